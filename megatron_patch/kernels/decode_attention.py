"""Attention of one new token per row over a static KV cache (flash-decoding).

A decode step's attention at batch 1 has a handful of (row, head) pairs, too few to keep a GPU
busy if each reads all its keys alone (cuDNN's SDPA with one query takes ~8 us a layer on an
H200 at a 384-slot window). Here the keys of each (row, head) are split into ``splits`` chunks:
pass 1 computes, per chunk, the running max, the softmax denominator and the unnormalised
weighted sum of values (online softmax, fp32); pass 2 merges the chunks, run by whichever chunk
of the (row, head) finishes last (an atomic counter), so one kernel launch does both. With one
chunk pass 1 writes the output itself.

Layouts are megatron-core's and our static cache's (generation/static_cache.py): the query
[b, heads, head dim]; the caches [max slots, b, query groups, head dim], of which the first
``window`` slots are read; ``masked`` [b, window] bool, True where a slot must not be attended
(megatron-core's convention). Every row must have at least one visible slot (a decode step
always sees its own token).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_patch.kernels import interpreting

BLOCK_S = 16  # keys per iteration of pass 1 (default of :func:`launch`)


@triton.jit
def _partial_kernel(q_ptr, k_ptr, v_ptr, masked_ptr, last_ptr, out_ptr, part_ptr, stats_ptr,
                    count_ptr, heads, window, keys_per_split, scale,
                    stride_qb, stride_qh, stride_ks, stride_kb, stride_kg,
                    stride_vs, stride_vb, stride_vg, stride_mb, stride_ob, stride_oh,
                    HEADS_PER_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_S: tl.constexpr, SPLITS: tl.constexpr, HAS_LAST: tl.constexpr):
    row_head = tl.program_id(0)
    split = tl.program_id(1)
    b = row_head // heads
    h = row_head % heads
    g = h // HEADS_PER_GROUP
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale
    running_max = -float("inf")
    denominator = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, window)
    if HAS_LAST:  # slots after the one written this step are empty: not read at all
        end = tl.minimum(end, tl.load(last_ptr).to(tl.int32) + 1)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        in_range = s < end
        hidden = tl.load(masked_ptr + b * stride_mb + s, mask=in_range, other=1)
        visible = in_range & (hidden == 0)
        k = tl.load(k_ptr + s[:, None] * stride_ks + b * stride_kb + g * stride_kg + d[None, :],
                    mask=in_range[:, None], other=0.0).to(tl.float32)
        scores = tl.where(visible, tl.sum(k * q[None, :], axis=1), -float("inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        # Nothing visible yet: keep the exponentials at 0 instead of exp(-inf + inf) = NaN.
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)
        rescale = tl.exp(running_max - shift)
        p = tl.exp(scores - shift)
        v = tl.load(v_ptr + s[:, None] * stride_vs + b * stride_vb + g * stride_vg + d[None, :],
                    mask=in_range[:, None], other=0.0).to(tl.float32)
        denominator = denominator * rescale + tl.sum(p, axis=0)
        acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
        running_max = new_max
    if SPLITS == 1:
        out = acc / denominator
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))
    else:
        part = row_head * SPLITS + split
        tl.store(part_ptr + part * HEAD_DIM + d, acc)
        tl.store(stats_ptr + part * 2, running_max)
        tl.store(stats_ptr + part * 2 + 1, denominator)
        # Every thread's stores are issued; the counter's acq_rel atomic publishes them. The
        # chunk that finishes last for this (row, head) merges all of them.
        tl.debug_barrier()
        finished = tl.atomic_add(count_ptr + row_head, 1)
        if finished == SPLITS - 1:
            _merge(part_ptr, stats_ptr, out_ptr + b * stride_ob + h * stride_oh, row_head,
                   HEAD_DIM, SPLITS)
            tl.store(count_ptr + row_head, 0)  # ready for the next call (graph replays)


@triton.jit
def _merge(part_ptr, stats_ptr, out_ptr, row_head, HEAD_DIM: tl.constexpr,
           SPLITS: tl.constexpr):
    """Pass 2: the chunks' results rescaled to the overall max and summed. Loads bypass L1
    (.cg): the other chunks wrote them from other SMs during this launch."""
    d = tl.arange(0, HEAD_DIM)
    base = row_head * SPLITS + tl.arange(0, SPLITS)
    maxima = tl.load(stats_ptr + base * 2, cache_modifier=".cg")
    denominators = tl.load(stats_ptr + base * 2 + 1, cache_modifier=".cg")
    overall = tl.max(maxima, axis=0)
    weights = tl.where(maxima == -float("inf"), 0.0, tl.exp(maxima - overall))
    parts = tl.load(part_ptr + base[:, None] * HEAD_DIM + d[None, :], cache_modifier=".cg")
    out = tl.sum(parts * weights[:, None], axis=0) / tl.sum(denominators * weights, axis=0)
    tl.store(out_ptr + d, out.to(out_ptr.dtype.element_ty))


_COUNTERS: dict = {}


def _counters(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (row, head), kept for the process: the kernel leaves them
    at zero, and CUDA graphs that captured a buffer keep pointing at it."""
    key = (str(device), size)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def choose_launch(row_heads: int, window: int, device: torch.device) -> tuple[int, int, int]:
    """(splits, BLOCK_S, num_warps): chunks of at least 16 keys, up to 16 of them while the
    (row, head) pairs alone leave SMs idle and 8 otherwise; 16-key iterations (32 past 256
    slots: one iteration a chunk) with 4 warps, or 2 warps when there are many programs. The
    fastest or within 10% of it in a sweep on an H200 at batch 1 and 16, 128 to 384 slots
    (bench_kernels.py --sweep)."""
    if device.type != "cuda" or interpreting():  # the interpreter's cost is per program
        return (2 if window >= 32 else 1), 16, 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    most = 16 if row_heads < sms else 8
    splits = 1
    while splits * 2 <= most and splits * 2 * 16 <= window:
        splits *= 2
    if row_heads >= sms:
        return splits, 16, 2
    return splits, 32 if window > 256 else 16, 4


