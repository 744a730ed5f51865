"""All prompts of a file: micro-batches spread over data-parallel ranks, progress on stderr,
results gathered on global rank 0.

With ``torchrun --nproc-per-node N`` and tensor parallel size T, the N / T data-parallel
replicas take micro-batches round-robin (micro-batch i goes to replica i mod N/T). Sampling draws
from a generator seeded with ``seed + i``, so the output depends on the seed and the
micro-batch size, not on the number of replicas.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_patch.generation.engine import BatchStats, Completion, Limits, generate_batch
from megatron_patch.generation.sampling import SamplingParams


def data_parallel_rank_and_size() -> tuple[int, int]:
    """This model replica's index and the number of replicas."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def is_first_rank() -> bool:
    """Global rank 0 (or no torch.distributed at all)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def progress_line(index: int, total: int, stats: BatchStats, started: float,
                  done_prompts: int, done_tokens: int) -> str:
    """One stderr line per micro-batch: this batch's speed and the running totals."""
    elapsed = max(time.perf_counter() - started, 1e-9)
    decode = stats.prompts * stats.decode_steps / max(stats.decode_seconds, 1e-9)
    return (f"[generate] batch {index + 1}/{total}: {stats.prompts} prompts, {stats.new_tokens} "
            f"new tokens, prefill {stats.prefill_seconds:.2f} s, decode {decode:.1f} tokens/s | "
            f"total {done_prompts / elapsed:.2f} prompts/s, {done_tokens / elapsed:.1f} "
            f"tokens/s")


def generate_all(backend, prompts: list[list[int]], params: SamplingParams, limits: Limits,
                 micro_batch_size: int, seed: int,
                 log: Optional[Callable[[str], None]] = None) -> Optional[list[Completion]]:
    """Completions of all ``prompts`` in order on global rank 0 (None on the other ranks)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    starts = list(range(0, len(prompts), micro_batch_size))
    rank, replicas = data_parallel_rank_and_size()
    device = next(backend.model.parameters()).device
    mine: dict[int, Completion] = {}
    started, done_tokens = time.perf_counter(), 0
    for index in range(rank, len(starts), replicas):
        first = starts[index]
        batch = prompts[first: first + micro_batch_size]
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=device).manual_seed(seed + index)
        completions, stats = generate_batch(backend, batch, params, limits, generator)
        mine.update(zip(range(first, first + len(batch)), completions))
        done_tokens += stats.new_tokens
        if is_first_rank():
            log(progress_line(index, len(starts), stats, started, len(mine), done_tokens))
    return _gather_on_first_rank(mine, len(prompts))


def _gather_on_first_rank(mine: dict, count: int) -> Optional[list[Completion]]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine[i] for i in range(count)]
    pieces = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, pieces, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = {}
    for piece in pieces:
        merged.update(piece)
    return [merged[i] for i in range(count)]
