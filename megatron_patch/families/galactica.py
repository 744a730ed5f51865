"""Galactica (facebook/galactica-125m to 120b), which is OPT: learned absolute positions kept two
rows down their table, LayerNorm with bias before each block, biases on every linear, GeLU
(OPT's own checkpoints: ReLU), separate q/k/v projections, tied embeddings.

Config fields from transformers' ``OPTConfig``; sizes from the released galactica config.json
files. OPT's ``embed_positions`` has ``max_position_embeddings + 2`` rows and looks position p up
at row p + 2 (``OPTLearnedPositionalEmbedding``); the Megatron side keeps the same table (the
two extra rows survive a round trip) and shifts positions the same way
(layers/embedding_extras.py).
"""
from __future__ import annotations

from megatron_patch.convert.mapping import Row
from megatron_patch.convert.ops import FuseQKV, PadVocab
from megatron_patch.convert.sharding import COLUMN, QKV, ROW
from megatron_patch.families.base import ConfigField, Family, ModelArgs

OPT_POSITION_OFFSET = 2  # transformers' OPTLearnedPositionalEmbedding.offset

CONFIG_FIELDS = (
    ConfigField("num_hidden_layers", "num_layers"),
    ConfigField("hidden_size", "hidden_size"),
    ConfigField("ffn_dim", "ffn_hidden_size"),
    ConfigField("num_attention_heads", "num_attention_heads"),
    ConfigField("vocab_size", "vocab_size"),
    ConfigField("max_position_embeddings", "max_position_embeddings", default=2048),
    ConfigField("activation_function", "activation", default="relu"),
    ConfigField("tie_word_embeddings", "tie_embeddings", default=True),
)

_GALACTICA = dict(vocab_size=50000, max_position_embeddings=2048, activation="gelu",
                  tie_embeddings=True)


def _row(layers: int, hidden: int, heads: int) -> dict:
    return dict(num_layers=layers, hidden_size=hidden, ffn_hidden_size=4 * hidden,
                num_attention_heads=heads, **_GALACTICA)


SIZES = {
    "125m": _row(12, 768, 12),
    "1.3B": _row(24, 2048, 32),
    "6.7B": _row(32, 4096, 32),
    "30B": _row(48, 7168, 56),
    "120B": _row(96, 10240, 80),
    "tiny": dict(_row(2, 64, 4), vocab_size=512, max_position_embeddings=256),
    "small": dict(_row(4, 256, 8), vocab_size=4096, max_position_embeddings=512),
}
for _alias, _size in (("1.3b", "1.3B"), ("6.7b", "6.7B"), ("30b", "30B"), ("120b", "120B")):
    SIZES[_alias] = SIZES[_size]

_ACTIVATIONS = ("relu", "gelu")  # OPT's activation_function values the model builder has


def read_extra(hf_config: dict, path: str) -> dict:
    """Refusals of OPT variants this table does not map."""
    if hf_config.get("do_layer_norm_before", True) is False:
        raise ValueError(f"{path}: do_layer_norm_before false (OPT-350m's post-norm) is not "
                         f"supported")
    width = hf_config.get("word_embed_proj_dim")
    if width is not None and width != hf_config["hidden_size"]:
        raise ValueError(f"{path}: word_embed_proj_dim {width} differs from hidden_size (OPT's "
                         f"project_in/project_out are not supported)")
    for flag in ("enable_bias", "layer_norm_elementwise_affine"):
        if hf_config.get(flag, True) is False:
            raise ValueError(f"{path}: {flag} false is not supported")
    if hf_config.get("activation_function", "relu") not in _ACTIVATIONS:
        raise ValueError(f"{path}: activation_function '{hf_config['activation_function']}' is "
                         f"not supported; supported: {', '.join(_ACTIVATIONS)}")
    return {}


def write_extra(args: ModelArgs) -> dict:
    return {"word_embed_proj_dim": args.hidden_size}


def weights(args: ModelArgs) -> list[Row]:
    """HF OPTForCausalLM <-> megatron-core GPTModel (local spec names)."""
    hf, mg = "model.decoder.layers.{layer}.", "decoder.layers.{layer}."
    both = ("weight", "bias")
    rows = [
        Row("embedding.word_embeddings.weight", "model.decoder.embed_tokens.weight", PadVocab(),
            COLUMN, stage="first"),
        # differs from llama: learned positions, the table's two leading rows included
        Row("embedding.position_embeddings.weight", "model.decoder.embed_positions.weight",
            stage="first"),
        *(Row(mg + f"input_layernorm.{p}", hf + f"self_attn_layer_norm.{p}") for p in both),
        *(Row(mg + f"self_attention.linear_qkv.{p}",
              tuple(hf + f"self_attn.{x}_proj.{p}" for x in "qkv"), FuseQKV(), QKV)
          for p in both),
        Row(mg + "self_attention.linear_proj.weight", hf + "self_attn.out_proj.weight", tp=ROW),
        Row(mg + "self_attention.linear_proj.bias", hf + "self_attn.out_proj.bias"),
        *(Row(mg + f"pre_mlp_layernorm.{p}", hf + f"final_layer_norm.{p}") for p in both),
        *(Row(mg + f"mlp.linear_fc1.{p}", hf + f"fc1.{p}", tp=COLUMN) for p in both),
        Row(mg + "mlp.linear_fc2.weight", hf + "fc2.weight", tp=ROW),
        Row(mg + "mlp.linear_fc2.bias", hf + "fc2.bias"),
        *(Row(f"decoder.final_layernorm.{p}", f"model.decoder.final_layer_norm.{p}",
              stage="last") for p in both),
    ]
    if not args.tie_embeddings:
        rows.append(Row("output_layer.weight", "lm_head.weight", PadVocab(), COLUMN,
                        stage="last"))
    return rows


GALACTICA = Family(
    name="galactica",
    hf_model_types=("opt",),
    hf_architecture="OPTForCausalLM",
    tokenizer="galacticabpe",
    config_fields=CONFIG_FIELDS,
    architecture=dict(normalization="LayerNorm", gated_linear_unit=False, add_bias_linear=True,
                      position_embedding_type="learned_absolute",
                      position_embedding_offset=OPT_POSITION_OFFSET, norm_epsilon=1e-5),
    hf_fixed=dict(do_layer_norm_before=True, enable_bias=True, layer_norm_elementwise_affine=True,
                  dropout=0.0, attention_dropout=0.0, init_std=0.02, use_cache=True),
    sizes=SIZES,
    weights=weights,
    read_extra=read_extra,
    write_extra=write_extra,
)
