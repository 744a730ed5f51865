"""A batch of prompts of different lengths as tensors: left padding, positions, masks.

Prompts are left-padded so that every row's last prompt token sits in the same column and all
rows decode in lockstep. The masks follow megatron-core's convention (bool, True = may NOT
attend) and hide the padding from every real token, so a row's completion is the one it gets
alone::

    row 0:  p  p  a  b  c   |  keys a b c visible, causally
    row 1:  d  e  f  g  h   |
"""
from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [b, s], valid [b, s]) for token lists, right-aligned; ``valid`` is False on
    padding."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt must have at least one token")
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        valid[row, width - len(prompt):] = True
    return tokens.to(device), valid.to(device)


def positions_of(valid: torch.Tensor) -> torch.Tensor:
    """Each token's position within its own row (padding gets 0)."""
    return (valid.long().cumsum(dim=-1) - 1).clamp(min=0)


def causal_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] attention mask (True = masked) for a left-padded prefill.

    Real queries see the real keys at or before them. A padding query sees only itself: a row
    of the mask with nothing visible would make softmax produce NaN, and that NaN would reach
    real tokens through the cached values (0 x NaN is NaN)."""
    width = valid.size(-1)
    causal = torch.ones(width, width, dtype=torch.bool, device=valid.device).tril()
    itself = torch.eye(width, dtype=torch.bool, device=valid.device)
    allowed = causal & (valid[:, None, :] | itself)
    return ~allowed.unsqueeze(1)


def decode_mask(key_valid: torch.Tensor, length: int) -> torch.Tensor:
    """[b, 1, 1, length] mask for one new token per row over the first ``length`` cache slots."""
    return ~key_valid[:, None, None, :length]
