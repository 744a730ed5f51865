"""RMSNorm / LayerNorm for megatron-core layer specs, with sequence parallelism.

megatron-core's torch fallback (``WrappedTorchNorm``) refuses ``sequence_parallel`` and its
fused versions need apex or Transformer Engine. This one accepts it: under sequence
parallelism each rank normalises its own slice of the sequence, and the weight is marked
``sequence_parallel`` so megatron-core all-reduces its gradient across the tensor-parallel
group (finalize_model_grads). Parameter names (``weight``, ``bias``) match the local spec's, so
checkpoints do not change.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Norm(torch.nn.Module):
    """``config.normalization`` (RMSNorm or LayerNorm) over the last dimension."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization '{config.normalization}' is not supported")
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None
        if not self.rms:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for param in (self.weight, self.bias):
            if param is not None:
                setattr(param, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if self.rms:
            return F.rms_norm(x, shape, self.weight, self.eps)
        return F.layer_norm(x, shape, self.weight, self.bias, self.eps)
