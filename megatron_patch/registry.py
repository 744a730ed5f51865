"""The families megatron_patch knows, looked up by name or by HF ``model_type``."""
from __future__ import annotations

from megatron_patch.families.base import Family
from megatron_patch.families.bloom import BLOOM
from megatron_patch.families.chatglm import CHATGLM
from megatron_patch.families.falcon import FALCON
from megatron_patch.families.galactica import GALACTICA
from megatron_patch.families.glm130b import GLM130B
from megatron_patch.families.llama import LLAMA

FAMILIES: dict[str, Family] = {family.name: family
                               for family in (LLAMA, BLOOM, FALCON, GALACTICA, CHATGLM,
                                                GLM130B)}


def get_family(name: str) -> Family:
    """Family by its name (``--model-family``)."""
    if name in FAMILIES:
        return FAMILIES[name]
    raise ValueError(f"unknown model family '{name}'; available: {', '.join(FAMILIES)}")


def family_for_model_type(model_type: str) -> Family:
    """Family whose HF ``model_type`` (config.json) is exactly ``model_type``."""
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    raise ValueError(f"no registered family has HF model_type '{model_type}'; registered: "
                     + ", ".join(f"{f.name} ({'/'.join(f.hf_model_types)})"
                                 for f in FAMILIES.values()))
