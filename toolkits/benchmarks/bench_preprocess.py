"""Benchmark ``python -m megatron_patch.data.preprocess`` against Megatron-LM's pipeline.

Builds a JSON-lines corpus (the standard library's docstrings, shuffled, numbered and repeated to
``--corpus-mb``), trains a small byte-level BPE tokenizer, then for each worker count times

* ours: ``megatron_patch.data.preprocess.run`` in this process, and
* the baseline, a faithful re-implementation of Megatron-LM ``tools/preprocess_data.py`` run in
  this process too: ``Pool.imap(encode, open(file), 32)``; per document ``json.loads`` and one
  ``tokenize`` call in the workers; ``IndexedDatasetBuilder.add_document`` per document in the
  main process. Its tokenizer is the one Megatron-LM builds with the installed megatron-core
  (``megatron.core.tokenizers`` ``build_tokenizer``, Megatron-LM's default flags), once as is and
  once with ``--tokenizer-hf-include-special-tokens`` (then ``tokenize`` is
  ``tokenizer(text).input_ids``, the older Megatron-LM call, which is faster).
* with ``--megatron-lm PATH``: that checkout's real script instead (its wall time is taken from
  its own last "Processed ... docs/s" line; its CPU time includes its start-up).

Outputs are compared byte for byte with ours. Wall time gives docs/s and MB/s; CPU time (all
processes) per document is printed too, because it stays meaningful on a shared, busy machine.

    python toolkits/benchmarks/bench_preprocess.py --corpus-mb 32 --workers 1 2
"""
from __future__ import annotations

import argparse
import contextlib
import filecmp
import io
import json
import multiprocessing
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# Imported up front (megatron-core takes seconds), so no timed run pays for a first import.

from megatron_patch.data import preprocess  # noqa: E402
from megatron_patch.data.corpus import iter_stdlib_docstrings  # noqa: E402
from megatron_patch.tokenizers import base as _tokenizer_base  # noqa: E402,F401  imports
from megatron_patch.tokenizers.train import train_bpe_tokenizer  # noqa: E402


def write_corpus(path: str, megabytes: float, seed: int = 0) -> int:
    """A JSON-lines file of about ``megabytes`` MB of shuffled, numbered docstrings."""
    texts = list(iter_stdlib_docstrings())
    rng = random.Random(seed)
    written, number = 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < megabytes * 2**20:
            rng.shuffle(texts)
            for text in texts:
                line = json.dumps({"text": f"[{number}] {text}"}, ensure_ascii=False) + "\n"
                out.write(line)
                written += len(line.encode("utf-8"))
                number += 1
    return number


def megatron_lm_tokenizer(tokenizer_dir: str, include_special_tokens: bool):
    """The tokenizer Megatron-LM's script builds for ``--tokenizer-type HuggingFaceTokenizer``
    with the installed megatron-core (0.16.1) and Megatron-LM's default flags."""
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer as build

    return build(argparse.Namespace(
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_dir, vocab_file=None,
        merge_file=None, tokenizer_special_tokens=None, tokenizer_hf_use_fast=False,
        trust_remote_code=False, tokenizer_hf_include_special_tokens=include_special_tokens,
        tokenizer_metadata=None))


class BaselineEncoder:
    """Megatron-LM preprocess_data.py's ``Encoder.encode``, for one key, no sentence split."""

    def __init__(self, tokenizer_dir: str, include_special_tokens: bool):
        self.tokenizer_args = (tokenizer_dir, include_special_tokens)

    def initializer(self) -> None:
        """Per worker, like Megatron-LM: a tokenizer in a class attribute."""
        BaselineEncoder.tokenizer = megatron_lm_tokenizer(*self.tokenizer_args)

    def encode(self, json_line: str):
        """One document: ids (+ eod when not empty) and sentence lengths."""
        text = json.loads(json_line)["text"]
        doc_ids, sentence_lens = [], []
        for sentence in (text if isinstance(text, list) else [text]):
            sentence_ids = BaselineEncoder.tokenizer.tokenize(sentence)
            if len(sentence_ids) > 0:
                doc_ids.extend(sentence_ids)
                sentence_lens.append(len(sentence_ids))
        if len(doc_ids) > 0:
            doc_ids.append(BaselineEncoder.tokenizer.eod)
            sentence_lens[-1] += 1
        return doc_ids, sentence_lens, len(json_line)


