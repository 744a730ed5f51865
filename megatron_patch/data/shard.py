"""Cut JSON-lines inputs into numbered shards, zstd-compressed: the seed's
``cat *.json > merged; split -l 1000; zstd`` in one streaming step.

Lines are copied byte for byte in input order (inputs may be files, directories, globs, ``.gz``
or ``.zst``); every line ends with a newline, also the last line of a file that had none (``cat``
would glue it to the next file's first line). Shards are ``00000.jsonl.zst``, ``00001...``, each
written under a temporary name and renamed when complete; several are compressed at once on a
thread pool (zstd releases the GIL). Validation is left to the preprocessing step, which reports
bad lines by file and line.

    python -m megatron_patch.data.shard --input cleaned/ --output-dir shards/ --lines-per-shard 1000
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import zstandard

from megatron_patch.data.readers import InputError, expand_inputs, iter_chunks

_SHARD_NAME = re.compile(r"^\d{5,}\.jsonl(\.zst)?$")


@dataclass
class ShardSummary:
    """What a sharding run wrote."""

    files: int = 0
    lines: int = 0
    shards: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        ratio = self.bytes_in / self.bytes_out if self.bytes_out else 0.0
        return (f"Wrote {self.shards} shard(s): {self.lines} lines, {self.bytes_in / 2**20:.2f} MB "
                f"of JSON lines -> {self.bytes_out / 2**20:.2f} MB ({ratio:.2f}x) from "
                f"{self.files} input file(s) in {self.seconds:.1f}s")


def iter_shards(chunks: Iterable, lines_per_shard: int) -> Iterator[bytes]:
    """Consecutive groups of ``lines_per_shard`` lines (the last may be shorter), each line
    ending in a newline. Shards are cut at newline offsets found a block at a time (numpy),
    so no line becomes a Python object of its own."""
    pending, count = [], 0  # pieces of the shard being filled, and the lines they hold
    for chunk in chunks:
        data = chunk.data if chunk.data.endswith(b"\n") else chunk.data + b"\n"
        ends = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n")) + 1
        start, taken = 0, 0  # bytes and lines of ``data`` already in a shard
        while lines_per_shard - count <= len(ends) - taken:
            taken += lines_per_shard - count
            pending.append(data[start:ends[taken - 1]])
            start = int(ends[taken - 1])
            yield b"".join(pending)
            pending, count = [], 0
        if start < len(data):
            pending.append(data[start:])
            count += len(ends) - taken
    if pending:
        yield b"".join(pending)


def write_shard(path: str, data: bytes, level: int | None) -> int:
    """Write ``data`` (zstd at ``level``, or raw when None) to ``path`` atomically; returns the
    bytes written."""
    if level is not None:
        data = zstandard.ZstdCompressor(level=level).compress(data)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return len(data)


def prepare_output_dir(output_dir: str, overwrite: bool) -> None:
    """Create ``output_dir``; refuse (or with ``overwrite`` remove) shards of an earlier run,
    which the next step would otherwise read as part of this one."""
    os.makedirs(output_dir, exist_ok=True)
    old = sorted(name for name in os.listdir(output_dir) if _SHARD_NAME.match(name))
    if old and not overwrite:
        raise FileExistsError(f"--output-dir {output_dir!r} already holds {len(old)} shard(s) "
                              f"({old[0]}, ...); pass --overwrite to replace them")
    for name in old:
        os.remove(os.path.join(output_dir, name))


def shard_jsonl(inputs: list[str], output_dir: str, lines_per_shard: int = 1000,
                compress: str = "zst", threads: int = 0, level: int = 3,
                overwrite: bool = False) -> ShardSummary:
    """Shard ``inputs`` into ``output_dir``; see the module docstring."""
    if lines_per_shard < 1:
        raise ValueError(f"--lines-per-shard must be >= 1, got {lines_per_shard}")
    if threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: one per CPU), got {threads}")
    if compress == "zst" and not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise ValueError(f"--level must be within 1..{zstandard.MAX_COMPRESSION_LEVEL} (zstd), "
                         f"got {level}")
    start, paths = time.time(), expand_inputs(inputs)
    prepare_output_dir(output_dir, overwrite)
    suffix, zstd_level = (".jsonl.zst", level) if compress == "zst" else (".jsonl", None)
    summary = ShardSummary(files=len(paths))
    threads = threads or os.cpu_count() or 1
    pending = collections.deque()
    try:
        with ThreadPoolExecutor(threads) as pool:
            for data in iter_shards(iter_chunks(paths), lines_per_shard):
                path = os.path.join(output_dir, f"{summary.shards:05d}{suffix}")
                pending.append(pool.submit(write_shard, path, data, zstd_level))
                summary.shards += 1
                summary.lines += data.count(b"\n")
                summary.bytes_in += len(data)
                while len(pending) > 2 * threads:  # bound the shards held in memory
                    summary.bytes_out += pending.popleft().result()
            while pending:
                summary.bytes_out += pending.popleft().result()
    except BaseException:
        # The shards written so far look finished; the next step would read them as the whole
        # input. The pool has joined, so every write is over.
        for number in range(summary.shards):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(output_dir, f"{number:05d}{suffix}"))
        raise
    summary.seconds = time.time() - start
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(prog="shard_jsonl.py", description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--input", nargs="+", required=True,
                        help="JSON-lines files (.jsonl/.json, .gz, .zst), directories or globs")
    parser.add_argument("--output-dir", required=True, help="where NNNNN.jsonl[.zst] go")
    parser.add_argument("--lines-per-shard", type=int, default=1000,
                        help="lines per shard (default 1000, the seed's split -l 1000)")
    parser.add_argument("--compress", choices=["zst", "none"], default="zst")
    parser.add_argument("--level", type=int, default=3, help="zstd level (default 3, as zstd)")
    parser.add_argument("--threads", type=int, default=0,
                        help="shards compressed at once (default: one per CPU)")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove shards an earlier run left in --output-dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        summary = shard_jsonl(args.input, args.output_dir, args.lines_per_shard, args.compress,
                              args.threads, args.level, args.overwrite)
    except (InputError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
