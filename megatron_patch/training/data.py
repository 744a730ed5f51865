"""Training data: megatron-core's GPTDataset (through BlendedMegatronDatasetBuilder) for
pretraining, megatron_patch's SFTDataset for fine-tuning, and a sampler that starts at the
number of samples already consumed, so a resumed run sees exactly the batches it would have."""
from __future__ import annotations

import numpy as np
import torch

from megatron_patch import compat


class VocabOnlyTokenizer:
    """For runs without a tokenizer (mock data): the last id is end-of-document."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self.pad = vocab_size - 1
        self.unique_identifiers = {"class": "VocabOnlyTokenizer", "vocab_size": vocab_size}


def parse_blend(data_path: list[str]):
    """``P`` or ``W1 P1 W2 P2 ...`` -> megatron-core's blend (prefixes, weights or None)."""
    if len(data_path) == 1:
        return [data_path[0]], None
    if len(data_path) % 2:
        raise ValueError(f"--data-path needs one prefix or weight/prefix pairs, got "
                         f"{' '.join(data_path)}")
    try:
        weights = [float(w) for w in data_path[0::2]]
    except ValueError as err:
        raise ValueError(f"--data-path weights must be numbers: {err}") from err
    return list(data_path[1::2]), weights


def _check_prefixes(prefixes):
    import os

    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise FileNotFoundError(f"--data-path: {prefix}{ext} not found (build it with "
                                        f"python -m megatron_patch.data.preprocess)")


def effective_split(split: str, sizes: list[int], prefixes: list[str] | None) -> str:
    """``--split`` with the splits nobody asks for zeroed, after checking that every split that
    is asked for has documents (megatron-core's GPTDataset loops forever on an empty one)."""
    try:
        weights = [float(w) for w in split.replace("/", ",").split(",")]
    except ValueError as err:
        raise ValueError(f"--split '{split}' must be comma-separated numbers") from err
    weights = (weights + [0.0] * 3)[:3]
    weights = [w if size else 0.0 for w, size in zip(weights, sizes)]
    total = sum(weights)
    if not total:
        raise ValueError(f"--split '{split}' gives the training split no documents")
    if prefixes:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        names = ("train", "valid", "test")
        for prefix in prefixes:
            documents = len(IndexedDataset(prefix))
            for name, weight in zip(names, weights):
                if weight and round(weight / total * documents) == 0:
                    raise ValueError(
                        f"--split '{split}': the {name} split of {prefix} gets no documents "
                        f"({documents} in all); use more data, another --split, or "
                        f"--eval-iters 0")
    return ",".join(f"{w:g}" for w in weights)


def build_pretrain_datasets(args, tokenizer, vocab_size: int, reserve: int = 0):
    """(train, valid, test) GPTDatasets sized for the whole run; each sample ``reserve``
    tokens shorter than --seq-length (room for tokens the collate puts in front)."""
    import torch.distributed as dist
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    tokenizer = tokenizer or VocabOnlyTokenizer(vocab_size)
    gbs = args.global_batch_size
    evaluating = args.eval_iters and args.eval_interval  # 0 turns either off (as the loop does)
    evals = (args.train_iters // args.eval_interval + 1) * args.eval_iters if evaluating else 0
    sizes = [args.train_iters * gbs, evals * gbs, 0]  # no test-set evaluation
    blend = None
    if not args.mock_data:
        if not args.data_path:
            raise ValueError("give --data-path (mmap prefixes) or --mock-data")
        blend = parse_blend(args.data_path)
        _check_prefixes(blend[0])
    split = effective_split(args.split, sizes, blend[0] if blend else None)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length - reserve, blend=blend, split=split,
        path_to_cache=args.data_cache_path, tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=args.reset_attention_mask,
        mmap_bin_files=not args.no_mmap_bin_files, mid_level_dataset_surplus=0.005)
    cls = MockGPTDataset if args.mock_data else GPTDataset
    # Rank 0 builds (and caches) the sample indices first, then the others read them.
    datasets = None
    for turn in (True, False):
        if (dist.get_rank() == 0) == turn:
            datasets = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
        dist.barrier()
    return datasets


class MicroBatchSampler:
    """This data-parallel rank's micro-batches of sample indices, from ``consumed`` on.

    Global batch g covers samples [g*gbs, (g+1)*gbs); each step of ``mbs x dp`` samples is cut
    into one micro-batch per data-parallel rank, as Megatron-LM's pretraining sampler does.
    ``order(i)`` maps a running sample number to a dataset index (epochs, shuffling)."""

    def __init__(self, total: int, consumed: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, order=None):
        self.total, self.consumed = total, consumed
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.order = order or (lambda i: i)

    def __iter__(self):
        step = self.mbs * self.dp_size
        start = self.consumed
        while start + step <= self.total:
            first = start + self.dp_rank * self.mbs
            yield [self.order(i) for i in range(first, first + self.mbs)]
            start += step


class EpochOrder:
    """Sample number -> index of a dataset of ``size`` items, reshuffled every epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._epoch, self._perm = -1, None

    def __call__(self, i: int) -> int:
        epoch, pos = divmod(i, self.size)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng(self.seed + epoch).permutation(self.size)
        return int(self._perm[pos])


def micro_batches(dataset, sampler, args, collate=None):
    """Iterator over micro-batches (dicts of tensors) on this rank's device."""
    # Its own generator: a DataLoader draws its workers' base seed when iteration starts, and
    # from the global RNG that draw would shift dropout's stream by one in a resumed run (the
    # loader starts at iteration 1 in a fresh run, after the RNG restore in a resumed one).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         num_workers=args.num_workers, collate_fn=collate,
                                         pin_memory=compat.on_gpu(),
                                         persistent_workers=args.num_workers > 0,
                                         generator=torch.Generator().manual_seed(args.seed))
    device = compat.device()
    for batch in loader:
        yield {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
               for k, v in batch.items()}


def glm_pretrain_collate(ids: dict, two_d: bool):
    """GLM's generation objective over plain text: every sample becomes ``[gMASK] <sop> text``
    (the dataset's samples are two tokens shorter, so no text is dropped), the loss is on the
    text (from ``<sop>`` on), and the prefix is ``[gMASK]`` alone, so attention is causal.
    ChatGLM-6B's 2-D positions: 0 for ``[gMASK]`` and the mask position (0) from ``<sop>`` on,
    block positions 0, 1, 2, ... (layers/glm_positions.py)."""
    from torch.utils.data import default_collate

    from megatron_patch.layers.glm_positions import prefix_lm_inputs

    def collate(items):
        batch = default_collate(items)
        tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"]
        rows = tokens.size(0)
        head = torch.tensor([ids["gmask"], ids["sop"]], dtype=tokens.dtype).expand(rows, 2)
        tokens = torch.cat([head, tokens], dim=1)
        # [gMASK] predicts nothing; <sop> predicts the first text token
        labels = torch.cat([head[:, 1:], tokens[:, 2:3], labels], dim=1)
        loss_mask = torch.cat([torch.zeros_like(loss_mask[:, :1]),
                               torch.ones_like(loss_mask[:, :1]), loss_mask], dim=1)
        _, positions = prefix_lm_inputs(tokens, ids["sop"], (ids["gmask"], ids["mask"]), None,
                                        two_d)
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                "position_ids": positions}

    return collate
