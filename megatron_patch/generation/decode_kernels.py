"""Decode steps of our static-cache backends through megatron_patch.kernels (Triton): at batch
sizes up to ``MAX_BATCH`` each linear layer becomes a matrix-vector kernel and the core
attention of the one-token step becomes flash-decoding over the cache.

The model's modules and weights stay the same: every ColumnParallelLinear / RowParallelLinear
gets an instance ``_forward_impl`` (the call megatron-core makes for its matrix product, inside
the tensor-parallel communication) that takes the kernel path only while the static cache is
active with kernels on (``CacheHolder.kernels``); anything else (prefill, training, the mcore
backend on the same model) runs megatron-core's own path.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_patch import kernels

CHOICES = ("auto", "on", "off")
# Decode steps of at most this many rows take the kernel path. Measured on an H200 (~1B Llama):
# at batch 1 the kernels raise decode from 963 to 1,123 tokens/s (bench_generation.py); at batch
# 16 the attention kernel lowered it from 13,474 to 13,097, and the matrix-vector kernel loses
# to cuBLAS on three of the five layer shapes already at 2 rows (bench_kernels.py --sweep).
MAX_BATCH = 1
MAX_HEAD_DIM = 256  # the attention kernel holds a [BLOCK_S, head dim] fp32 tile per operand


def head_dim_supported(head_dim: int) -> bool:
    """The attention kernel's head dims: powers of two up to MAX_HEAD_DIM."""
    return 0 < head_dim <= MAX_HEAD_DIM and head_dim & (head_dim - 1) == 0


def resolve(choice: str, device: torch.device, backend: str,
            head_dim: Optional[int] = None, alibi: bool = False) -> bool:
    """``--decode-kernels`` for ``backend`` on ``device`` (and a model of ``head_dim``, once
    known): auto = on for the CUDA-graph backends on a GPU with Triton importable; on =
    required (ValueError saying what is missing). The attention kernel adds no ALiBi bias, so
    an ALiBi model (``alibi``) keeps SDPA."""
    if choice not in CHOICES:
        raise ValueError(f"--decode-kernels {choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "off" or (choice == "auto" and alibi):
        return False
    if alibi:
        raise ValueError("--decode-kernels on: the attention kernel has no ALiBi bias, which "
                         "this model needs (use --decode-kernels off)")
    static_cache = backend in ("static", "graph", "graph-compiled")
    usable_head = head_dim is None or head_dim_supported(head_dim)
    if choice == "auto":
        return (static_cache and backend != "static" and device.type == "cuda"
                and kernels.triton_importable() and usable_head)
    if not usable_head:
        raise ValueError(f"--decode-kernels on: the attention kernel needs a head dim that is a "
                         f"power of two up to {MAX_HEAD_DIM}; this model's is {head_dim} (use "
                         f"--decode-kernels off)")
    if not static_cache:
        raise ValueError(f"--decode-kernels on needs our static cache (--inference-backend "
                         f"static, graph or graph-compiled), not {backend!r}")
    if not kernels.triton_importable():
        raise ValueError("--decode-kernels on needs Triton (pip install triton)")
    if not kernels.supported_on(device):
        raise ValueError("--decode-kernels on needs a GPU (on a CPU only under Triton's "
                         "interpreter: TRITON_INTERPRET=1)")
    return True


def install(model, holder) -> None:
    """Give every tensor-parallel linear layer of ``model`` the kernel path (once)."""
    # Importing registers torch.ops.megatron_patch.gemv / decode_attention.
    from megatron_patch.kernels import decode_attention, gemv  # noqa: F401
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_patch.layers.alibi_attention import ALiBiAttention

    if getattr(model, "_decode_kernels_installed", False):
        return
    if any(isinstance(module, ALiBiAttention) for module in model.modules()):
        raise ValueError("the Triton decode attention kernel adds no ALiBi bias, which this "
                         "model needs: decode without the kernels (--decode-kernels off)")
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            module._forward_impl = _linear_impl(module._forward_impl, holder)
    model._decode_kernels_installed = True


def _linear_impl(fallback, holder):
    """megatron-core's ``_forward_impl(input, weight, bias, ...)`` with a matrix-vector path."""

    def forward_impl(input, weight, bias=None, *args, **kwargs):
        rows = input.numel() // input.size(-1)
        if (holder.active and holder.kernels and rows <= MAX_BATCH
                and not kwargs.get("sequence_parallel")):
            out = torch.ops.megatron_patch.gemv(input.reshape(rows, input.size(-1)), weight)
            out = out.view(*input.shape[:-1], weight.size(0))
            return out if bias is None else out + bias
        return fallback(input, weight, bias, *args, **kwargs)

    return forward_impl
