"""The input file of prompts and the output file of completions.

Input: one prompt per line, or JSON lines with a ``query`` field (the seed's two formats; a
``.jsonl`` / ``.json`` name means JSON lines). Empty lines are skipped and counted. Output: JSON
lines ``{"prompt", "completion", "completion_ids", "finish_reason"}`` in input order, written to
a temporary name and renamed, so an interrupted run never leaves a file that looks complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

JSONL_SUFFIXES = (".jsonl", ".json")


@dataclass
class PromptSet:
    """Prompts of one input file, with the line each came from (1-based)."""

    path: str
    texts: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    skipped_empty: int = 0


def _query_of(line: str, path: str, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); a .jsonl input needs "
                         f"one object with a 'query' field per line") from None
    if not isinstance(record, dict) or not isinstance(record.get("query"), str):
        raise ValueError(f"{path}:{number}: expected a JSON object with a string 'query' field")
    return record["query"]


def read_prompts(path: str) -> PromptSet:
    """Read ``--input-file``; errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input-file {path!r}: no such file")
    jsonl = path.lower().endswith(JSONL_SUFFIXES)
    prompts = PromptSet(path)
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                text = line.rstrip("\r\n")
                if jsonl and text.strip():
                    text = _query_of(text, path, number)
                if not text.strip():
                    prompts.skipped_empty += 1
                    continue
                prompts.texts.append(text)
                prompts.lines.append(number)
    except UnicodeDecodeError as err:
        raise ValueError(f"--input-file {path!r} is not UTF-8 text ({err})") from None
    if not prompts.texts:
        raise ValueError(f"--input-file {path!r} has no prompts ({prompts.skipped_empty} empty "
                         f"lines)")
    return prompts


def check_output_path(path: str) -> None:
    """Fail before any work when ``--output-file`` cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--output-file {path!r} is a directory")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--output-file {path!r}: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"--output-file {path!r}: directory {directory!r} is not writable")


def truncate_left(prompts: list[list[int]], limit: int) -> tuple[list[list[int]], list[int]]:
    """Keep the last ``limit`` tokens of each prompt; also returns the indices cut."""
    cut = [i for i, ids in enumerate(prompts) if len(ids) > limit]
    return [ids[-limit:] if len(ids) > limit else ids for ids in prompts], cut


def write_completions(path: str, records: list[dict]) -> None:
    """JSON lines to ``path`` through a temporary file and an atomic rename."""
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
