"""The generation loop for one batch of prompts, over any backend (backends.py).

    tokens = left-padded prompts ──backend.start──▶ logits ──choose──▶ next tokens ─┐
                                   ▲                                                │
                                   └───────────────backend.step◀────────────────────┘
                                   until every row has produced EOS, or max_new_tokens

Every tensor-parallel rank runs the same loop on the same gathered logits; the chosen tokens are
broadcast from the group's first rank so that the ranks can never drift apart.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_patch.generation import decode_kernels as decode_kernels_module
from megatron_patch.generation.backends import McoreBackend, UncachedBackend
from megatron_patch.generation.batching import left_pad
from megatron_patch.generation.cuda_graphs import GraphBackend
from megatron_patch.generation.sampling import SamplingParams, choose_tokens
from megatron_patch.generation.static_cache import StaticBackend

BACKENDS = {
    "mcore": McoreBackend,          # megatron-core's StaticInferenceContext
    "static": StaticBackend,        # our static cache, eager (same math as graph)
    "graph": GraphBackend,          # our static cache, decode steps as CUDA graphs (GPU)
    "graph-compiled": functools.partial(GraphBackend, compile_mode="default"),
    "uncached": UncachedBackend,    # reference: re-run the whole sequence each step
}
GPU_BACKENDS = ("graph", "graph-compiled")
# On a GPU a stop check (a device -> host copy) every step would stall the launch queue.
STOP_CHECK_EVERY_GPU = 8


def backend_name(name: str, device: torch.device, tensor_parallel: int) -> str:
    """``--inference-backend`` with ``auto`` resolved (see :func:`build_backend`)."""
    if name == "auto":
        return "graph" if device.type == "cuda" and tensor_parallel == 1 else "mcore"
    if name not in BACKENDS:
        raise ValueError(f"--inference-backend {name!r}: choose one of auto, "
                         f"{', '.join(BACKENDS)}")
    if name in GPU_BACKENDS and device.type != "cuda":
        raise ValueError(f"--inference-backend {name} needs a GPU (CUDA graphs); use "
                         f"--inference-backend static (the same math, eager) or mcore")
    return name


def build_backend(name: str, model, max_length: int, decode_kernels: str = "auto"):
    """Backend ``name``: a key of BACKENDS, or ``auto``: ``graph`` on one GPU, ``mcore``
    otherwise (on the CPU, and under tensor parallelism, where CUDA graphs over NCCL
    all-reduces have not been measured yet). ``graph-compiled`` is the fastest on a GPU but
    compiles once per batch size and attention window (seconds each), so it is asked for.

    ``decode_kernels`` (auto, on, off): decode steps of our static-cache backends through the
    Triton kernels (decode_kernels.py); auto = on for the CUDA-graph backends."""
    from megatron_patch.layers.alibi_attention import ALiBiAttention

    device = next(model.parameters()).device
    prefix_lm = getattr(model, "prefix_lm_ids", None)
    if prefix_lm and name == "auto":  # megatron-core's cache builds causal masks only
        name = "graph" if device.type == "cuda" and model.config.tensor_model_parallel_size == 1 \
            else "static"
    name = backend_name(name, device, model.config.tensor_model_parallel_size)
    if prefix_lm and name == "mcore":
        raise ValueError("--inference-backend mcore: megatron-core's KV cache masks causally; "
                         "GLM's prefix-LM (the prompt attends both ways) runs on static (any "
                         "device), graph (a GPU) or uncached")
    alibi = isinstance(model.decoder.layers[0].self_attention.core_attention, ALiBiAttention)
    if decode_kernels_module.resolve(decode_kernels, device, name, model.config.kv_channels,
                                     alibi):
        return BACKENDS[name](model, max_length, kernels=True)
    return BACKENDS[name](model, max_length)


@dataclass(frozen=True)
class Limits:
    """Where generation stops and which logits count."""

    max_new_tokens: int
    eos_id: Optional[int]     # None: never stop early
    pad_id: int               # fills prompts on the left and finished rows
    vocab_size: int           # the true vocabulary; logits past it are embedding padding
    logprobs: bool = False    # also return each new token's log-probability under the model


@dataclass
class Completion:
    ids: list[int]            # generated ids, the final EOS included when it stopped there
    finish_reason: str        # "eos" or "length"
    logprobs: Optional[list[float]] = None  # log p(id) under the model, before sampling's
                                            # processors (Limits.logprobs)


@dataclass
class BatchStats:
    prompts: int
    new_tokens: int           # generated tokens that were kept (finished rows excluded)
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int


def seen_tokens(tokens: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [batch, vocab]: which tokens each row's prompt contains (padding excluded)."""
    counts = torch.zeros(tokens.size(0), vocab_size, dtype=torch.int32, device=tokens.device)
    return counts.scatter_add_(1, tokens, valid.int()) > 0


