"""ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B (THUDM): RMSNorm, SwiGLU, grouped (multi-query) key /
value heads with a QKV bias, no other bias, untied output, and rotary angles on the first half
of each head, rotating interleaved pairs (x0, x1), (x2, x3), ...

One declaration, three checkpoint layouts (``ModelArgs.checkpoint_layout``, kept in the
metadata so Megatron -> HF writes back the layout it read):

* ``glm``: transformers' ``GlmForCausalLM`` (``model.layers.N.self_attn.{q,k,v}_proj``, fused
  ``mlp.gate_up_proj``);
* ``glm4``: transformers' ``Glm4ForCausalLM`` (GLM-4-0414): ``glm`` plus a norm on each
  sublayer's output (``post_self_attn_layernorm``, ``post_mlp_layernorm``);
* ``chatglm2``: the remote-code ``model_type: chatglm`` release of ChatGLM2/3 and GLM-4-9B
  (``transformer.encoder.layers.N.self_attention.query_key_value``, contiguous
  ``[Q | K | V]``; ``mlp.dense_h_to_4h`` is ``[gate | up]``; ``rope_ratio`` scales the base
  10000). Its config.json has its own field names (``num_layers``, ``padded_vocab_size``,
  ``multi_query_group_num``, ``seq_length``, ``kv_channels``); its modeling code stays the
  user's (``auto_map``), converted checkpoints carry only config.json and weights.

The field names and the QKV layouts are from transformers 5.24's ``GlmConfig`` / modeling_glm.py
and chatglm.cpp's converter (../shared/notes/glm_references.md).
"""
from __future__ import annotations

from megatron_patch.convert.derived import ChatGLMInvFreq, Derived
from megatron_patch.convert.mapping import Row
from megatron_patch.convert.ops import Copy, FuseQKV, PadVocab, SplitQKV, SwapRotaryQuarters
from megatron_patch.convert.sharding import COLUMN, QKV, ROW, Split
from megatron_patch.families.base import ConfigField, Family, ModelArgs
from megatron_patch.families.glm_rows import glm_rows

# glm's names first (written back for glm / glm4); the remote-code config's as aliases.
CONFIG_FIELDS = (
    ConfigField("num_hidden_layers", "num_layers", aliases=("num_layers",)),
    ConfigField("hidden_size", "hidden_size"),
    ConfigField("intermediate_size", "ffn_hidden_size",
                aliases=("ffn_hidden_size", "inner_hidden_size")),
    ConfigField("num_attention_heads", "num_attention_heads"),
    ConfigField("num_key_value_heads", "num_query_groups",
                default=lambda cfg: cfg["num_attention_heads"]),
    ConfigField("head_dim", "kv_channels", aliases=("kv_channels",),
                default=lambda cfg: cfg["hidden_size"] // cfg["num_attention_heads"]),
    ConfigField("vocab_size", "vocab_size", aliases=("padded_vocab_size",)),
    ConfigField("max_position_embeddings", "max_position_embeddings",
                aliases=("seq_length", "max_sequence_length"), default=8192),
    ConfigField("rms_norm_eps", "norm_epsilon", aliases=("layernorm_epsilon",), default=1e-5),
    ConfigField("attention_bias", "add_qkv_bias", aliases=("add_qkv_bias",), default=True),
    ConfigField("tie_word_embeddings", "tie_embeddings", default=False),
)

_CHATGLM2 = dict(num_layers=28, hidden_size=4096, ffn_hidden_size=13696, num_attention_heads=32,
                 num_query_groups=2, kv_channels=128, vocab_size=65024, norm_epsilon=1e-5,
                 checkpoint_layout="chatglm2")
# ChatGLM-6B (v1), after its 2023-04-06 vocabulary update: [MASK] 130000, [gMASK] 130001,
# <sop> (bos) 130004, <eop> (eos) 130005, <pad> 3
_V1_IDS = dict(sop=130004, gmask=130001, mask=130000, pad=3, eop=130005)
_V1 = dict(checkpoint_layout="chatglm-v1", normalization="LayerNorm", activation="gelu_tanh",
           gated_linear_unit=False, add_bias_linear=True, add_qkv_bias=True,
           position_embedding_type="rope_2d", rotary_percent=1.0, rotary_interleaved=False,
           deepnorm=True)
_TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4,
             num_query_groups=2, kv_channels=16, vocab_size=512, max_position_embeddings=256)
