"""Rotary-embedding fields of an HF config, in both the transformers 4 spelling (``rope_theta``
+ ``rope_scaling``) and the transformers 5 one (``rope_parameters``), mapped onto what
megatron-core's ``RotaryEmbedding`` can compute."""
from __future__ import annotations

# megatron-core 0.16's Llama-3.1 scaling hard-codes these three values
# (models/common/embeddings/rotary_pos_embedding.py, apply_rope_scaling); only `factor` varies.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def read_rope(hf_config: dict, path: str) -> dict:
    """-> ``{"rotary_base": ..., "rope_scaling_factor": ...}``; refuses what mcore cannot do."""
    params = dict(hf_config.get("rope_parameters") or {})
    scaling = dict(hf_config.get("rope_scaling") or {})
    theta = hf_config.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", params.get("rope_type", "default")))
    if not scaling and kind != "default":
        scaling = params
    if kind == "default":
        return {"rotary_base": float(theta), "rope_scaling_factor": None}
    if kind != "llama3":
        raise ValueError(f"{path}: rope scaling type '{kind}' is not supported by megatron-core's "
                         f"rotary embedding; supported: default, llama3")
    for key, expected in LLAMA3_FIXED.items():
        if float(scaling.get(key, expected)) != float(expected):
            raise ValueError(f"{path}: llama3 rope scaling with {key}={scaling[key]} is not "
                             f"supported (megatron-core fixes it to {expected})")
    if "factor" not in scaling:
        raise ValueError(f"{path}: llama3 rope scaling without 'factor'")
    return {"rotary_base": float(theta), "rope_scaling_factor": float(scaling["factor"])}


def write_rope(rotary_base: float, rope_scaling_factor: float | None) -> dict:
    """Inverse of :func:`read_rope`, in the transformers 4 spelling both versions read."""
    config = {"rope_theta": rotary_base}
    if rope_scaling_factor:
        config["rope_scaling"] = {"rope_type": "llama3", "factor": rope_scaling_factor,
                                  **LLAMA3_FIXED}
    return config
