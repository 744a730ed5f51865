"""Train a small byte-level BPE tokenizer and save it as a HuggingFace tokenizer directory.

The quickstart trains one on its corpus and the tests train tiny ones, so no tokenizer is ever
downloaded. The directory loads with ``transformers.AutoTokenizer.from_pretrained``.
"""
from __future__ import annotations

import os
from typing import Iterable

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                  "pad_token": "<pad>"}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str,
                        min_frequency: int = 2) -> str:
    """Train byte-level BPE on ``texts``; write ``output_dir`` (tokenizer.json + configs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    os.makedirs(output_dir, exist_ok=True)
    wrapped.save_pretrained(output_dir)
    return output_dir
