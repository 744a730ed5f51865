"""Training with fewer key/value groups than tensor-parallel ranks (multi-query falcon at TP2).

megatron-core splits whole query groups over TP ranks, so it cannot split one key/value head.
Here each group's key and value heads are copied to the ``TP / groups`` ranks that hold its
query heads (convert/sharding.py ``GroupedQKV``; the model is built with ``TP`` groups). The
copies are one weight, so after megatron-core's gradient reduction (``finalize_model_grads``)
each copy's gradient is replaced by the sum over the ranks sharing it, which is the gradient
TP1 computes; the copies then get identical updates and stay equal (the converter checks that
on the way back). The clipping norm would count each copy: :func:`corrected_norm` takes the
extra ``(copies - 1) x |summed gradient|^2`` out again, so the grad norm, the clipping and the
losses match TP1's.
"""
from __future__ import annotations

import math

import torch

_PENDING = {"extra": 0.0}  # squared norm counted more than once in this step's gradients


def replicated_copies(num_query_groups: int, tensor_parallel: int) -> int:
    """Ranks sharing each key/value group (1: nothing is replicated)."""
    return tensor_parallel // num_query_groups if num_query_groups < tensor_parallel else 1


class ReplicatedKV:
    """The key/value rows of every ``linear_qkv`` weight and bias of this rank's chunks."""

    def __init__(self, chunks, num_query_groups: int, config):
        from megatron.core import parallel_state as ps

        self.groups = num_query_groups
        self.tp = config.tensor_model_parallel_size
        self.copies = replicated_copies(num_query_groups, self.tp)
        self.group = ps.get_tensor_model_parallel_rank() // self.copies
        heads = config.num_attention_heads // self.tp
        self.kv_start = heads * config.kv_channels  # local rows: [q heads | k | v]
        self.params = [p for chunk in chunks for name, p in chunk.named_parameters()
                       if "self_attention.linear_qkv." in name]

    def sync(self, loss_scale: float) -> None:
        """Sum each copy's gradient over the ranks sharing it; note the norm counted twice."""
        from megatron.core import parallel_state as ps

        grads = [getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None
                 else p.grad for p in self.params]
        slices = [g[self.kv_start:] for g in grads if g is not None]
        if not slices:
            return
        flat = torch.cat([s.reshape(-1).float() for s in slices])
        per_group = flat.new_zeros(self.groups, flat.numel())
        per_group[self.group] = flat
        torch.distributed.all_reduce(per_group, group=ps.get_tensor_model_parallel_group())
        summed = per_group[self.group]
        offset = 0
        for piece in slices:
            piece.copy_(summed[offset:offset + piece.numel()].view_as(piece))
            offset += piece.numel()
        # Every TP rank holds all groups' sums; the norm sums over the pipeline stages too.
        extra = (self.copies - 1) * per_group.square().sum() / loss_scale ** 2
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(extra, group=ps.get_pipeline_model_parallel_group())
        _PENDING["extra"] = extra.item()


def corrected_norm(norm_fn):
    """megatron-core's ``get_grad_norm_fp32`` less the squared norm counted more than once
    (taken once per step: the first norm computed after :meth:`ReplicatedKV.sync`)."""

    def get_grad_norm_fp32(grads_for_norm, norm_type=2, grad_stats_parallel_group=None):
        norm = norm_fn(grads_for_norm, norm_type, grad_stats_parallel_group)
        extra, _PENDING["extra"] = _PENDING["extra"], 0.0
        if extra and norm_type == 2 and math.isfinite(norm):
            norm = math.sqrt(max(norm * norm - extra, 0.0))
        return norm
    get_grad_norm_fp32.__wrapped__ = norm_fn
    return get_grad_norm_fp32


def check(args, model_args) -> None:
    """Refuse what the replicated copies do not support yet, before anything is built."""
    copies = replicated_copies(model_args.num_query_groups, args.tensor_model_parallel_size)
    if copies > 1 and args.use_distributed_optimizer:
        raise ValueError(f"--use-distributed-optimizer with --tensor-model-parallel-size "
                         f"{args.tensor_model_parallel_size} and {model_args.num_query_groups} "
                         f"key/value head(s): each is copied to {copies} ranks, and the "
                         f"copies' gradients are summed on the whole gradient, which the "
                         f"distributed optimizer shards; drop the flag, or use a TP that "
                         f"divides the key/value heads")


def install(chunks, optimizer, num_query_groups: int, config) -> ReplicatedKV | None:
    """Wrap ``config.finalize_model_grads_func`` with the copies' gradient sum, and the
    optimizer's norm with the correction; None when TP divides the groups."""
    if replicated_copies(num_query_groups, config.tensor_model_parallel_size) == 1:
        return None
    from megatron.core.optimizer import optimizer as optimizer_module

    if not hasattr(optimizer_module.get_grad_norm_fp32, "__wrapped__"):
        optimizer_module.get_grad_norm_fp32 = corrected_norm(optimizer_module.get_grad_norm_fp32)
    replicated = ReplicatedKV(chunks, num_query_groups, config)
    finalize = config.finalize_model_grads_func

    def finalize_model_grads(*args, **kwargs):
        finalize(*args, **kwargs)
        replicated.sync(float(optimizer.get_loss_scale()))
    config.finalize_model_grads_func = finalize_model_grads
    return replicated
