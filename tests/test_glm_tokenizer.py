"""The ``chatglm`` / ``glm130b`` tokenizer types on SentencePiece files built here: GLM-130B's and
ChatGLM-6B's ids equal SAT 0.4.12's GLM130BTokenizer (over icetk's TextTokenizer) on the same
model; ChatGLM2/3's follow their tokenizer's rule (special tokens numbered after the pieces,
``[gMASK] sop`` first)."""
import json
import os
import shutil

import pytest
import sentencepiece

from helpers import REPO, run_python, train_tiny_sentencepiece, train_tiny_tokenizer
from megatron_patch.data.sft import encode_record
from megatron_patch.layers.glm_positions import prompt_ids
from megatron_patch.tokenizers import build_tokenizer
from megatron_patch.tokenizers.glm import GLM130B_ID_OFFSET
from megatron_patch.tokenizers.glm_files import token_count

TEXTS = [
    "Return the value of the attribute.",
    "line one\nline two\n\nthree",
    "\tindented\twith tabs",
    "two  spaces, eighty" + " " * 80 + "end",
    "eighty-one" + " " * 81 + "|, eighty-five" + " " * 85 + "|, 170" + " " * 170 + "|",
    " leading and trailing  ",
    "unseen characters: é, 中文, 😀",
    "a literal [gMASK] and <sop> stay text",
    "",
]


@pytest.fixture(scope="module")
def ice(tmp_path_factory):
    """(directory with an icetk-style ice_text.model, directory with a ChatGLM-6B-style one,
    SAT's answers on TEXTS)."""
    root = tmp_path_factory.mktemp("ice")
    base, v1 = root / "glm130b", root / "chatglm-6b"
    base.mkdir()
    v1.mkdir()
    train_tiny_sentencepiece(str(base / "ice_text.model"))
    texts = root / "texts.json"
    texts.write_text(json.dumps(TEXTS))
    run_python([os.path.join(REPO, "tests", "sat_reference.py"), "tokenize", str(base),
                str(texts), str(root / "sat.json"), "--save-v1", str(v1 / "ice_text.model")])
    return base, v1, json.loads((root / "sat.json").read_text())


def test_glm130b_ids_equal_sat(ice):
    base, _, sat = ice
    tokenizer = build_tokenizer("glm130b", str(base))
    assert tokenizer.tokenize_batch(TEXTS) == sat["ids"]
    assert [tokenizer.tokenize(text) for text in TEXTS] == sat["ids"]
    assert [tokenizer.detokenize(ids) for ids in sat["ids"]] == sat["decoded"]
    special = sat["special"]
    assert tokenizer.special_ids == dict(
        mask=special["[MASK]"], gmask=special["[gMASK]"], smask=special["[sMASK]"],
        sop=special["<sop>"], eop=special["<eop>"])
    # the release's numbering: its 130000 pieces put [gMASK] at 150001 and </s> at 20002
    assert special["[gMASK]"] == GLM130B_ID_OFFSET + 320 + 1
    assert tokenizer.eod == special["</s>"] == GLM130B_ID_OFFSET + 2
    assert tokenizer.vocab_size == sat["num_tokens"] == GLM130B_ID_OFFSET + 320 + 8 + 80 + 256
    assert tokenizer.pad == tokenizer.eod
    assert token_count(str(base), "glm130b") == tokenizer.vocab_size  # the way to HF's count
    # every id is a real one, and the preprocessing is undone on the way back
    assert max(max(ids) for ids in sat["ids"] if ids) < tokenizer.vocab_size
    assert tokenizer.detokenize(tokenizer.tokenize(TEXTS[3])) == TEXTS[3]
    # the whole file is read by the model file's name too, not only by its directory
    assert build_tokenizer("glm130b", str(base / "ice_text.model")).tokenize(TEXTS[4]) == \
        sat["ids"][4]


def test_chatglm_6b_ids_equal_sat_without_the_offset(ice):
    _, v1, sat = ice
    tokenizer = build_tokenizer("chatglm", str(v1))
    assert tokenizer.tokenize_batch(TEXTS) == [
        [index - GLM130B_ID_OFFSET for index in ids] for ids in sat["ids"]]
    special = {name: index - GLM130B_ID_OFFSET for name, index in sat["special"].items()}
    assert tokenizer.special_ids == dict(
        mask=special["[MASK]"], gmask=special["[gMASK]"], smask=special["[sMASK]"],
        sop=special["<sop>"], eop=special["<eop>"])
    # ChatGLM-6B's own numbering: [MASK] right after the text pieces, <sop> 4 later, pad 3
    assert (special["[MASK]"], special["<sop>"]) == (320, 324)
    assert tokenizer.eod == special["<eop>"] and tokenizer.pad == special["<pad>"] == 3
    assert tokenizer.bos == special["<sop>"]
    assert token_count(str(v1), "chatglm") == tokenizer.vocab_size == 320 + 8 + 80 + 256
    assert [tokenizer.detokenize(ids) for ids in tokenizer.tokenize_batch(TEXTS)] == \
        sat["decoded"]
    # the prompt builder ends a prompt as ChatGLM-6B's tokenizer does: text [gMASK] <sop>
    ids = tokenizer.tokenize(TEXTS[0])
    prefix_lm = dict(tokenizer.special_ids, pad=tokenizer.pad)
    assert prompt_ids(ids, prefix_lm) == ids + [special["[gMASK]"], special["<sop>"]]


