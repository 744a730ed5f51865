"""One episode's experience: prompts -> rollouts -> old / reference log-probabilities, values,
scores -> per-token advantages (PPO) or group advantages (GRPO).

Prompt data (``rlhf.prompt_data``): JSON lines or a JSON list of ``{"prompt": text}`` (also
the generation tool's ``{"query": text}``), or SFT records, whose prompt part is used:
``{"instruction", "input"}`` (the Alpaca template) or ``{"messages"}`` (the chat template;
a final assistant turn is dropped). A ``{prompt}`` is wrapped as ``rlhf.prompt_format`` says
(default: the format the actor's SFT checkpoint records, else raw).

Every tensor below is ``[rows, length]`` in rollout.py's layout (label positions).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys

import torch

from megatron_patch.rlhf import ppo_math


@dataclasses.dataclass
class Prompts:
    ids: list                 # token ids per prompt
    texts: list               # the prompt as written (for a reward_fn)
    truncated: int = 0        # prompts cut on the left to fit seq_length - max_new_tokens


def read_prompt_data(path: str, tokenizer, prompt_format: str, limit: int) -> Prompts:
    """The prompts of ``path``; a record of another shape is an error naming file and line."""
    from megatron_patch.data.sft import iter_json_records
    from megatron_patch.generation.prompt_format import encode_prompt

    if not path:
        raise ValueError("rlhf.prompt_data is not set: give a JSONL file of {\"prompt\": ...} "
                         "records (or SFT records)")
    if not os.path.isfile(path):
        raise ValueError(f"rlhf.prompt_data {path!r}: no such file")
    prompts = Prompts([], [])
    for where, record in iter_json_records(path):
        try:
            ids, text = _encode(record, tokenizer, prompt_format, encode_prompt)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if not ids:
            raise ValueError(f"{where}: the prompt is empty")
        if len(ids) > limit:
            ids, prompts.truncated = ids[-limit:], prompts.truncated + 1
        prompts.ids.append(list(ids))
        prompts.texts.append(text)
    if not prompts.ids:
        raise ValueError(f"rlhf.prompt_data {path!r} holds no records")
    return prompts


def _encode(record, tokenizer, prompt_format, encode_prompt):
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object: {\"prompt\": text}, {\"instruction\", "
                         "\"input\"} or {\"messages\"}")
    text = record.get("prompt", record.get("query"))
    if isinstance(text, str):
        return encode_prompt(tokenizer, prompt_format, text), text
    if isinstance(record.get("instruction"), str):
        return encode_prompt(tokenizer, "alpaca", record["instruction"],
                             record.get("input") or None), record["instruction"]
    messages = record.get("messages")
    if isinstance(messages, list) and messages:
        if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                   for m in messages):
            raise ValueError("'messages' needs {\"role\", \"content\"} turns before the answer")
        return encode_prompt(tokenizer, "chat", messages[-1]["content"], None,
                             messages), messages[-1]["content"]
    raise ValueError("expected a string 'prompt' (or 'query'), an 'instruction', or "
                     "'messages'")


def episode_prompts(count: int, episode: int, seed: int, total: int) -> list[int]:
    """Indices of the ``count`` prompts of ``episode``: passes over a fixed shuffle of the data
    (a new shuffle each pass), so a resumed run sees the same prompts."""
    order, start = [], episode * count
    while len(order) < count:
        epoch, offset = divmod(start + len(order), total)
        perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed + epoch))
        order += perm[offset:offset + count - len(order)].tolist()
    return order


def merge_rollouts(batches: list[dict], pad: int, multiple: int = 1) -> dict:
    """Rollout batches of different lengths as one, right-padded to a multiple of
    ``multiple`` (the tensor-parallel size: sequence parallelism splits the sequence)."""
    length = max(b["tokens"].shape[1] for b in batches)
    length = -(-length // multiple) * multiple
    merged = {}
    for key, fill in (("tokens", pad), ("labels", pad), ("mask", 0), ("gen_logps", 0)):
        merged[key] = torch.cat([torch.nn.functional.pad(
            b[key], (0, length - b[key].shape[1]), value=fill) for b in batches])
    rows = merged["tokens"].shape[0]
    merged["position_ids"] = torch.arange(length, device=merged["tokens"].device).repeat(rows, 1)
    merged["response_lengths"] = [n for b in batches for n in b["response_lengths"]]
    return merged


def micro_batches(batch: dict, rows: int, keys) -> list[dict]:
    """``batch`` cut into micro-batches of ``rows`` rows (the last may be smaller)."""
    total = batch["tokens"].shape[0]
    return [{k: batch[k][start:start + rows] for k in keys} for start in range(0, total, rows)]


@torch.no_grad()
def policy_logps(module, batch: dict, rows: int) -> torch.Tensor:
    """Log-probabilities of the labels under ``module`` (a language model), 0 off the mask."""
    parts = []
    for part in micro_batches(batch, rows, ("tokens", "position_ids", "labels", "mask")):
        losses = module(part["tokens"], part["position_ids"], None, labels=part["labels"])
        parts.append(-losses.float() * part["mask"])
    return torch.cat(parts)


@torch.no_grad()
def critic_values(module, batch: dict, rows: int) -> torch.Tensor:
    """The critic's value at every label position (its scalar head there), 0 off the mask."""
    parts = []
    for part in micro_batches(batch, rows, ("tokens", "position_ids", "mask")):
        scores = module(part["tokens"], part["position_ids"], None)
        parts.append(scores.float()[..., 0] * part["mask"])
    return torch.cat(parts)


