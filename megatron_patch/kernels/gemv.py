"""``y = x @ W.T`` for a few rows of ``x``: a matrix-vector product per row that reads ``W`` once.

At batch 1 a decode step's linear layers are matrix-vector products; their speed is how fast
the weights stream from memory. Each program computes ``BLOCK_N`` outputs of one row of ``x``:
it walks ``BLOCK_N`` rows of ``W`` in ``BLOCK_K``-wide tiles, multiplying and adding in fp32
elementwise, and reduces once at the end. Programs of the rows of ``x`` that share a tile of
``W`` are neighbours in the launch order, so with several rows the tile comes from L2 after the
first read. The tile shape comes from :func:`choose_config` (swept on an H200 by
toolkits/benchmarks/bench_kernels.py).

Numerics: products and sums in fp32, one rounding to the output dtype (cuBLAS also accumulates
in fp32; the order of the sums differs, so results agree to rounding, not bit for bit).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_patch.kernels import interpreting


def choose_config(rows: int, outputs: int, inner: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps). 2 x 1024 tiles with 4 warps were the fastest at one row
    for every linear layer of a ~1B Llama on an H200 (8.1 us for 6144 x 2048 where cuBLAS takes
    10.0; 31.6 us for the 32000 x 2048 output layer, cuBLAS 34.9; bench_kernels.py --sweep)."""
    if interpreting():  # big tiles: the interpreter's cost is per program
        return 32, 64, 1
    return 2, 1024, 4


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    m = pid % M                      # the rows of x sharing a tile of W run side by side
    rows = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        k_ok = k < K
        x = tl.load(x_ptr + m * stride_xm + k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * stride_wn + k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + m * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def launch(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, config=None) -> None:
    """``out`` = ``x`` @ ``weight``.T with ``config`` (BLOCK_N, BLOCK_K, num_warps), or the
    chosen one; no checks (see :func:`gemv`)."""
    rows, inner = x.shape
    outputs = weight.size(0)
    block_n, block_k, warps = config or choose_config(rows, outputs, inner)
    _gemv_kernel[(rows * triton.cdiv(outputs, block_n),)](
        x, weight, out, rows, outputs, inner, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)


@torch.library.custom_op("megatron_patch::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` [M, K] @ ``weight`` [N, K].T -> [M, N] in ``x``'s dtype (M small: it reads W
    once per row; generation/decode_kernels.py uses it for one row)."""
    if x.dim() != 2 or weight.dim() != 2 or x.size(1) != weight.size(1):
        raise ValueError(f"gemv: x [M, K] and weight [N, K] expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    y = torch.empty(x.size(0), weight.size(0), dtype=x.dtype, device=x.device)
    if x.size(0):
        launch(x, weight, y)
    return y


@gemv.register_fake
def _(x, weight):
    return x.new_empty(x.size(0), weight.size(0))