@pytest.fixture(scope="module")
def chatglm2(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatglm2")
    train_tiny_sentencepiece(str(root / "tokenizer.model"), vocab_size=700,
                             byte_fallback=True, user_defined=())
    return root


def test_chatglm2_and_3_number_their_special_tokens_after_the_pieces(chatglm2, tmp_path):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(chatglm2 / "tokenizer.model"))
    size = processor.get_piece_size()
    tokenizer = build_tokenizer("chatglm", str(chatglm2))
    assert tokenizer.special_ids == dict(mask=size, gmask=size + 1, smask=size + 2, sop=size + 3,
                                         eop=size + 4)
    assert tokenizer.vocab_size == token_count(str(chatglm2), "chatglm") == size + 5
    for text in TEXTS:
        assert tokenizer.tokenize(text) == [size + 1, size + 3] + processor.encode(text)
        assert tokenizer.tokenize_text(text) == processor.encode(text)
    assert tokenizer.eod == processor.eos_id() and tokenizer.pad == processor.unk_id() == 0
    assert tokenizer.detokenize(tokenizer.tokenize("a b")) == "[gMASK]sopa b"
    # ChatGLM3: its tokenization_chatglm.py declares four role tokens after the five
    chatglm3 = tmp_path / "chatglm3"
    chatglm3.mkdir()
    shutil.copy(chatglm2 / "tokenizer.model", chatglm3)
    (chatglm3 / "tokenization_chatglm.py").write_text(
        'role_special_tokens = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]\n')
    three = build_tokenizer("chatglm", str(chatglm3))
    assert three.vocab_size == token_count(str(chatglm3), "chatglm") == size + 9 and three.vocab["<|observation|>"] == size + 8
    assert three.special_ids == tokenizer.special_ids


def test_chatglm2_sft_samples_start_with_gmask_sop_once(chatglm2):
    tokenizer = build_tokenizer("chatglm", str(chatglm2))
    ids, mask = encode_record({"instruction": "Say hi.", "input": "", "output": "hi"}, tokenizer)
    head = [tokenizer.special_ids["gmask"], tokenizer.special_ids["sop"]]
    assert list(ids[:2]) == head and list(mask[:2]) == [0, 0]
    assert head[0] not in ids[2:] and head[1] not in ids[2:]
    assert ids[-1] == tokenizer.eod and mask[-1] == 1


def test_errors_name_the_path_and_what_to_give(tmp_path, chatglm2):
    with pytest.raises(FileNotFoundError, match="does not exist.*ice_text.model or "
                                                "tokenizer.model"):
        build_tokenizer("glm130b", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="none of tokenizer.json, ice_text.model"):
        build_tokenizer("chatglm", str(tmp_path))
    tiktoken = tmp_path / "glm4" / "tokenizer.model"
    tiktoken.parent.mkdir()
    tiktoken.write_text("IQ== 0\nIg== 1\n")  # GLM-4's file: base64 token, rank
    with pytest.raises(ValueError, match="not a SentencePiece model.*GLM-4.*tokenizer.json"):
        build_tokenizer("chatglm", str(tiktoken.parent))
    # an HF fast tokenizer directory (GLM-4's) still loads as one
    hf = train_tiny_tokenizer(str(tmp_path / "hf"), vocab_size=280)
    shutil.copy(chatglm2 / "tokenizer.model", hf)  # tokenizer.json wins
    assert type(build_tokenizer("chatglm", hf)).__name__ == "HFTokenizer"


def test_a_tokenizer_of_another_release_is_refused(ice):
    """The trainer and generation compare a GLM tokenizer's special ids with the config's."""
    from megatron_patch.tokenizers.glm_files import check_special_ids

    _, v1, _ = ice
    tokenizer = build_tokenizer("chatglm", str(v1))
    own = dict(tokenizer.special_ids, pad=tokenizer.pad)
    check_special_ids(tokenizer, own, "here")  # the same ids pass
    check_special_ids(tokenizer, None, "here")  # a causal model (ChatGLM2) names none
    release = dict(sop=130004, gmask=130001, mask=130000, pad=3, eop=130005)  # chatglm-6b's
    with pytest.raises(ValueError, match=r"here: .*gmask 321 \(tokenizer\) vs 130001 \(model\)"):
        check_special_ids(tokenizer, release, "here")


def test_preprocessing_writes_the_tokenizers_ids(ice, tmp_path):
    """GLM-130B's ice_text.model through the data tool: megatron-core's own reader gives each
    document's ids (offset, whitespace pieces) and the eod."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_patch.data import preprocess

    base, _, _ = ice
    texts = TEXTS[:-1]  # an empty document is skipped (and counted) by the tool
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert preprocess.main(["--input", str(tmp_path / "docs.jsonl"), "--tokenizer-type",
                            "glm130b", "--tokenizer-model", str(base), "--output-prefix",
                            str(tmp_path / "out"), "--append-eod", "--workers", "1"]) == 0
    tokenizer = build_tokenizer("glm130b", str(base))
    documents = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [list(documents[i]) for i in range(len(documents))] == [
        tokenizer.tokenize(text) + [tokenizer.eod] for text in texts]
