"""Reward-model training: preference pairs, the Bradley-Terry loss, scores read at explicit
indices.

Data: JSON / JSONL records ``{"prompt": str, "chosen": str, "rejected": str}`` (the response
follows the prompt as written; BOS as the tokenizer starts texts, eod closes each side), or
``{"chosen": [messages], "rejected": [messages]}`` (whole conversations, rendered with the
tokenizer's chat template as SFT renders them; an optional ``"prompt": [messages]`` goes before
both). An optional number ``"margin"`` per record asks ``r_chosen - r_rejected`` to exceed it.

A sample is a pair; its micro-batch holds ``micro_batch_size`` chosen rows then as many
rejected rows, right-padded to ``--seq-length``. Each row's score is read at its last token
(the eod): the collate gives those positions as flat indices into the ``[rows x seq]`` scores,
so padding (left or right) and the pad id never decide which score counts.

With ``--packing`` a sample is a pack of consecutive pairs: their chosen sides share one row, their
rejected sides another, each side with its own positions and attending only to itself, so every
pair is scored as it would be alone.

Loss per pair: ``-log sigmoid(r_chosen - r_rejected - margin)``, averaged over every pair of the
global batch (megatron-core's per-token loss path with pairs as the tokens, so it is the same
for any split into micro-batches and data-parallel ranks); logged with the accuracy
(``r_chosen > r_rejected``) and the mean margin ``r_chosen - r_rejected``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import numpy as np
import torch

from megatron_patch.data.sft import bos_pieces, chat_pieces, encode_pieces, iter_json_records

HEAD = "output_layer.weight"  # the reward model's scalar head (layers/reward_head.py)


@dataclasses.dataclass
class PairStats:
    """What reading a pairs file kept, cut and dropped (nothing goes silently)."""

    read: int = 0
    kept: int = 0
    truncated: int = 0             # sides cut to --seq-length (their eod kept last)
    dropped_identical: int = 0     # chosen = rejected after truncation: no preference left
    packs: int | None = None       # --packing: samples of several pairs each

    def summary(self, path: str, length: int) -> str:
        packed = f", packed into {self.packs} samples" if self.packs is not None else ""
        return (f"{path}: {self.read} pairs read, {self.kept} kept{packed}; {self.truncated} "
                f"sides truncated to {length} tokens, {self.dropped_identical} pairs dropped "
                f"(chosen = rejected after truncation)")


def encode_side(prompt, response, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids, response mask) of one side of a pair, ending with eod."""
    if isinstance(response, list):
        messages = (prompt if isinstance(prompt, list) else []) + response
        pieces = chat_pieces(messages, tokenizer)
    else:
        pieces = bos_pieces(tokenizer) + [(prompt or "", False), (response, True),
                                          ([tokenizer.eod], True)]
    return encode_pieces(pieces, tokenizer)


def side_ids(prompt, response, tokenizer) -> np.ndarray:
    """Token ids of one side of a pair, ending with eod."""
    return encode_side(prompt, response, tokenizer)[0]


def _check_record(record) -> None:
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise ValueError("expected a preference record {prompt, chosen, rejected} or "
                         "{chosen: [messages], rejected: [messages]}")
    kinds = {type(record["chosen"]), type(record["rejected"])}
    if kinds not in ({str}, {list}):
        raise ValueError("'chosen' and 'rejected' must both be strings or both be message "
                         "lists")
    prompt = record.get("prompt")
    if kinds == {str} and not isinstance(prompt, (str, type(None))):
        raise ValueError("'prompt' must be a string when 'chosen' and 'rejected' are")
    if not isinstance(record.get("margin", 0.0), (int, float)):
        raise ValueError("'margin' must be a number")


def fit(ids: np.ndarray, length: int, eod: int) -> tuple[np.ndarray, bool]:
    """``ids`` cut to ``length`` tokens with the eod kept last (the score is read there)."""
    if len(ids) <= length:
        return ids, False
    return np.concatenate([ids[:length - 1], [eod]]), True


def encode_pairs(path: str, tokenizer, length: int,
                 masks: bool = False) -> tuple[list[dict], PairStats]:
    """Every pair of ``path`` as ``{"chosen", "rejected", "margin"}`` (``masks``: also each
    side's response mask, ``chosen_mask`` / ``rejected_mask``, for DPO); errors name
    file:line."""
    pairs, stats = [], PairStats()
    for where, record in iter_json_records(path):
        stats.read += 1
        try:
            _check_record(record)
            sides = [encode_side(record.get("prompt"), record[key], tokenizer)
                     for key in ("chosen", "rejected")]
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        pair = {"margin": float(record.get("margin", 0.0))}
        for key, (ids, mask) in zip(("chosen", "rejected"), sides):
            fitted, cut = fit(ids, length, tokenizer.eod)
            stats.truncated += cut
            pair[key] = fitted.astype(np.int64)
            if masks:  # a cut side keeps its eod, which is a response token
                pair[key + "_mask"] = np.concatenate([mask[:length - 1], [1]]).astype(
                    np.uint8) if cut else mask
        if np.array_equal(pair["chosen"], pair["rejected"]):
            stats.dropped_identical += 1
            continue
        pairs.append(pair)
    stats.kept = len(pairs)
    return pairs, stats


