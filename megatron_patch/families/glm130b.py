"""GLM-130B (THUDM, 2022): DeepNorm post-LN residuals, GeGLU, rotary over the whole head
(rotate-half, base 10000), GLM's prefix-LM mask, biases on every linear and norm, output tied
to the word embeddings. Released as a SwissArmyTransformer (SAT) checkpoint; there is no
transformers model.

The HF-side checkpoint is a directory with config.json (``model_type: glm130b``, SAT's argument
names: ``num_layers``, ``hidden_size``, ``inner_hidden_size``, ...) and safetensors under SAT's
tensor names (``transformer.layers.N.attention.query_key_value.weight``, ...); the SAT
checkpoint itself (``latest`` + ``<iter>/mp_rank_XX_model_states.pt``) is read and written by
``convert/sat_io.py``. Facts from SAT 0.4.12's glm130B_model.py and GLM-130B's configs and
tools/convert_tp.py (../shared/notes/glm_references.md §3.2):

* query_key_value rows are per head ``[q k v]``: megatron-core's grouped layout with one group
  per head, mapped as is;
* ``mlp.dense_h_to_4h`` is ``[x1; x2]`` and the MLP computes ``x1 * gelu(x2)``; megatron-core's
  GLU activates its first half, so the halves swap (``SwapHalves``);
* the release's per-layer ``attention.rotary_emb.inv_freq`` is a function of the config:
  checked, not carried.
"""
from __future__ import annotations

from megatron_patch.convert.derived import Derived, RotaryInvFreq
from megatron_patch.convert.ops import Copy, SwapHalves
from megatron_patch.convert.sharding import Split
from megatron_patch.families.base import ConfigField, Family, ModelArgs
from megatron_patch.families.glm_rows import glm_rows
from megatron_patch.families.rope import LLAMA3_FIXED

CONFIG_FIELDS = (
    ConfigField("num_layers", "num_layers"),
    ConfigField("hidden_size", "hidden_size"),
    ConfigField("inner_hidden_size", "ffn_hidden_size"),
    ConfigField("num_attention_heads", "num_attention_heads"),
    ConfigField("vocab_size", "vocab_size"),
    ConfigField("max_sequence_length", "max_position_embeddings", default=2048),
    ConfigField("layernorm_epsilon", "norm_epsilon", default=1e-5),
)

# icetk-glm-130B's special tokens (SAT's ice_tokenizer.py): [MASK] 150000, [gMASK] 150001,
# sop 150004, eop 150005; generation pads on the left with none of them (no pad id).
_IDS = dict(sop=150004, gmask=150001, mask=150000, pad=None, eop=150005)
_GLM = dict(vocab_size=150528, max_position_embeddings=2048, norm_epsilon=1e-5)
SIZES = {
    "130B": dict(num_layers=70, hidden_size=12288, ffn_hidden_size=32768,
                 num_attention_heads=96, prefix_lm_ids=_IDS, **_GLM),
    # The seed's smaller presets (GLM's 2B and 10B shapes, GeGLU with 8/3 x hidden).
    "2B": dict(num_layers=36, hidden_size=2048, ffn_hidden_size=5461, num_attention_heads=32,
               prefix_lm_ids=_IDS, **_GLM),
    "10B": dict(num_layers=48, hidden_size=4096, ffn_hidden_size=10922, num_attention_heads=64,
                prefix_lm_ids=_IDS, **_GLM),
    "tiny": dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                 vocab_size=512, max_position_embeddings=256, norm_epsilon=1e-5,
                 prefix_lm_ids=dict(sop=500, gmask=502, mask=501, pad=503, eop=499)),
}
for _alias, _size in (("130b", "130B"), ("2b", "2B"), ("10b", "10B")):
    SIZES[_alias] = SIZES[_size]

_ID_FIELDS = (("sop", "sop_token_id"), ("gmask", "gmask_token_id"), ("mask", "mask_token_id"),
              ("pad", "pad_token_id"), ("eop", "eop_token_id"))


def read_extra(hf_config: dict, path: str) -> dict:
    """Special token ids (the release's when absent) and refusals of SAT options."""
    if hf_config.get("position_encoding_2d"):
        raise ValueError(f"{path}: GLM-130B with position_encoding_2d is not supported "
                         f"(the release rotates the whole head; ChatGLM-6B is --model-family "
                         f"chatglm)")
    if hf_config.get("no_glu"):
        raise ValueError(f"{path}: GLM-130B with no_glu is not supported (the release is GeGLU)")
    ids = {key: hf_config.get(field, _IDS[key]) for key, field in _ID_FIELDS}
    return dict(prefix_lm_ids=ids)


def write_extra(args: ModelArgs) -> dict:
    ids = args.prefix_lm_ids or _IDS
    return dict(position_encoding_2d=False, no_glu=False, layernorm_order="post",
                **{field: ids[key] for key, field in _ID_FIELDS})


def weights(args: ModelArgs) -> list:
    """SAT GLM130B names <-> megatron-core GPTModel (local spec names); the output layer is
    the word embeddings."""
    return glm_rows(Copy(), SwapHalves(), Split(dim=0, parts=2))


GLM130B = Family(
    name="glm130b",
    hf_model_types=("glm130b",),
    hf_architecture="GLM130B",
    tokenizer="glm130b",
    config_fields=CONFIG_FIELDS,
    architecture=dict(normalization="LayerNorm", activation="gelu", gated_linear_unit=True,
                      add_bias_linear=True, add_qkv_bias=True, position_embedding_type="rope",
                      deepnorm=True, tie_embeddings=True),
    hf_fixed=dict(),
    sizes=SIZES,
    weights=weights,
    derived_buffers=(Derived("transformer.layers.{layer}.attention.rotary_emb.inv_freq",
                             RotaryInvFreq(LLAMA3_FIXED)),),
    read_extra=read_extra,
    write_extra=write_extra,
)
