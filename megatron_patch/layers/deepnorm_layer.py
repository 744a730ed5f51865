"""DeepNorm residuals as GLM-130B and ChatGLM-6B (v1) compute them (Wang et al., "DeepNet",
2022; SAT's ``DeepNormWithGLUMixin`` / ``ChatGLMLayerMixin`` with ``layernorm_order='post'``):
the residual is the *normalised* input, scaled by ``alpha = sqrt(2 x num_layers)``,

    n1  = norm_in(x);   h   = alpha * n1 + attention(n1)
    n2  = norm_mlp(h);  out = alpha * n2 + mlp(n2)

(the final norm follows the last layer as usual). megatron-core's TransformerLayer adds each
sublayer to its raw input; this subclass keeps its submodules, names and bias-dropout-add and
changes only what the residual is.
"""
from __future__ import annotations

from megatron.core.transformer.transformer_layer import TransformerLayer


class DeepNormLayer(TransformerLayer):
    """A TransformerLayer with DeepNorm residuals (alpha from the total layer count)."""

    def __init__(self, config, submodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.alpha = (2.0 * config.num_layers) ** 0.5

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None,
                attention_bias=None, inference_context=None, packed_seq_params=None,
                sequence_len_offset=None, **unused):
        normed = self.input_layernorm(hidden_states)
        attention = self.self_attention(
            normed, attention_mask=attention_mask, inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb, attention_bias=attention_bias,
            packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset)
        fusion = self.config.bias_dropout_fusion
        with self.bias_dropout_add_exec_handler():
            hidden = self.self_attn_bda(self.training, fusion)(attention, normed * self.alpha,
                                                               self.hidden_dropout)
        normed = self.pre_mlp_layernorm(hidden)
        mlp = self.mlp(normed)
        with self.bias_dropout_add_exec_handler():
            hidden = self.mlp_bda(self.training, fusion)(mlp, normed * self.alpha,
                                                         self.hidden_dropout)
        return hidden, None
