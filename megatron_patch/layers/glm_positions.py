"""GLM's prefix-LM inputs and 2-D rotary angles (ChatGLM-6B v1, GLM-130B).

**Mask.** A GLM sample is ``[pad..] prompt [gMASK] <sop> text``: every token attends to the
whole context (everything before the first ``<sop>``, the bos id, in both directions) and
causally after it; left padding is masked both ways (SAT's ``ChatGLMModel.get_masks``,
GLM-130B's ``generate.py``). The mask here is megatron-core's: boolean, True where attention is
NOT allowed, [b, 1, s, s]. A row without ``<sop>`` is all context (bidirectional).

**Positions** (``two_d``, ChatGLM-6B): two ids per token. The first counts tokens from the end
of the padding and stays at the mask token's index from ``<sop>`` on; the second is 0 in the
context and 1, 2, 3, ... from ``<sop>`` (SAT's ``get_position_ids``). Without ``two_d``
(GLM-130B with [gMASK]) the positions are plain 0, 1, 2, ... after the padding.

**2-D rotary** (ChatGLM-6B): each head's dimensions are two halves, the first rotated by the
first id, the second by the second, each half rotate-half style over its own quarters with
base 10000 over hn / 2 dimensions. megatron-core's rotary rotates pairs (i, i + hn/2) of the
whole head; with the middle two quarters of each query and key head swapped (the converter's
``SwapRotaryQuarters``), the pairs are GLM's: (A1_i, A2_i) and (B1_i, B2_i) become
(i, i + hn/2) for i < hn/2. :func:`rotary_2d` builds the angle table for that layout.
"""
from __future__ import annotations

import torch


def prefix_lm_inputs(tokens: torch.Tensor, sop_id: int, mask_ids: tuple, pad_id: int | None,
                     two_d: bool, valid: torch.Tensor | None = None):
    """tokens [b, s] -> (attention_mask [b, 1, s, s] bool, True = masked; position_ids
    [b, 2, s] when ``two_d``, else [b, s]). ``mask_ids``: ([gMASK], [MASK]) ids, in the order
    a row's mask position is looked for. Left padding: the leading ``pad_id`` tokens, or
    where ``valid`` [b, s] is False (generation's left-padded batches)."""
    batch, seq = tokens.shape
    device = tokens.device
    index = torch.arange(seq, device=device)
    is_sop = tokens == sop_id
    context = torch.where(is_sop.any(1), is_sop.int().argmax(1), torch.full_like(index[:1], seq)
                          .expand(batch))
    padding = torch.zeros(batch, dtype=torch.long, device=device)
    if valid is not None:
        padding = (~valid).long().sum(1)
    elif pad_id is not None:  # leading pad tokens
        padding = (torch.cumprod((tokens == pad_id).int(), dim=1)).sum(1)
    keys, queries = index[None, None, :], index[None, :, None]
    allowed = (keys <= queries) | (keys < context[:, None, None])
    real = index[None, :] >= padding[:, None]
    allowed = allowed & real[:, None, :] & real[:, :, None]
    mask = ~allowed[:, None]
    position = (index[None, :] - padding[:, None]).clamp(min=0)
    if not two_d:
        return mask, position
    # the row's first mask token, of the first of ``mask_ids`` the row has ([gMASK] before
    # [MASK], as SAT picks); none: the context end
    first = context
    for token in reversed(mask_ids):
        is_mask = tokens == token
        first = torch.where(is_mask.any(1), is_mask.int().argmax(1), first)
    generated = index[None, :] >= context[:, None]
    position = torch.where(generated, (first - padding)[:, None], position)
    block = torch.where(generated, index[None, :] - context[:, None] + 1, 0)
    return mask, torch.stack([position, block], dim=1)


def generation_inputs(tokens: torch.Tensor, valid: torch.Tensor, ids: dict, two_d: bool):
    """:func:`prefix_lm_inputs` for a left-padded generation batch, where a padding query
    sees itself (a row with nothing visible makes softmax NaN, which the cached values would
    carry to real tokens)."""
    mask, positions = prefix_lm_inputs(tokens, ids["sop"], (ids["gmask"], ids["mask"]), None,
                                       two_d, valid=valid)
    itself = torch.eye(tokens.size(1), dtype=torch.bool, device=tokens.device)
    return mask & ~(itself & ~valid[:, :, None])[:, None], positions


def prompt_ids(ids: list[int], special: dict) -> list[int]:
    """A prompt as GLM's tokenizers end it: ``... [gMASK] <sop>`` (kept if it already has a
    mask token and ends with ``<sop>``)."""
    has_mask = special["gmask"] in ids or special["mask"] in ids
    if has_mask and ids and ids[-1] == special["sop"]:
        return list(ids)
    return list(ids) + ([] if has_mask else [special["gmask"]]) + [special["sop"]]


def uses_rotary_2d(model) -> bool:
    """Whether ``model`` is a Rotary2DGPTModel (layers/rotary_2d_model.py), without importing
    megatron-core here."""
    return getattr(model, "two_d_positions", False)


def rotary_2d(position_ids: torch.Tensor, kv_channels: int, base: float = 10000.0):
    """position_ids [b, 2, s] -> angles [s, b, 1, kv_channels] for megatron-core's rotate-half
    rotary on heads whose middle quarters are swapped (see the module docstring)."""
    half = kv_channels // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float32,
                                            device=position_ids.device) / half))
    angles = position_ids.float()[..., None] * inv_freq  # [b, 2, s, hn / 4]
    freqs = torch.cat([angles[:, 0], angles[:, 1]], dim=-1)  # [b, s, hn / 2]
    return torch.cat([freqs, freqs], dim=-1).transpose(0, 1)[:, :, None, :]

