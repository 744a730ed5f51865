"""Pre-tokenize SFT data into megatron-core indexed datasets.

``python -m megatron_patch.data.sft_preprocess --input IN --output-prefix P --tokenizer-type T
--tokenizer-model PATH --seq-length N [--packing]`` writes two ``IndexedDataset`` s::

    P_tokens_document.bin/.idx      token ids
    P_loss_mask_document.bin/.idx   1 where the token is a response token to learn (uint8)

Both have one sequence per sample and one document per training sequence (several with
``--packing``); ``SFTDataset.from_mmap(P, tokenizer, N)`` reads them back. Samples are already
truncated to N tokens and those with no response token left are dropped (both counted).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from megatron_patch.data.sft import SFTDataset, SFTStats

DATASETS = ("tokens", "loss_mask")


def write_sft_mmap(dataset: SFTDataset, output_prefix: str, vocab_size: int) -> list[str]:
    """Write ``dataset``'s samples, grouped as its sequences; return the dataset prefixes.

    Files are written under ``.tmp`` names and renamed only when both datasets are complete.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtypes = {"tokens": DType.optimal_dtype(vocab_size), "loss_mask": np.uint8}
    prefixes = {name: f"{output_prefix}_{name}_document" for name in DATASETS}
    builders = {name: IndexedDatasetBuilder(prefixes[name] + ".bin.tmp", dtype=dtypes[name])
                for name in DATASETS}
    for group in dataset.groups:
        samples = [dataset.sample(j) for j in group]
        lengths = [len(ids) for ids, _ in samples]
        for name, part in zip(DATASETS, zip(*samples)):
            builders[name].add_document(np.concatenate(part), lengths)
    for name in DATASETS:
        builders[name].finalize(prefixes[name] + ".idx.tmp")
    for name in DATASETS:
        for suffix in (".bin", ".idx"):
            os.replace(prefixes[name] + suffix + ".tmp", prefixes[name] + suffix)
    return list(prefixes.values())


def preprocess_sft(input_path: str, output_prefix: str, tokenizer, seq_length: int,
                   packing: bool = False) -> SFTStats:
    """Tokenize ``input_path`` (JSON list or jsonl of instruction/chat records) and write the
    indexed datasets; return the counts."""
    dataset = SFTDataset(input_path, tokenizer, seq_length, packing=packing)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    write_sft_mmap(dataset, output_prefix, tokenizer.vocab_size)
    return dataset.stats


def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM ``tools/preprocess_data.py`` flag names where the concept is the same."""
    parser = argparse.ArgumentParser(
        prog="python -m megatron_patch.data.sft_preprocess",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="JSON list or jsonl of instruction "
                        "{instruction, input, output} or chat {messages} records")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX_tokens_document and PREFIX_loss_mask_document")
    parser.add_argument("--tokenizer-type", required=True, help="e.g. llamabpe, bloombpe")
    parser.add_argument("--tokenizer-model", required=True, help="tokenizer path")
    parser.add_argument("--seq-length", type=int, required=True, help="tokens per sequence")
    parser.add_argument("--packing", action="store_true",
                        help="pack several samples into each sequence (greedy first fit)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; one clear error line (file:line for bad records) and status 2 on bad input."""
    args = build_parser().parse_args(argv)
    # Imported here: the tokenizer builder pulls in the tokenizer libraries only when needed.
    from megatron_patch.tokenizers import build_tokenizer

    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        stats = preprocess_sft(args.input, args.output_prefix, tokenizer, args.seq_length,
                               args.packing)
    except (ValueError, OSError) as err:
        print(f"sft_preprocess: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(vars(stats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
