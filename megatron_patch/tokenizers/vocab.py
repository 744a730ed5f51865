"""Vocabulary padding, shared by the tokenizers, the converter and the trainer."""
from __future__ import annotations


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128,
                      tensor_parallel: int = 1, extra_vocab_size: int = 0) -> int:
    """Rows of the Megatron embedding: ``vocab_size + extra_vocab_size`` rounded up to a multiple
    of ``make_vocab_size_divisible_by x tensor_parallel`` (Megatron-LM's rule, plus the seed's
    ``--extra-vocab-size`` rows for tokens a user adds later)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab size must be positive, got {vocab_size}")
    if extra_vocab_size < 0:
        raise ValueError(f"--extra-vocab-size must be >= 0, got {extra_vocab_size}")
    multiple = max(1, make_vocab_size_divisible_by) * max(1, tensor_parallel)
    wanted = vocab_size + extra_vocab_size
    return -(-wanted // multiple) * multiple
