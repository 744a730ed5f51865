"""Raw-text cleaning for pretraining corpora: WuDao json and jsonl, written out as jsonl ``text``.

Each document goes through, in order::

    NFKC -> one space between words -> invisible characters removed -> lines joined
         -> too short? -> repeated lines? -> repeated characters? -> exact duplicate?

Workers clean chunks of documents; the main process consumes their results in input order, so
the duplicate check (a hash set over the whole run) and the output bytes do not depend on the
number of processes. Input that cannot be used (invalid JSON, bytes that are not UTF-8, records
without text) is counted per reason and reported with its file and line.
CLI: ``toolkits/pretrain_data_preprocessing/clean_raw_text.py -i IN -o OUT -p N``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import sys
import time
import unicodedata
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Iterator, NamedTuple

from megatron_patch.data.readers import is_json_list, iter_json_list, ordered_map

INPUT_SUFFIXES = (".json", ".jsonl")
DROP_REASONS = ("too_short", "repeated_lines", "repeated_chars", "duplicate")
BAD_INPUT_REASONS = ("invalid_json", "invalid_utf8", "missing_key")

# Zero-width (non-)joiners are format characters that change how emoji and Persian or Indic
# script render, so unlike the other invisible characters they stay.
_KEEP_INVISIBLE = frozenset("\u200c\u200d")
# What ``surrogateescape`` decoding makes of bytes that are not UTF-8.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_BLANK_LINES = re.compile(r"\n{3,}")
_STDERR_REPORTS = 100


class CleanError(Exception):
    """Input or output that stops the whole run (missing, unreadable, empty, unwritable)."""


@dataclass(frozen=True)
class CleanConfig:
    """The filter thresholds; the defaults are the CLI defaults."""

    min_chars: int = 32
    max_repeated_line_fraction: float = 0.3
    max_top_char_fraction: float = 0.3
    keep_newlines: bool = False
    dedup: bool = True


class BadRecord(NamedTuple):
    """A document the reader already knows to be unusable."""

    reason: str
    detail: str


class Outcome(NamedTuple):
    """What a worker made of one document: ``reason`` is None when it is kept."""

    line: int
    reason: str | None
    detail: str | None
    data: bytes | None  # the output jsonl line
    digest: bytes | None


# ---------------------------------------------------------------------------------- the rules


def normalize_lines(text: str) -> list[str]:
    """NFKC-normalise ``text`` and return its lines with one ASCII space between words.

    Invisible characters (control Cc, format Cf, private-use Co, unassigned Cn) are removed.
    Empty lines are kept as "" so that paragraph breaks survive for ``keep_newlines``.
    """
    lines = []
    for raw in unicodedata.normalize("NFKC", text).splitlines():
        line = " ".join(raw.split())  # tabs and every Unicode space become one space
        if not line.isprintable():
            # After the split the only whitespace left is " ", so what is unprintable is an
            # invisible character, never a word separator.
            kept = "".join(ch for ch in line if ch.isprintable() or ch in _KEEP_INVISIBLE)
            line = " ".join(kept.split())
        lines.append(line)
    return lines


def join_lines(lines: list[str], keep_newlines: bool) -> str:
    """One line per document by default; with ``keep_newlines`` at most one blank line in a row."""
    if not keep_newlines:
        return " ".join(line for line in lines if line)
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")


def repeated_line_fraction(lines: list[str]) -> float:
    """Share of the non-empty lines that repeat an earlier line of the document."""
    lines = [line for line in lines if line]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


def top_char_fraction(text: str) -> float:
    """Share of the non-space characters taken by the most frequent one ("!!!!", "哈哈哈")."""
    counts = Counter(text)
    counts.pop(" ", None)
    counts.pop("\n", None)
    total = sum(counts.values())
    return max(counts.values()) / total if total else 0.0


def clean_text(text: str, config: CleanConfig) -> tuple[str, str | None]:
    """Return the cleaned text and the filter that drops it (None: keep it).

    The duplicate check is not here: it needs the whole run and happens in input order.
    """
    lines = normalize_lines(text)
    cleaned = join_lines(lines, config.keep_newlines)
    if len(cleaned) < config.min_chars:
        return cleaned, "too_short"
    if repeated_line_fraction(lines) > config.max_repeated_line_fraction:
        return cleaned, "repeated_lines"
    if top_char_fraction(cleaned) > config.max_top_char_fraction:
        return cleaned, "repeated_chars"
    return cleaned, None


def record_text(record: object) -> str | None:
    """The document text of a jsonl ``{"text"}`` or WuDao ``{"title", "content"}`` record."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("text"), str):
        return record["text"]
    content, title = record.get("content"), record.get("title")
    if not isinstance(content, str):
        return None
    # The title is the document's first line, as it is on the page.
    return f"{title}\n{content}" if isinstance(title, str) and title.strip() else content


