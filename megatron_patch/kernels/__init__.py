"""Triton kernels for decoding at small batch, where a step is bound by reading weights and the
KV cache, not by arithmetic.

- :mod:`.gemv`: ``x @ W.T`` for a few rows of ``x`` (cuBLAS's skinny GEMMs read the weights at
  ~68% of the copy bandwidth on an H200).
- :mod:`.decode_attention`: one query per row against a static KV cache, split over the keys
  (flash-decoding), so a batch of one still spreads over the whole GPU.

Both are ``torch.library`` custom ops (``torch.ops.megatron_patch.*``): ``torch.compile`` treats
them as opaque calls and CUDA graphs capture their launches. They need Triton and a GPU; on a
CPU they run in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before Triton is
imported (how the tests run them).
"""
from __future__ import annotations

import importlib.util
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def supported_on(device: torch.device) -> bool:
    """True when these kernels can run on ``device``: a GPU with Triton, or the CPU under
    Triton's interpreter."""
    if not triton_importable():
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())
