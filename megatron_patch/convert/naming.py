"""megatron-core's two names for a transformer layer's norms, in ``torch`` checkpoints.

Weight-mapping tables use the local spec's names. megatron-core's Transformer Engine spec
fuses each pre-norm into the linear layer after it, so the same weights carry other names
(Megatron-LM ``tools/checkpoint/schema_core.py``, ``CoreLocalSchema`` / ``CoreTESchema``)::

    local spec (in decoder.layers.N.)   Transformer Engine spec
    input_layernorm.weight              self_attention.linear_qkv.layer_norm_weight
    pre_mlp_layernorm.bias              mlp.linear_fc1.layer_norm_bias

and its modules keep an ``_extra_state`` (FP8 metadata) that a strict load expects. The
renaming is generic: every family's table gets both schemes. ``torch_dist`` checkpoints need
none of it: megatron-core's local spec stores the Transformer Engine names there itself
(``gpt_layer_specs.py``, ``sharded_state_dict_keys_map``), so both specs write the same keys.
"""
from __future__ import annotations

import re

from megatron_patch.convert.io_utils import CheckpointError

LOCAL = "local"
TRANSFORMER_ENGINE = "transformer_engine"
SCHEMES = (LOCAL, TRANSFORMER_ENGINE)

# Inside decoder.layers.N.: the local spec's prefix -> the Transformer Engine spec's.
_TE_PREFIXES = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))
# Transformer Engine modules of a layer with an _extra_state entry (TE's base module and its
# DotProductAttention); the local spec's linear layers default theirs when loading.
_TE_EXTRA_STATE = ("self_attention.linear_qkv", "self_attention.core_attention",
                   "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
_LAYER = re.compile(r"^(decoder\.layers\.\d+\.)(.+)$")


def _swap(name: str, pairs) -> str:
    match = _LAYER.match(name)
    if match:
        for old, new in pairs:
            if match.group(2).startswith(old):
                return match.group(1) + new + match.group(2)[len(old):]
    return name


def to_scheme(name: str, scheme: str) -> str:
    """A local-spec name as ``scheme`` spells it."""
    return name if scheme == LOCAL else _swap(name, _TE_PREFIXES)


def to_local(name: str, scheme: str) -> str:
    """Inverse of :func:`to_scheme`."""
    return name if scheme == LOCAL else _swap(name, [(te, local) for local, te in _TE_PREFIXES])


def detect(keys, where: str) -> str:
    """The scheme a rank file's keys use (local when they name no norm either way)."""
    found = {}
    for key in keys:
        match = _LAYER.match(key)
        for local, te in _TE_PREFIXES if match else ():
            if match.group(2).startswith(local):
                found.setdefault(LOCAL, key)
            elif match.group(2).startswith(te):
                found.setdefault(TRANSFORMER_ENGINE, key)
    if len(found) > 1:
        raise CheckpointError(f"{where}: holds local-spec names ({found[LOCAL]}) and Transformer "
                              f"Engine names ({found[TRANSFORMER_ENGINE]}) together")
    return next(iter(found), LOCAL)


def extra_state_keys(names, scheme: str) -> list[str]:
    """The ``_extra_state`` entries a ``scheme`` model's state dict holds beside ``names`` (its
    tensors, already in ``scheme``): None for every Transformer Engine module of each layer."""
    if scheme == LOCAL:
        return []
    layers = sorted({m.group(1) for m in map(_LAYER.match, names) if m},
                    key=lambda prefix: int(prefix.split(".")[2]))
    present = set(names)
    return [f"{layer}{module}._extra_state" for layer in layers for module in _TE_EXTRA_STATE
            if module.endswith("core_attention") or
            any(n.startswith(f"{layer}{module}.") for n in present)]