# ------------------------------------------------------------------------------ reading input


def read_text(path: str) -> str:
    """The whole file as text; bytes that are not UTF-8 become lone surrogates, never errors."""
    with open(path, "rb") as handle:
        return handle.read().decode("utf-8", "surrogateescape").removeprefix("\ufeff")


def iter_file_items(path: str) -> Iterator[tuple[int, object]]:
    """Yield ``(line, payload)`` per document: raw bytes (jsonl), a decoded element (JSON list)
    or a ``BadRecord``. Blank jsonl lines are no documents."""
    if not is_json_list(path):
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if raw.strip():
                    yield number, raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw
        return
    text = read_text(path)
    try:
        for line, start, end, element in iter_json_list(text):
            if _ESCAPED_BYTE.search(text, start, end):
                yield line, BadRecord("invalid_utf8", "bytes that are not UTF-8")
            else:
                yield line, element
    except json.JSONDecodeError as err:
        yield err.lineno, BadRecord("invalid_json", f"{err.msg}; the rest of the file is skipped")


# ----------------------------------------------------------------------------------- workers


def clean_payload(payload: object, config: CleanConfig) -> tuple:
    """``(reason, detail, output line, digest)`` for one document payload."""
    if isinstance(payload, BadRecord):
        return payload.reason, payload.detail, None, None
    if isinstance(payload, bytes):
        source = payload.decode("utf-8", "surrogateescape")
        if _ESCAPED_BYTE.search(source):
            return "invalid_utf8", "bytes that are not UTF-8", None, None
        try:
            payload = json.loads(source)
        except json.JSONDecodeError as err:
            return "invalid_json", err.msg, None, None
    text = record_text(payload)
    if text is None:
        return "missing_key", "no string 'text' or 'content' field", None, None
    cleaned, reason = clean_text(text, config)
    if reason is not None:
        return reason, None, None, None
    data = (json.dumps({"text": cleaned}, ensure_ascii=False) + "\n").encode("utf-8")
    return None, None, data, hashlib.blake2b(data, digest_size=16).digest()


def clean_chunk(task: tuple) -> list[Outcome]:
    """Worker entry: ``(file index, [(line, payload)], config)`` -> outcomes."""
    _, items, config = task
    return [Outcome(line, *clean_payload(payload, config)) for line, payload in items]


def iter_tasks(files: list[str], config: CleanConfig, chunk_size: int) -> Iterator[tuple]:
    """Chunks of documents in input order; every file yields at least one (maybe empty) chunk,
    so that every input gets its output file."""
    for index, path in enumerate(files):
        items, emitted = [], False
        for item in iter_file_items(path):
            items.append(item)
            if len(items) == chunk_size:
                yield index, items, config
                items, emitted = [], True
        if items or not emitted:
            yield index, items, config


# ------------------------------------------------------------------------------------- a run


def find_input_files(input_path: str, output_dir: str) -> list[str]:
    """The input file, or the ``*.json``/``*.jsonl`` files under the input directory in sorted
    order (so a run is reproducible); stops on missing, unreadable or empty input."""
    if os.path.isfile(input_path):
        files = [input_path]
    elif os.path.isdir(input_path):
        files, skip = [], os.path.abspath(output_dir)
        for dirpath, dirnames, filenames in os.walk(input_path):
            dirnames[:] = sorted(name for name in dirnames if not name.startswith(".")
                                 and os.path.abspath(os.path.join(dirpath, name)) != skip)
            files += [os.path.join(dirpath, name) for name in sorted(filenames)
                      if name.endswith(INPUT_SUFFIXES) and not name.startswith(".")]
    else:
        raise CleanError(f"input {input_path} does not exist")
    if not files:
        raise CleanError(f"no {'/'.join(INPUT_SUFFIXES)} files under {input_path}")
    unreadable = [path for path in files if not os.access(path, os.R_OK)]
    if unreadable:
        raise CleanError(f"cannot read {unreadable[0]}")
    if all(os.path.getsize(path) == 0 for path in files):
        raise CleanError(f"input {input_path} is empty")
    return files


