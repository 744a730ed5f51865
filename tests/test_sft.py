"""SFT data: templates, response-only loss masks, truncation, packing, attention mask, mmap.

The masks are checked independently of how they are built: the labels under the loss mask are
detokenized and compared with the response texts of the records.
"""
from __future__ import annotations

import json
import logging
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import run_python, train_tiny_tokenizer
from megatron_patch.data.sft import SFTDataset
from megatron_patch.data.sft_packing import build_attention_mask, collate, first_fit_pack
from megatron_patch.data.sft_preprocess import preprocess_sft

SEQ = 256  # the tiny tokenizer needs about 100 tokens for an Alpaca prompt
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ALPACA = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris, of course."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Return the list sorted.", "input": "[3, 1, 2]", "output": "[1, 2, 3]"},
    {"instruction": "Say nothing.", "output": ""},
]
CHAT = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "Six, as a string of the object."},
]}


class HFTokenizer:
    """The interface SFT data needs, over an HF tokenizer (stands in for build_tokenizer)."""

    def __init__(self, hf_tokenizer):
        self.hf_tokenizer = hf_tokenizer
        self.eod, self.pad = hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id
        self.bos, self.vocab_size = hf_tokenizer.bos_token_id, len(hf_tokenizer)

    def tokenize(self, text):
        """Like Megatron-LM's HF tokenizer: LLaMA-style, a BOS before every text."""
        return [self.bos] + self.hf_tokenizer(text).input_ids

    def detokenize(self, ids):
        return self.hf_tokenizer.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="module")
def chatml_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    hf_tokenizer.chat_template = CHATML
    return HFTokenizer(hf_tokenizer)


def learned_texts(item, tokenizer) -> list[str]:
    """The labels under the loss mask, detokenized and cut at each eod."""
    texts, current = [], []
    for label in item["labels"][item["loss_mask"] == 1]:
        if label == tokenizer.eod:
            texts.append(tokenizer.detokenize(current))
            current = []
        else:
            current.append(label)
    assert current == [], "every response ends with a learned eod"
    return texts


def sequence_text(item, tokenizer) -> str:
    return tokenizer.detokenize(item["tokens"][item["segment_ids"] > 0])


# ------------------------------------------------------------------------- templates and masks


def test_loss_mask_covers_exactly_the_responses(tokenizer):
    dataset = SFTDataset(ALPACA, tokenizer, seq_length=SEQ)
    assert len(dataset) == len(ALPACA)
    for record, item in zip(ALPACA, dataset):
        assert learned_texts(item, tokenizer) == [record["output"]]
        assert item["loss_mask"].sum() == len(tokenizer.tokenize(record["output"]))  # + eod - bos
        assert (item["tokens"] == tokenizer.bos).sum() == 1, "one BOS, not one per piece"


def test_alpaca_templates_with_and_without_input(tokenizer):
    dataset = SFTDataset(ALPACA[:2], tokenizer, seq_length=SEQ)
    head = "Below is an instruction that describes a task"
    without = (f"{head}. Write a response that appropriately completes the request.\n\n"
               "### Instruction:\nName the capital of France.\n\n### Response:")
    with_input = (f"{head}, paired with an input that provides further context. Write a "
                  "response that appropriately completes the request.\n\n### Instruction:\n"
                  "Translate to French.\n\n### Input:\nGood morning\n\n### Response:")
    for item, prompt, record in zip(dataset, (without, with_input), ALPACA):
        assert sequence_text(item, tokenizer) == f"<s>{prompt}{record['output']}</s>"
        first_learned = int(np.argmax(item["loss_mask"]))
        assert tokenizer.detokenize(item["tokens"][1:first_learned + 1]) == prompt