def run_baseline(corpus: str, prefix: str, tokenizer_dir: str, workers: int,
                 include_special_tokens: bool) -> None:
    """Megatron-LM's pipeline, re-implemented."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    encoder = BaselineEncoder(tokenizer_dir, include_special_tokens)
    tokenizer = megatron_lm_tokenizer(tokenizer_dir, include_special_tokens)
    with open(corpus, "r", encoding="utf-8") as fin, \
            multiprocessing.Pool(workers, initializer=encoder.initializer) as pool:
        builder = IndexedDatasetBuilder(f"{prefix}.bin",
                                        dtype=DType.optimal_dtype(tokenizer.vocab_size))
        for doc, sentence_lens, _ in pool.imap(encoder.encode, fin, 32):
            builder.add_document(doc, sentence_lens)
        builder.finalize(f"{prefix}.idx")


def run_megatron_lm(checkout: str, corpus: str, prefix: str, tokenizer_dir: str,
                    workers: int) -> float:
    """The real tools/preprocess_data.py; returns its processing seconds (from its log)."""
    cmd = [sys.executable, os.path.join(checkout, "tools", "preprocess_data.py"),
           "--input", corpus, "--output-prefix", prefix, "--json-keys", "text",
           "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir,
           "--append-eod", "--workers", str(workers), "--log-interval", "1000"]
    env = dict(os.environ, PYTHONPATH=f"{checkout}:{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    rates = re.findall(r"Processed (\d+) documents \(([\d.]+) docs/s", proc.stderr)
    if proc.returncode != 0 or not rates:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    documents, rate = rates[-1]
    return int(documents) / float(rate)


def run_ours(corpus: str, prefix: str, tokenizer_dir: str, workers: int) -> None:
    """megatron_patch.data.preprocess.run, in this process."""
    args = preprocess.build_parser().parse_args([
        "--input", corpus, "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", tokenizer_dir, "--append-eod", "--workers", str(workers),
        "--log-interval", str(10**9)])
    with contextlib.redirect_stdout(io.StringIO()):  # its start-up line would break the table
        preprocess.run(args)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers, once joined)."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all processes) of ``run(*args)``; a run that returns a
    number reports its own wall seconds."""
    wall, cpu = time.time(), cpu_seconds()
    own = run(*args)
    return own or time.time() - wall, cpu_seconds() - cpu


def same_output(ours: str, baseline: str) -> bool:
    """Byte equality of the .bin and .idx files."""
    return all(filecmp.cmp(f"{ours}.{ext}", f"{baseline}.{ext}", shallow=False)
               for ext in ("bin", "idx"))


def pipelines(args, work: str, corpus: str, tokenizer_dir: str, workers: int) -> list:
    """(name, output prefix, run, run's arguments) of ours and each baseline for ``workers``."""
    ours = os.path.join(work, f"ours_{workers}")
    found = [("megatron_patch.data.preprocess", f"{ours}_text_document", run_ours,
              (corpus, ours, tokenizer_dir, workers))]
    if args.megatron_lm:
        prefix = os.path.join(work, f"megatron_lm_{workers}")
        return found + [("Megatron-LM tools/preprocess_data.py", f"{prefix}_text_document",
                         run_megatron_lm, (args.megatron_lm, corpus, prefix, tokenizer_dir,
                                           workers))]
    for special in (False, True):
        prefix = os.path.join(work, f"baseline_{workers}_{int(special)}")
        found.append(("Megatron-LM pipeline" + (" +include-special-tokens" if special else ""),
                      prefix, run_baseline, (corpus, prefix, tokenizer_dir, workers, special)))
    return found


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus-mb", type=float, default=32.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--megatron-lm", help="a Megatron-LM checkout: run its real script")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per pipeline, interleaved; the fastest is kept")
    parser.add_argument("--work-dir", help="keep corpus and outputs here (default: a temp dir)")
    return parser.parse_args()


def _row(workers: int, name: str, documents: int, megabytes: float, times, ours=None,
         same: str = "") -> str:
    # speedup = the baseline's seconds / ours, in wall time and in CPU time of all processes
    wall, cpu = times
    speedup = f"{wall / ours[0]:.2f}x" if ours else ""
    cpu_speedup = f"{cpu / ours[1]:.2f}x" if ours else ""
    return (f"{workers:>7}  {name:<42} {documents / wall:>8.0f} {megabytes / wall:>6.2f} "
            f"{speedup:>8} {1e6 * cpu / documents:>10.0f} {cpu_speedup:>8} {same:>5}")


def main() -> None:
    """Build corpus and tokenizer, time each pipeline per worker count, print the table."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker = one core, for both sides
    args = parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_preprocess_")
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.jsonl")
    documents = write_corpus(corpus, args.corpus_mb)
    megabytes = os.path.getsize(corpus) / 2**20
    sample = [text for _, text in zip(range(3000), iter_stdlib_docstrings())]
    tokenizer_dir = train_bpe_tokenizer(sample, args.vocab_size, os.path.join(work, "tokenizer"))
    print(f"corpus: {documents} documents, {megabytes:.1f} MB; BPE vocab {args.vocab_size}; "
          f"{os.cpu_count()} CPU(s); best of {args.repeat}; speedup = baseline time / ours")
    print(f"{'workers':>7}  {'pipeline':<42} {'docs/s':>8} {'MB/s':>6} {'speedup':>8} "
          f"{'CPU us/doc':>10} {'CPU x':>8} {'same':>5}")
    for workers in args.workers:
        runs = pipelines(args, work, corpus, tokenizer_dir, workers)
        best = [(float("inf"), float("inf"))] * len(runs)
        for _ in range(args.repeat):  # interleaved, so a busy spell hits every pipeline alike
            best = [min(old, timed(run, *run_args))
                    for old, (_, _, run, run_args) in zip(best, runs)]
        ours_prefix = runs[0][1]
        print(_row(workers, runs[0][0], documents, megabytes, best[0]), flush=True)
        for (name, prefix, _, _), times in zip(runs[1:], best[1:]):
            same = str(same_output(ours_prefix, prefix))
            print(_row(workers, name, documents, megabytes, times, best[0], same), flush=True)

if __name__ == "__main__":
    main()