SIZES = {
    "chatglm2-6b": dict(max_position_embeddings=32768, **_CHATGLM2),
    "chatglm3-6b": dict(max_position_embeddings=8192, **_CHATGLM2),
    "glm-4-9b": dict(num_layers=40, hidden_size=4096, ffn_hidden_size=13696,
                     num_attention_heads=32, num_query_groups=2, kv_channels=128,
                     vocab_size=151552, max_position_embeddings=8192, norm_epsilon=1.5625e-07,
                     checkpoint_layout="glm"),
    "chatglm-6b": dict(num_layers=28, hidden_size=4096, ffn_hidden_size=16384,
                       num_attention_heads=32, vocab_size=130528, max_position_embeddings=2048,
                       norm_epsilon=1e-5, **_V1),
    # Test rows, one per layout.
    "tiny": dict(checkpoint_layout="glm", **_TINY),
    "tiny-glm4": dict(checkpoint_layout="glm4", post_sublayer_norms=True, **_TINY),
    "tiny-chatglm2": dict(checkpoint_layout="chatglm2", **_TINY),
    "tiny-v1": dict(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                    vocab_size=512, max_position_embeddings=256,
                    prefix_lm_ids=dict(sop=500, gmask=502, mask=501, pad=503, eop=499), **_V1),
}
SIZES["chatglm-6b"]["prefix_lm_ids"] = _V1_IDS
for _alias, _size in (("6B", "chatglm2-6b"), ("9B", "glm-4-9b")):
    SIZES[_alias] = SIZES[_size]

LAYOUTS = {"glm": ("glm", "GlmForCausalLM"), "glm4": ("glm4", "Glm4ForCausalLM"),
           "chatglm2": ("chatglm", "ChatGLMModel"), "chatglm-v1": ("chatglm", "ChatGLMModel")}


def transformers_layout(args: ModelArgs) -> ModelArgs:
    """``args`` in a layout transformers has a class for: the remote-code ChatGLM2 layout as
    ``glm`` (the same model under other names); others as they are. For HF baselines."""
    import dataclasses

    if args.checkpoint_layout == "chatglm2":
        return dataclasses.replace(args, checkpoint_layout="glm")
    return args


def _layout(hf_config: dict, path: str) -> str:
    model_type = hf_config.get("model_type")
    if model_type in ("glm", "glm4"):
        return model_type
    if hf_config.get("position_encoding_2d") or "inner_hidden_size" in hf_config:
        return "chatglm-v1"
    return "chatglm2"


def _refuse(hf_config: dict, path: str, expected: dict) -> None:
    for key, value in expected.items():
        if key in hf_config and hf_config[key] != value:
            raise ValueError(f"{path}: {key}={hf_config[key]!r} is not supported (ChatGLM2/3 "
                             f"and GLM-4 have {value!r})")


def read_extra(hf_config: dict, path: str) -> dict:
    """The layout, its rotary fields, and refusals of what this table does not map."""
    layout = _layout(hf_config, path)
    values = dict(checkpoint_layout=layout, post_sublayer_norms=layout == "glm4")
    if layout == "chatglm-v1":
        if not hf_config.get("position_encoding_2d", True):
            raise ValueError(f"{path}: ChatGLM-6B with position_encoding_2d false is not "
                             f"supported (the release uses 2-D positions)")
        ids = {}
        for key, field in (("sop", "bos_token_id"), ("gmask", "gmask_token_id"),
                           ("mask", "mask_token_id"), ("pad", "pad_token_id"),
                           ("eop", "eos_token_id")):
            if hf_config.get(field) is None:
                raise ValueError(f"{path}: ChatGLM-6B config.json has no '{field}' (the "
                                 f"prefix-LM mask and positions need it)")
            ids[key] = int(hf_config[field])
        return {**values, **_V1, "prefix_lm_ids": ids, "rotary_base": 10000.0}
    if layout == "chatglm2":
        _refuse(hf_config, path, dict(add_bias_linear=False, rmsnorm=True, original_rope=True,
                                      apply_residual_connection_post_layernorm=False,
                                      post_layer_norm=True))
        if not hf_config.get("multi_query_attention", False):
            values["num_query_groups"] = hf_config["num_attention_heads"]
        else:
            values["num_query_groups"] = hf_config["multi_query_group_num"]
        values["rotary_base"] = 10000.0 * float(hf_config.get("rope_ratio", 1.0))
        return values
    _refuse(hf_config, path, dict(hidden_act="silu"))
    params = hf_config.get("rope_parameters") or {}
    kind = params.get("rope_type", "default")
    if kind != "default" or hf_config.get("rope_scaling"):
        raise ValueError(f"{path}: rope scaling ('{kind}') is not supported for GLM")
    values["rotary_base"] = float(hf_config.get("rope_theta", params.get("rope_theta", 10000.0)))
    values["rotary_percent"] = float(hf_config.get(
        "partial_rotary_factor", params.get("partial_rotary_factor", 0.5)))
    return values


