"""ALiBi core attention (Press et al., "Train Short, Test Long", 2022; BLOOM's position
encoding): no position embedding; each head adds ``slope_h * j`` to the score of key j.

Adding a per-head multiple of the key's index is the same, after the softmax, as the paper's
``-slope_h * (i - j)``: the two differ by ``slope_h * i``, a constant along each query's row. So
the bias needs no query positions, and a left-padded row (whose keys are shifted by its
padding) gets the same probabilities as the unpadded one. It is what transformers' BLOOM adds
(``build_alibi_tensor``).

The slopes follow the paper's rule, non-power-of-two head counts included, and each
tensor-parallel rank takes its own heads' slice. The bias goes to torch SDPA together with the
causal or padding mask (SDPAttention's masking), so it is exact for every mask SDPAttention
takes; a bias is built once per shape and kept.
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


class ALiBiAttention(SDPAttention):
    """SDPAttention with this rank's ALiBi bias added to the scores."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout, softmax_scale, cp_comm_type, pg_collection)
        from megatron.core import parallel_state as ps

        self.slopes = rank_slopes(config.num_attention_heads,
                                  ps.get_tensor_model_parallel_rank(),
                                  config.tensor_model_parallel_size)
        self._bias: dict = {}

    def bias(self, sk: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[1, heads, 1, sk]: slope_h * j for key j."""
        key = (sk, device, dtype)
        if key not in self._bias:
            keys = torch.arange(sk, device=device, dtype=torch.float32)
            self._bias = {key: (self.slopes.to(device)[:, None] * keys).to(dtype)[None, :, None]}
        return self._bias[key]

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("ALiBiAttention builds its own bias; it takes no attention_bias")
        bias = self.bias(key.size(0), query.device, query.dtype)
        return super().forward(query, key, value, attention_mask, attn_mask_type,
                               attention_bias=bias.expand(-1, -1, query.size(0), -1),
                               packed_seq_params=packed_seq_params)
