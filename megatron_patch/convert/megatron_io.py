"""Megatron-LM's ``torch`` checkpoint layout, plus megatron_patch's metadata::

    <root>/latest_checkpointed_iteration.txt          "release" or an iteration number
    <root>/megatron_patch.json                         family, model args, vocab, HF config
    <root>/tokenizer/                                  the HF tokenizer files, when known
    <root>/<release|iter_0000100>/mp_rank_TT[_PPP]/model_optim_rng.pt

``mp_rank_TT`` without ``_PPP`` when pipeline parallelism is 1, as Megatron-LM writes it. Each
``model_optim_rng.pt`` holds ``model`` (the stage's state dict, layers numbered locally, in the
local or the Transformer Engine spec's names: :mod:`.naming`), ``checkpoint_version``,
``iteration``, ``args`` (an argparse.Namespace Megatron-LM reads with ``--use-checkpoint-args``)
and ``megatron_patch`` (the metadata). Megatron-LM's own files hold no ``megatron_patch`` but add
``optimizer``, ``opt_param_scheduler``, ``rng_state`` and ``num_floating_point_operations_so_far``.
"""
from __future__ import annotations

import json
import os
import re

import torch

from megatron_patch.convert import naming
from megatron_patch.convert.checkpoint_args import megatron_lm_args  # noqa: F401 (re-export)
from megatron_patch.convert.io_utils import (CheckpointError, load_lazily, read_json,
                                             read_tensor, require_dir)
from megatron_patch.convert.sharding import merge_tensors

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "megatron_patch.json"
MODEL_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def iteration_dir_name(iteration) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp_size > 1 else "")


def write_metadata(root: str, meta: dict) -> None:
    with open(os.path.join(root, METADATA), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2, sort_keys=True)


def read_metadata(root: str) -> dict | None:
    path = os.path.join(root, METADATA)
    if not os.path.isfile(path):
        return None
    return read_json(path)


def write_tracker(root: str, iteration) -> None:
    """Point ``latest_checkpointed_iteration.txt`` at ``iteration`` (atomic rename)."""
    tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(str(iteration))
    os.replace(tmp, os.path.join(root, TRACKER))


def save_rank_file(iter_dir: str, tp_rank: int, pp_rank: int, pp_size: int, payload: dict):
    """Write one rank's ``model_optim_rng.pt`` (temporary name, then rename)."""
    rank_dir = os.path.join(iter_dir, rank_dir_name(tp_rank, pp_rank, pp_size))
    os.makedirs(rank_dir, exist_ok=True)
    final = os.path.join(rank_dir, MODEL_FILE)
    torch.save(payload, final + ".tmp")
    os.replace(final + ".tmp", final)


def is_torch_dist(iter_dir: str) -> bool:
    """A megatron-core distributed checkpoint keeps a .metadata file per iteration."""
    return os.path.isfile(os.path.join(iter_dir, ".metadata"))


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """``path`` is a checkpoint root or one of its iteration directories -> (root, iter dir)."""
    require_dir(path, "Megatron checkpoint")
    if os.path.isfile(os.path.join(path, TRACKER)):
        with open(os.path.join(path, TRACKER)) as handle:
            iteration = handle.read().strip()
        if iteration != "release" and not iteration.isdigit():
            raise CheckpointError(f"{path}/{TRACKER}: expected an iteration number or 'release', "
                                  f"got {iteration[:40]!r}")
        iter_dir = os.path.join(path, iteration_dir_name(iteration if iteration == "release"
                                                          else int(iteration)))
        if not os.path.isdir(iter_dir):
            raise CheckpointError(f"{path}/{TRACKER} names '{iteration}' but {iter_dir} is "
                                  f"missing")
        return path, iter_dir
    names = os.listdir(path)
    if ".metadata" in names or any(_RANK_DIR.match(name) for name in names):
        return os.path.dirname(os.path.abspath(path)), path
    raise CheckpointError(f"{path}: not a Megatron checkpoint (no {TRACKER} and no mp_rank_* "
                          f"directories)")


