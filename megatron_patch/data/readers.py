"""Find, stream and parse JSON-lines inputs for the data tools (and whole JSON lists, which the
cleaning and SFT tools also take).

Inputs are files, directories (searched recursively) and globs, in a deterministic order: each
argument's matches sorted by path, arguments in the order given. Files may be plain, gzip or
zstd (detected from their first bytes, so ``xaa.zst`` from the seed's ``split`` + ``zstd`` works);
they are read as blocks of whole lines, so memory does not grow with the file.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

try:
    import orjson

    _loads = orjson.loads
except ImportError:  # orjson is optional; json gives the same objects, slower
    _loads = json.loads

# Directory members taken as inputs; an explicit file path may have any name.
INPUT_SUFFIXES = (".jsonl", ".json", ".zst", ".gz")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


class InputError(ValueError):
    """An input that cannot be read: named by path (and line where there is one)."""


class _CorruptStream(ValueError):
    """Compressed data that does not decode (raised without the path, which the caller adds)."""


@dataclass
class Chunk:
    """Whole lines of one input file."""

    path: str
    first_line: int  # 1-based number of the first line in ``data``
    data: bytes
    input_bytes_done: int  # on-disk bytes of all inputs read so far (for progress / ETA)


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files named by ``patterns`` (files, directories, globs); an InputError if one matches
    nothing or nothing at all is found."""
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
        else:
            matches = [pattern] if os.path.exists(pattern) else []
        if not matches:
            raise InputError(f"--input {pattern!r}: no such file, directory or glob match")
        for match in matches:
            paths.extend(_directory_files(match) if os.path.isdir(match) else [match])
    unique = list(dict.fromkeys(paths))  # a file named twice is read once
    if not unique:
        raise InputError(f"--input {' '.join(patterns)}: no input files (directories are "
                         f"searched for {', '.join(INPUT_SUFFIXES)})")
    return unique


def _directory_files(directory: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, name) for name in files
                  if name.endswith(INPUT_SUFFIXES) and not name.startswith(".")]
    return sorted(found)


def iter_chunks(paths: Sequence[str], chunk_bytes: int = 1 << 20) -> Iterator[Chunk]:
    """Blocks of about ``chunk_bytes`` whole lines from each file in turn (decompressed).

    A truncated or corrupt compressed file raises InputError naming the file and the last line
    read intact.
    """
    done = 0
    for path in paths:
        line = 1
        try:
            raw = open(path, "rb")
        except OSError as err:
            raise InputError(f"{path}: cannot read ({err.strerror or err})") from err
        with raw:
            try:
                for data in _line_blocks(raw, chunk_bytes):
                    yield Chunk(path, line, data, done + raw.tell())
                    line += data.count(b"\n")
            except (EOFError, OSError, zlib.error, _CorruptStream) as err:
                raise InputError(f"{path}: corrupt or truncated input after line {line - 1} "
                                 f"({err})") from err
            except InputError as err:
                raise InputError(f"{path}: {err}") from err
        done += os.path.getsize(path)


def _line_blocks(raw, size: int) -> Iterator[bytes]:
    rest = b""
    first = True
    for block in _decoded_blocks(raw, size):
        if first and block.lstrip()[:1] == b"[":
            raise InputError("this is a JSON array; expected one JSON object per line "
                             "(JSON lines, Megatron-LM's 'loose json')")
        first = False
        block = rest + block
        cut = block.rfind(b"\n") + 1
        if cut:
            yield block[:cut]
        rest = block[cut:]
    if rest:
        yield rest


def _decoded_blocks(raw, size: int) -> Iterator[bytes]:
    magic = raw.read(4)
    raw.seek(0)
    if magic.startswith(_GZIP_MAGIC):
        stream = gzip.GzipFile(fileobj=raw, mode="rb")
        while block := stream.read(size):
            yield block
    elif magic == _ZSTD_MAGIC:
        yield from _zstd_blocks(raw, size)
    else:
        while block := raw.read(size):
            yield block


