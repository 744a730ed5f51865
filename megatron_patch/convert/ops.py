"""Reversible tensor ops: the vocabulary of weight-mapping tables.

An op turns the HF tensors of one table row into the one full (unsharded) Megatron tensor and
back. ``to_megatron`` and ``to_hf`` are exact inverses (no arithmetic, only copies, views and
concatenations), which is what makes HF -> Megatron -> HF bit-identical. Each op gets a
``Dims`` with the sizes it needs; tensor-parallel sharding is not an op's business
(see :mod:`megatron_patch.convert.sharding`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dims:
    """Model sizes that ops need."""

    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int          # the tokenizer's true vocabulary (HF rows)
    padded_vocab_size: int   # Megatron rows


class Copy:
    """One HF tensor is the Megatron tensor."""

    def to_megatron(self, tensors, dims):
        (tensor,) = tensors
        return tensor

    def to_hf(self, tensor, dims):
        return [tensor]


@dataclass(frozen=True)
class Concat:
    """Stack HF tensors of equal shape along ``dim`` (e.g. SwiGLU ``[gate; up]`` -> linear_fc1)."""

    parts: int = 2
    dim: int = 0

    def to_megatron(self, tensors, dims):
        return torch.cat(list(tensors), dim=self.dim)

    def to_hf(self, tensor, dims):
        return [t.clone() for t in torch.chunk(tensor, self.parts, dim=self.dim)]


class FuseQKV:
    """Separate q, k, v projections -> megatron-core's grouped ``linear_qkv``.

    For each query group in order: that group's query heads, then its key head, then its value
    head, each ``kv_channels`` rows (heads = nh, groups = ng, r = nh / ng)::

        q: [q_0 .. q_{nh-1}]      linear_qkv: | q_0..q_{r-1} k_0 v_0 | q_r..q_{2r-1} k_1 v_1 | ...
        k: [k_0 .. k_{ng-1}]   ->              \\______ group 0 ______/ \\______ group 1 ______/
        v: [v_0 .. v_{ng-1}]

    Works for weights ([out, in]) and biases ([out]). Tensor parallelism splits whole groups.
    """

    def to_megatron(self, tensors, dims):
        q, k, v = tensors
        ng, d = dims.num_query_groups, dims.kv_channels
        r = dims.num_attention_heads // ng
        rest = q.shape[1:]
        fused = torch.cat([q.reshape(ng, r * d, *rest), k.reshape(ng, d, *rest),
                           v.reshape(ng, d, *rest)], dim=1)
        return fused.reshape(ng * (r + 2) * d, *rest)

    def to_hf(self, tensor, dims):
        ng, d = dims.num_query_groups, dims.kv_channels
        r = dims.num_attention_heads // ng
        rest = tensor.shape[1:]
        grouped = tensor.reshape(ng, (r + 2) * d, *rest)
        q, k, v = torch.split(grouped, [r * d, d, d], dim=1)
        return [t.reshape(-1, *rest).clone() for t in (q, k, v)]


class SplitQKV:
    """One fused projection stored contiguously, ``[Q (nh x d) | K (ng x d) | V (ng x d)]``
    (ChatGLM2/3 and GLM-4's remote-code ``query_key_value``) -> megatron-core's grouped
    ``linear_qkv`` (see FuseQKV), and back."""

    def to_megatron(self, tensors, dims):
        (tensor,) = tensors
        d = dims.kv_channels
        sizes = [dims.num_attention_heads * d, dims.num_query_groups * d,
                 dims.num_query_groups * d]
        if tensor.shape[0] != sum(sizes):
            raise ValueError(f"query_key_value has {tensor.shape[0]} rows, expected "
                             f"{' + '.join(map(str, sizes))} (query, key, value heads x "
                             f"kv_channels)")
        return FuseQKV().to_megatron(torch.split(tensor, sizes, dim=0), dims)

    def to_hf(self, tensor, dims):
        return [torch.cat(FuseQKV().to_hf(tensor, dims), dim=0)]


class SwapRotaryQuarters:
    """Per-head ``[q k v]`` rows (ChatGLM-6B's ``query_key_value``, megatron-core's grouped
    layout when every head is its own group) with the middle two quarters of each query and key
    head swapped: GLM's 2-D rotary pairs become megatron-core's rotate-half pairs
    (layers/glm_positions.py). The swap is its own inverse."""

    @staticmethod
    def _swap(tensor, dims):
        heads, d = dims.num_attention_heads, dims.kv_channels
        rest = tensor.shape[1:]
        view = tensor.reshape(heads, 3, 4, d // 4, *rest)
        quarters = torch.tensor([0, 2, 1, 3])  # per query and key head; values stay
        swapped = torch.cat([view[:, :2].index_select(2, quarters), view[:, 2:]], dim=1)
        return swapped.reshape(tensor.shape)

    def to_megatron(self, tensors, dims):
        (tensor,) = tensors
        if dims.num_query_groups != dims.num_attention_heads or dims.kv_channels % 4:
            raise ValueError("2-D rotary needs one key/value head per query head and a head "
                             "dim divisible by 4")
        return self._swap(tensor, dims)

    def to_hf(self, tensor, dims):
        return [self._swap(tensor, dims)]


class SwapHalves:
    """A GLU matrix whose halves are the other way round: GLM-130B's ``[x1; x2]`` computing
    ``x1 * gelu(x2)`` <-> megatron-core's ``[gate; up]`` computing ``gelu(gate) * up``. Its own
    inverse."""

    @staticmethod
    def _swap(tensor):
        first, second = torch.chunk(tensor, 2, dim=0)
        return torch.cat([second, first], dim=0)

    def to_megatron(self, tensors, dims):
        (tensor,) = tensors
        return self._swap(tensor)

    def to_hf(self, tensor, dims):
        return [self._swap(tensor)]


class PadVocab:
    """Embedding / output rows: HF has the true vocabulary, Megatron pads it with zero rows to
    ``padded_vocab_size`` (make-vocab-size-divisible-by x TP, plus --extra-vocab-size)."""

    def to_megatron(self, tensors, dims):
        (tensor,) = tensors
        rows = tensor.shape[0]
        if rows != dims.vocab_size:
            raise ValueError(f"vocabulary tensor has {rows} rows, config says vocab_size "
                             f"{dims.vocab_size}")
        pad = tensor.new_zeros(dims.padded_vocab_size - rows, *tensor.shape[1:])
        return torch.cat([tensor, pad], dim=0)

    def to_hf(self, tensor, dims):
        return [tensor[: dims.vocab_size].clone()]
