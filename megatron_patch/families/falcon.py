"""Falcon (tiiuae/falcon-7b/40b/180B): RoPE, LayerNorm with bias, GeLU, parallel attention and
MLP, multi-query (7B) or grouped-query (40B/180B, "new decoder architecture") attention.

Config fields from transformers' ``FalconConfig``; sizes from the released config.json files.
Which norms a layer has follows ``FalconDecoderLayer``: sequential layers (``parallel_attn``
false) have ``input_layernorm`` and ``post_attention_layernorm``; parallel ones one shared
``input_layernorm``, or ``ln_attn`` and ``ln_mlp`` when ``num_ln_in_parallel_attn`` is 2 (the
new architecture's default). Falcon's fused ``query_key_value`` is grouped as megatron-core's
``linear_qkv`` is (per key/value head: its query heads, then k, then v; multi-query is one
group, classic multi-head one group per head), so it maps as it is.
"""
from __future__ import annotations

from megatron_patch.convert.mapping import Row
from megatron_patch.convert.ops import PadVocab
from megatron_patch.convert.sharding import COLUMN, QKV, ROW
from megatron_patch.families.base import ConfigField, Family, ModelArgs
from megatron_patch.families.rope import read_rope, write_rope

CONFIG_FIELDS = (
    ConfigField("num_hidden_layers", "num_layers", aliases=("n_layer",)),
    ConfigField("hidden_size", "hidden_size"),
    ConfigField("ffn_hidden_size", "ffn_hidden_size", default=lambda cfg: 4 * cfg["hidden_size"]),
    ConfigField("num_attention_heads", "num_attention_heads", aliases=("n_head",)),
    ConfigField("vocab_size", "vocab_size"),
    ConfigField("max_position_embeddings", "max_position_embeddings", default=2048),
    ConfigField("layer_norm_epsilon", "norm_epsilon", default=1e-5),
    ConfigField("tie_word_embeddings", "tie_embeddings", default=True),
    ConfigField("bias", "add_bias_linear", default=False),
    ConfigField("parallel_attn", "parallel_attention", default=True),
)

_FALCON = dict(vocab_size=65024, max_position_embeddings=2048, norm_epsilon=1e-5,
               tie_embeddings=True, add_bias_linear=False, parallel_attention=True)
SIZES = {
    "7B": dict(num_layers=32, hidden_size=4544, ffn_hidden_size=18176, num_attention_heads=71,
               num_query_groups=1, parallel_attention_norms=1, **_FALCON),
    "40B": dict(num_layers=60, hidden_size=8192, ffn_hidden_size=32768,
                num_attention_heads=128, num_query_groups=8, parallel_attention_norms=2,
                **_FALCON),
    "180B": dict(num_layers=80, hidden_size=14848, ffn_hidden_size=59392,
                 num_attention_heads=232, num_query_groups=8, parallel_attention_norms=2,
                 **_FALCON),
    # Test rows: 7B's style (multi-query, one norm) and 40B's (grouped, ln_attn/ln_mlp).
    "tiny": dict(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                 num_query_groups=1, parallel_attention_norms=1,
                 **{**_FALCON, "vocab_size": 512, "max_position_embeddings": 256}),
    "tiny-40b": dict(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                     num_query_groups=2, parallel_attention_norms=2,
                     **{**_FALCON, "vocab_size": 512, "max_position_embeddings": 256}),
}
for _alias, _size in (("7b", "7B"), ("40b", "40B"), ("180b", "180B")):
    SIZES[_alias] = SIZES[_size]


def _query_groups(hf_config: dict) -> int:
    """FalconAttention's key/value heads: num_kv_heads in the new architecture, one for
    multi-query, else one per head."""
    if hf_config.get("new_decoder_architecture"):
        return hf_config.get("num_kv_heads") or hf_config["num_attention_heads"]
    return 1 if hf_config.get("multi_query", True) else hf_config["num_attention_heads"]


def _norms(hf_config: dict) -> int:
    """Input norms of a parallel layer (FalconDecoderLayer's rule)."""
    count = hf_config.get("num_ln_in_parallel_attn")
    if count is None:
        count = 2 if hf_config.get("new_decoder_architecture") else 1
    return count


