"""``python -m megatron_patch.data.preprocess``: JSON lines -> megatron-core indexed datasets.

Takes Megatron-LM ``tools/preprocess_data.py``'s flags and writes the same tokens: one document
per JSON line and key, ``tokenizer.tokenize(text)`` (+ EOD with ``--append-eod``), a list value
as one sequence per non-empty item, an empty document kept as a document with no sequence (and no
EOD), dtype uint16 below 65500 ids else int32, documents in input order, into
``{prefix}_{key}_document.bin/.idx``.

Differences, all on purpose: inputs may be directories, globs, several paths, ``.gz`` and
``.zst``; a bad line (invalid JSON or UTF-8, missing key, non-text value) is reported as
``file:line`` and skipped for every key instead of killing the run (``--on-bad-line stop``
stops); every key gets its index (Megatron-LM finalizes only the last key's).

Why it is faster: the main process only cuts the input into 256 KB blocks of raw lines; each
worker parses a block (orjson when installed, else json), tokenizes it in one batch call and
sends back numpy arrays; the index is spooled to disk (see ``indexed.py``), so memory stays flat.
What is left is the tokenizer's own Rust call: about 95% of the CPU time on a mixed
Chinese/English corpus (``toolkits/benchmarks/bench_preprocess.py --corpus mixed``).
"""
from __future__ import annotations

import argparse
import collections
import itertools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np

from megatron_patch.data.indexed import IndexedDatasetWriter, token_dtype
from megatron_patch.data.readers import (Chunk, InputError, expand_inputs, iter_chunks,
                                         ordered_map, parse_lines)

_MAX_REPORTED = 20  # bad lines printed one by one; the rest only counted


class OutputError(OSError):
    """The output prefix cannot be written."""


# --------------------------------------------------------------------------- worker side

_WORKER: dict = {}  # tokenizer, keys, eod, dtype; set before fork or by the pool initializer


def _init_worker(tokenizer_args: dict, keys: list[str], eod, dtype) -> None:
    """Pool initializer: reuse the tokenizer inherited over fork, else build it (spawn)."""
    if "tokenizer" not in _WORKER:
        from megatron_patch.tokenizers import build_tokenizer

        _WORKER["tokenizer"] = build_tokenizer(**tokenizer_args)
    _WORKER.update(keys=keys, eod=eod, dtype=np.dtype(dtype))


@dataclass
class ChunkResult:
    """What a worker returns for one chunk: per key (tokens, sequence lengths, sequences per
    document), the skipped lines, and counts."""

    arrays: dict
    bad: list = field(default_factory=list)  # (line number, reason)
    documents: int = 0
    lines: int = 0
    nbytes: int = 0


def encode_chunk(chunk: Chunk) -> ChunkResult:
    """Parse, tokenize and pack one block of lines (runs in a worker)."""
    first_line, data = chunk.first_line, chunk.data
    keys, tokenizer = _WORKER["keys"], _WORKER["tokenizer"]
    rows = data.split(b"\n")
    if data.endswith(b"\n"):
        rows.pop()  # the split's empty tail, not a line
    lines, values, bad = parse_lines(rows, first_line, keys)
    ids = {key: _tokenize(tokenizer, values[key], lines, bad) for key in keys}
    failed = {line for line, _ in bad}
    keep = [line not in failed for line in lines]
    arrays = {key: _pack(*ids[key], keep, _WORKER["eod"], _WORKER["dtype"]) for key in keys}
    return ChunkResult(arrays, sorted(bad), sum(keep), len(rows), len(data))


def _tokenize(tokenizer, documents: list[list[str]], lines: list[int], bad: list):
    """(ids per sequence, sequences per document); a text the tokenizer refuses marks its line
    bad instead of failing the chunk."""
    counts = [len(texts) for texts in documents]
    flat = list(itertools.chain.from_iterable(documents))
    try:
        return tokenizer.tokenize_batch(flat), counts
    except Exception:  # find the culprit(s) one text at a time
        ids = []
        owners = itertools.chain.from_iterable([line] * n for line, n in zip(lines, counts))
        for text, line in zip(flat, owners):
            try:
                ids.append(tokenizer.tokenize(text))
            except Exception as err:
                bad.append((line, f"tokenizer failed: {type(err).__name__}: {err}"))
                ids.append([])
        return ids, counts


def _pack(ids: list[list[int]], counts: list[int], keep: list[bool], eod, dtype):
    """Numpy arrays for the kept documents, with Megatron-LM's rules: empty sequences dropped,
    EOD appended to a document's last sequence when the document is not empty."""
    sequences, per_document, start = [], [], 0
    for count, kept in zip(counts, keep):
        document = [seq for seq in ids[start:start + count] if len(seq) > 0]
        start += count
        if not kept:
            continue
        if document and eod is not None:
            document[-1] = [*document[-1], eod]
        sequences += document
        per_document.append(len(document))
    lengths = np.fromiter(map(len, sequences), np.int32, len(sequences))
    tokens = np.fromiter(itertools.chain.from_iterable(sequences), dtype, int(lengths.sum()))
    return tokens, lengths, np.asarray(per_document, np.int64)


