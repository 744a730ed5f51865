"""Direct preference optimisation (DPO) on megatron-core: ``python -m megatron_patch.dpo``.

Data: the reward model's preference pairs (rlhf/reward.py's formats); log-probabilities are
summed over each side's response tokens (the chosen / rejected text and its eod, never the
prompt), read from megatron-core's vocab-parallel cross-entropy of the labels (no vocabulary
gather at TP > 1; padded vocabulary rows are -inf, so they take no probability).

Loss per pair, with ``h = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r))``: ``sigmoid``
(default) ``-log sigmoid(beta h)``; ``ipo`` ``(h - 1 / (2 beta))^2``. Logged: the loss, the
implicit rewards ``beta (log pi - log ref)`` of each side, their accuracy (chosen > rejected) and
mean margin; averaged over every pair of the global batch (any micro-batch / data-parallel
split gives the same figures).

The reference is the --load checkpoint unless --ref-load names another. Its log-probabilities
are precomputed once, before step 1: one forward pass (no backward) of the reference over the
training and validation pairs, with the policy's own layout; they are kept as two floats per
pair (16 bytes; 16 MB for a million pairs) and no reference model stays in memory. With --save
the table is written to ``SAVE/dpo_reference.pt``, and a resumed run reads it back.
"""
from __future__ import annotations

import functools
import os
import time

import torch
import torch.distributed as dist

from megatron_patch.rlhf.reward import (PairStats, check_pair_args, encode_pairs, pair_batches,
                                        pair_iterators, reward_arguments)

REFERENCE_FILE = "dpo_reference.pt"


def encode_dpo_pairs(path: str, tokenizer, length: int) -> tuple[list[dict], PairStats]:
    """rlhf/reward.py's pairs with each side's response mask."""
    return encode_pairs(path, tokenizer, length, masks=True)


class DPODataset(torch.utils.data.Dataset):
    """Pairs with their reference log-probabilities (``reference``: [pairs, 2], set once
    computed; zeros before, and on the pipeline stages that compute no loss)."""

    def __init__(self, path: str, tokenizer, length: int):
        self.path, self.pad = path, tokenizer.pad
        self.pairs, self.stats = encode_dpo_pairs(path, tokenizer, length)
        self.reference = torch.zeros(len(self.pairs), 2, dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        return {**self.pairs[index], "index": index, "reference": self.reference[index]}


def collate_dpo(items: list[dict], length: int, pad: int) -> dict:
    """Chosen rows then rejected rows, right-padded: tokens, next-token labels and the mask of
    the labels that are response tokens."""
    rows = [(item["chosen"], item["chosen_mask"]) for item in items] + \
        [(item["rejected"], item["rejected_mask"]) for item in items]
    tokens = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), pad, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), length)
    for row, (ids, mask) in enumerate(rows):
        n = len(ids)
        tokens[row, :n] = torch.as_tensor(ids)
        labels[row, :n - 1] = torch.as_tensor(ids[1:])
        loss_mask[row, :n - 1] = torch.as_tensor(mask[1:], dtype=torch.float32)
    reference = torch.stack([item["reference"] for item in items]).float()
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": torch.arange(length).repeat(len(rows), 1),
            "index": torch.tensor([item["index"] for item in items]),
            "reference": reference}


def sequence_logps(token_losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-row sum of the response tokens' log-probabilities (the model's per-token
    cross-entropy is their negative)."""
    return -(token_losses.float() * loss_mask).sum(dim=-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
             loss_type: str = "sigmoid"):
    """(per-pair losses, chosen rewards, rejected rewards)."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -torch.nn.functional.logsigmoid(beta * h)
    return (losses, beta * (policy_chosen - ref_chosen).detach(),
            beta * (policy_rejected - ref_rejected).detach())


def pair_loss(loss_mask, reference, beta, loss_type, output):
    logps = sequence_logps(output, loss_mask)
    pairs = logps.numel() // 2
    losses, chosen, rejected = dpo_loss(logps[:pairs], logps[pairs:], reference[:, 0],
                                        reference[:, 1], beta, loss_type)
    count = torch.tensor(pairs, device=logps.device)
    n = count.float()
    total = losses.sum()
    return total, count.to(torch.int), {
        "dpo loss": torch.stack([total.detach(), n]),
        "accuracy": torch.stack([(chosen > rejected).float().sum(), n]),
        "margin": torch.stack([(chosen - rejected).sum(), n]),
        "chosen reward": torch.stack([chosen.sum(), n]),
        "rejected reward": torch.stack([rejected.sum(), n])}


class DPOObjective:
    loss_name = "dpo loss"
    rows_per_sample = 2
    beta, loss_type = 0.1, "sigmoid"

    @staticmethod
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        losses = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                       labels=batch["labels"])
        return losses, functools.partial(pair_loss, batch["loss_mask"], batch["reference"],
                                         DPOObjective.beta, DPOObjective.loss_type)


def _reference_step(data_iterator, model):
    """Forward only: each row's response log-probability, with the pairs' dataset indices."""
    batch = next(data_iterator)
    losses = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"])

    def collect(output):
        logps = sequence_logps(output, batch["loss_mask"]).double()
        pairs = logps.numel() // 2
        zero = torch.zeros((), device=logps.device)
        return zero, torch.ones((), dtype=torch.int, device=logps.device), {
            "index": batch["index"], "logps": torch.stack([logps[:pairs], logps[pairs:]], 1)}
    return losses, collect


