"""Text generation from Megatron checkpoints: KV-cached decoding over megatron-core's GPTModel
(megatron-core's own cache, or ours with CUDA graphs), sampling, prompt files.
``python -m megatron_patch.generate`` is the command line (megatron_patch/generate.py)."""
from megatron_patch.generation.engine import (BACKENDS, Completion, Limits, build_backend,
                                              generate_batch)
from megatron_patch.generation.sampling import SamplingParams

__all__ = ["BACKENDS", "Completion", "Limits", "SamplingParams", "build_backend",
           "generate_batch"]