def pack_pairs(pairs: list[dict], length: int) -> list[list[dict]]:
    """Pairs in order, as many to a pack as fit: a pack's chosen sides share one row of
    ``length`` tokens and its rejected sides another."""
    packs, used = [], None
    for pair in pairs:
        sizes = (len(pair["chosen"]), len(pair["rejected"]))
        if used is None or used[0] + sizes[0] > length or used[1] + sizes[1] > length:
            packs.append([])
            used = (0, 0)
        packs[-1].append(pair)
        used = (used[0] + sizes[0], used[1] + sizes[1])
    return packs


def collate_pairs(items: list[dict], length: int, pad: int) -> dict:
    """Chosen rows then rejected rows, right-padded to ``length``; ``chosen_index`` /
    ``rejected_index``: each side's last token as a flat index into ``[rows x length]``, pair
    by pair. An item is a pair, or a pack of them (``{"pairs": [...]}``): its sides follow one
    another in their row, each with positions from 0 and attention only within itself."""
    packs = [item["pairs"] if "pairs" in item else [item] for item in items]
    rows = len(packs)
    tokens = torch.full((2 * rows, length), pad, dtype=torch.long)
    positions = torch.zeros(2 * rows, length, dtype=torch.long)
    segments = torch.zeros(2 * rows, length, dtype=torch.long)
    index = {"chosen": [], "rejected": []}
    for offset, key in ((0, "chosen"), (rows, "rejected")):
        for row, pack in enumerate(packs, offset):
            start = 0
            for segment, pair in enumerate(pack, 1):
                ids = torch.as_tensor(pair[key])
                end = start + len(ids)
                tokens[row, start:end] = ids
                positions[row, start:end] = torch.arange(len(ids))
                segments[row, start:end] = segment
                index[key].append(row * length + end - 1)
                start = end
    batch = {"tokens": tokens, "position_ids": positions,
             "chosen_index": torch.tensor(index["chosen"]),
             "rejected_index": torch.tensor(index["rejected"]),
             "margin": torch.tensor([pair["margin"] for pack in packs for pair in pack],
                                    dtype=torch.float32)}
    if any(len(pack) > 1 for pack in packs):  # else causal attention is the same thing
        from megatron_patch.data.sft_packing import build_attention_mask

        batch["attention_mask"] = build_attention_mask(segments)
    return batch


def pair_loss(chosen_index, rejected_index, margin, output: torch.Tensor):
    """Bradley-Terry loss summed over the micro-batch's pairs, their count, and the figures
    the log reports (``{name: [sum, count]}``)."""
    scores = output.float().reshape(-1)
    difference = scores[chosen_index] - scores[rejected_index]
    losses = -torch.nn.functional.logsigmoid(difference - margin)
    count = torch.tensor(difference.numel(), device=scores.device)
    total = losses.sum()
    pairs = count.float()
    return total, count.to(torch.int), {
        "rm loss": torch.stack([total.detach(), pairs]),
        "accuracy": torch.stack([(difference > 0).float().sum().detach(), pairs]),
        "margin": torch.stack([difference.sum().detach(), pairs])}


def forward_step(data_iterator, model):
    """One micro-batch of pairs through this pipeline stage: scores at every position."""
    batch = next(data_iterator)
    scores = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
    return scores, functools.partial(pair_loss, batch["chosen_index"], batch["rejected_index"],
                                     batch["margin"])


class RewardObjective:
    """loop.LanguageModelObjective's interface for pairs."""

    loss_name = "rm loss"
    rows_per_sample = 2
    forward_step = staticmethod(forward_step)


class PairDataset(torch.utils.data.Dataset):
    """Pairs, or with ``packing`` packs of them (:func:`pack_pairs`: one sample each)."""

    def __init__(self, path: str, tokenizer, length: int, packing: bool = False):
        self.path, self.pad = path, tokenizer.pad
        self.pairs, self.stats = encode_pairs(path, tokenizer, length)
        self.packs = pack_pairs(self.pairs, length) if packing else None
        if packing:
            self.stats.packs = len(self.packs)

    def __len__(self) -> int:
        return len(self.packs) if self.packs is not None else len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        return {"pairs": self.packs[index]} if self.packs is not None else self.pairs[index]


def reward_arguments(parser) -> None:
    g = parser.add_argument_group("reward-model data")
    g.add_argument("--train-data", help="preference pairs, JSON / JSONL (module docstring of "
                                        "megatron_patch.rlhf.reward)")
    g.add_argument("--valid-data", help="same format; loss, accuracy and margin every "
                                        "--eval-interval")
    g.add_argument("--epochs", type=float, help="sets --train-iters from the number of pairs")