@torch.library.custom_op("megatron_patch::decode_attention", mutates_args=())
def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     masked: torch.Tensor, window: int, scale: float, splits: int = 0,
                     last_slot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``query`` [b, heads, d] over the first ``window`` slots of ``keys``/``values``
    [slots, b, groups, d] where ``masked`` [b, window] is False -> [b, heads, d].
    ``splits`` 0 chooses the chunk count (:func:`choose_launch`); else a power of two.
    ``last_slot`` (a one-element device tensor): slots after it are masked and are not read
    (a CUDA graph's window is rounded up; its step reads only the slots written so far)."""
    batch, heads, head_dim = query.shape
    groups = keys.size(2)
    if (keys.shape != values.shape or keys.size(1) != batch or keys.size(3) != head_dim
            or heads % groups or tuple(masked.shape) != (batch, window)
            or window > keys.size(0) or head_dim & (head_dim - 1)):
        raise ValueError(
            f"decode_attention: query {tuple(query.shape)}, keys {tuple(keys.shape)}, values "
            f"{tuple(values.shape)}, masked {tuple(masked.shape)}, window {window}: expected "
            f"[b, h, d], [slots, b, g, d] twice, [b, window] with g dividing h, window <= "
            f"slots and d a power of two")
    for name, tensor in (("query", query), ("keys", keys), ("values", values),
                         ("masked", masked)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"decode_attention: {name} must be contiguous in its last dim")
    if splits < 0 or splits & (splits - 1):
        raise ValueError(f"decode_attention: splits must be a power of two (or 0: chosen), "
                         f"got {splits}")
    out = torch.empty_like(query)
    chosen, block_s, num_warps = choose_launch(batch * heads, window, query.device)
    launch(query, keys, values, masked, window, scale, out, splits or chosen, block_s,
           num_warps, last_slot)
    return out


def launch(query, keys, values, masked, window: int, scale: float, out, splits: int,
           block_s: int = BLOCK_S, num_warps: int = 0, last_slot=None) -> None:
    """Passes 1 and 2 into ``out`` with explicit launch parameters; no checks (see
    :func:`decode_attention`)."""
    batch, heads, head_dim = query.shape
    keys_per_split = triton.cdiv(triton.cdiv(window, splits), block_s) * block_s
    parts = stats = counts = out  # placeholders: with one split pass 1 writes the output
    if splits > 1:
        parts = torch.empty(batch * heads * splits, head_dim, dtype=torch.float32,
                            device=query.device)
        stats = torch.empty(batch * heads * splits, 2, dtype=torch.float32, device=query.device)
        counts = _counters(query.device, batch * heads)
    masked = masked.view(torch.uint8) if masked.dtype == torch.bool else masked
    _partial_kernel[(batch * heads, splits)](
        query, keys, values, masked, out if last_slot is None else last_slot, out, parts, stats,
        counts, heads, window, keys_per_split,
        scale, query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), masked.stride(0), out.stride(0),
        out.stride(1), HEADS_PER_GROUP=heads // keys.size(2), HEAD_DIM=head_dim,
        BLOCK_S=block_s, SPLITS=splits, HAS_LAST=last_slot is not None,
        num_warps=num_warps or (4 if head_dim >= 128 else 2))


@decode_attention.register_fake
def _(query, keys, values, masked, window, scale, splits=0, last_slot=None):
    return torch.empty_like(query)