def read_extra(hf_config: dict, path: str) -> dict:
    """Query groups, norms and rotary fields; refusals of variants this table does not map."""
    if hf_config.get("alibi"):
        raise ValueError(f"{path}: Falcon with alibi (falcon-rw) is not supported: it scales "
                         f"ALiBi with the scores, unlike BLOOM")
    if hf_config.get("activation", "gelu") != "gelu":
        raise ValueError(f"{path}: activation '{hf_config['activation']}' is not supported "
                         f"(Falcon uses gelu)")
    if hf_config.get("new_decoder_architecture") and not hf_config.get("parallel_attn", True):
        raise ValueError(f"{path}: the new decoder architecture is always parallel")
    values = dict(num_query_groups=_query_groups(hf_config), **read_rope(hf_config, path))
    if hf_config.get("parallel_attn", True):
        values["parallel_attention_norms"] = _norms(hf_config)
    return values


def write_extra(args: ModelArgs) -> dict:
    """FalconConfig's spelling of the query groups and norms."""
    new = args.parallel_attention and (args.parallel_attention_norms == 2
                                       or args.num_query_groups not in (1, args.num_attention_heads))
    config = dict(new_decoder_architecture=new, num_kv_heads=args.num_query_groups,
                  multi_query=args.num_query_groups == 1, activation="gelu", alibi=False)
    if args.parallel_attention:
        config["num_ln_in_parallel_attn"] = args.parallel_attention_norms
    config.update(write_rope(args.rotary_base, args.rope_scaling_factor))
    return config


def _norm_rows(args: ModelArgs, hf: str, mg: str) -> list[Row]:
    """The layer's norms by name: [megatron] <- [HF]."""
    if not args.parallel_attention:
        pairs = (("input_layernorm", "input_layernorm"),
                 ("pre_mlp_layernorm", "post_attention_layernorm"))
    elif args.parallel_attention_norms == 2:  # differs from 7B: an input norm for each branch
        pairs = (("input_layernorm", "ln_attn"), ("pre_mlp_layernorm", "ln_mlp"))
    else:  # one shared norm; megatron-core's pre_mlp_layernorm is an IdentityOp
        pairs = (("input_layernorm", "input_layernorm"),)
    return [Row(mg + f"{m}.{p}", hf + f"{h}.{p}") for m, h in pairs for p in ("weight", "bias")]


def weights(args: ModelArgs) -> list[Row]:
    """HF FalconForCausalLM <-> megatron-core GPTModel (local spec names)."""
    hf, mg = "transformer.h.{layer}.", "decoder.layers.{layer}."
    bias = ("weight", "bias") if args.add_bias_linear else ("weight",)
    rows = [
        Row("embedding.word_embeddings.weight", "transformer.word_embeddings.weight", PadVocab(),
            COLUMN, stage="first"),
        *_norm_rows(args, hf, mg),
        *(Row(mg + f"self_attention.linear_qkv.{p}", hf + f"self_attention.query_key_value.{p}",
              tp=QKV) for p in bias),
        Row(mg + "self_attention.linear_proj.weight", hf + "self_attention.dense.weight", tp=ROW),
        *(Row(mg + f"mlp.linear_fc1.{p}", hf + f"mlp.dense_h_to_4h.{p}", tp=COLUMN)
          for p in bias),
        Row(mg + "mlp.linear_fc2.weight", hf + "mlp.dense_4h_to_h.weight", tp=ROW),
        *(Row(f"decoder.final_layernorm.{p}", f"transformer.ln_f.{p}", stage="last")
          for p in ("weight", "bias")),
    ]
    if args.add_bias_linear:  # row-parallel biases are whole on every rank
        rows += [Row(mg + "self_attention.linear_proj.bias", hf + "self_attention.dense.bias"),
                 Row(mg + "mlp.linear_fc2.bias", hf + "mlp.dense_4h_to_h.bias")]
    if not args.tie_embeddings:
        rows.append(Row("output_layer.weight", "lm_head.weight", PadVocab(), COLUMN,
                        stage="last"))
    return rows


FALCON = Family(
    name="falcon",
    hf_model_types=("falcon", "RefinedWeb", "RefinedWebModel"),
    hf_architecture="FalconForCausalLM",
    tokenizer="falconbpe",
    config_fields=CONFIG_FIELDS,
    architecture=dict(normalization="LayerNorm", activation="gelu", gated_linear_unit=False,
                      position_embedding_type="rope", parallel_attention=True),
    hf_fixed=dict(hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.02,
                  use_cache=True),
    sizes=SIZES,
    weights=weights,
    read_extra=read_extra,
    write_extra=write_extra,
)
