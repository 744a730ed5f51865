"""Sandwich norms (GLM-4-0414's ``Glm4DecoderLayer``; CogView's "sandwich LayerNorm"): each
sublayer's output is normalised before it joins the residual,

    h   = x + norm_post_attn(attention(norm_in(x)))
    out = h + norm_post_mlp(mlp(norm_pre_mlp(h)))

megatron-core's TransformerLayer adds the sublayer output to the residual as it is; this
subclass keeps its submodules, names and bias-dropout-add and adds the two output norms,
``post_self_attn_layernorm`` and ``post_mlp_layernorm`` (transformers' names), built like the
spec's input norm.
"""
from __future__ import annotations

from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_patch.layers.norms import Norm


class SandwichNormLayer(TransformerLayer):
    """A TransformerLayer that normalises attention's and the MLP's outputs."""

    def __init__(self, config, submodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.post_self_attn_layernorm = Norm(config, config.hidden_size,
                                             eps=config.layernorm_epsilon)
        self.post_mlp_layernorm = Norm(config, config.hidden_size, eps=config.layernorm_epsilon)

    @staticmethod
    def _normed(norm, output):
        out, bias = output
        return norm(out if bias is None else out + bias), None

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None,
                attention_bias=None, inference_context=None, packed_seq_params=None,
                sequence_len_offset=None, **unused):
        attention = self.self_attention(
            self.input_layernorm(hidden_states), attention_mask=attention_mask,
            inference_context=inference_context, rotary_pos_emb=rotary_pos_emb,
            attention_bias=attention_bias, packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset)
        fusion = self.config.bias_dropout_fusion
        with self.bias_dropout_add_exec_handler():
            hidden = self.self_attn_bda(self.training, fusion)(
                self._normed(self.post_self_attn_layernorm, attention), hidden_states,
                self.hidden_dropout)
        mlp = self._normed(self.post_mlp_layernorm, self.mlp(self.pre_mlp_layernorm(hidden)))
        with self.bias_dropout_add_exec_handler():
            hidden = self.mlp_bda(self.training, fusion)(mlp, hidden, self.hidden_dropout)
        return hidden, None