# --------------------------------------------------------------------------- main process


def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM's flags, plus the few this tool adds (marked 'not in Megatron-LM')."""
    parser = argparse.ArgumentParser(
        prog="python -m megatron_patch.data.preprocess",
        description="Tokenize JSON lines into megatron-core indexed datasets "
                    "({prefix}_{key}_document.bin/.idx).")
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True,
                       help="JSON-lines files (.jsonl/.json, .gz, .zst), directories or globs")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract from each JSON line (default: text)")
    group.add_argument("--split-sentences", action="store_true", help="refused: see the error")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True,
                       help="bloombpe, llamabpe, falconbpe, galacticabpe, chatglm, glm130b, "
                            "HuggingFaceTokenizer, SentencePieceTokenizer")
    group.add_argument("--tokenizer-model", help="tokenizer directory or .model file")
    group.add_argument("--vocab-file", help="refused: save the tokenizer as a directory")
    group.add_argument("--merge-file", help="refused: save the tokenizer as a directory")
    group.add_argument("--extra-vocab-size", type=int, default=0,
                       help="rows added to the padded vocabulary (reported, not used here)")
    group.add_argument("--append-eod", action="store_true",
                       help="append the EOD token to every non-empty document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="path prefix of the outputs")
    group.add_argument("--dataset-impl", default="mmap", choices=["mmap"],
                       help="accepted for old launchers; mmap is the only format")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="tokenizing processes (default: one per CPU)")
    group.add_argument("--partitions", type=int, default=1,
                       help="accepted; not needed (inputs are streamed to all workers)")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="accepted; order is always kept")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="documents between progress lines")
    # 256 KB: a run ends with its last block, and meanwhile the other workers sit idle. With
    # 1 MB blocks the 2 workers of the benchmark's 12,000-document run finished 0.25 s apart
    # (mean of 4 runs of ~4 s), with 256 KB 0.04 s; the CPU per document is the same.
    group.add_argument("--chunk-bytes", type=int, default=1 << 18,
                       help="input bytes per worker task (not in Megatron-LM)")
    group.add_argument("--on-bad-line", choices=["skip", "stop"], default="skip",
                       help="skip (report file:line, count) or stop at a bad line "
                            "(not in Megatron-LM)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse, with the reason, the Megatron-LM options this tool does not implement."""
    if args.split_sentences:
        raise ValueError("--split-sentences is not supported: documents are tokenized whole "
                         "(Megatron-LM's default). To keep sentences apart, store each document "
                         "as a JSON list of strings; every non-empty item becomes a sequence.")
    if args.vocab_file or args.merge_file:
        raise ValueError("--vocab-file/--merge-file are not supported: save the tokenizer as a "
                         "HuggingFace directory (tokenizer.json) and pass it as "
                         "--tokenizer-model with --tokenizer-type HuggingFaceTokenizer.")
    if args.workers < 1 or args.partitions < 1 or args.log_interval < 1 or args.chunk_bytes < 1:
        raise ValueError("--workers, --partitions, --log-interval and --chunk-bytes must be >= 1")
    if args.partitions > 1:
        print(f"note: --partitions {args.partitions} is not needed; all {args.workers} workers "
              "share one ordered stream (the result equals --keep-sequential-samples).")


def output_prefixes(args: argparse.Namespace) -> dict:
    """{key: '{prefix}_{key}_document'}"""
    return {key: f"{args.output_prefix}_{key}_document" for key in args.json_keys}


def open_writers(prefixes: dict, dtype) -> dict:
    """An IndexedDatasetWriter per key, or OutputError naming the directory."""
    writers = {}
    directory = os.path.dirname(os.path.abspath(next(iter(prefixes.values()))))
    try:
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(13, "Permission denied")
        for key, prefix in prefixes.items():
            writers[key] = IndexedDatasetWriter(prefix, dtype)
    except OSError as err:
        for writer in writers.values():
            writer.abort()
        raise OutputError(f"--output-prefix: cannot write in {directory!r}: "
                          f"{err.strerror or err}") from err
    return writers


class Report:
    """Counts of one run, its progress lines and its bad-line reports (stderr)."""

    def __init__(self, paths: list, prefixes: dict, log_interval: int, stop_on_bad_line: bool):
        self.start = time.time()
        self.files, self.prefixes = len(paths), prefixes
        self.input_bytes = sum(os.path.getsize(path) for path in paths)
        self.log_interval = log_interval
        self.stop_on_bad_line = stop_on_bad_line
        self.documents = self.lines = self.nbytes = self.tokens = 0
        self.skipped: collections.Counter = collections.Counter()
        self.first_skipped: dict = {}  # reason kind -> "file:line"
        self._next_log = log_interval

    def add(self, path: str, input_bytes_done: int, result: ChunkResult) -> None:
        """Account for one chunk's result; print progress every ``log_interval`` documents."""
        self._bad_lines(path, result.bad)
        self.documents += result.documents
        self.lines += result.lines
        self.nbytes += result.nbytes
        if self.documents >= self._next_log:
            print(self.progress_line(input_bytes_done), file=sys.stderr, flush=True)
            self._next_log = (self.documents // self.log_interval + 1) * self.log_interval

    def _bad_lines(self, path: str, bad: list) -> None:
        for line, reason in bad:
            where = f"{path}:{line}"
            if self.stop_on_bad_line:
                raise InputError(f"{where}: {reason} (--on-bad-line stop)")
            kind = reason.split(" (")[0].split(":")[0]
            self.first_skipped.setdefault(kind, where)
            self.skipped[kind] += 1
            if sum(self.skipped.values()) <= _MAX_REPORTED:
                print(f"{where}: skipped: {reason}", file=sys.stderr)
            elif sum(self.skipped.values()) == _MAX_REPORTED + 1:
                print("further bad lines are counted in the summary only", file=sys.stderr)

    def progress_line(self, input_bytes_done: int) -> str:
        """Megatron-LM's "Processed N documents (docs/s, MB/s)." plus share done and ETA."""
        elapsed = max(time.time() - self.start, 1e-9)
        line = (f"Processed {self.documents} documents ({self.documents / elapsed:.1f} docs/s, "
                f"{self.nbytes / elapsed / 2**20:.2f} MB/s).")
        if self.input_bytes and input_bytes_done:
            done = min(input_bytes_done / self.input_bytes, 1.0)
            eta = elapsed * (1 - done) / done
            line += f" {100 * done:.1f}% of input, ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        return line

    def summary(self) -> str:
        """The closing report: documents, tokens, speed, skipped lines by reason, outputs."""
        elapsed = max(time.time() - self.start, 1e-9)
        skipped = sum(self.skipped.values())
        lines = [f"Done: {self.documents} documents, {self.tokens} tokens from {self.lines} lines "
                 f"in {self.files} file(s) in {elapsed:.1f}s "
                 f"({self.documents / elapsed:.1f} docs/s, {self.nbytes / elapsed / 2**20:.2f} "
                 f"MB/s); {skipped} line(s) skipped."]
        lines += [f"  skipped {count}: {kind} (first at {self.first_skipped[kind]})"
                  for kind, count in self.skipped.most_common()]
        lines += [f"  wrote {prefix}.bin / .idx" for prefix in self.prefixes.values()]
        return "\n".join(lines)


def _encode_all(args, paths: list, tokenizer, writers: dict, report: Report) -> None:
    """Stream every chunk through the worker processes (in order, see ``ordered_map``) into
    the writers."""
    dtype = next(iter(writers.values())).dtype
    eod = tokenizer.eod if args.append_eod else None
    tokenizer_args = dict(tokenizer_type=args.tokenizer_type,
                          tokenizer_model=args.tokenizer_model,
                          extra_vocab_size=args.extra_vocab_size)
    _WORKER["tokenizer"] = tokenizer  # forked workers inherit it instead of loading it again
    initargs = (tokenizer_args, args.json_keys, eod, dtype.str)
    pool = ProcessPoolExecutor(args.workers, initializer=_init_worker, initargs=initargs)
    try:
        chunks = iter_chunks(paths, args.chunk_bytes)
        for chunk, result in ordered_map(pool, encode_chunk, chunks, 2 * args.workers + 2):
            for key, arrays in result.arrays.items():
                writers[key].add_documents(*arrays)
            report.add(chunk.path, chunk.input_bytes_done, result)
    finally:  # on an error, do not wait for the chunks still queued
        pool.shutdown(wait=True, cancel_futures=True)
    report.tokens = sum(writer.tokens for writer in writers.values())


def run(args: argparse.Namespace) -> Report:
    """Preprocess as ``args`` say; outputs appear (renamed into place) only on success."""
    from megatron_patch.tokenizers import build_tokenizer

    check_args(args)
    paths = expand_inputs(args.input)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.extra_vocab_size)
    if args.append_eod and tokenizer.eod is None:
        raise ValueError(f"--append-eod: the tokenizer {args.tokenizer_model!r} has no EOS token")
    dtype = token_dtype(tokenizer.vocab_size)
    report = Report(paths, output_prefixes(args), args.log_interval, args.on_bad_line == "stop")
    print(f"{len(paths)} input file(s), {report.input_bytes / 2**20:.1f} MB on disk; "
          f"{tokenizer!r}, dtype {dtype.name}; {args.workers} worker(s)", flush=True)
    writers = open_writers(report.prefixes, dtype)
    try:
        _encode_all(args, paths, tokenizer, writers, report)
        if report.documents == 0:
            raise InputError(f"--input {' '.join(args.input)}: no documents to write "
                             f"({report.lines} line(s), all empty or skipped)")
        for writer in writers.values():
            writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    # One worker process is one core: the Rust tokenizer's own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    args = build_parser().parse_args(argv)
    from megatron_patch import compat

    # The tokenizers stand on megatron-core's base class: check its version first (and keep its
    # import-time warnings about Transformer Engine / Apex, which preprocessing never uses, out).
    compat.exit_unless_supported()
    try:
        report = run(args)
    except (InputError, OutputError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except BrokenProcessPool as err:
        print(f"error: a worker process died ({err}); out of memory? Nothing was written.",
              file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