def output_paths(files: list[str], input_path: str, output_dir: str) -> list[str]:
    """``OUT/<relative dir>/<stem>.json`` per input, so ``find OUT -name '*.json'`` finds them."""
    base = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)
    targets = [os.path.join(output_dir, os.path.splitext(os.path.relpath(path, base))[0] + ".json")
               for path in files]
    clashes = sorted(target for target, count in Counter(targets).items() if count > 1)
    if clashes:
        raise CleanError(f"two inputs would both be written to {clashes[0]}")
    overwritten = {os.path.abspath(t) for t in targets} & {os.path.abspath(f) for f in files}
    if overwritten:
        raise CleanError(f"output would overwrite input {sorted(overwritten)[0]}")
    return targets


def check_writable(output_dir: str) -> None:
    """Stop before any work when the output directory cannot be created or written."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-probe-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as err:
        raise CleanError(f"cannot write to output directory {output_dir}: {err.strerror}") from err


@dataclass
class CleanSummary:
    """Counts of a run; ``documents_read == documents_kept + sum(dropped.values())``."""

    documents_read: int = 0
    documents_kept: int = 0
    dropped: dict = field(
        default_factory=lambda: dict.fromkeys(DROP_REASONS + BAD_INPUT_REASONS, 0))
    bad_input: list = field(default_factory=list)  # "file:line: reason: detail", the first ones
    files: list = field(default_factory=list)
    config: dict = field(default_factory=dict)


class _AtomicFile:
    """Written under ``<path>.tmp`` and renamed when complete, so a half-written output never
    looks like a finished one."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path, self.tmp = path, path + ".tmp"
        self.handle = open(self.tmp, "wb")

    def commit(self) -> None:
        self.handle.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.handle.close()
        os.remove(self.tmp)


class _Consumer:
    """The main process's side: dedup in input order, output files, counts and progress."""

    def __init__(self, files, targets, config: CleanConfig, max_reported: int, log_interval):
        self.files, self.targets, self.config = files, targets, config
        self.summary = CleanSummary(files=list(files), config=asdict(config))
        self.max_reported, self.log_interval = max_reported, log_interval
        self.seen: set[bytes] = set()
        self.out: _AtomicFile | None = None
        self.committed: list[str] = []  # outputs this run finished (removed if it fails)
        self.index = -1
        self.start = self.last_log = time.monotonic()

    def consume(self, file_index: int, outcomes: list[Outcome]) -> None:
        """Take one chunk's outcomes (chunks arrive in input order)."""
        if file_index != self.index:
            self.finish_file()
            self.index, self.out = file_index, _AtomicFile(self.targets[file_index])
        for outcome in outcomes:
            reason = outcome.reason
            if reason is None and self.config.dedup and outcome.digest in self.seen:
                reason = "duplicate"
            self.summary.documents_read += 1
            if reason is None:
                self.seen.add(outcome.digest)
                self.out.handle.write(outcome.data)
                self.summary.documents_kept += 1
            else:
                self.summary.dropped[reason] += 1
                if reason in BAD_INPUT_REASONS:
                    self.report_bad(outcome)
        self.log_progress()

    def report_bad(self, outcome: Outcome) -> None:
        """Bad input is listed with file and line (stderr and summary), never dropped silently."""
        where = f"{self.files[self.index]}:{outcome.line}: {outcome.reason}: {outcome.detail}"
        bad = self.summary.bad_input
        if len(bad) < _STDERR_REPORTS:
            print(f"clean_raw_text: warning: {where}", file=sys.stderr)
        elif len(bad) == _STDERR_REPORTS:
            print("clean_raw_text: warning: further bad input is listed in the summary only",
                  file=sys.stderr)
        if len(bad) < self.max_reported:
            bad.append(where)

    def log_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_log >= self.log_interval:
            self.last_log = now
            read = self.summary.documents_read
            print(f"clean_raw_text: {read} documents read, {self.summary.documents_kept} kept, "
                  f"{read / max(now - self.start, 1e-9):.0f} docs/s", file=sys.stderr)

    def finish_file(self) -> None:
        if self.out is not None:
            self.out.commit()
            self.committed.append(self.out.path)
            self.out = None

    def abort(self) -> None:
        """A run that stops leaves no output of its own: the next step would take the files
        it finished for the whole corpus."""
        if self.out is not None:
            self.out.discard()
            self.out = None
        for path in self.committed:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def clean_corpus(input_path: str, output_dir: str, config: CleanConfig = CleanConfig(),
                 processes: int = 1, chunk_size: int = 256, max_reported: int = 1000,
                 log_interval: float = 10.0, summary_path: str | None = None) -> CleanSummary:
    """Clean ``input_path`` (a file or directory) into ``output_dir``; write and return the
    summary (default ``<output_dir>.summary.json``, beside the directory so that
    ``find OUT -name '*.json'`` does not pick it up)."""
    files = find_input_files(input_path, output_dir)
    targets = output_paths(files, input_path, output_dir)
    check_writable(output_dir)
    summary_path = summary_path or os.path.abspath(output_dir) + ".summary.json"
    if os.path.isdir(summary_path):
        raise CleanError(f"--summary {summary_path} is a directory; give a file path")
    consumer = _Consumer(files, targets, config, max_reported, log_interval)
    tasks = iter_tasks(files, config, chunk_size)
    try:
        with ProcessPoolExecutor(processes) if processes > 1 else nullcontext() as pool:
            for (file_index, _, _), outcomes in ordered_map(pool, clean_chunk, tasks,
                                                            2 * processes):
                consumer.consume(file_index, outcomes)
        consumer.finish_file()
        consumer.log_progress(force=True)
        # Inside the try: outputs without their summary would look like a finished run.
        consumer.out = _AtomicFile(summary_path)
        consumer.out.handle.write(json.dumps(asdict(consumer.summary), indent=2,
                                             ensure_ascii=False).encode("utf-8") + b"\n")
        consumer.finish_file()
    except BaseException:
        consumer.abort()
        raise
    return consumer.summary