def test_chat_fallback_template_masks_only_assistant_turns(tokenizer):
    item = SFTDataset([CHAT], tokenizer, seq_length=SEQ)[0]
    assert learned_texts(item, tokenizer) == ["It is 4.", "Six, as a string of the object."]
    assert sequence_text(item, tokenizer) == (
        "<s><|system|>\nYou are terse.\n<|user|>\nWhat is 2 + 2?\n<|assistant|>\nIt is 4.</s>"
        "<|user|>\nAnd 3 + 3?\n<|assistant|>\nSix, as a string of the object.</s>")


def test_chat_template_masks_only_assistant_turns(chatml_tokenizer):
    tokenizer = chatml_tokenizer
    item = SFTDataset([CHAT], tokenizer, seq_length=SEQ)[0]
    rendered = tokenizer.hf_tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert sequence_text(item, tokenizer) == rendered + "</s>"
    assert learned_texts(item, tokenizer) == [
        "It is 4.<|im_end|>\nSix, as a string of the object.<|im_end|>\n"]
    # A conversation ending with a user turn learns no eod after it.
    asked = SFTDataset([{"messages": CHAT["messages"][:4]}], tokenizer, seq_length=SEQ)[0]
    learned = asked["labels"][asked["loss_mask"] == 1]
    assert tokenizer.detokenize(learned) == "It is 4.<|im_end|>\n"


def test_truncation_and_samples_without_response_are_counted(tokenizer, caplog):
    long_output = {"instruction": "Go on.", "output": "and on " * 40}
    long_prompt = {"instruction": "Read this. " * 40, "output": "Done."}
    with caplog.at_level(logging.WARNING):
        dataset = SFTDataset([ALPACA[0], long_output, long_prompt], tokenizer, seq_length=120)
    stats = dataset.stats
    assert (stats.read, stats.kept, stats.truncated, stats.dropped_no_response) == (3, 2, 2, 1)
    assert "2 truncated to 120 tokens, 1 dropped with no response token left" in caplog.text
    truncated = dataset[1]
    assert (truncated["segment_ids"] == 1).all() and truncated["loss_mask"].sum() > 0


