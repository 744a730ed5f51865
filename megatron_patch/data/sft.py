"""Supervised fine-tuning data: instruction and chat records, tokenized with a response mask.

Two record kinds, in a JSON list or jsonl (one kind or both in one file):

- instruction: ``{"instruction", "input" (optional), "output"}``, formatted with the two
  standard Alpaca prompts (with and without input); the response is ``output``.
- chat: ``{"messages": [{"role", "content"}, ...]}``; the responses are the assistant turns.
  Rendered with the tokenizer's chat template when ``tokenizer.hf_tokenizer`` has one, else
  with ``FALLBACK_CHAT_HEADER``: every turn is ``<|role|>\\n`` + content, then ``\\n`` after a
  system/user turn and eod after an assistant turn.

A record becomes a list of pieces ``(text, learned)``; each piece is tokenized on its own and
the ids are concatenated, so the ids and the mask always agree, and those ids are exactly what
the model is trained on. The tokenizer is duck-typed (``tokenize``, ``detokenize``, ``eod``,
``pad``, ``bos``, ``vocab_size``, ``hf_tokenizer``), e.g. ``megatron_patch.tokenizers``'
``build_tokenizer``; see ``tokenize_piece`` for how special tokens are kept out of the pieces.
"""
from __future__ import annotations

import json
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from megatron_patch.data.readers import iter_json_list, starts_json_list
from megatron_patch.data.sft_packing import assemble_sequence, group_samples

logger = logging.getLogger(__name__)

# The two prompts of Stanford Alpaca (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:")
FALLBACK_CHAT_HEADER = "<|{role}|>\n"

Piece = tuple  # (text or list of ids, learned: bool)


