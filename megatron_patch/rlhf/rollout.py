"""Rollouts for PPO / GRPO: the policy samples responses with the project's generation engine
over the very module the trainer updates (no copy of the weights), and the batch it returns is
laid out for the trainer's forward pass.

Layout (the DPO collate's): ``tokens [b, L]`` = prompt then response, right-padded;
``labels[t] = tokens[t + 1]``; ``mask[t] = 1`` where ``labels[t]`` is a response token (the
final eos included when the row stopped there); ``gen_logps[t]`` = the generator's
log-probability of ``labels[t]`` (0 elsewhere). The trainer's per-token log-probabilities of the
same batch are ``-model(tokens, positions, labels=labels)`` (megatron-core's vocab-parallel
cross-entropy), and ``ppo_math.agreement`` compares the two.
"""
from __future__ import annotations

import torch

from megatron_patch.generation.engine import Limits, generate_batch


@torch.no_grad()
def sample(backend, prompts: list[list[int]], params, limits: Limits,
           generator: torch.Generator | None = None) -> dict:
    """Responses of ``prompts`` -> the batch of the module docstring (on the model's device),
    with ``response_lengths`` and the engine's stats."""
    limits = Limits(limits.max_new_tokens, limits.eos_id, limits.pad_id, limits.vocab_size,
                    logprobs=True)
    completions, stats = generate_batch(backend, prompts, params, limits, generator)
    device = next(backend.model.parameters()).device
    length = max(len(p) + len(c.ids) for p, c in zip(prompts, completions))
    rows = len(prompts)
    tokens = torch.full((rows, length), limits.pad_id, dtype=torch.long)
    labels = torch.full((rows, length), limits.pad_id, dtype=torch.long)
    mask = torch.zeros(rows, length)
    gen_logps = torch.zeros(rows, length)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = prompt + completion.ids
        tokens[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(ids) - 1] = torch.tensor(ids[1:])
        start, end = len(prompt) - 1, len(ids) - 1  # label positions of the response
        mask[row, start:end] = 1
        gen_logps[row, start:end] = torch.tensor(completion.logprobs, dtype=torch.float32)
    return {"tokens": tokens.to(device), "labels": labels.to(device), "mask": mask.to(device),
            "gen_logps": gen_logps.to(device),
            "position_ids": torch.arange(length).repeat(rows, 1).to(device),
            "response_lengths": [len(c.ids) for c in completions], "stats": stats}


@torch.no_grad()
def token_logps(model, batch: dict) -> torch.Tensor:
    """The trainer's log-probabilities of ``batch["labels"]`` (0 outside the mask), one
    pipeline stage holding the whole model."""
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return -losses.float() * batch["mask"]
