"""Turning tokenized SFT samples into fixed-length training sequences.

A sample is ``(ids, response_mask)``: ``response_mask[j]`` is 1 when token ``j`` is a response
token the model should learn to produce. Several samples may share one sequence (packing);
each keeps its own positions and segment, and ``build_attention_mask`` keeps attention inside
a segment, so a packed sample sees exactly what it would see alone.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

FIELDS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")


def first_fit_pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first fit, in sample order: each sample goes into the first sequence that still
    has room for it, a new one when none has. Deterministic; ``O(n log n)`` through a max-tree
    over the sequences' free room (sequences not yet opened have all of it)."""
    size = 1
    while size < len(lengths):
        size *= 2
    room = [capacity] * (2 * size)  # room[size + b]: free tokens of sequence b
    bins: list[list[int]] = []
    for index, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"sample {index} has {length} tokens, more than {capacity}")
        node = 1
        while node < size:  # walk down to the leftmost sequence with room
            node = 2 * node if room[2 * node] >= length else 2 * node + 1
        if node - size == len(bins):
            bins.append([])
        bins[node - size].append(index)
        room[node] -= length
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return bins


def group_samples(lengths: Sequence[int], seq_length: int, packing: bool) -> list[list[int]]:
    """The samples of each training sequence: first-fit packed, or one sample each."""
    return first_fit_pack(lengths, seq_length) if packing else [[i] for i in range(len(lengths))]


def assemble_sequence(samples: Sequence[tuple[np.ndarray, np.ndarray]], seq_length: int,
                      pad: int) -> dict[str, np.ndarray]:
    """Lay ``samples`` one after another into arrays of ``seq_length``, then pad.

    ``labels`` is the next token of the same sample; a sample's last token and the padding are
    labelled ``pad`` with ``loss_mask`` 0, so no sample learns to predict the next one.
    ``position_ids`` restart at 0 per sample; ``segment_ids`` are 1, 2, ... (0: padding).
    """
    tokens = np.full(seq_length, pad, dtype=np.int64)
    labels = np.full(seq_length, pad, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    position_ids = np.zeros(seq_length, dtype=np.int64)
    segment_ids = np.zeros(seq_length, dtype=np.int64)
    start = 0
    for segment, (ids, response_mask) in enumerate(samples, 1):
        end = start + len(ids)
        if end > seq_length:
            raise ValueError(f"samples of {end} tokens do not fit a sequence of {seq_length}")
        tokens[start:end] = ids
        labels[start:end - 1] = ids[1:]
        loss_mask[start:end - 1] = response_mask[1:]
        position_ids[start:end] = np.arange(len(ids))
        segment_ids[start:end] = segment
        start = end
    return dict(zip(FIELDS, (tokens, labels, loss_mask, position_ids, segment_ids)))


def build_attention_mask(segment_ids) -> torch.Tensor:
    """``[b, 1, s, s]`` bool, True = masked out (megatron-core's convention): a token attends
    to the earlier tokens of its own segment only.

    Padding is segment 0, so padding rows still attend to earlier padding and no row is fully
    masked (a fully masked softmax row is NaN, and NaN times a zero loss mask is still NaN).
    """
    segment_ids = torch.as_tensor(segment_ids)
    if segment_ids.dim() == 1:
        segment_ids = segment_ids.unsqueeze(0)
    length = segment_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return ~(causal & same_segment).unsqueeze(1)


def collate_numpy(batch: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack the items' arrays into ``[b, s]`` numpy arrays."""
    return {name: np.stack([item[name] for item in batch]) for name in FIELDS}


def collate(batch: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """``torch.utils.data.DataLoader`` collate: ``[b, s]`` tensors plus ``attention_mask``
    (``[b, 1, s, s]``, see ``build_attention_mask``)."""
    stacked = {name: torch.from_numpy(array) for name, array in collate_numpy(batch).items()}
    stacked["attention_mask"] = build_attention_mask(stacked["segment_ids"])
    return stacked


def glm_collate(special: dict, two_d: bool):
    """``collate`` for GLM's prefix-LM samples (``prompt [gMASK] <sop> response <eop>``, see
    sft.glm_sample): within each packed segment the prompt through ``[gMASK]`` attends both
    ways and the rest causally (layers/glm_positions.prefix_lm_inputs, segment by segment),
    and ChatGLM-6B's 2-D positions restart per segment. Padding (segment 0) attends to earlier
    padding, as in :func:`build_attention_mask`."""
    from megatron_patch.layers.glm_positions import prefix_lm_inputs

    mask_ids = (special["gmask"], special["mask"])

    def collate_glm(batch):
        stacked = collate(batch)
        tokens, segments = stacked["tokens"], stacked["segment_ids"]
        rows, length = tokens.shape
        allowed = ~build_attention_mask(segments)[:, 0]
        positions = (torch.zeros(rows, 2, length, dtype=torch.long) if two_d
                     else stacked["position_ids"].clone())
        for row in range(rows):
            for segment in segments[row].unique().tolist():
                if segment == 0:
                    continue
                where = (segments[row] == segment).nonzero()[:, 0]
                start, end = int(where[0]), int(where[-1]) + 1
                mask, ids = prefix_lm_inputs(tokens[row:row + 1, start:end], special["sop"],
                                             mask_ids, None, two_d)
                allowed[row, start:end, start:end] = ~mask[0, 0]
                positions[row, ..., start:end] = ids[0]
        stacked["attention_mask"] = ~allowed[:, None]
        stacked["position_ids"] = positions
        return stacked

    return collate_glm
