"""Parallel attention + MLP residual (GPT-J, Falcon): both read the layer's input,

    out = x + attention(norm_attn(x)) + mlp(norm_mlp(x))

with one shared input norm (falcon-7B: ``norm_mlp`` is ``norm_attn``) or two (falcon-40B/180B's
``ln_attn`` and ``ln_mlp``). megatron-core's TransformerLayer runs the MLP on the attention's
output; this subclass keeps its submodules, names and bias-dropout-add, and changes only what the
MLP reads. With a shared norm the spec's ``pre_mlp_layernorm`` is megatron-core's IdentityOp (no
parameters), so the checkpoint holds only ``input_layernorm``.
"""
from __future__ import annotations

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer


class ParallelAttentionMLPLayer(TransformerLayer):
    """A TransformerLayer whose attention and MLP both take the layer's input."""

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None,
                attention_bias=None, inference_context=None, packed_seq_params=None,
                sequence_len_offset=None, **unused):
        residual = hidden_states
        attention_input = self.input_layernorm(hidden_states)
        shared = isinstance(self.pre_mlp_layernorm, IdentityOp)
        mlp_input = attention_input if shared else self.pre_mlp_layernorm(hidden_states)
        attention = self.self_attention(
            attention_input, attention_mask=attention_mask, inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb, attention_bias=attention_bias,
            packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset)
        mlp = self.mlp(mlp_input)
        fusion = self.config.bias_dropout_fusion
        with self.bias_dropout_add_exec_handler():
            hidden = self.self_attn_bda(self.training, fusion)(attention, residual,
                                                               self.hidden_dropout)
            hidden = self.mlp_bda(self.training, fusion)(mlp, hidden, self.hidden_dropout)
        return hidden, None