class MockPairDataset(torch.utils.data.Dataset):
    """--mock-data: random token pairs filling --seq-length (benchmarks), no tokenizer."""

    def __init__(self, size: int, length: int, vocab: int, seed: int):
        rng = np.random.default_rng(seed)
        self.ids = rng.integers(1, vocab - 1, size=(size, 2, length), dtype=np.int64)
        self.ids[:, :, -1] = vocab - 1  # an "eod" where the score is read
        self.pad, self.path = 0, "--mock-data"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"chosen": self.ids[index, 0], "rejected": self.ids[index, 1], "margin": 0.0}


def reward_model_arguments(parser) -> None:
    reward_arguments(parser)
    parser.add_argument("--mock-data", action="store_true",
                        help="random pairs of --seq-length tokens instead of --train-data "
                             "(throughput benchmarks)")
    parser.add_argument("--packing", action="store_true",
                        help="several pairs per sample: their chosen sides share one row, their "
                             "rejected sides another, each side attending only to itself "
                             "(--micro-batch-size then counts packs)")


class RewardData:
    """Pairs, reshuffled per epoch, resumable at any pair; a run resumes only from its own
    --save directory (another checkpoint, an SFT model's, gives it weights)."""

    RESUMES_OWN_SAVE_ONLY = True
    RUN_NAME = "reward-model training"
    add_arguments = staticmethod(reward_model_arguments)
    objective = RewardObjective

    @staticmethod
    def adjust_model(model_args, meta):
        """The trunk of ``model_args`` under a scalar head (never tied); a language model's
        checkpoint gives the trunk, the head starts from the init."""
        if model_args.prefix_lm_ids:
            raise ValueError("reward models of the GLM prefix-LM models (ChatGLM-6B, GLM-130B) "
                             "are not supported: their score position depends on the prompt's "
                             "[gMASK] layout")
        fresh = () if model_args.reward_head else (HEAD,)
        model_args.reward_head, model_args.tie_embeddings = True, False
        return fresh

    @staticmethod
    def build_datasets(args, plan):
        if args.mock_data:
            args.calculate_per_token_loss = True
            if args.train_iters is None:
                raise ValueError("--mock-data needs --train-iters")
            size = args.train_iters * args.global_batch_size
            return MockPairDataset(size, args.seq_length, plan.model_args.vocab_size,
                                   args.seed), None
        return check_pair_args(args, plan, functools.partial(PairDataset,
                                                              packing=args.packing))

    @staticmethod
    def make_iterators(args, datasets, consumed: int):
        return pair_iterators(args, datasets, consumed, collate_pairs)


def check_pair_args(args, plan, dataset_class) -> tuple:
    """(train, valid or None) datasets of pairs; --epochs sets --train-iters."""
    if not args.train_data:
        raise ValueError("--train-data is required: a JSON / JSONL file of preference pairs")
    if plan.tokenizer is None:
        raise ValueError("training on preference pairs needs a tokenizer: give --tokenizer-type/"
                         "--tokenizer-model or --load a checkpoint that carries one")
    args.calculate_per_token_loss = True  # pairs are the tokens: a global per-pair mean
    datasets = []
    for path in (args.train_data, args.valid_data):
        if path is None:
            datasets.append(None)
            continue
        if not os.path.isfile(path):
            raise FileNotFoundError(f"preference data {path!r}: no such file")
        dataset = dataset_class(path, plan.tokenizer, args.seq_length)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[megatron_patch] {dataset.stats.summary(path, args.seq_length)}", flush=True)
        datasets.append(dataset)
    train, valid = datasets
    if len(train) == 0:
        raise ValueError(f"--train-data {args.train_data}: no pair is left (see the counts "
                         f"above)")
    if args.epochs and args.train_iters:
        raise ValueError("give --epochs or --train-iters, not both")
    if args.train_iters is None and args.epochs:
        args.train_iters = max(1, math.floor(args.epochs * len(train) / args.global_batch_size))
    return train, valid


def pair_batches(args, dataset, total: int, start: int = 0, collate=None):
    """This data-parallel rank's micro-batches of ``dataset`` pairs ``start``..``total``
    (epochs reshuffled with --seed)."""
    from megatron.core import parallel_state as ps

    from megatron_patch.training.data import EpochOrder, MicroBatchSampler, micro_batches

    sampler = MicroBatchSampler(total, start, args.micro_batch_size,
                                ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                                EpochOrder(len(dataset), args.seed))
    pad = dataset.pad if dataset.pad is not None else 0
    return micro_batches(dataset, sampler, args,
                         functools.partial(collate, length=args.seq_length, pad=pad))


def pair_iterators(args, datasets, consumed: int, collate):
    train, valid = datasets
    make_valid = None
    if valid is not None and len(valid) > 0:
        evals = args.eval_iters * args.global_batch_size
        make_valid = lambda: pair_batches(args, valid, evals, collate=collate)  # noqa: E731
    total = args.train_iters * args.global_batch_size
    return pair_batches(args, train, total, consumed, collate), make_valid
