"""``--ckpt-format torch_dist``: megatron-core distributed checkpoints.

A torch_dist checkpoint stores global tensors with their shard layout, so megatron-core
reshards it at load time for any TP/PP. The converter therefore writes it from one process at
TP1/PP1 (the model is built once, with its weights filled in place, so host memory stays near
one copy) and reads it back the same way, Megatron-LM's own (any TP/PP, either spec) too.

The keys are megatron-core's: its local spec stores the Transformer Engine spec's names here
(see :mod:`.naming`), so one layout serves both. The common state (``common.pt``) holds
``megatron_patch`` (our metadata) and Megatron-LM's ``args``; Megatron-LM's adds its
``optimizer`` / ``opt_param_scheduler`` state, and its sharded part ``optimizer.state.*`` and
``rng_state``, none of which the converter reads."""
from __future__ import annotations

import os

import torch

from megatron_patch import compat
from megatron_patch.convert.checkpoint_args import megatron_lm_args
from megatron_patch.convert.io_utils import CheckpointError
from megatron_patch.convert.megatron_io import CHECKPOINT_VERSION, resolve_checkpoint

COMMON_FILE = "common.pt"


def _single_process_model(family, args, padded_vocab: int, dtype: str = "float32"):
    """A TP1/PP1 GPTModel with uninitialised weights (world size 1)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        compat.initialize_parallel(1, 1)
    elif dist.get_world_size() != 1:
        raise CheckpointError("torch_dist conversion runs in a single process; do not start "
                              "the converter with torchrun")
    from megatron_patch.families.model import build_gpt_model, transformer_config

    # Weights keep the checkpoint's dtype (bf16 stays bf16 on the way back).
    config = transformer_config(family, args, perform_initialization=False,
                                params_dtype=getattr(torch, dtype))
    return build_gpt_model(family, args, config, padded_vocab)


@torch.no_grad()
def save_torch_dist(family, args, meta, fetch, iter_dir: str, progress: bool = True) -> None:
    """Fill a TP1/PP1 model from ``fetch(binding)`` and save it with dist_checkpointing."""
    from megatron.core import dist_checkpointing

    from megatron_patch.convert.engine import _progress, stage_bindings

    meta.update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    model = _single_process_model(family, args, meta["padded_vocab_size"],
                                  meta.get("dtype", "float32"))
    state = model.state_dict(keep_vars=True)
    bindings = stage_bindings(family, args, 1, 0)
    with _progress(len(bindings), "writing torch_dist", progress) as bar:
        for binding in bindings:
            state[binding.megatron_local].copy_(fetch(binding))
            bar.update(1)
    os.makedirs(iter_dir, exist_ok=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(),
                             "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0,
                             "args": megatron_lm_args(meta), "megatron_patch": meta}, iter_dir)


def read_common_state(iter_dir: str) -> dict:
    """The non-sharded part of a torch_dist checkpoint (``common.pt``)."""
    from megatron.core import dist_checkpointing

    path = os.path.join(iter_dir, COMMON_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{iter_dir}: torch_dist checkpoint without {COMMON_FILE}")
    try:
        return dist_checkpointing.load_common_state_dict(iter_dir)
    except (ModuleNotFoundError, AttributeError) as err:
        raise CheckpointError(f"{path}: cannot unpickle it without the code that wrote it "
                              f"({err}); put that Megatron-LM checkout on PYTHONPATH "
                              f"(MEGATRON_PATH)") from err


def _weights_only(sharded: dict) -> dict:
    """The model's sharded state without its ``_extra_state`` objects: Transformer Engine's
    FP8 metadata, which neither the local spec nor the HF side holds."""
    return {k: v for k, v in sharded.items() if not k.endswith("_extra_state")}


class TorchDistReader:
    """The reader interface of :class:`~megatron_patch.convert.megatron_io.MegatronReader`
    over a torch_dist checkpoint, loaded whole at TP1/PP1."""

    tp = 1
    pp = 1

    def __init__(self, path: str, meta: dict):
        from megatron.core import dist_checkpointing

        from megatron_patch.families.base import ModelArgs
        from megatron_patch.registry import get_family

        self.root, self.iter_dir = resolve_checkpoint(path)
        self.meta = meta
        args = ModelArgs.from_dict(meta["model_args"])
        model = _single_process_model(get_family(meta["family"]), args,
                                      meta["padded_vocab_size"], meta.get("dtype", "float32"))
        loaded = dist_checkpointing.load({"model": _weights_only(model.sharded_state_dict())},
                                         self.iter_dir)
        model.load_state_dict(loaded["model"], strict=False)
        self._state = {k: v for k, v in model.state_dict().items()
                       if not k.endswith("_extra_state")}
        self.consumed: set[tuple[int, str]] = set()

    def get(self, name: str, stage: str, split, layers_per_stage: int,
            dims=None) -> torch.Tensor:
        if name not in self._state:
            raise CheckpointError(f"{self.iter_dir}: no tensor '{name}'")
        self.consumed.add((0, name))
        return self._state[name]

    def unconsumed(self) -> list[str]:
        return sorted(k for k in self._state if (0, k) not in self.consumed)