def format_summary(summary: CleanSummary) -> str:
    """A short table: documents read, kept, and dropped per reason."""
    rows = [("documents read", summary.documents_read), ("kept", summary.documents_kept)]
    rows += [(f"dropped: {reason}", count) for reason, count in summary.dropped.items()]
    return "\n".join(f"{name:<28}{count:>12}" for name, count in rows)


def build_parser() -> argparse.ArgumentParser:
    """The CLI; every rule's threshold with its default."""
    parser = argparse.ArgumentParser(
        prog="clean_raw_text.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Clean WuDao json (a JSON list or jsonl of {title, content}) and jsonl "
        "{text} into jsonl {text}, one OUT/<stem>.json per input file. Always applied: "
        "Unicode NFKC normalisation; whitespace normalisation (one space between words, lines "
        "stripped); control and other invisible characters removed (Unicode Cc, Cf, Co, Cn, "
        "except zero-width joiners). Filters below; bad input is counted and reported with "
        "file:line.")
    parser.add_argument("-i", "--input", required=True, help="input file or directory")
    parser.add_argument("-o", "--output", required=True, help="output directory")
    parser.add_argument("-p", "--processes", type=int, default=1, help="worker processes")
    parser.add_argument("--min-chars", type=int, default=CleanConfig.min_chars,
                        help="drop documents shorter than this after cleaning")
    parser.add_argument("--max-repeated-line-fraction", type=float,
                        default=CleanConfig.max_repeated_line_fraction,
                        help="drop documents whose share of lines repeating an earlier line "
                        "is above this")
    parser.add_argument("--max-top-char-fraction", type=float,
                        default=CleanConfig.max_top_char_fraction,
                        help="drop documents whose most frequent non-space character is above "
                        "this share of all non-space characters")
    parser.add_argument("--keep-newlines", action="store_true",
                        help="keep line breaks (at most one blank line in a row); default "
                        "joins the lines of a document with spaces")
    parser.add_argument("--no-dedup", action="store_true",
                        help="keep exact duplicates; without it a document whose cleaned text "
                        "was already kept in this run is dropped")
    parser.add_argument("--summary", help="summary JSON path; None means OUT.summary.json")
    parser.add_argument("--chunk-size", type=int, default=256, help="documents per worker task")
    parser.add_argument("--log-interval", type=float, default=10.0,
                        help="seconds between progress lines on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; exit status 2 with one clear line on input or output that stops the run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.processes < 1 or args.chunk_size < 1:
        parser.error("--processes and --chunk-size must be at least 1")
    config = CleanConfig(args.min_chars, args.max_repeated_line_fraction,
                         args.max_top_char_fraction, args.keep_newlines, not args.no_dedup)
    try:
        summary = clean_corpus(args.input, args.output, config, args.processes, args.chunk_size,
                               log_interval=args.log_interval, summary_path=args.summary)
    except (CleanError, OSError) as err:
        print(f"clean_raw_text: error: {err}", file=sys.stderr)
        return 2
    except BrokenProcessPool as err:
        print(f"clean_raw_text: error: a worker process died ({err}); out of memory? The "
              "files this run wrote were removed and no summary was written.", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
