"""SwissArmyTransformer (SAT) checkpoints, GLM-130B's release format: ``<dir>/latest`` (the
iteration, as text) and ``<dir>/<iter>/mp_rank_XX_model_states.pt``, each ``torch.load`` of
``{"module": state_dict}`` holding one model-parallel rank's slice of every tensor (the release
is 8-way). The tensor names are those of ``families/glm130b.py`` (and a config.json beside
``latest`` gives the shape, as for an HF directory).

How the slices merge (GLM-130B's tools/convert_tp.py; ../shared/notes/glm_references.md §3.2):
norms, ``attention.dense.bias``, ``mlp.dense_4h_to_h.bias`` and ``rotary_emb.inv_freq`` are
whole on every rank (checked equal); ``attention.dense.weight`` and
``mlp.dense_4h_to_h.weight`` are cut along dim 1; the GLU matrix ``mlp.dense_h_to_4h`` is
``[x1_r; x2_r]`` on rank r, so the whole is ``[x1_0 .. x1_k; x2_0 .. x2_k]``; everything else
(QKV, whole heads per rank; the word embeddings, rows) along dim 0.

:class:`SATReader` reads like :class:`~.hf_io.HFReader` (rank files memory-mapped, a tensor
merged when asked for); :func:`write_sat` writes one rank file at a time, each from its own
pass over the source, so memory holds one rank's slice, not the model.
"""
from __future__ import annotations

import os

import torch

from megatron_patch.convert.hf_io import read_hf_config
from megatron_patch.convert.io_utils import CheckpointError

_REPLICATED = ("input_layernorm.weight", "input_layernorm.bias",
               "post_attention_layernorm.weight", "post_attention_layernorm.bias",
               "attention.dense.bias", "mlp.dense_4h_to_h.bias", "rotary_emb.inv_freq",
               "final_layernorm.weight", "final_layernorm.bias")
_ROW_PARALLEL = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
_GLU = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")


def _rule(name: str) -> str:
    if name.endswith(_REPLICATED):
        return "replicated"
    if name.endswith(_ROW_PARALLEL):
        return "dim1"
    return "glu" if name.endswith(_GLU) else "dim0"


def is_sat_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "latest"))


def _iteration_dir(path: str) -> str:
    with open(os.path.join(path, "latest")) as handle:
        iteration = handle.read().strip()
    where = os.path.join(path, iteration)
    if not iteration or not os.path.isdir(where):
        raise CheckpointError(f"{path}/latest names iteration {iteration!r}, but {where} is "
                              f"not a directory")
    return where


def _rank_files(iter_dir: str) -> list[str]:
    files = sorted(f for f in os.listdir(iter_dir) if f.startswith("mp_rank_")
                   and f.endswith("_model_states.pt"))
    expected = [f"mp_rank_{r:02d}_model_states.pt" for r in range(len(files))]
    if not files or files != expected:
        raise CheckpointError(f"{iter_dir}: expected mp_rank_00_model_states.pt .. "
                              f"mp_rank_NN_model_states.pt, found {files or 'none'}")
    return [os.path.join(iter_dir, f) for f in files]


def merge(name: str, pieces: list[torch.Tensor], where: str) -> torch.Tensor:
    """One tensor from its model-parallel slices, by the rules above."""
    rule = _rule(name)
    if rule == "replicated":
        for rank, piece in enumerate(pieces[1:], 1):
            if not torch.equal(piece, pieces[0]):
                raise CheckpointError(f"{where}: '{name}' differs between mp_rank_00 and "
                                      f"mp_rank_{rank:02d} (it should be the same on every rank)")
        return pieces[0].clone()
    if rule == "dim1":
        return torch.cat(pieces, dim=1)
    if rule == "glu":
        halves = [piece.chunk(2, dim=0) for piece in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(pieces, dim=0)


def split(name: str, tensor: torch.Tensor, parts: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s slice of a whole tensor (the inverse of :func:`merge`)."""
    rule = _rule(name)
    if rule == "replicated":
        return tensor.clone()
    if rule == "dim1":
        return tensor.chunk(parts, dim=1)[rank].clone()
    if rule == "glu":
        first, second = tensor.chunk(2, dim=0)
        return torch.cat([first.chunk(parts, 0)[rank], second.chunk(parts, 0)[rank]]).clone()
    return tensor.chunk(parts, dim=0)[rank].clone()


class SATReader:
    """Whole tensors of a SAT checkpoint by name (HFReader's interface)."""

    def __init__(self, path: str):
        self.path = path
        self.config = read_hf_config(path)
        self.iter_dir = _iteration_dir(path)
        self.files = _rank_files(self.iter_dir)
        self._states = []
        for file in self.files:
            try:
                loaded = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unreadable file is the same error
                raise CheckpointError(f"{file}: not a readable torch checkpoint ({err})") from None
            if not isinstance(loaded, dict) or not isinstance(loaded.get("module"), dict):
                raise CheckpointError(f"{file}: no 'module' state dict (SAT's layout)")
            self._states.append(loaded["module"])
        names = [set(state) for state in self._states]
        for rank, these in enumerate(names[1:], 1):
            if these != names[0]:
                odd = sorted(these ^ names[0])[:3]
                raise CheckpointError(f"{self.files[rank]}: holds other tensors than "
                                      f"mp_rank_00 ({', '.join(odd)} ...)")
        self._names = names[0]
        self.reads: dict[str, int] = {}

    @property
    def model_parallel_size(self) -> int:
        return len(self.files)

    def has(self, name: str) -> bool:
        return name in self._names

    def get(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise CheckpointError(f"{self.iter_dir}: tensor '{name}' is missing")
        self.reads[name] = self.reads.get(name, 0) + 1
        return merge(name, [state[name] for state in self._states], self.iter_dir)

    def unconsumed(self) -> list[str]:
        return sorted(self._names - self.reads.keys())

    def dtype(self) -> torch.dtype:
        for tensor in self._states[0].values():
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32


def write_sat(out: str, tensors, parts: int, iteration: int = 1) -> None:
    """``tensors()`` yields (name, whole tensor) and is called once per rank: rank r's file
    gets its slices, then the next rank starts again from the source."""
    iter_dir = os.path.join(out, str(iteration))
    os.makedirs(iter_dir, exist_ok=True)
    for rank in range(parts):
        state = {name: split(name, tensor, parts, rank) for name, tensor in tensors()}
        torch.save({"module": state}, os.path.join(iter_dir, f"mp_rank_{rank:02d}_model_states.pt"))
        del state
    with open(os.path.join(out, "latest"), "w") as handle:
        handle.write(f"{iteration}\n")
