"""ALiBi core attention (Press et al., "Train Short, Test Long", 2022; BLOOM's position
encoding): no position embedding; each head adds ``-slope_h * (i - j)`` to the score of query
i for key j.

transformers' BLOOM adds ``slope_h * j`` (``build_alibi_tensor``): after the softmax the same,
since the two differ by ``slope_h * i``, a constant along each query's row, and a left-padded
row (whose keys are shifted by its padding) gets the same probabilities as the unpadded one.
The relative form is kept because it is small where the weight is (near the diagonal), so it
stays exact in bf16.

The slopes follow the paper's rule, non-power-of-two head counts included, and each
tensor-parallel rank takes its own heads' slice. Two paths, the same math:

* fused (a GPU, causal training or prefill without a padding mask, no attention dropout):
  ``torch.nn.attention.flex_attention`` under torch.compile with a score_mod adding
  ``slope[h] * kv_idx`` in fp32 inside the kernel and a causal block mask (built once per
  shape), so no bias tensor exists; flex attention has no dropout;
* otherwise the bias goes to torch SDPA together with the causal or padding mask
  (SDPAttention's masking), exact for every mask SDPAttention takes; a bias is built once per
  shape and kept.

``ALiBiAttention.fused`` (None: auto; True / False) picks the path; the tests run the fused one
on the CPU in eager mode against the SDPA one.
"""
from __future__ import annotations

import math

import torch

from megatron_patch.layers.sdpa_attention import SDPAttention


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The paper's slopes, float32 [num_heads]: for n heads a power of two, the geometric
    sequence ``2^(-8/n), 2^(-16/n), ...``; otherwise the sequence of the largest power of two
    below n, then every other slope of the sequence for twice that many heads."""
    def geometric(count: int, powers: torch.Tensor) -> torch.Tensor:
        # float32 powers of a float32 ratio, as transformers computes them (bit for bit)
        ratio = torch.tensor(2.0 ** (-(2.0 ** -(math.log2(count) - 3))), dtype=torch.float32)
        return torch.pow(ratio, powers)

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(closest, torch.arange(1, closest + 1, dtype=torch.int32))
    if closest != num_heads:
        odd = torch.arange(1, 2 * (num_heads - closest), 2, dtype=torch.int32)
        slopes = torch.cat([slopes, geometric(2 * closest, odd)])
    return slopes


def rank_slopes(num_heads: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slopes of tensor-parallel rank ``tp_rank``'s heads (whole heads per rank)."""
    per_rank = num_heads // tp_size
    return alibi_slopes(num_heads)[tp_rank * per_rank:(tp_rank + 1) * per_rank]


_COMPILED_FLEX = None


def _flex_attention(compiled: bool):
    """flex_attention, compiled once per process for the GPU (eager on the CPU)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


class ALiBiAttention(SDPAttention):
    """SDPAttention with this rank's ALiBi bias added to the scores."""

    fused = None  # None: the flex-attention path where it applies (a GPU); True / False: forced

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout, softmax_scale, cp_comm_type, pg_collection)
        from megatron.core import parallel_state as ps

        # A buffer, so it moves with the model (a CPU tensor would be copied to the GPU, a
        # synchronising copy, whenever a bias is built); not persistent: not a weight.
        self.register_buffer("slopes", rank_slopes(config.num_attention_heads,
                                                   ps.get_tensor_model_parallel_rank(),
                                                   config.tensor_model_parallel_size),
                             persistent=False)
        self._bias: dict = {}
        self._block_mask: dict = {}

    def bias(self, sq: int, sk: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[1, heads, sq, sk]: slope_h * (j - i) for query i (position sk - sq + i) and key j.
        Relative, so the entries near the diagonal, which carry the weight, stay small and
        exact in bf16 (``slope * j`` would reach 1000 at position 2048, 8 apart in bf16)."""
        key = (sq, sk, device, dtype)
        if key not in self._bias:
            keys = torch.arange(sk, device=device, dtype=torch.float32)
            queries = torch.arange(sk - sq, sk, device=device, dtype=torch.float32)
            distance = keys[None, :] - queries[:, None]
            if sq > 1:  # one prefill / training shape at a time (they are large)
                self._bias = {k: v for k, v in self._bias.items() if k[0] == 1}
            # Decode biases (one query) are all kept: a captured CUDA graph reads its own.
            self._bias[key] = (self.slopes.to(device)[:, None, None] * distance).to(dtype)[None]
        return self._bias[key]

    def use_fused(self, query, key, attention_mask, mask_type) -> bool:
        """Causal self-attention over the whole sequence, no mask tensor, no dropout."""
        from megatron.core.transformer.enums import AttnMaskType

        applies = (attention_mask is None and mask_type == AttnMaskType.causal
                   and query.size(0) == key.size(0)
                   and (self.dropout_p == 0.0 or not self.training))
        if self.fused is None:
            return applies and query.is_cuda
        if self.fused and not applies:
            raise ValueError("ALiBiAttention.fused: flex attention here takes causal "
                             "self-attention without a mask tensor or dropout")
        return self.fused

    def flex(self, query, key, value):
        """The fused path: query [s, b, np, hn], key/value [s, b, ng, hn] -> [s, b, np * hn]."""
        from torch.nn.attention.flex_attention import create_block_mask

        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # views
        seq, device = q.size(2), q.device
        if (seq, device) not in self._block_mask:
            self._block_mask = {(seq, device): create_block_mask(
                _causal, None, None, seq, seq, device=device)}
        slopes = self.slopes.to(device)

        def score_mod(score, b, h, q_idx, kv_idx):  # relative: small where the weight is
            return score + slopes[h] * (kv_idx - q_idx)

        context = _flex_attention(q.is_cuda)(
            q, k, v, score_mod=score_mod, block_mask=self._block_mask[(seq, device)],
            scale=self.softmax_scale, enable_gqa=self.groups_per_rank != self.heads_per_rank)
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(context.size(0), context.size(1), -1)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("ALiBiAttention builds its own bias; it takes no attention_bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if packed_seq_params is None and self.use_fused(query, key, attention_mask, mask_type):
            return self.flex(query, key, value)
        bias = self.bias(query.size(0), key.size(0), query.device, query.dtype)
        return super().forward(query, key, value, attention_mask, attn_mask_type,
                               attention_bias=bias,
                               packed_seq_params=packed_seq_params)
