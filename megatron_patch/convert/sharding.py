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


@dataclass(frozen=True)
class GroupedQKV(Split):
    """Column-parallel ``linear_qkv`` (weight or bias), grouped as ops.FuseQKV lays it out:
    whole query groups per rank. With fewer key/value groups than TP ranks (multi-query
    falcon at TP2), each group's query heads are cut over ``TP / groups`` ranks and its key
    and value heads are copied to each of them; merging checks that the copies agree (training
    keeps them equal: training/replicated_kv.py) and keeps one."""


COLUMN = Split(dim=0)
ROW = Split(dim=1)
QKV = GroupedQKV(dim=0)


def replication(dims, tp: int) -> int:
    """How many TP ranks share each key/value group (1 when TP divides the groups)."""
    groups = dims.num_query_groups
    if groups >= tp:
        return 1
    if tp % groups or dims.num_attention_heads % tp:
        raise ValueError(f"tensor-parallel size {tp} is neither a divisor nor a multiple of "
                         f"the {groups} key/value groups (or does not divide the "
                         f"{dims.num_attention_heads} heads)")
    return tp // groups


def _grouped(tensor: torch.Tensor, dims) -> torch.Tensor:
    """[groups, (heads per group + 2) x kv_channels, ...] view of a full linear_qkv."""
    return tensor.reshape(dims.num_query_groups, -1, *tensor.shape[1:])


def expand_groups(tensor: torch.Tensor, dims, copies: int) -> torch.Tensor:
    """Full linear_qkv of G groups -> that of G x ``copies`` groups: each group's query heads
    cut into ``copies`` parts, each with the group's key and value heads."""
    d, per_group = dims.kv_channels, dims.num_attention_heads // dims.num_query_groups
    grouped = _grouped(tensor, dims)
    q, kv = grouped[:, :per_group * d], grouped[:, per_group * d:]
    q = q.reshape(dims.num_query_groups, copies, per_group // copies * d, *tensor.shape[1:])
    kv = kv.unsqueeze(1).expand(-1, copies, *kv.shape[1:])
    return torch.cat([q, kv], dim=2).reshape(-1, *tensor.shape[1:])


def contract_groups(tensor: torch.Tensor, dims, copies: int, name: str = "linear_qkv"):
    """Inverse of :func:`expand_groups`; the key/value copies must be equal."""
    d, per_group = dims.kv_channels, dims.num_attention_heads // dims.num_query_groups
    part = per_group // copies * d
    grouped = tensor.reshape(dims.num_query_groups, copies, part + 2 * d, *tensor.shape[1:])
    q, kv = grouped[:, :, :part], grouped[:, :, part:]
    for copy in range(1, copies):
        if not torch.equal(kv[:, copy], kv[:, 0]):
            raise ValueError(f"{name}: the key/value heads replicated over {copies} "
                             f"tensor-parallel ranks differ (rank {copy} of each group against "
                             f"its first): they must stay equal; was this checkpoint trained "
                             f"without megatron_patch's trainer?")
    q = q.reshape(dims.num_query_groups, per_group * d, *tensor.shape[1:])
    return torch.cat([q, kv[:, 0]], dim=1).reshape(-1, *tensor.shape[1:])


def split_tensor(tensor: torch.Tensor, split: Split | None, tp: int,
                 dims=None) -> list[torch.Tensor]:
    """Full tensor -> one contiguous piece per tensor-parallel rank (``dims``, ops.Dims, for
    a :data:`QKV` row)."""
    return [shard_tensor(tensor, split, tp, rank, dims) for rank in range(tp)]


def shard_tensor(tensor: torch.Tensor, split: Split | None, tp: int, rank: int,
                 dims=None) -> torch.Tensor:
    """Tensor-parallel rank ``rank``'s piece of :func:`split_tensor`, without building the
    others."""
    if split is None:
        return tensor
    if isinstance(split, GroupedQKV) and replication(dims, tp) > 1:
        tensor = expand_groups(tensor, dims, replication(dims, tp))
    if tp == 1:
        return tensor.contiguous()  # the whole tensor: no copy to make and free
    size = tensor.shape[split.dim] // split.parts
    if size % tp:
        raise ValueError(f"dimension {split.dim} of size {size} does not divide into {tp} "
                         f"tensor-parallel ranks")
    blocks = torch.chunk(tensor, split.parts, dim=split.dim)
    return torch.cat([torch.chunk(block, tp, dim=split.dim)[rank] for block in blocks],
                     dim=split.dim).contiguous()


def merge_tensors(pieces: list[torch.Tensor], split: Split | None, dims=None,
                  name: str = "tensor") -> torch.Tensor:
    """Inverse of :func:`split_tensor`. Replicated pieces must agree."""
    if split is None:
        for rank, piece in enumerate(pieces[1:], start=1):
            if not torch.equal(piece, pieces[0]):
                raise ValueError(f"replicated tensor differs between TP rank 0 and TP rank {rank}")
        return pieces[0]
    per_rank = [torch.chunk(p, split.parts, dim=split.dim) for p in pieces]
    blocks = [torch.cat([r[b] for r in per_rank], dim=split.dim) for b in range(split.parts)]
    merged = torch.cat(blocks, dim=split.dim)
    if isinstance(split, GroupedQKV) and replication(dims, len(pieces)) > 1:
        merged = contract_groups(merged, dims, replication(dims, len(pieces)), name)
    return merged


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """Global indices of the transformer layers on pipeline stage ``stage`` (even split)."""
    if num_layers % pp:
        raise ValueError(f"--pipeline-model-parallel-size {pp} does not divide num_layers "
                         f"{num_layers}")
    per_stage = num_layers // pp
    return range(stage * per_stage, (stage + 1) * per_stage)
