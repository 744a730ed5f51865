"""build_tokenizer: every seed name, SentencePiece, errors and vocabulary padding, checked against
the tokenizer libraries' own answers."""
from __future__ import annotations

import pytest
from helpers import train_tiny_tokenizer

from megatron_patch.tokenizers import TOKENIZER_TYPES, build_tokenizer

TEXTS = ["Return the absolute value of the argument.",
         "  Leading spaces, unicode: café, naïve — and digits 12345.\n",
         "",
         "def f(x):\n    return x ** 2  # squares"]
HF_NAMES = ["bloombpe", "llamabpe", "falconbpe", "galacticabpe", "chatglm", "glm130b",
            "HuggingFaceTokenizer"]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("bpe")))


def _variant(bpe_dir: str, out_dir: str, add_bos: bool = False, drop_pad: bool = False,
             added_tokens: tuple = ()) -> str:
    """The tiny tokenizer re-saved: a LLaMA-style BOS post-processor, no pad, added tokens."""
    from tokenizers import processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source = AutoTokenizer.from_pretrained(bpe_dir)
    backend = source.backend_tokenizer
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", source.bos_token_id)])
    tokens = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if not drop_pad:
        tokens["pad_token"] = "<pad>"
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)
    wrapped.add_tokens(list(added_tokens))
    wrapped.save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("name", HF_NAMES)
def test_hf_names_match_transformers(bpe_dir, name):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(bpe_dir)
    tokenizer = build_tokenizer(name, bpe_dir)
    assert [tokenizer.tokenize(t) for t in TEXTS] == [reference(t).input_ids for t in TEXTS]
    assert tokenizer.tokenize_batch(TEXTS) == [reference(t).input_ids for t in TEXTS]
    assert tokenizer.vocab_size == len(reference)
    assert (tokenizer.eod, tokenizer.bos, tokenizer.pad) == (
        reference.eos_token_id, reference.bos_token_id, reference.pad_token_id)
    assert tokenizer.detokenize(tokenizer.tokenize(TEXTS[1])) == TEXTS[1]
    assert tokenizer.hf_tokenizer.get_vocab() == reference.get_vocab()
    assert tokenizer.inv_vocab[tokenizer.eod] == "</s>"


def test_megatron_core_interface(bpe_dir):
    from megatron.core.datasets import megatron_tokenizer

    base = getattr(megatron_tokenizer, "MegatronLegacyTokenizer", None) or getattr(
        megatron_tokenizer, "MegatronTokenizer")
    tokenizer = build_tokenizer("BloomBPE", bpe_dir)  # names are case-insensitive
    assert isinstance(tokenizer, base)
    assert tokenizer.tokenizer_type == "bloombpe"
    assert tokenizer.unique_identifiers["tokenizer_path"] == [bpe_dir]


def test_bos_post_processor_pad_fallback_and_added_tokens(bpe_dir, tmp_path):
    from transformers import AutoTokenizer

    path = _variant(bpe_dir, str(tmp_path / "llama_like"), add_bos=True, drop_pad=True,
                    added_tokens=("<extra_0>", "<extra_1>"))
    reference = AutoTokenizer.from_pretrained(path)
    tokenizer = build_tokenizer("llamabpe", path)
    expected = [reference(t).input_ids for t in TEXTS]
    assert all(ids[0] == reference.bos_token_id for ids in expected)
    assert tokenizer.tokenize_batch(TEXTS) == expected
    assert tokenizer.tokenize("a <extra_1> b") == reference("a <extra_1> b").input_ids
    assert tokenizer.vocab_size == len(AutoTokenizer.from_pretrained(bpe_dir)) + 2
    assert reference.pad_token_id is None and tokenizer.pad == tokenizer.eod


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    import sentencepiece

    from megatron_patch.data.corpus import iter_stdlib_docstrings

    work = tmp_path_factory.mktemp("spm")
    with open(work / "corpus.txt", "w", encoding="utf-8") as out:
        for _, text in zip(range(300), iter_stdlib_docstrings()):
            out.write(text.replace("\n", " ") + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(work / "corpus.txt"), model_prefix=str(work / "tiny"), vocab_size=300,
        model_type="bpe", minloglevel=2)
    return str(work / "tiny.model")


@pytest.mark.parametrize("name", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer"])
def test_sentencepiece(spm_model, name):
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    tokenizer = build_tokenizer(name, spm_model)
    assert [tokenizer.tokenize(t) for t in TEXTS] == [reference.encode(t) for t in TEXTS]
    assert tokenizer.tokenize_batch(TEXTS) == [reference.encode(t) for t in TEXTS]
    assert tokenizer.vocab_size == reference.get_piece_size() == 300
    assert (tokenizer.eod, tokenizer.bos) == (reference.eos_id(), reference.bos_id())
    assert reference.pad_id() == -1 and tokenizer.pad == tokenizer.eod
    assert tokenizer.hf_tokenizer is None
    assert tokenizer.detokenize(tokenizer.tokenize(TEXTS[0])) == TEXTS[0]


def test_extra_vocab_padding(bpe_dir):
    tokenizer = build_tokenizer("bloombpe", bpe_dir, extra_vocab_size=300,
                                make_vocab_size_divisible_by=128, tensor_model_parallel_size=2)
    assert tokenizer.vocab_size == 500
    assert tokenizer.padded_vocab_size == 1024  # 500 + 300 = 800, next multiple of 256
    assert build_tokenizer("bloombpe", bpe_dir).padded_vocab_size == 512


def test_unknown_type_lists_valid_names(bpe_dir):
    with pytest.raises(ValueError) as err:
        build_tokenizer("gpt2bpe", bpe_dir)
    message = str(err.value)
    assert "--tokenizer-type 'gpt2bpe'" in message
    assert all(name in message for name in TOKENIZER_TYPES)


def test_missing_or_unusable_paths(tmp_path, spm_model):
    missing = str(tmp_path / "no_such_tokenizer")
    with pytest.raises(FileNotFoundError, match="--tokenizer-model.*no_such_tokenizer"):
        build_tokenizer("llamabpe", missing)
    with pytest.raises(FileNotFoundError, match="--tokenizer-model.*no_such_tokenizer"):
        build_tokenizer("SentencePieceTokenizer", missing)
    with pytest.raises(ValueError, match="--tokenizer-model is required"):
        build_tokenizer("bloombpe", "")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match="empty"):
        build_tokenizer("chatglm", str(empty))
    # A hub id is not a local directory: an error, never a download.
    with pytest.raises(FileNotFoundError, match="does not exist.*nothing is downloaded"):
        build_tokenizer("bloombpe", "bigscience/bloom-560m")
    # A file (tokenizer.json itself) is named as such, with the directory asked for.
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="is a file, not a directory.*give the directory"):
        build_tokenizer("llamabpe", str(tmp_path / "tokenizer.json"))
