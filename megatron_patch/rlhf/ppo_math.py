"""The arithmetic of PPO and GRPO on ``[batch, response length]`` tensors, with a ``mask`` of the
response tokens (1) against padding (0). Pure torch, no model, no distributed state (the
whitening's global statistics come in as sums). The trainer (the RLHF issue) composes them.

Conventions (OpenRLHF / TRL / verl agree on them):

- ``kl(logp, ref_logp, kind)``: per-token estimators of KL(pi || ref) from samples of pi: ``k1``
  ``logp - ref``, ``k2`` ``(logp - ref)^2 / 2``, ``k3`` ``exp(ref - logp) - (ref - logp) - 1``
  (non-negative, unbiased; GRPO's loss term).
- ``token_rewards``: ``-beta * k1`` at every response token, plus the sequence's (clipped)
  score at its last response token.
- ``gae``: ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lambda A_{t+1}``
  over the response tokens (``V`` after the last one is 0); returns ``A + V``.
- ``whiten``: ``(x - mean) / sqrt(var + 1e-8)`` over the masked tokens of the whole global batch
  (``stats`` summed over data-parallel ranks), the mean added back when ``shift_mean`` is off.
- ``policy_loss_sum``: PPO's clipped surrogate ``max(-A ratio, -A clip(ratio, 1-eps, 1+eps))``
  summed over response tokens (the caller divides by the global token count, so any split into
  micro-batches or ranks gives the same loss), with the clipped tokens counted.
- ``value_loss_sum``: ``max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) / 2``, summed.
- ``group_advantages``: GRPO's ``(r - mean) / (std + eps)`` within each prompt's group of
  samples.
- ``adaptive_kl_coef``: the KL coefficient after an episode under Ziegler et al.'s controller.
- ``agreement``: ``mean(exp(|logp_train - logp_gen|))`` over response tokens (1 when the trainer
  and the generator agree).
"""
from __future__ import annotations

import torch


def kl(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimator ``k1``, ``k2`` or ``k3`` (module docstring)."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1
    raise ValueError(f"unknown KL estimator {kind!r}: k1, k2 or k3")


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                  mask: torch.Tensor, beta: float, clip: float | None = None) -> torch.Tensor:
    """``[b, t]`` rewards: the KL penalty on every response token, the score (clipped to
    ``[-clip, clip]``) added at each row's last response token."""
    rewards = -beta * kl(logp, ref_logp, "k1") * mask
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores * (mask.sum(dim=1) > 0)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), zero outside the response (module docstring)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        live = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * live
        advantages[:, t] = running
        # padding after the response carries nothing back; inside it the next value is V_t
        next_value = torch.where(live > 0, values[:, t], next_value)
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten_stats(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[sum, sum of squares, count]`` of the masked entries, to be summed over ranks."""
    return torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()


def whiten(x: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor | None = None,
           shift_mean: bool = True) -> torch.Tensor:
    """Whitened ``x`` over the masked tokens; ``stats``: the global :func:`whiten_stats`
    (default: this tensor's own)."""
    total, squares, count = (whiten_stats(x, mask) if stats is None else stats).tolist()
    mean = total / count
    var = squares / count - mean ** 2
    out = (x - mean) / (max(var, 0.0) + 1e-8) ** 0.5
    if not shift_mean:
        out = out + mean
    return out * mask


def policy_loss_sum(logp, old_logp, advantages, mask, clip_eps: float = 0.2):
    """(summed clipped surrogate loss, number of clipped tokens)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = torch.maximum(unclipped, clipped)
    return (loss * mask).sum(), ((clipped > unclipped).float() * mask).sum()


def value_loss_sum(values, old_values, returns, mask, clip: float | None = 0.2):
    """Summed clipped value loss (``clip`` None: plain squared error / 2)."""
    loss = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum()


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: ``rewards`` [prompts x group_size] in prompt-major order -> advantages."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards are not groups of {group_size}")
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((groups - mean) / (std + eps)).view(-1)


def adaptive_kl_coef(coef: float, kl: float, target: float, samples: int,
                     horizon: int) -> float:
    """Ziegler et al. (2019)'s proportional controller: ``coef * (1 + e * samples / horizon)``
    with ``e = clip(kl / target - 1, -0.2, 0.2)`` (``kl``: the episode's mean KL per
    sequence, ``samples`` its sequences)."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return coef * (1 + error * samples / horizon)


def agreement(logp_train: torch.Tensor, logp_gen: torch.Tensor, mask: torch.Tensor) -> float:
    """mean(exp(|logp_train - logp_gen|)) over response tokens."""
    return ((torch.exp((logp_train - logp_gen).abs()) * mask).sum() / mask.sum()).item()
