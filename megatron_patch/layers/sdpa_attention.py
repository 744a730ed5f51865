"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

A drop-in for megatron-core's ``DotProductAttention`` in a layer spec's ``core_attention`` slot:
same constructor and forward signature, same tensor layouts ([s, b, heads, head_dim] in,
[s, b, heads x head_dim] out). SDPA picks the flash / cuDNN / memory-efficient kernel on GPU,
which makes training 1.7x faster than megatron-core's unfused local attention
(../shared/notes/gpu_baseline.md); on CPU it runs the same math.

Masking follows megatron-core: a boolean ``attention_mask`` is True where attention is NOT
allowed (it already carries causality, e.g. packed SFT samples); without a mask, the causal
type means "query i sees keys <= i", aligned bottom-right when there are fewer queries than
keys (KV-cache decoding).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Scaled dot-product core attention for one tensor-parallel rank's heads."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        tp = config.tensor_model_parallel_size
        self.attn_mask_type = attn_mask_type
        self.heads_per_rank = divide(config.num_attention_heads, tp)
        self.groups_per_rank = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        if config.apply_query_key_layer_scaling:
            raise ValueError("apply_query_key_layer_scaling only matters for fp16 softmax; "
                             "SDPAttention computes softmax in fp32")
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn]."""
        if packed_seq_params is not None:
            raise ValueError("packed sequences: pass an attention mask built from segment ids")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.groups_per_rank != self.heads_per_rank:
            repeat = self.heads_per_rank // self.groups_per_rank
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        mask, causal = self._sdpa_mask(attention_mask, attention_bias, mask_type,
                                       q.size(2), k.size(2), q.device)
        dropout_p = self.dropout_p if self.training else 0.0
        # Dropout inside the tensor-parallel region draws from the model-parallel RNG stream.
        rng = (tensor_parallel.get_cuda_rng_tracker().fork()
               if dropout_p > 0.0 and not self.config.sequence_parallel else contextlib.nullcontext())
        with rng:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                     is_causal=causal, scale=self.softmax_scale)
        # [b, h, sq, d] -> [sq, b, h * d]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(context.size(0), context.size(1), -1)

    @staticmethod
    def _sdpa_mask(attention_mask, attention_bias, mask_type, sq, sk, device):
        """Return (attn_mask for SDPA, is_causal). SDPA's boolean masks mean True = attend."""
        if attention_mask is not None:
            mask = ~attention_mask.bool()
            return (mask if attention_bias is None else
                    attention_bias.masked_fill(~mask, float("-inf"))), False
        causal = mask_type == AttnMaskType.causal
        if attention_bias is not None or (causal and sq != sk):
            # Bottom-right aligned causal mask: query i (of sq) is position sk - sq + i.
            allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
            if causal:
                allowed = allowed.tril(diagonal=sk - sq)
            if attention_bias is None:
                return allowed, False
            return attention_bias.masked_fill(~allowed, float("-inf")), False
        return None, causal