@dataclass
class SFTStats:
    """What became of the records: ``read == kept + dropped_no_response``."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_response: int = 0
    sequences: int = 0

    def report(self, seq_length: int) -> None:
        """One log line; a warning when samples were truncated or dropped."""
        level = logging.WARNING if self.truncated or self.dropped_no_response else logging.INFO
        logger.log(level, "SFT data: %d records read, %d kept in %d sequences of %d tokens; "
                   "%d truncated to %d tokens, %d dropped with no response token left",
                   self.read, self.kept, self.sequences, seq_length, self.truncated, seq_length,
                   self.dropped_no_response)


def alpaca_pieces(record: dict, tokenizer) -> list[Piece]:
    """Alpaca prompt (not learned), then the output and eod (learned)."""
    fields = {key: record.get(key) or "" for key in ("instruction", "input")}
    if not isinstance(record.get("output"), str) or not isinstance(fields["instruction"], str):
        raise ValueError("an instruction record needs string 'instruction' and 'output'")
    template = ALPACA_PROMPT_WITH_INPUT if fields["input"] else ALPACA_PROMPT_NO_INPUT
    return bos_pieces(tokenizer) + [(template.format(**fields), False), (record["output"], True),
                              ([tokenizer.eod], True)]


def fallback_chat_pieces(messages: list[dict], tokenizer) -> list[Piece]:
    """The documented fallback template; eod ends each assistant turn."""
    pieces = bos_pieces(tokenizer)
    for message in messages:
        header = FALLBACK_CHAT_HEADER.format(role=message["role"])
        if message["role"] == "assistant":
            pieces += [(header, False), (message["content"], True), ([tokenizer.eod], True)]
        else:
            pieces.append((header + message["content"] + "\n", False))
    return pieces


def template_chat_pieces(messages: list[dict], hf_tokenizer) -> list[Piece]:
    """Cut the chat template's rendering at turn boundaries.

    Turn i is what rendering ``messages[:i + 1]`` adds to rendering ``messages[:i]``; for an
    assistant turn, the generation prompt (its role header) is not learned, the rest (content
    and the template's end-of-turn marker) is.
    """
    pieces, done = [], ""
    for index, message in enumerate(messages):
        full = _render(hf_tokenizer, messages[:index + 1])
        if message["role"] == "assistant":
            head = _render(hf_tokenizer, messages[:index], generation_prompt=True)
            pieces += [(_extension(done, head), False), (_extension(head, full), True)]
        else:
            pieces.append((_extension(done, full), False))
        done = full
    return pieces


def chat_pieces(messages: object, tokenizer) -> list[Piece]:
    """Chat template when the tokenizer has one, else the fallback; eod closes the sample."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise ValueError("'messages' must be a list of {\"role\": str, \"content\": str}")
    hf_tokenizer = getattr(tokenizer, "hf_tokenizer", None)
    if getattr(hf_tokenizer, "chat_template", None) is None:
        return fallback_chat_pieces(messages, tokenizer)
    # A template has its own end-of-turn marker; eod only closes the sample (learned when the
    # sample ends with a response), so the model never learns to end a document mid-dialogue.
    ending_with_response = bool(messages) and messages[-1]["role"] == "assistant"
    return template_chat_pieces(messages, hf_tokenizer) + [([tokenizer.eod], ending_with_response)]


def encode_record(record: object, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, response_mask)`` of one instruction or chat record."""
    if isinstance(record, dict) and "messages" in record:
        pieces = chat_pieces(record["messages"], tokenizer)
    elif isinstance(record, dict) and "instruction" in record:
        pieces = alpaca_pieces(record, tokenizer)
    else:
        raise ValueError("expected an instruction record {instruction, input, output} "
                         "or a chat record {messages}")
    return encode_pieces(pieces, tokenizer)


def encode_pieces(pieces: list[Piece], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, learned mask)`` of text / id pieces."""
    ids, mask = [], []
    for piece, learned in pieces:
        piece_ids = piece if isinstance(piece, list) else tokenize_piece(tokenizer, piece)
        # An ending that repeats eod (a template whose marker is eod) is not doubled.
        if piece == [tokenizer.eod] and ids and ids[-1] == tokenizer.eod:
            continue
        ids += piece_ids
        mask += [int(learned)] * len(piece_ids)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def tokenize_piece(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` without special tokens.

    Megatron-style ``tokenize`` adds the tokenizer's special tokens (LLaMA's BOS) to every call,
    which would put one inside a sample at each piece; with an HF tokenizer at hand the pieces
    are tokenized with ``add_special_tokens=False`` instead. Special tokens written in the text
    (a chat template's markers) still become their ids.
    """
    hf_tokenizer = getattr(tokenizer, "hf_tokenizer", None)
    if hf_tokenizer is not None:
        return list(hf_tokenizer(text, add_special_tokens=False).input_ids)
    if hasattr(tokenizer, "tokenize_text"):  # tokenizers/glm.py: ChatGLM2's [gMASK] sop left out
        return list(tokenizer.tokenize_text(text))
    return list(tokenizer.tokenize(text))


def bos_pieces(tokenizer) -> list[Piece]:
    """BOS once at the start of a sample, when the tokenizer itself starts a text with one
    (LLaMA's does); a tokenizer that never adds BOS (so neither did the pretraining data)
    gets none. A tokenizer with a ``text_prefix`` (ChatGLM2's ``[gMASK] sop``) gets that."""
    prefix = getattr(tokenizer, "text_prefix", None)
    if prefix is not None:
        return [(list(prefix), False)] if prefix else []
    bos = getattr(tokenizer, "bos", None)
    if bos is None:
        return []
    starts = _STARTS_WITH_BOS.get(tokenizer)
    if starts is None:  # probed once per tokenizer, not once per record
        starts = _STARTS_WITH_BOS[tokenizer] = list(tokenizer.tokenize("a"))[:1] == [bos]
    return [([bos], False)] if starts else []


_STARTS_WITH_BOS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _render(hf_tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    if not messages and not generation_prompt:
        return ""
    return hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=generation_prompt)


def _extension(prefix: str, text: str) -> str:
    """What ``text`` adds to ``prefix``; a template that rewrites earlier turns cannot be cut."""
    if not text.startswith(prefix):
        raise ValueError("the tokenizer's chat template does not render a conversation as its "
                         "turns one after another (it changes earlier turns), so the assistant "
                         "turns cannot be masked; remove the template to use the fallback")
    return text[len(prefix):]


# ------------------------------------------------------------------------------ the records


def iter_json_records(path: str) -> Iterator[tuple[str, object]]:
    """Yield ``("file:line", record)`` from a JSON list or jsonl file; malformed input raises
    ``ValueError`` naming the file and line (SFT data is curated: better stop than guess)."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{line}: bytes that are not UTF-8") from None
    as_list, line = starts_json_list(data[:1 << 16]), 0
    try:
        if as_list:
            for line, _, _, record in iter_json_list(text):
                yield f"{path}:{line}", record
            return
        # Not splitlines(): JSON strings may hold a raw U+2028, which it would split on.
        for line, raw in enumerate(text.split("\n"), 1):
            if raw.strip():
                yield f"{path}:{line}", json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno if as_list else line}: invalid JSON: "
                         f"{err.msg}") from None


def glm_sample(ids: np.ndarray, mask: np.ndarray, special: dict, eod: int):
    """A sample in GLM's prefix-LM form: ``prompt [gMASK] <sop> response <eop>``. The two
    tokens go before the first response token (``<sop>`` is not learned; it predicts the first
    response token), and a closing eod becomes ``<eop>``, the token GLM stops at."""
    learned = np.flatnonzero(mask)
    if len(learned) == 0:
        return ids, mask
    start = learned[0]
    ids = np.concatenate([ids[:start], [special["gmask"], special["sop"]], ids[start:]])
    mask = np.concatenate([mask[:start], [0, 0], mask[start:]]).astype(np.uint8)
    if ids[-1] == eod and special["eop"] != eod:
        ids[-1] = special["eop"]
    return ids.astype(np.int64), mask


def encode_records(records: Iterable[tuple[str, object]], tokenizer, seq_length: int,
                   glm: dict | None = None):
    """Tokenize, truncate to ``seq_length`` and drop samples left without a response token
    to learn; return ``(ids list, mask list, SFTStats)``. ``glm``: GLM's special ids (a
    prefix-LM model's samples: :func:`glm_sample`)."""
    ids_list, masks, stats = [], [], SFTStats()
    for where, record in records:
        stats.read += 1
        try:
            ids, mask = encode_record(record, tokenizer)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if glm:
            ids, mask = glm_sample(ids, mask, glm, tokenizer.eod)
        if len(ids) > seq_length:
            ids, mask = ids[:seq_length], mask[:seq_length]
            stats.truncated += 1
        # Token j is learned as the label of position j - 1, so the first token never is.
        if not mask[1:].any():
            stats.dropped_no_response += 1
            continue
        ids_list.append(ids)
        masks.append(mask)
    stats.kept = len(ids_list)
    return ids_list, masks, stats


# ------------------------------------------------------------------------------ the dataset


class SFTDataset(torch.utils.data.Dataset):
    """Fixed-length SFT sequences, one sample each or several packed (first fit).

    ``samples_or_path``: a JSON list / jsonl file, or a list of records. Items are dicts of
    ``seq_length`` arrays (see ``sft_packing.assemble_sequence``): int64 ``tokens``,
    ``labels``, ``position_ids``, ``segment_ids`` and float32 ``loss_mask``.
    """

    def __init__(self, samples_or_path, tokenizer, seq_length: int, packing: bool = False,
                 glm: dict | None = None):
        if isinstance(samples_or_path, (str, os.PathLike)):
            records = iter_json_records(os.fspath(samples_or_path))
        else:
            records = ((f"sample {i}", record) for i, record in enumerate(samples_or_path))
        ids_list, masks, stats = encode_records(records, tokenizer, seq_length, glm)
        lengths = [len(ids) for ids in ids_list]
        groups = group_samples(lengths, seq_length, packing)
        self._attach(ids_list, masks, lengths, groups, tokenizer, seq_length, stats)

    @classmethod
    def from_mmap(cls, prefix: str, tokenizer, seq_length: int, packing: bool | None = None):
        """Read what ``sft_preprocess`` wrote: ``{prefix}_tokens_document`` and
        ``{prefix}_loss_mask_document``, one sequence per sample and one document per training
        sequence. ``packing=None`` keeps the stored grouping; True/False re-groups."""
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ids = IndexedDataset(f"{prefix}_tokens_document")
        masks = IndexedDataset(f"{prefix}_loss_mask_document")
        lengths = ids.sequence_lengths
        if not np.array_equal(lengths, masks.sequence_lengths):
            raise ValueError(f"{prefix}: tokens and loss mask datasets do not match")
        if packing is None:
            bounds = ids.document_indices
            groups = [list(range(bounds[d], bounds[d + 1])) for d in range(len(bounds) - 1)]
        else:
            groups = group_samples(lengths.tolist(), seq_length, packing)
        self = cls.__new__(cls)
        stats = SFTStats(read=len(lengths), kept=len(lengths))
        self._attach(ids, masks, lengths, groups, tokenizer, seq_length, stats)
        return self

    def _attach(self, ids, masks, lengths, groups, tokenizer, seq_length: int,
                stats: SFTStats) -> None:
        longest = max((sum(lengths[j] for j in group) for group in groups), default=0)
        if longest > seq_length:
            raise ValueError(f"a sequence of {longest} tokens does not fit --seq-length "
                             f"{seq_length} (preprocessed for a longer one?)")
        self._ids, self._masks, self.groups = ids, masks, groups
        # The seed's convention: pad with eod when the tokenizer has no pad token.
        self.pad = tokenizer.eod if tokenizer.pad is None else tokenizer.pad
        self.seq_length, self.stats = seq_length, stats
        stats.sequences = len(groups)
        stats.report(seq_length)

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, response_mask)`` of sample ``index`` (before packing)."""
        return self._ids[index], self._masks[index]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        samples = [self.sample(j) for j in self.groups[index]]
        return assemble_sequence(samples, self.seq_length, self.pad)
