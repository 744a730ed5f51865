"""FP8 against bf16 on real text: the same pretraining run (same seed, weights, data order)
with and without --fp8-format, and the mean loss of the last iterations of each.

The text is the docstrings of Python's standard library and of the installed packages named
by --packages (nothing is downloaded); a byte-level BPE tokenizer is trained on it.

    python toolkits/benchmarks/bench_fp8_loss.py                 # on a GPU: the 0.95B shape
    python toolkits/benchmarks/bench_fp8_loss.py --tiny --train-iters 20   # CPU smoke test
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile


def build_data(work: str, packages: list[str], vocab: int) -> str:
    from megatron_patch.data.corpus import iter_docstrings, iter_stdlib_docstrings
    from megatron_patch.tokenizers.train import train_bpe_tokenizer

    texts = list(iter_stdlib_docstrings(min_chars=100))
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            print(f"--packages: {name} is not an installed package; skipped", flush=True)
            continue
        texts.extend(iter_docstrings(list(spec.submodule_search_locations)[0], min_chars=100))
    with open(os.path.join(work, "docs.jsonl"), "w") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    train_bpe_tokenizer(texts[::3], vocab, os.path.join(work, "tok"))
    subprocess.run([sys.executable, "-m", "megatron_patch.data.preprocess", "--input",
                    os.path.join(work, "docs.jsonl"), "--output-prefix",
                    os.path.join(work, "data"), "--tokenizer-type", "HuggingFaceTokenizer",
                    "--tokenizer-model", os.path.join(work, "tok"), "--append-eod"], check=True)
    print(f"corpus: {len(texts)} docstrings, {sum(map(len, texts)) / 1e6:.1f}M characters",
          flush=True)
    return os.path.join(work, "data_text_document")


def train(work: str, data: str, opts, extra: list[str], name: str) -> list[float]:
    metrics = os.path.join(work, f"{name}.jsonl")
    size = ["--model-size", "tiny"] if opts.tiny else \
        ["--model-size", "1B", "--bf16", "--compile-layers", "--compile-output-layer"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
                    "-m", "megatron_patch.pretrain", "--load", "", "--model-family", "llama",
                    *size, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                    os.path.join(work, "tok"), "--data-path", data, "--data-cache-path",
                    os.path.join(work, "cache"), "--micro-batch-size",
                    str(opts.micro_batch_size), "--global-batch-size",
                    str(opts.global_batch_size), "--seq-length", str(opts.seq_length),
                    "--lr", "3e-4", "--min-lr", "3e-5", "--lr-warmup-iters",
                    str(max(1, opts.train_iters // 10)), "--train-iters", str(opts.train_iters),
                    "--eval-iters", "0", "--log-interval", "50", "--seed", str(opts.seed),
                    "--metrics-file", metrics, *extra], check=True)
    rows = [json.loads(line) for line in open(metrics)]
    return [r["lm_loss"] for r in rows if "lm_loss" in r]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model, fp32: CPU smoke test")
    parser.add_argument("--train-iters", type=int, default=300)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=None, help="default 2048 (tiny 64)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--fp8-format", default="hybrid", choices=("hybrid", "e4m3"))
    parser.add_argument("--last", type=int, default=20, help="iterations averaged at the end")
    parser.add_argument("--packages", default="transformers,torch,numpy,scipy,sympy,pandas,"
                                               "networkx,megatron",
                        help="installed packages whose docstrings join the standard library's")
    parser.add_argument("--vocab-size", type=int, default=8192)
    opts = parser.parse_args(argv)
    opts.seq_length = opts.seq_length or (64 if opts.tiny else 2048)
    with tempfile.TemporaryDirectory() as work:
        data = build_data(work, [p for p in opts.packages.split(",") if p], opts.vocab_size)
        bf16 = train(work, data, opts, [], "bf16")
        fp8 = train(work, data, opts, ["--fp8-format", opts.fp8_format], "fp8")
    last = min(opts.last, len(bf16))
    mean_bf16, mean_fp8 = sum(bf16[-last:]) / last, sum(fp8[-last:]) / last
    base = "fp32" if opts.tiny else "bf16"
    print(f"mean loss of the last {last} of {len(bf16)} iterations: {base} {mean_bf16:.5f}, "
          f"fp8 {opts.fp8_format} {mean_fp8:.5f} ({mean_fp8 / mean_bf16 - 1:+.3%}); "
          f"first losses {bf16[0]:.5f} / {fp8[0]:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
