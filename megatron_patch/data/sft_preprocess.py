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

from megatron_patch.data.indexed import IndexedDatasetWriter, token_dtype
from megatron_patch.data.sft import SFTDataset, SFTStats

DATASETS = ("tokens", "loss_mask")


def write_sft_mmap(dataset: SFTDataset, output_prefix: str, vocab_size: int) -> list[str]:
    """Write ``dataset``'s samples, grouped as its sequences; return the dataset prefixes.

    Both datasets are written under temporary names (removed on failure); the tokens dataset,
    whose ``.idx`` is what marks a prefix as present, is moved into place last.
    """
    prefixes = {name: f"{output_prefix}_{name}_document" for name in DATASETS}
    with IndexedDatasetWriter(prefixes["tokens"], token_dtype(vocab_size)) as tokens, \
            IndexedDatasetWriter(prefixes["loss_mask"], np.uint8) as loss_mask:
        for group in dataset.groups:
            samples = [dataset.sample(j) for j in group]
            lengths = [len(ids) for ids, _ in samples]
            for writer, part in zip((tokens, loss_mask), zip(*samples)):
                writer.add_documents(np.concatenate(part), lengths, [len(group)])
        loss_mask.finalize()
        tokens.finalize()
    return list(prefixes.values())


def preprocess_sft(input_path: str, output_prefix: str, tokenizer, seq_length: int,
                   packing: bool = False) -> SFTStats:
    """Tokenize ``input_path`` (JSON list or jsonl of instruction/chat records) and write the
    indexed datasets; return the counts."""
    dataset = SFTDataset(input_path, tokenizer, seq_length, packing=packing)
    if not dataset.groups:  # an empty dataset would look like a finished one
        raise ValueError(f"--input {input_path}: no sample keeps a response token within "
                         f"--seq-length {seq_length}; nothing written")
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
    from megatron_patch import compat

    compat.exit_unless_supported()  # the mmap writer is megatron-core's
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