def agree_across_tensor_parallel(tokens: torch.Tensor) -> torch.Tensor:
    """The first tensor-parallel rank's choice, on every rank of the group."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.broadcast(tokens, ps.get_tensor_model_parallel_src_rank(),
                                    group=ps.get_tensor_model_parallel_group())
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log softmax over the true vocabulary of the model's logits, at ``tokens``: [batch]."""
    return torch.log_softmax(logits[:, :vocab_size].float(), dim=-1).gather(
        1, tokens[:, None])[:, 0]


def _synchronized_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def generate_batch(backend, prompts: list[list[int]], params: SamplingParams, limits: Limits,
                   generator: Optional[torch.Generator] = None):
    """Completions of ``prompts`` (token lists) -> (list of Completion, BatchStats)."""
    device = next(backend.model.parameters()).device
    began = _synchronized_time(device)
    tokens, valid = left_pad(prompts, limits.pad_id, device)
    seen = (seen_tokens(tokens, valid, limits.vocab_size)
            if params.repetition_penalty != 1.0 else None)
    logits = backend.start(tokens, valid)
    generated = torch.full((len(prompts), limits.max_new_tokens), limits.pad_id,
                           dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    check_every = STOP_CHECK_EVERY_GPU if device.type == "cuda" else 1
    logprobs = torch.zeros(generated.shape, device=device) if limits.logprobs else None
    # Greedy without a penalty: the backend returns the argmax itself (in the CUDA graph), unless
    # the logits are wanted. Finished rows keep decoding their own argmax; their tokens are
    # replaced by padding.
    argmax_in_backend = params.greedy and seen is None and logprobs is None
    chosen = choose_tokens(logits[:, : limits.vocab_size].float(), seen, params, generator)
    prefilled, steps = _synchronized_time(device), 0
    for step in range(limits.max_new_tokens):
        chosen = agree_across_tensor_parallel(chosen)
        kept = torch.where(finished, limits.pad_id, chosen)
        generated[:, step] = kept
        if logprobs is not None:
            logprobs[:, step] = token_logprobs(logits, chosen, limits.vocab_size)
        if limits.eos_id is not None:
            finished |= kept == limits.eos_id
        if step + 1 == limits.max_new_tokens or (limits.eos_id is not None and (
                step + 1) % check_every == 0 and bool(finished.all())):
            break
        if argmax_in_backend:
            chosen = backend.step_greedy(chosen, limits.vocab_size)
        else:
            if seen is not None:
                seen.scatter_(1, kept[:, None], True)
            logits = backend.step(kept)
            chosen = choose_tokens(logits[:, : limits.vocab_size].float(), seen, params,
                                   generator)
        steps += 1
    completions = trim_completions(generated[:, : step + 1].tolist(), limits.eos_id,
                                   None if logprobs is None else logprobs[:, : step + 1].tolist())
    done = _synchronized_time(device)
    stats = BatchStats(len(prompts), sum(len(c.ids) for c in completions), prefilled - began,
                       done - prefilled, steps)
    return completions, stats


def trim_completions(rows: list[list[int]], eos_id: Optional[int],
                     logprob_rows: Optional[list[list[float]]] = None) -> list[Completion]:
    """Cut each row (and its log-probabilities) after its first EOS (what follows is
    padding)."""
    completions = []
    for index, ids in enumerate(rows):
        stopped = eos_id is not None and eos_id in ids
        end = ids.index(eos_id) + 1 if stopped else len(ids)
        logprobs = None if logprob_rows is None else logprob_rows[index][:end]
        completions.append(Completion(ids[:end], "eos" if stopped else "length", logprobs))
    return completions