def test_bad_records_name_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match="data.jsonl:2: invalid JSON"):
        SFTDataset(str(path), tokenizer, seq_length=SEQ)
    path.write_text(json.dumps(ALPACA[0]) + "\n\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(ValueError, match="data.jsonl:3: an instruction record needs"):
        SFTDataset(str(path), tokenizer, seq_length=SEQ)


# ------------------------------------------------------------------------------------ packing


def reference_first_fit(lengths, capacity):
    """The textbook first fit, scanning every open sequence."""
    bins, room = [], []
    for index, length in enumerate(lengths):
        slot = next((b for b, free in enumerate(room) if free >= length), len(bins))
        if slot == len(bins):
            bins.append([])
            room.append(capacity)
        bins[slot].append(index)
        room[slot] -= length
    return bins


def test_first_fit_pack():
    assert first_fit_pack([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]
    lengths = [random.Random(0).randint(1, 64) for _ in range(500)]
    assert first_fit_pack(lengths, 64) == reference_first_fit(lengths, 64)


def packed_records():
    return [dict(r, output=r["output"] + " " + str(i)) for i in range(3) for r in ALPACA]


def test_packing_restarts_positions_and_keeps_samples_intact(tokenizer):
    single = SFTDataset(packed_records(), tokenizer, seq_length=SEQ)
    packed = SFTDataset(packed_records(), tokenizer, seq_length=SEQ, packing=True)
    assert len(packed) < len(single)
    assert sorted(j for group in packed.groups for j in group) == list(range(len(single)))
    for index, group in enumerate(packed.groups):
        item = packed[index]
        for segment, j in enumerate(group, 1):
            at = item["segment_ids"] == segment
            alone = single[j]
            assert (item["position_ids"][at] == np.arange(at.sum())).all()
            for name in ("tokens", "labels", "loss_mask"):
                assert (item[name][at] == alone[name][alone["segment_ids"] == 1]).all()


def test_attention_mask_keeps_packed_samples_apart(tokenizer):
    packed = SFTDataset(packed_records(), tokenizer, seq_length=SEQ, packing=True)
    batch = collate([packed[0], packed[1]])
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, SEQ, SEQ) and mask.dtype == torch.bool
    torch.manual_seed(0)
    embedding = torch.randn(tokenizer.vocab_size, 32, dtype=torch.float64)
    weights = [torch.randn(32, 32, dtype=torch.float64) for _ in range(3)]

    def attend(tokens, **kwargs):
        x = embedding[tokens]
        q, k, v = (x @ w for w in weights)
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    # torch's boolean attn_mask is True where attention is allowed, megatron-core's the reverse.
    out = attend(batch["tokens"], attn_mask=~mask[:, 0])
    assert not out.isnan().any()
    for row in range(2):
        segments = batch["segment_ids"][row]
        assert segments.max() > 1, "the check needs packed samples"
        for segment in range(1, int(segments.max()) + 1):
            at = segments == segment
            alone = attend(batch["tokens"][row][at], is_causal=True)
            assert torch.allclose(out[row][at], alone, atol=1e-10)
    assert (build_attention_mask(batch["segment_ids"][0]) == mask[:1]).all()


def test_items_and_collate_types(tokenizer):
    item = SFTDataset(ALPACA, tokenizer, seq_length=SEQ)[0]
    assert {name: (array.dtype, array.shape) for name, array in item.items()} == {
        "tokens": (np.int64, (SEQ,)), "labels": (np.int64, (SEQ,)),
        "loss_mask": (np.float32, (SEQ,)), "position_ids": (np.int64, (SEQ,)),
        "segment_ids": (np.int64, (SEQ,))}
    padding = item["segment_ids"] == 0
    assert padding.any() and (item["tokens"][padding] == tokenizer.pad).all()
    assert (item["labels"][padding] == tokenizer.pad).all() and not item["loss_mask"][padding].any()


# ----------------------------------------------------------------------------- mmap files


@pytest.mark.parametrize("packing", [False, True])
def test_mmap_round_trip_equals_in_memory_dataset(tmp_path, tokenizer, packing):
    source = tmp_path / "sft.json"
    source.write_text(json.dumps(packed_records() + [CHAT], indent=1))
    prefix = str(tmp_path / "out" / "sft")
    stats = preprocess_sft(str(source), prefix, tokenizer, seq_length=SEQ, packing=packing)
    memory = SFTDataset(str(source), tokenizer, seq_length=SEQ, packing=packing)
    stored = SFTDataset.from_mmap(prefix, tokenizer, seq_length=SEQ)
    assert stats.kept == len(packed_records()) + 1 and len(stored) == len(memory)
    for index in range(len(memory)):
        for name, array in memory[index].items():
            assert np.array_equal(stored[index][name], array), (index, name)
    assert sorted(os.listdir(tmp_path / "out")) == [
        f"sft_{name}_document.{ext}" for name in ("loss_mask", "tokens") for ext in ("bin", "idx")]
    with pytest.raises(ValueError, match="does not fit"):
        SFTDataset.from_mmap(prefix, tokenizer, seq_length=16)


def test_preprocess_cli_with_the_tokenizer_builder(tmp_path, tokenizer, tokenizer_dir):
    from megatron_patch.tokenizers import build_tokenizer

    real = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    source = tmp_path / "sft.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in packed_records() + [CHAT]))
    prefix = str(tmp_path / "sft")
    proc = run_python(["-m", "megatron_patch.data.sft_preprocess", "--input", str(source),
                       "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
                       "--tokenizer-model", tokenizer_dir, "--seq-length", str(SEQ), "--packing"])
    assert json.loads(proc.stdout.splitlines()[-1])["kept"] == len(packed_records()) + 1
    memory = SFTDataset(str(source), real, seq_length=SEQ, packing=True)
    stored = SFTDataset.from_mmap(prefix, real, seq_length=SEQ)
    assert len(stored) == len(memory)
    assert all(np.array_equal(stored[i]["tokens"], memory[i]["tokens"]) for i in range(len(memory)))
