"""Tensor- and pipeline-parallel layout: the only code that knows how a full Megatron tensor is
cut across ranks. Mapping tables declare, per row, ``Split(dim, parts)`` (column-parallel:
dim 0, row-parallel: dim 1) or ``None`` (replicated)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    """Cut along ``dim`` into TP pieces. With ``parts > 1`` the tensor is a stack of ``parts``
    equal blocks (SwiGLU's ``[gate; up]``) and each rank holds its slice of every block."""

    dim: int
    parts: int = 1


COLUMN = Split(dim=0)
ROW = Split(dim=1)


def split_tensor(tensor: torch.Tensor, split: Split | None, tp: int) -> list[torch.Tensor]:
    """Full tensor -> one contiguous piece per tensor-parallel rank."""
    return [shard_tensor(tensor, split, tp, rank) for rank in range(tp)]


def shard_tensor(tensor: torch.Tensor, split: Split | None, tp: int, rank: int) -> torch.Tensor:
    """Tensor-parallel rank ``rank``'s piece of :func:`split_tensor`, without building the
    others."""
    if split is None:
        return tensor
    if tp == 1:
        return tensor.contiguous()  # the whole tensor: no copy to make and free
    size = tensor.shape[split.dim] // split.parts
    if size % tp:
        raise ValueError(f"dimension {split.dim} of size {size} does not divide into {tp} "
                         f"tensor-parallel ranks")
    blocks = torch.chunk(tensor, split.parts, dim=split.dim)
    return torch.cat([torch.chunk(block, tp, dim=split.dim)[rank] for block in blocks],
                     dim=split.dim).contiguous()


def merge_tensors(pieces: list[torch.Tensor], split: Split | None) -> torch.Tensor:
    """Inverse of :func:`split_tensor`. Replicated pieces must agree."""
    if split is None:
        for rank, piece in enumerate(pieces[1:], start=1):
            if not torch.equal(piece, pieces[0]):
                raise ValueError(f"replicated tensor differs between TP rank 0 and TP rank {rank}")
        return pieces[0]
    per_rank = [torch.chunk(p, split.parts, dim=split.dim) for p in pieces]
    blocks = [torch.cat([r[b] for r in per_rank], dim=split.dim) for b in range(split.parts)]
    return torch.cat(blocks, dim=split.dim)


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """Global indices of the transformer layers on pipeline stage ``stage`` (even split)."""
    if num_layers % pp:
        raise ValueError(f"--pipeline-model-parallel-size {pp} does not divide num_layers "
                         f"{num_layers}")
    per_stage = num_layers // pp
    return range(stage * per_stage, (stage + 1) * per_stage)
