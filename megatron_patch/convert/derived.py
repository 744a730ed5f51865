"""Derived HF buffers: tensors that some HF checkpoints store although they are a function of
config.json, not weights. Older Llama exports (and fine-tunes saved from them) carry every
layer's ``self_attn.rotary_emb.inv_freq``, which older transformers releases kept as a
persistent buffer; transformers loads such a directory and recomputes the buffer, and
Megatron-LM's and the 2023 Pai-Megatron-Patch converters skip it.

A family names the derived buffers it may meet (``Family.derived_buffers``); HF -> Megatron
checks each one a checkpoint stores against the config, counts it as consumed and writes nothing
for it. Megatron -> HF does not write it back either (transformers recomputes it). This is not a
blanket ignore: a tensor that neither the weight table nor this list names is still an error,
and a declared buffer that contradicts the config is one too, naming the tensor and the field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_patch.convert.mapping import LAYER

# How far a stored buffer may be from the value computed here, in units of the precision that
# bounds it: its own dtype's, or float32's (transformers computes these in float32, and another
# machine's pow() may differ in the last bits). Below the smallest normal number (fp16 stores
# the slowest frequencies as subnormals) the spacing is absolute, so the tolerance is too.
ULPS = 4


@dataclass(frozen=True)
class Derived:
    """An HF-only buffer ``hf`` (``{layer}`` repeats for every layer) that ``kind`` computes
    from the model's args: ``kind.expected(args)`` and ``kind.config_fields(args)``, the
    config.json fields it comes from, for messages."""

    hf: str
    kind: object

    def names(self, num_layers: int) -> list[str]:
        if LAYER not in self.hf:
            return [self.hf]
        return [self.hf.replace(LAYER, str(layer)) for layer in range(num_layers)]


@dataclass(frozen=True)
class RotaryInvFreq:
    """transformers' rotary ``inv_freq``: ``1 / rope_theta ** (2i / head_dim)`` for
    ``i < head_dim / 2`` in float32 (``_compute_default_rope_parameters``), then, with llama3
    rope scaling, ``_compute_llama3_parameters``'s smoothing with ``llama3``'s fixed values
    (low_freq_factor, high_freq_factor, original_max_position_embeddings) and args' factor."""

    llama3: dict

    def expected(self, args) -> torch.Tensor:
        dim = args.kv_channels
        inv_freq = 1.0 / (args.rotary_base ** (
            torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
        if args.rope_scaling_factor is None:
            return inv_freq
        return _llama3_scaled(inv_freq, args.rope_scaling_factor, **self.llama3)

    def config_fields(self, args) -> str:
        fields = [f"rope_theta {args.rotary_base:g}", f"head_dim {args.kv_channels}"]
        if args.rope_scaling_factor is not None:
            fields.append(f"rope_scaling (llama3, factor {args.rope_scaling_factor:g})")
        return ", ".join(fields[:-1]) + " and " + fields[-1]


@dataclass(frozen=True)
class ChatGLMInvFreq:
    """The remote-code ChatGLM2/3 and GLM-4 ``transformer.rotary_pos_emb.inv_freq``:
    ``1 / 10000 ** (2i / n)`` over the rotating part of the head (``n`` = kv_channels x
    rotary_percent), in float32. Its ``__init__`` uses 10000 whatever ``rope_ratio`` is (the
    ratio scales the base in ``forward_impl``, which recomputes the angles)."""

    def expected(self, args) -> torch.Tensor:
        dim = int(args.kv_channels * args.rotary_percent)
        return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))

    def config_fields(self, args) -> str:
        return f"kv_channels {args.kv_channels}"


def _llama3_scaled(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                   high_freq_factor: float, original_max_position_embeddings: int):
    """transformers' ``_compute_llama3_parameters`` (modeling_rope_utils.py), step for step."""
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def mismatch(stored: torch.Tensor, expected: torch.Tensor) -> str | None:
    """Why ``stored`` is not ``expected`` saved in ``stored``'s dtype, or None if it is."""
    if tuple(stored.shape) != tuple(expected.shape):
        return f"has shape {list(stored.shape)}, expected {list(expected.shape)}"
    if not stored.is_floating_point():
        return f"has dtype {str(stored.dtype).replace('torch.', '')}, expected a float"
    info = torch.finfo(stored.dtype)
    eps = max(info.eps, torch.finfo(torch.float32).eps)
    want = expected.to(stored.dtype).double()  # rounded as saving in that dtype rounds it
    error = (stored.double() - want).abs()
    allowed = ULPS * eps * want.abs().clamp(min=info.smallest_normal)
    if bool((error <= allowed).all()):
        return None
    worst = int(torch.argmax(error / allowed))
    return (f"element [{worst}] is {stored[worst].item():.6g}, expected {want[worst].item():.6g} "
            f"(tolerance {ULPS} x {eps:.2g} relative for "
            f"{str(stored.dtype).replace('torch.', '')})")
