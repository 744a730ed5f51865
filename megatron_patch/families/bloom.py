"""BLOOM (bigscience/bloom*, 560m to 176B): ALiBi attention, a LayerNorm on the word embeddings,
LayerNorm with bias, biases on every linear, GeLU (tanh approximation), tied embeddings.

Config fields from transformers' ``BloomConfig`` (its config.json spells the layers and heads
``n_layer``/``n_head``, older files the width ``n_embed``); sizes from the released config.json
files. BLOOM's fused ``query_key_value`` keeps each head's [q; k; v] together, which is
megatron-core's ``linear_qkv`` layout with one query head per group, so it maps as it is.
"""
from __future__ import annotations

from megatron_patch.convert.mapping import Row
from megatron_patch.convert.ops import PadVocab
from megatron_patch.convert.sharding import COLUMN, QKV, ROW
from megatron_patch.families.base import ConfigField, Family, ModelArgs

CONFIG_FIELDS = (
    ConfigField("n_layer", "num_layers", aliases=("num_hidden_layers",)),
    ConfigField("hidden_size", "hidden_size", aliases=("n_embed",)),
    ConfigField("n_head", "num_attention_heads", aliases=("num_attention_heads",)),
    ConfigField("vocab_size", "vocab_size"),
    ConfigField("layer_norm_epsilon", "norm_epsilon", default=1e-5),
    ConfigField("tie_word_embeddings", "tie_embeddings", default=True),
)

_BLOOM = dict(vocab_size=250880, max_position_embeddings=2048, norm_epsilon=1e-5,
              tie_embeddings=True)


def _row(layers: int, hidden: int, heads: int) -> dict:
    return dict(num_layers=layers, hidden_size=hidden, ffn_hidden_size=4 * hidden,
                num_attention_heads=heads, **_BLOOM)


SIZES = {
    "560m": _row(24, 1024, 16),
    "1.1B": _row(24, 1536, 16),
    "1.7B": _row(24, 2048, 16),
    "3B": _row(30, 2560, 32),
    "7.1B": _row(30, 4096, 32),
    "176B": _row(70, 14336, 112),
    # Test and quickstart rows; 6 heads: ALiBi's rule for a head count that is no power of two.
    "tiny": dict(_row(2, 96, 6), vocab_size=512, max_position_embeddings=256),
    "small": dict(_row(4, 256, 8), vocab_size=4096, max_position_embeddings=512),
}
# The names of the released checkpoints (bloom-1b1, ...) and of the seed (1.1B, ...).
for _alias, _size in (("1b1", "1.1B"), ("1b7", "1.7B"), ("3b", "3B"), ("7b1", "7.1B")):
    SIZES[_alias] = SIZES[_size]


def read_extra(hf_config: dict, path: str) -> dict:
    """The MLP width BLOOM fixes (4 x hidden); refusals of what the released models never use."""
    if hf_config.get("apply_residual_connection_post_layernorm"):
        raise ValueError(f"{path}: apply_residual_connection_post_layernorm is not supported "
                         f"(no released BLOOM uses it)")
    hidden = hf_config.get("hidden_size", hf_config.get("n_embed"))
    return {"ffn_hidden_size": 4 * hidden, "max_position_embeddings": 2048}


def write_extra(args: ModelArgs) -> dict:
    if args.ffn_hidden_size != 4 * args.hidden_size:
        raise ValueError(f"BLOOM's MLP is 4 x hidden ({4 * args.hidden_size}), not "
                         f"{args.ffn_hidden_size}")
    return {}


def weights(args: ModelArgs) -> list[Row]:
    """HF BloomForCausalLM <-> megatron-core GPTModel (local spec names)."""
    hf, mg = "transformer.h.{layer}.", "decoder.layers.{layer}."
    rows = [
        Row("embedding.word_embeddings.weight", "transformer.word_embeddings.weight", PadVocab(),
            COLUMN, stage="first"),
        # differs from llama: a LayerNorm on the embeddings (layers/embedding_extras.py)
        *(Row(f"embedding.word_embeddings_layernorm.{p}",
              f"transformer.word_embeddings_layernorm.{p}", stage="first")
          for p in ("weight", "bias")),
        *(Row(mg + f"input_layernorm.{p}", hf + f"input_layernorm.{p}") for p in ("weight", "bias")),
        *(Row(mg + f"self_attention.linear_qkv.{p}", hf + f"self_attention.query_key_value.{p}",
              tp=QKV) for p in ("weight", "bias")),
        Row(mg + "self_attention.linear_proj.weight", hf + "self_attention.dense.weight", tp=ROW),
        Row(mg + "self_attention.linear_proj.bias", hf + "self_attention.dense.bias"),
        *(Row(mg + f"pre_mlp_layernorm.{p}", hf + f"post_attention_layernorm.{p}")
          for p in ("weight", "bias")),
        *(Row(mg + f"mlp.linear_fc1.{p}", hf + f"mlp.dense_h_to_4h.{p}", tp=COLUMN)
          for p in ("weight", "bias")),
        Row(mg + "mlp.linear_fc2.weight", hf + "mlp.dense_4h_to_h.weight", tp=ROW),
        Row(mg + "mlp.linear_fc2.bias", hf + "mlp.dense_4h_to_h.bias"),
        *(Row(f"decoder.final_layernorm.{p}", f"transformer.ln_f.{p}", stage="last")
          for p in ("weight", "bias")),
    ]
    if not args.tie_embeddings:
        rows.append(Row("output_layer.weight", "lm_head.weight", PadVocab(), COLUMN,
                        stage="last"))
    return rows


BLOOM = Family(
    name="bloom",
    hf_model_types=("bloom",),
    hf_architecture="BloomForCausalLM",
    tokenizer="bloombpe",
    config_fields=CONFIG_FIELDS,
    architecture=dict(normalization="LayerNorm", activation="gelu_tanh",
                      gated_linear_unit=False, add_bias_linear=True,
                      position_embedding_type="alibi", embedding_norm=True),
    hf_fixed=dict(apply_residual_connection_post_layernorm=False, hidden_dropout=0.0,
                  attention_dropout=0.0, initializer_range=0.02, use_cache=True),
    sizes=SIZES,
    weights=weights,
    read_extra=read_extra,
    write_extra=write_extra,
)
