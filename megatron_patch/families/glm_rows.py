"""The tensor names ChatGLM-6B (v1) and GLM-130B share (both grew out of GLM's
SwissArmyTransformer code): ``transformer.word_embeddings``, ``transformer.layers.N.
{input_layernorm, attention.query_key_value, attention.dense, post_attention_layernorm,
mlp.dense_h_to_4h, mlp.dense_4h_to_h}`` (weights and biases), ``transformer.final_layernorm``.
What differs is how the QKV rows and the first MLP matrix map, passed in."""
from __future__ import annotations

from megatron_patch.convert.mapping import Row
from megatron_patch.convert.ops import PadVocab
from megatron_patch.convert.sharding import COLUMN, QKV, ROW


def glm_rows(qkv_op, fc1_op, fc1_split) -> list[Row]:
    """Megatron <- GLM rows, every linear and norm with a bias; no output layer."""
    glm, mg = "transformer.layers.{layer}.", "decoder.layers.{layer}."
    both = ("weight", "bias")
    return [
        Row("embedding.word_embeddings.weight", "transformer.word_embeddings.weight",
            PadVocab(), COLUMN, stage="first"),
        *(Row(mg + f"input_layernorm.{p}", glm + f"input_layernorm.{p}") for p in both),
        *(Row(mg + f"self_attention.linear_qkv.{p}", glm + f"attention.query_key_value.{p}",
              qkv_op, QKV) for p in both),
        Row(mg + "self_attention.linear_proj.weight", glm + "attention.dense.weight", tp=ROW),
        Row(mg + "self_attention.linear_proj.bias", glm + "attention.dense.bias"),
        *(Row(mg + f"pre_mlp_layernorm.{p}", glm + f"post_attention_layernorm.{p}")
          for p in both),
        *(Row(mg + f"mlp.linear_fc1.{p}", glm + f"mlp.dense_h_to_4h.{p}", fc1_op, fc1_split)
          for p in both),
        Row(mg + "mlp.linear_fc2.weight", glm + "mlp.dense_4h_to_h.weight", tp=ROW),
        Row(mg + "mlp.linear_fc2.bias", glm + "mlp.dense_4h_to_h.bias"),
        *(Row(f"decoder.final_layernorm.{p}", f"transformer.final_layernorm.{p}", stage="last")
          for p in both),
    ]
