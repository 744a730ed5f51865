"""PPO's actor and critic losses as megatron-core loss functions: ``loss_func(output)`` ->
``(summed loss, response tokens, reported figures)``. With ``calculate_per_token_loss`` the
schedule divides by the response tokens of the whole global batch, so the loss and its
gradients do not depend on the micro-batch split or the data-parallel ranks (tested).

A micro-batch (rlhf/rollout.py's layout plus the experience): ``tokens``, ``position_ids``,
``labels``, ``mask`` (response labels), ``old_logps``, ``advantages``; the critic's also
``old_values`` and ``returns`` (per label position; the critic's value at position t is its
scalar head's output there).
"""
from __future__ import annotations

import functools

import torch

from megatron_patch.rlhf import ppo_math


def actor_loss(batch: dict, clip_eps: float, output: torch.Tensor, kl_coef: float = 0.0):
    """``output``: the actor's per-token cross-entropy of ``labels`` ([b, s]). ``kl_coef`` > 0
    (GRPO) adds ``kl_coef * k3(logp, ref_logps)`` per token to the loss."""
    mask = batch["mask"].float()
    logps = -output.float()
    policy, clipped = ppo_math.policy_loss_sum(logps, batch["old_logps"], batch["advantages"],
                                               mask, clip_eps)
    tokens = mask.sum()
    log_ratio = (logps - batch["old_logps"]).detach() * mask
    report = {"policy loss": torch.stack([policy.detach(), tokens]),
              "clip fraction": torch.stack([clipped, tokens]),
              # k3 estimate of KL(old || new) over the step's tokens
              "approx kl": torch.stack([((torch.exp(log_ratio) - 1 - log_ratio) * mask).sum(),
                                        tokens])}
    total = policy
    if kl_coef:
        kl = (ppo_math.kl(logps, batch["ref_logps"], "k3") * mask).sum()
        total = policy + kl_coef * kl
        report["kl loss"] = torch.stack([kl.detach(), tokens])
    return total, tokens.to(torch.int), report


def critic_loss(batch: dict, value_clip: float | None, output: torch.Tensor):
    """``output``: the critic's scores at every position ([b, s, 1])."""
    mask = batch["mask"].float()
    values = output.float()[..., 0]
    total = ppo_math.value_loss_sum(values, batch["old_values"], batch["returns"], mask,
                                    value_clip)
    tokens = mask.sum()
    return total, tokens.to(torch.int), {"value loss": torch.stack([total.detach(), tokens])}


def actor_forward_step(clip_eps: float, kl_coef: float = 0.0):
    """A megatron-core forward_step_func training the actor on experience micro-batches."""
    def step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                       labels=batch["labels"])
        return output, functools.partial(actor_loss, batch, clip_eps, kl_coef=kl_coef)
    return step


def critic_forward_step(value_clip: float | None):
    def step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        return output, functools.partial(critic_loss, batch, value_clip)
    return step
