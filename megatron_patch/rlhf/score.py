"""Scoring texts with a reward-model checkpoint (``python -m megatron_patch.reward_model --score``).

Input: JSON / JSONL records, each a preference pair (the training format: the output has
``chosen_score`` and ``rejected_score``, and the run prints the accuracy), ``{"prompt", "response"}``
or ``{"text"}`` (a ``score``). Each text is tokenized as in training (BOS as the tokenizer
starts texts, eod last) and scored at its last token, in right-padded micro-batches; a text
longer than ``--seq-length`` keeps its first tokens and its eod (counted and reported).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from megatron_patch import compat
from megatron_patch.generation.cli import log
from megatron_patch.rlhf.reward import _check_record, fit, side_ids


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m megatron_patch.reward_model --score",
        description="Score texts or preference pairs with a reward-model checkpoint; under "
                    "torchrun with --tensor-model-parallel-size equal to the number of ranks.")
    parser.add_argument("--score", action="store_true", required=True, help=argparse.SUPPRESS)
    parser.add_argument("--load", required=True, help="a reward-model checkpoint (trained, or "
                        "converted from an HF *ForSequenceClassification)")
    parser.add_argument("--input-file", required=True, help="JSON / JSONL records: pairs "
                        "{prompt, chosen, rejected}, {prompt, response} or {text}")
    parser.add_argument("--output-file", required=True, help="JSON lines, one per record")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int,
                        help="longest text scored (default: max_position_embeddings)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--tokenizer-path", help="default: the checkpoint's tokenizer")
    parser.add_argument("--tokenizer-type", help="default: the checkpoint's")
    return parser.parse_args(argv)


def read_texts(path: str, tokenizer, length: int):
    """(id lists to score, per record the indices of its texts and whether it is a pair,
    number of texts truncated)."""
    from megatron_patch.data.sft import iter_json_records

    texts, records, truncated = [], [], 0
    for where, record in iter_json_records(path):
        try:
            if isinstance(record, dict) and "chosen" in record:
                _check_record(record)
                sides = [side_ids(record.get("prompt"), record[k], tokenizer)
                         for k in ("chosen", "rejected")]
            elif isinstance(record, dict) and isinstance(record.get("text"), str):
                sides = [side_ids("", record["text"], tokenizer)]
            elif isinstance(record, dict) and isinstance(record.get("response"), str):
                sides = [side_ids(record.get("prompt") or "", record["response"], tokenizer)]
            else:
                raise ValueError("expected {prompt, chosen, rejected}, {prompt, response} or "
                                 "{text}")
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        first = len(texts)
        for ids in sides:
            ids, cut = fit(ids, length, tokenizer.eod)
            texts.append(ids.tolist())
            truncated += cut
        records.append((list(range(first, len(texts))), len(sides) == 2))
    return texts, records, truncated


@torch.no_grad()
def score_rows(model, rows: list[list[int]], pad: int, micro_batch_size: int) -> list[float]:
    """The score at each row's last token, right-padded micro-batches (a reward model at
    PP=1)."""
    device = compat.device()
    scores = []
    for start in range(0, len(rows), micro_batch_size):
        chunk = rows[start:start + micro_batch_size]
        width = max(len(r) for r in chunk)
        tokens = torch.full((len(chunk), width), pad, dtype=torch.long)
        for i, ids in enumerate(chunk):
            tokens[i, :len(ids)] = torch.tensor(ids)
        positions = torch.arange(width).expand(len(chunk), width)
        out = model(tokens.to(device), positions.to(device), None)  # [b, s, 1]
        last = torch.tensor([len(ids) - 1 for ids in chunk], device=device)
        scores += out[torch.arange(len(chunk), device=device), last, 0].float().tolist()
    return scores


def run(opts) -> None:
    from megatron_patch.generation.loading import load_model, load_tokenizer, open_checkpoint

    if not os.path.isfile(opts.input_file):
        raise FileNotFoundError(f"--input-file {opts.input_file!r}: no such file")
    checkpoint = open_checkpoint(opts.load)
    if not checkpoint.args.reward_head:
        raise ValueError(f"--load {opts.load}: not a reward model (a language model's "
                         f"checkpoint); train one with python -m megatron_patch.reward_model "
                         f"or convert an HF *ForSequenceClassification")
    tokenizer = load_tokenizer(checkpoint, opts.tokenizer_path, opts.tokenizer_type)
    length = opts.seq_length or checkpoint.args.max_position_embeddings
    texts, records, truncated = read_texts(opts.input_file, tokenizer, length)
    if truncated:
        log(f"[score] {truncated} of {len(texts)} texts were longer than {length} tokens: "
            f"their first {length - 1} tokens and eod were scored")
    precision = opts.precision or ("bf16" if compat.on_gpu() else "fp32")
    compat.initialize_parallel(opts.tensor_model_parallel_size, 1)
    try:
        model = load_model(checkpoint, opts.tensor_model_parallel_size, precision)
        pad = tokenizer.pad if tokenizer.pad is not None else 0
        scores = score_rows(model, texts, pad, opts.micro_batch_size)
    finally:
        compat.destroy_parallel()
    if os.environ.get("RANK", "0") != "0":
        return
    right = pairs = 0
    tmp = f"{opts.output_file}.tmp"  # renamed when complete: no half-written output
    with open(tmp, "w", encoding="utf-8") as out:
        for indices, is_pair in records:
            if is_pair:
                chosen, rejected = (scores[i] for i in indices)
                pairs += 1
                right += chosen > rejected
                out.write(json.dumps({"chosen_score": chosen, "rejected_score": rejected})
                          + "\n")
            else:
                out.write(json.dumps({"score": scores[indices[0]]}) + "\n")
    os.replace(tmp, opts.output_file)
    log(f"[score] wrote {len(records)} records to {opts.output_file}"
        + (f"; accuracy {right / pairs:.4f} ({right} of {pairs} pairs score chosen > "
           f"rejected)" if pairs else ""))


def main(argv=None) -> int:
    """Exit code: 0 done, 1 bad input (message on stderr), 2 bad flags (usage)."""
    from megatron_patch.generation.cli import run_command

    return run_command(parse_args, run, argv)