def _zstd_blocks(raw, size: int) -> Iterator[bytes]:
    # zstandard's stream_reader ends quietly at a truncated frame; a decompressobj per frame
    # tells a complete frame (``eof``) from a cut one. Several frames (pzstd, cat) are allowed.
    import zstandard

    context = zstandard.ZstdDecompressor()
    frame, inside = context.decompressobj(), False
    while data := raw.read(max(size // 4, 1 << 16)):
        while data:
            if frame.eof:
                frame = context.decompressobj()
            try:
                out = frame.decompress(data)
            except zstandard.ZstdError as err:
                raise _CorruptStream(f"corrupt zstd data: {err}") from err
            inside = not frame.eof
            data = frame.unused_data if frame.eof else b""
            if out:
                yield out
    if inside:
        raise _CorruptStream("truncated zstd stream (the last frame is incomplete)")


def ordered_map(pool, func, tasks: Iterable, window: int) -> Iterator[tuple]:
    """``(task, func(task))`` in task order, through ``pool`` (a ProcessPoolExecutor; None: in
    this process) with at most ``window`` tasks in flight: ``pool.map`` would read the whole
    input ahead into memory. In order, so results do not depend on the number of workers.

    A ProcessPoolExecutor rather than multiprocessing.Pool: a worker that dies (out of memory,
    say) fails the run with BrokenProcessPool instead of leaving it waiting forever.
    """
    if pool is None:
        yield from ((task, func(task)) for task in tasks)
        return
    pending = collections.deque()
    for task in tasks:
        pending.append((task, pool.submit(func, task)))
        if len(pending) >= window:
            task, future = pending.popleft()
            yield task, future.result()
    while pending:
        task, future = pending.popleft()
        yield task, future.result()


def parse_lines(rows: list[bytes], first_line: int, keys: list[str]):
    """Parse JSON lines ``rows`` (numbered from ``first_line``): (numbers of the good lines,
    {key: [texts of each good line]}, [(line, reason) of each bad line]). A string value is one
    text, a list of strings several (Megatron-LM's sentence lists)."""
    lines, values, bad = [], {key: [] for key in keys}, []
    for number, raw in enumerate(rows, start=first_line):
        texts, reason = _texts_of(raw, keys) if raw.strip() else (None, "empty line")
        if reason:
            bad.append((number, reason))
            continue
        lines.append(number)
        for key, text in zip(keys, texts):
            values[key].append(text)
    return lines, values, bad


def _texts_of(raw: bytes, keys: list[str]):
    """([texts per key], None) for a good line, (None, reason) for a bad one."""
    try:
        record = _load_json(raw)
    except ValueError as err:
        return None, str(err)
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    texts = []
    for key in keys:
        if key not in record:
            return None, f"missing key {key!r} (has: {', '.join(list(record)[:8])})"
        value = record[key]
        if isinstance(value, str):
            value = [value]
        elif not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return None, f"key {key!r} is {type(value).__name__}, expected a string"
        texts.append(value)
    return texts, None


def _load_json(raw: bytes):
    """The value of one JSON line, or a ValueError that says what is wrong with it."""
    try:
        return _loads(raw)
    except ValueError:
        pass  # orjson refuses a few things json accepts (lone surrogate escapes, huge ints)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        raise ValueError(f"not valid UTF-8 (byte {bad.start})") from None
    try:
        return json.loads(text)
    except ValueError as err:
        raise ValueError(f"invalid JSON: {err}") from None



def is_json_list(path: str) -> bool:
    """True when the file is one JSON list (WuDao), False for jsonl."""
    with open(path, "rb") as handle:
        return starts_json_list(handle.read(1 << 16))


def starts_json_list(head: bytes) -> bool:
    """True when ``head``, a file's first bytes, opens a JSON list (a UTF-8 BOM allowed)."""
    return head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")


def iter_json_list(text: str) -> Iterator[tuple[int, int, int, object]]:
    """Yield ``(line, start, end, element)`` for each element of the JSON list ``text``.

    Elements are decoded one at a time so that each knows its line; a syntax error raises
    ``json.JSONDecodeError``, whose ``lineno`` points at it.
    """
    decoder = json.JSONDecoder()
    pos = _JSON_SPACE.match(text).end()
    if not text.startswith("[", pos):
        raise json.JSONDecodeError("expected '['", text, pos)
    pos = _JSON_SPACE.match(text, pos + 1).end()
    line, counted, closed = 1, 0, text.startswith("]", pos)
    while not closed:
        element, end = decoder.raw_decode(text, pos)
        line, counted = line + text.count("\n", counted, pos), pos
        yield line, pos, end, element
        pos = _JSON_SPACE.match(text, end).end()
        closed = text.startswith("]", pos)
        if not closed and not text.startswith(",", pos):
            raise json.JSONDecodeError("expected ',' or ']'", text, pos)
        pos = _JSON_SPACE.match(text, pos + 1).end()
    if pos < len(text):
        raise json.JSONDecodeError("extra data after the list", text, pos)