@torch.no_grad()
def reward_model_scores(module, batch: dict, rows: int, eod: int, pad: int) -> torch.Tensor:
    """``[rows]`` scores of a reward model at each sequence's last token; a response that did
    not end with eod gets one appended, as the reward model's training texts end."""
    sequences = []
    for tokens, mask in zip(batch["tokens"].tolist(), batch["mask"].tolist()):
        end = max(i for i, m in enumerate(mask) if m) + 2  # the last response token, + 1
        ids = tokens[:end]
        sequences.append(ids if ids[-1] == eod else ids + [eod])
    length = max(map(len, sequences))
    device = batch["tokens"].device
    tokens = torch.full((len(sequences), length), pad, dtype=torch.long, device=device)
    for row, ids in enumerate(sequences):
        tokens[row, :len(ids)] = torch.tensor(ids)
    last = torch.tensor([len(ids) - 1 for ids in sequences], device=device)
    positions = torch.arange(length, device=device).repeat(len(sequences), 1)
    scores = []
    for start in range(0, len(sequences), rows):
        out = module(tokens[start:start + rows], positions[start:start + rows], None)
        index = last[start:start + rows]
        scores.append(out.float()[torch.arange(index.numel(), device=device), index, 0])
    return torch.cat(scores)


def load_reward_fn(spec: str, working_dir: str):
    """``module:function`` (importable, or a module file in ``working_dir``): ``fn(response)``
    or ``fn(prompt, response)`` -> float."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"rlhf.reward_fn {spec!r}: expected module:function")
    if working_dir not in sys.path:
        sys.path.insert(0, working_dir)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"rlhf.reward_fn {spec!r}: cannot import {module_name} ({err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"rlhf.reward_fn {spec!r}: {module_name} has no function {name}")
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) not in (1, 2):
        raise ValueError(f"rlhf.reward_fn {spec!r}: takes {len(params)} arguments; expected "
                         f"fn(response) or fn(prompt, response)")
    return fn, len(params)


def rule_scores(reward_fn, prompts: list[str], responses: list[str], device) -> torch.Tensor:
    fn, arity = reward_fn
    scores = []
    for prompt, response in zip(prompts, responses):
        value = fn(response) if arity == 1 else fn(prompt, response)
        try:
            scores.append(float(value))
        except (TypeError, ValueError):
            raise ValueError(f"rlhf.reward_fn returned {value!r} for a response; it must "
                             f"return a number") from None
    return torch.tensor(scores, device=device)


def ppo_advantages(exp: dict, rlhf: dict, kl_coef: float, dp_group) -> None:
    """PPO: token rewards (k1 penalty + clipped score at the last token), GAE, and advantages
    whitened over the whole global batch (statistics summed over the data-parallel ranks)."""
    rewards = ppo_math.token_rewards(exp["scores"], exp["old_logps"], exp["ref_logps"],
                                     exp["mask"], kl_coef, rlhf["reward_clip"])
    advantages, returns = ppo_math.gae(rewards, exp["old_values"], exp["mask"], rlhf["gamma"],
                                       rlhf["lam"])
    if rlhf["whiten_advantages"]:
        stats = ppo_math.whiten_stats(advantages, exp["mask"])
        torch.distributed.all_reduce(stats, group=dp_group)
        advantages = ppo_math.whiten(advantages, exp["mask"], stats)
    exp.update(advantages=advantages, returns=returns, token_rewards=rewards)


def grpo_advantages(exp: dict, rlhf: dict) -> None:
    """GRPO: each sample's score normalised within its prompt's group, on every response
    token (the groups never cross ranks: a rank samples whole groups)."""
    advantages = ppo_math.group_advantages(exp["scores"], rlhf["group_size"])
    exp["advantages"] = advantages[:, None] * exp["mask"]
