"""Choosing the next token: repetition penalty, temperature, top-k / top-p filtering, sampling.

The processors follow the order and the arithmetic of transformers' ``generate`` (its
``RepetitionPenaltyLogitsProcessor``, then ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and
``TopPLogitsWarper``), so a user comparing our output with HF's sees the same distribution; the
tests check each one against transformers on random logits. As in Megatron-LM, top-k and top-p
cannot be combined: one of them must be 0. ``top_k == 1`` is greedy decoding (argmax, no
random draw).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens (Megatron-LM's flag names in the messages)."""

    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"--top-p must be in [0, 1] (0 disables it), got {self.top_p}")
        if self.top_k > 0 and self.top_p > 0.0:
            raise ValueError(
                f"--top-k {self.top_k} and --top-p {self.top_p} are both set: one of them must "
                "be 0 (top-k and top-p sampling cannot be combined, as in Megatron-LM; greedy "
                "decoding is --top-k 1 --top-p 0)")
        if not self.temperature > 0.0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature} (for greedy "
                             "decoding use --top-k 1)")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"--repetition-penalty must be > 0 (1 disables it), got "
                             f"{self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        """``--top-k 1``: argmax, no random draw."""
        return self.top_k == 1


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """Penalise tokens already in the sequence (``seen``: bool [batch, vocab]): positive logits
    are divided by ``penalty`` and negative ones multiplied, so a penalty > 1 always lowers them
    (the seed's version divided regardless of the sign, which raised negative logits)."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sharpen (< 1) or flatten (> 1) the distribution."""
    return logits / temperature


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of each row (ties with the k-th kept too)."""
    top_k = min(top_k, logits.size(-1))
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus
    sampling); the most likely token always stays."""
    ascending, order = torch.sort(logits, dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1.0 - top_p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def process_logits(logits: torch.Tensor, seen: Optional[torch.Tensor],
                   params: SamplingParams) -> torch.Tensor:
    """The filtered, temperature-scaled logits that the next token is drawn from."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature != 1.0:
        logits = apply_temperature(logits, params.temperature)
    if params.top_k > 0:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p > 0.0:
        logits = top_p_filter(logits, params.top_p)
    return logits


def choose_tokens(logits: torch.Tensor, seen: Optional[torch.Tensor], params: SamplingParams,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token of each row of ``logits`` [batch, vocab] (fp32): argmax when greedy, else one
    draw from the processed distribution with ``generator`` (reproducible with ``--seed``)."""
    if params.greedy:
        if params.repetition_penalty != 1.0 and seen is not None:
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        return logits.argmax(dim=-1)
    probs = process_logits(logits, seen, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
