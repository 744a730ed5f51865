"""Llama (1, 2, 3, 3.1): RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases.

Config fields from transformers' ``LlamaConfig``; sizes from the Llama 2 and Llama 3 papers /
their released config.json files."""
from __future__ import annotations

from megatron_patch.convert.derived import Derived, RotaryInvFreq
from megatron_patch.convert.mapping import Row
from megatron_patch.convert.ops import Concat, FuseQKV, PadVocab
from megatron_patch.convert.sharding import COLUMN, QKV, ROW, Split
from megatron_patch.families.base import ConfigField, Family, ModelArgs
from megatron_patch.families.rope import LLAMA3_FIXED, read_rope, write_rope

CONFIG_FIELDS = (
    ConfigField("num_hidden_layers", "num_layers"),
    ConfigField("hidden_size", "hidden_size"),
    ConfigField("intermediate_size", "ffn_hidden_size"),
    ConfigField("num_attention_heads", "num_attention_heads"),
    ConfigField("num_key_value_heads", "num_query_groups",
                default=lambda cfg: cfg["num_attention_heads"]),
    ConfigField("head_dim", "kv_channels",
                default=lambda cfg: cfg["hidden_size"] // cfg["num_attention_heads"]),
    ConfigField("vocab_size", "vocab_size"),
    ConfigField("max_position_embeddings", "max_position_embeddings", default=2048),
    ConfigField("rms_norm_eps", "norm_epsilon", default=1e-6),
    ConfigField("tie_word_embeddings", "tie_embeddings", default=False),
)

_L2 = dict(vocab_size=32000, max_position_embeddings=4096, norm_epsilon=1e-5)
_L3 = dict(vocab_size=128256, max_position_embeddings=8192, norm_epsilon=1e-5,
           rotary_base=500000.0, num_query_groups=8)
SIZES = {
    "7B": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
               **_L2),
    "13B": dict(num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40,
                **_L2),
    "70B": dict(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                num_query_groups=8, **_L2),
    "llama3-8B": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                      num_attention_heads=32, **_L3),
    "llama3-70B": dict(num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
                       num_attention_heads=64, **_L3),
    # The GPU benchmark shape (about 0.95B parameters).
    "1B": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
               **_L2),
    # Test and quickstart rows.
    "tiny": dict(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4,
                 num_query_groups=2, vocab_size=512, max_position_embeddings=256),
    "small": dict(num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=8,
                  num_query_groups=4, vocab_size=4096, max_position_embeddings=512),
}


def read_extra(hf_config: dict, path: str) -> dict:
    """Rotary fields, and refusals of Llama variants megatron-core's local spec cannot build."""
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise ValueError(f"{path}: attention_bias / mlp_bias Llama variants are not supported")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act '{hf_config['hidden_act']}' is not supported "
                         f"(Llama uses silu)")
    return read_rope(hf_config, path)


def write_extra(args: ModelArgs) -> dict:
    return write_rope(args.rotary_base, args.rope_scaling_factor)


def weights(args: ModelArgs) -> list[Row]:
    """HF LlamaForCausalLM <-> megatron-core GPTModel (local spec names)."""
    hf_layer = "model.layers.{layer}."
    mg_layer = "decoder.layers.{layer}."
    rows = [
        Row("embedding.word_embeddings.weight", "model.embed_tokens.weight", PadVocab(), COLUMN,
            stage="first"),
        Row(mg_layer + "input_layernorm.weight", hf_layer + "input_layernorm.weight"),
        Row(mg_layer + "self_attention.linear_qkv.weight",
            tuple(hf_layer + f"self_attn.{p}_proj.weight" for p in "qkv"), FuseQKV(), QKV),
        Row(mg_layer + "self_attention.linear_proj.weight", hf_layer + "self_attn.o_proj.weight",
            tp=ROW),
        Row(mg_layer + "pre_mlp_layernorm.weight", hf_layer + "post_attention_layernorm.weight"),
        Row(mg_layer + "mlp.linear_fc1.weight",
            (hf_layer + "mlp.gate_proj.weight", hf_layer + "mlp.up_proj.weight"), Concat(),
            Split(dim=0, parts=2)),
        Row(mg_layer + "mlp.linear_fc2.weight", hf_layer + "mlp.down_proj.weight", tp=ROW),
        Row("decoder.final_layernorm.weight", "model.norm.weight", stage="last"),
    ]
    if not args.tie_embeddings:
        rows.append(Row("output_layer.weight", "lm_head.weight", PadVocab(), COLUMN,
                        stage="last"))
    return rows


# Llama exports from older transformers releases (Llama 1/2 and their fine-tunes) store each
# layer's rotary inv_freq, a function of rope_theta, head_dim and rope_scaling.
DERIVED_BUFFERS = (
    Derived("model.layers.{layer}.self_attn.rotary_emb.inv_freq", RotaryInvFreq(LLAMA3_FIXED)),
)

LLAMA = Family(
    name="llama",
    hf_model_types=("llama",),
    hf_architecture="LlamaForCausalLM",
    tokenizer="llamabpe",
    config_fields=CONFIG_FIELDS,
    architecture=dict(normalization="RMSNorm", gated_linear_unit=True, activation="silu",
                      add_bias_linear=False, position_embedding_type="rope"),
    hf_fixed=dict(hidden_act="silu", attention_bias=False, mlp_bias=False,
                  attention_dropout=0.0, initializer_range=0.02, use_cache=True),
    sizes=SIZES,
    weights=weights,
    derived_buffers=DERIVED_BUFFERS,
    read_extra=read_extra,
    write_extra=write_extra,
)