def write_extra(args: ModelArgs) -> dict:
    """glm / glm4: the layout's class, rotary fields in the spelling transformers 4 and 5
    read. Token ids belong to the tokenizer (the original config.json, kept in the metadata,
    is what conversion writes back); GlmConfig's defaults (pad 151329) would not fit a
    smaller vocabulary."""
    model_type, architecture = LAYOUTS[args.checkpoint_layout]
    return dict(model_type=model_type, architectures=[architecture], hidden_act="silu",
                rope_theta=args.rotary_base, partial_rotary_factor=args.rotary_percent,
                pad_token_id=None, eos_token_id=None, bos_token_id=None)


def _write_v1_config(args: ModelArgs) -> dict:
    """ChatGLM-6B's remote-code config.json."""
    ids = args.prefix_lm_ids
    return dict(
        architectures=["ChatGLMModel"], model_type="chatglm",
        auto_map={"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                  "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                  "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        num_layers=args.num_layers, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
        inner_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
        max_sequence_length=args.max_position_embeddings, layernorm_epsilon=args.norm_epsilon,
        position_encoding_2d=True, bos_token_id=ids["sop"], eos_token_id=ids["eop"],
        mask_token_id=ids["mask"], gmask_token_id=ids["gmask"], pad_token_id=ids["pad"],
        use_cache=True, pre_seq_len=None, prefix_projection=False, quantization_bit=0)


def write_config(args: ModelArgs) -> dict | None:
    """The remote-code config.json of ChatGLM-6B or ChatGLM2/3 / GLM-4
    (configuration_chatglm.py's fields); None for transformers' glm / glm4."""
    if args.checkpoint_layout == "chatglm-v1":
        return _write_v1_config(args)
    if args.checkpoint_layout != "chatglm2":
        return None
    return dict(
        architectures=["ChatGLMModel"], model_type="chatglm",
        auto_map={"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                  "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                  "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        num_layers=args.num_layers, padded_vocab_size=args.vocab_size,
        hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        kv_channels=args.kv_channels, num_attention_heads=args.num_attention_heads,
        seq_length=args.max_position_embeddings, layernorm_epsilon=args.norm_epsilon,
        rmsnorm=True, apply_residual_connection_post_layernorm=False, post_layer_norm=True,
        add_bias_linear=False, add_qkv_bias=args.add_qkv_bias, bias_dropout_fusion=True,
        multi_query_attention=args.num_query_groups != args.num_attention_heads,
        multi_query_group_num=args.num_query_groups, rope_ratio=args.rotary_base / 10000.0,
        apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True,
        fp32_residual_connection=False, original_rope=True, hidden_dropout=0.0,
        attention_dropout=0.0, tie_word_embeddings=args.tie_embeddings, use_cache=True)


def _chatglm2_weights(args: ModelArgs) -> list[Row]:
    hf, mg = "transformer.encoder.layers.{layer}.", "decoder.layers.{layer}."
    qkv = ("weight", "bias") if args.add_qkv_bias else ("weight",)
    rows = [
        Row("embedding.word_embeddings.weight", "transformer.embedding.word_embeddings.weight",
            PadVocab(), COLUMN, stage="first"),
        Row(mg + "input_layernorm.weight", hf + "input_layernorm.weight"),
        *(Row(mg + f"self_attention.linear_qkv.{p}", hf + f"self_attention.query_key_value.{p}",
              SplitQKV(), QKV) for p in qkv),
        Row(mg + "self_attention.linear_proj.weight", hf + "self_attention.dense.weight",
            tp=ROW),
        Row(mg + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight"),
        Row(mg + "mlp.linear_fc1.weight", hf + "mlp.dense_h_to_4h.weight", Copy(),
            Split(dim=0, parts=2)),
        Row(mg + "mlp.linear_fc2.weight", hf + "mlp.dense_4h_to_h.weight", tp=ROW),
        Row("decoder.final_layernorm.weight", "transformer.encoder.final_layernorm.weight",
            stage="last"),
    ]
    if not args.tie_embeddings:
        rows.append(Row("output_layer.weight", "transformer.output_layer.weight", PadVocab(),
                        COLUMN, stage="last"))
    return rows


def _v1_weights(args: ModelArgs) -> list[Row]:
    """ChatGLM-6B: biases everywhere, per-head [q k v] rows (megatron-core's grouped layout
    with a group per head) with the 2-D rotary quarters swapped, LayerNorms with bias."""
    rows = glm_rows(SwapRotaryQuarters(), Copy(), COLUMN)
    if not args.tie_embeddings:
        rows.append(Row("output_layer.weight", "lm_head.weight", PadVocab(), COLUMN,
                        stage="last"))
    return rows


def weights(args: ModelArgs) -> list[Row]:
    """HF GlmForCausalLM / Glm4ForCausalLM / remote-code ChatGLM <-> megatron-core GPTModel."""
    if args.checkpoint_layout == "chatglm-v1":
        return _v1_weights(args)
    if args.checkpoint_layout == "chatglm2":
        return _chatglm2_weights(args)
    hf, mg = "model.layers.{layer}.", "decoder.layers.{layer}."
    qkv = ("weight", "bias") if args.add_qkv_bias else ("weight",)
    rows = [
        Row("embedding.word_embeddings.weight", "model.embed_tokens.weight", PadVocab(), COLUMN,
            stage="first"),
        Row(mg + "input_layernorm.weight", hf + "input_layernorm.weight"),
        *(Row(mg + f"self_attention.linear_qkv.{p}",
              tuple(hf + f"self_attn.{x}_proj.{p}" for x in "qkv"), FuseQKV(), QKV)
          for p in qkv),
        Row(mg + "self_attention.linear_proj.weight", hf + "self_attn.o_proj.weight", tp=ROW),
        Row(mg + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight"),
        Row(mg + "mlp.linear_fc1.weight", hf + "mlp.gate_up_proj.weight", Copy(),
            Split(dim=0, parts=2)),
        Row(mg + "mlp.linear_fc2.weight", hf + "mlp.down_proj.weight", tp=ROW),
        Row("decoder.final_layernorm.weight", "model.norm.weight", stage="last"),
    ]
    if args.post_sublayer_norms:
        rows += [Row(mg + f"{name}.weight", hf + f"{name}.weight")
                 for name in ("post_self_attn_layernorm", "post_mlp_layernorm")]
    if not args.tie_embeddings:
        rows.append(Row("output_layer.weight", "lm_head.weight", PadVocab(), COLUMN,
                        stage="last"))
    return rows


CHATGLM = Family(
    name="chatglm",
    hf_model_types=("glm", "glm4", "chatglm"),
    hf_architecture="GlmForCausalLM",
    tokenizer="chatglm",
    config_fields=CONFIG_FIELDS,
    architecture=dict(normalization="RMSNorm", activation="silu", gated_linear_unit=True,
                      add_bias_linear=False, add_qkv_bias=True, position_embedding_type="rope",
                      rotary_percent=0.5, rotary_interleaved=True),
    hf_fixed=dict(attention_dropout=0.0, initializer_range=0.02, use_cache=True),
    sizes=SIZES,
    weights=weights,
    derived_buffers=(Derived("transformer.rotary_pos_emb.inv_freq", ChatGLMInvFreq()),),
    read_extra=read_extra,
    write_extra=write_extra,
    write_config=write_config,
)