class _ReferencePass:
    loss_name = "reference"
    rows_per_sample = 2
    forward_step = staticmethod(_reference_step)


@torch.no_grad()
def reference_logps(args, chunks, dataset, make_batches) -> None:
    """Fill ``dataset.reference`` with the current weights' log-probabilities (every pair
    once; the last global batch wraps around to the first pairs), on the last pipeline
    stage's ranks (gathered over data-parallel ranks)."""
    from megatron.core import parallel_state as ps

    from megatron_patch.training.loop import _forward_backward

    size = len(dataset)
    steps = -(-size // args.global_batch_size)
    iterator = make_batches(dataset, steps * args.global_batch_size)
    for chunk in chunks:
        chunk.eval()
    sums = torch.zeros(size, 2, dtype=torch.float64)
    counts = torch.zeros(size, dtype=torch.float64)
    for _ in range(steps):
        for out in _forward_backward(args, chunks, iterator, _ReferencePass, forward_only=True):
            index = out["index"].cpu()
            sums.index_add_(0, index, out["logps"].cpu())
            counts.index_add_(0, index, torch.ones(len(index), dtype=torch.float64))
    for chunk in chunks:
        chunk.train()
    if ps.is_pipeline_last_stage():
        from megatron_patch import compat

        both = torch.cat([sums, counts[:, None]], 1).to(compat.device())
        dist.all_reduce(both, group=ps.get_data_parallel_group())
        both = both.cpu()
        dataset.reference = both[:, :2] / both[:, 2:].clamp(min=1)


def dpo_arguments(parser) -> None:
    reward_arguments(parser)
    g = parser.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1,
                   help="strength of the pull to the reference (default 0.1)")
    g.add_argument("--dpo-loss-type", choices=("sigmoid", "ipo"), default="sigmoid",
                   help="sigmoid: DPO's -log sigmoid(beta h); ipo: (h - 1/(2 beta))^2")
    g.add_argument("--ref-load", help="the reference checkpoint (default: --load, the policy's "
                                      "starting weights); any TP/PP, the same family and shape")


class DPOData:
    """Pairs for DPO; a run resumes only from its own --save (its reference table there)."""

    RESUMES_OWN_SAVE_ONLY = True
    RUN_NAME = "DPO"
    add_arguments = staticmethod(dpo_arguments)
    objective = DPOObjective

    @staticmethod
    def build_datasets(args, plan):
        if args.beta <= 0:
            raise ValueError(f"--beta must be positive, got {args.beta}")
        DPOObjective.beta, DPOObjective.loss_type = args.beta, args.dpo_loss_type
        if plan.model_args.prefix_lm_ids:
            raise ValueError("DPO of the GLM prefix-LM models (ChatGLM-6B, GLM-130B) is not "
                             "supported yet: their pairs need [gMASK] <sop> and prefix masks")
        if plan.model_args.reward_head:
            raise ValueError(f"--load {args.load}: a reward model; DPO trains a language model "
                             f"(an SFT checkpoint)")
        return check_pair_args(args, plan, DPODataset)

    @staticmethod
    def make_iterators(args, datasets, consumed: int):
        return pair_iterators(args, datasets, consumed, collate_dpo)

    @staticmethod
    def before_training(args, parts, resumed: bool) -> None:
        """The reference log-probabilities: read back on a resume, else computed now (with
        --ref-load's weights, then the policy's put back)."""
        from megatron_patch.training import checkpointing

        datasets = [d for d in parts["datasets"] if d is not None]
        rank0 = dist.get_rank() == 0
        stored = os.path.join(args.load, REFERENCE_FILE) if args.load else None
        if resumed:
            if not stored or not os.path.isfile(stored):
                raise ValueError(f"--load {args.load}: no {REFERENCE_FILE} (the reference "
                                 f"log-probabilities of this run); start a new DPO run")
            tables = torch.load(stored)
            for dataset, table in zip(datasets, tables):
                if table.shape[0] != len(dataset):
                    raise ValueError(f"{stored}: {table.shape[0]} pairs, but {dataset.path} has "
                                     f"{len(dataset)}: the data changed since this run began")
                dataset.reference = table
            return
        started = time.time()
        if args.ref_load:
            checkpointing.load_weights(_with_load(args, args.ref_load), parts["model"])
        batches = functools.partial(pair_batches, args, collate=collate_dpo)
        for dataset in datasets:
            reference_logps(args, parts["chunks"], dataset, batches)
        if args.ref_load:  # the policy's starting weights again
            checkpointing.load_weights(args, parts["model"])
        pairs = sum(len(d) for d in datasets)
        if rank0:
            print(f"[megatron_patch] reference log-probabilities of {pairs} pairs from "
                  f"{args.ref_load or args.load} (one forward pass, {time.time() - started:.1f}s"
                  f"): kept as 2 floats per pair ({pairs * 16 / 2**10:.1f} KiB), no reference "
                  f"model in memory", flush=True)
        if args.save and dist.get_rank() == dist.get_world_size() - 1:  # a last-stage rank
            os.makedirs(args.save, exist_ok=True)
            tmp = os.path.join(args.save, REFERENCE_FILE + ".tmp")
            torch.save([d.reference for d in datasets], tmp)
            os.replace(tmp, os.path.join(args.save, REFERENCE_FILE))


def _with_load(args, path):
    import copy

    other = copy.copy(args)
    other.load = path
    return other