class MegatronReader:
    """Full (TP-merged) tensors of a ``torch``-format Megatron checkpoint, by global name.

    A rank file's structure is loaded when first needed, without its weights; each tensor is
    then read on its own into new memory (see :func:`~megatron_patch.convert.io_utils.
    load_lazily`), so what stays resident is what the caller keeps. Names asked for are the
    local spec's; the files' scheme (``self.naming``) is read from their keys. Remembers which
    keys were read.
    """

    def __init__(self, path: str):
        self.root, self.iter_dir = resolve_checkpoint(path)
        ranks = [_RANK_DIR.match(n) for n in sorted(os.listdir(self.iter_dir))]
        ranks = [(int(m.group(1)), int(m.group(2) or 0)) for m in ranks if m]
        self.tp = max(t for t, _ in ranks) + 1
        self.pp = max(p for _, p in ranks) + 1
        if len(ranks) != self.tp * self.pp:
            raise CheckpointError(f"{self.iter_dir}: expected {self.tp * self.pp} mp_rank "
                                  f"directories for TP={self.tp} PP={self.pp}, found {len(ranks)}")
        self._files: dict[tuple[int, int], dict] = {}  # (tp, pp) -> lazily loaded payload
        self.consumed: set[tuple[int, str]] = set()
        self.first_path = self._path(0, 0)
        self.first = self._load(0, 0)
        if "model" not in self.first:
            chunks = sorted(k for k in self.first if k.startswith("model"))
            raise CheckpointError(f"{self.first_path}: no 'model' entry" + (
                f" but {', '.join(chunks)}: virtual pipeline stages are not supported; save it "
                f"from Megatron-LM without --num-layers-per-virtual-pipeline-stage" if chunks
                else ""))
        self.naming = naming.detect(self.first["model"], self.first_path)

    def _path(self, tp_rank: int, pp_rank: int) -> str:
        return os.path.join(self.iter_dir, rank_dir_name(tp_rank, pp_rank, self.pp), MODEL_FILE)

    def _load(self, tp_rank: int, pp_rank: int) -> dict:
        key = (tp_rank, pp_rank)
        if key not in self._files:
            path = self._path(tp_rank, pp_rank)
            if not os.path.isfile(path):
                raise CheckpointError(f"missing {path}")
            # weights_only=False: Megatron-LM stores an argparse.Namespace under "args".
            try:
                self._files[key] = load_lazily(path, weights_only=False)
            except (ModuleNotFoundError, AttributeError) as err:
                raise CheckpointError(f"{path}: cannot unpickle it without the code that wrote "
                                      f"it ({err}); put that Megatron-LM checkout on PYTHONPATH "
                                      f"(MEGATRON_PATH)") from err
        return self._files[key]

    def stage_keys(self, pp_rank: int) -> list[str]:
        return [k for k in self._load(0, pp_rank)["model"] if not k.endswith("_extra_state")]

    def get(self, name: str, stage: str, split, layers_per_stage: int,
            dims=None) -> torch.Tensor:
        """Tensor ``name`` (local-spec name, global layer numbering) merged over
        tensor-parallel ranks (``dims``: the model's ops.Dims, for a grouped QKV)."""
        pp_rank, local = self._locate(name, stage, layers_per_stage)
        local = naming.to_scheme(local, self.naming)
        pieces = []
        for tp_rank in range(self.tp):
            state = self._load(tp_rank, pp_rank)["model"]
            if local not in state:
                raise CheckpointError(f"{self.iter_dir}: {rank_dir_name(tp_rank, pp_rank, self.pp)}"
                                      f" has no tensor '{local}'")
            pieces.append(read_tensor(self._path(tp_rank, pp_rank), state[local]))
        self.consumed.add((pp_rank, local))
        try:
            return merge_tensors(pieces, split, dims, name)
        except ValueError as err:
            raise CheckpointError(f"{self.iter_dir}: {err}") from None

    def _locate(self, name: str, stage: str, layers_per_stage: int) -> tuple[int, str]:
        if stage == "first":
            return 0, name
        if stage == "last":
            return self.pp - 1, name
        layer = int(_LAYER.match(name).group(1))
        pp_rank, local = divmod(layer, layers_per_stage)
        return pp_rank, _LAYER.sub(f"decoder.layers.{local}.", name, count=1)

    def unconsumed(self) -> list[str]:
        left = []
        for pp_rank in range(self.pp):
            left += [f"{rank_dir_name(0, pp_rank, self.pp)}:{k}" for k in self.stage_keys(pp_rank)
                     if (pp_rank, k) not in self.consumed]
        return left
