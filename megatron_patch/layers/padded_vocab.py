"""Padded vocabulary rows take no probability.

The embedding and output layer have ``padded_vocab_size`` rows (the true vocabulary rounded up
to make-vocab-size-divisible-by x TP, plus --extra-vocab-size), so without a mask the softmax
spreads probability over rows no token ever uses, and how much depends on TP: a random tiny
llama with a 117-token tokenizer measured loss ln 128 at TP1 and ln 256 at TP2. Here the output
layer's logits at or past the true vocabulary are set to -inf on each tensor-parallel rank's own
slice (the vocabulary is never gathered for it), so the loss, greedy choice, sampling and every
log-probability computed from the logits see only real tokens. exp(-inf) = 0 keeps megatron-core's
vocab-parallel cross-entropy finite, and the fill's backward gives those rows no gradient.
"""
from __future__ import annotations

import torch


def padded_columns(width: int, vocab_size: int, padded_vocab_size: int, tp_rank: int,
                   tp_size: int) -> int:
    """Index of the first padded column in a logits tensor ``width`` wide: this rank's slice
    (``padded_vocab_size / tp_size`` columns) or the gathered vocabulary (all of them)."""
    first = 0 if width == padded_vocab_size else tp_rank * (padded_vocab_size // tp_size)
    return min(max(vocab_size - first, 0), width)


def mask_padded_logits(output_layer: torch.nn.Module, vocab_size: int, padded_vocab_size: int,
                       tp_rank: int, tp_size: int):
    """Hook megatron-core's output ``ColumnParallelLinear`` so its logits past ``vocab_size``
    are -inf. Returns the hook handle, or None when nothing is padded."""
    if vocab_size >= padded_vocab_size:
        return None

    def hook(module, inputs, output):
        logits, bias = output
        start = padded_columns(logits.shape[-1], vocab_size, padded_vocab_size, tp_rank, tp_size)
        if start < logits.shape[-1]:
            # In place on the padded columns only: the matmul's backward needs its inputs,
            # not its output, and a full masked copy of [tokens, vocab] would cost a pass. A
            # view (the decode kernels' output) is copied first: autograd forbids writing into
            # a view made inside a custom function.
            if logits._is_view():
                logits = logits.clone()
            logits.narrow(-1, start, logits.shape[-1] - start).fill_(float("-inf"))
        return logits, bias

    return output_layer.register_forward_hook(hook)
