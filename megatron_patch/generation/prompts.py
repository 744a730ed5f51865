"""The input file of prompts and the output file of completions.

Input: one prompt per line, or JSON lines with a ``query`` field (the seed's two formats; a
``.jsonl`` / ``.json`` name means JSON lines). A JSON line may also carry ``input`` (the Alpaca
prompt's input, for ``--prompt-format alpaca``) or, instead of ``query``, a chat's ``messages``
(for ``--prompt-format chat``; prompt_format.py wraps the prompts). Empty lines are skipped and
counted. Output: JSON lines ``{"prompt", "prompt_format", "completion", "completion_ids",
"finish_reason"}`` in input order, written to a temporary name and renamed, so an interrupted
run never leaves a file that looks complete.
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
    inputs: list = field(default_factory=list)    # a JSON line's 'input' (str), else None
    messages: list = field(default_factory=list)  # a JSON line's 'messages' (list), else None

    def where(self, index: int) -> str:
        """``file:line`` of prompt ``index``."""
        return f"{self.path}:{self.lines[index]}"


def _record_of(line: str, path: str, number: int) -> tuple[str, str | None, list | None]:
    """(prompt text, input, messages) of one JSON line; a chat's text is its last turn."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); a .jsonl input needs "
                         f"one object with a 'query' field per line") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object with a string 'query' field")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise ValueError(f"{path}:{number}: 'input' must be a string")
    if "messages" not in record:
        if not isinstance(record.get("query"), str):
            raise ValueError(f"{path}:{number}: expected a JSON object with a string 'query' "
                             f"field (or 'messages', for --prompt-format chat)")
        return record["query"], extra, None
    messages = record["messages"]
    if "query" in record:
        raise ValueError(f"{path}:{number}: give 'query' or 'messages', not both")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if not isinstance(last, dict) or not isinstance(last.get("content"), str):
        raise ValueError(f"{path}:{number}: 'messages' must be a non-empty list of "
                         f"{{\"role\": str, \"content\": str}}")
    if last.get("role") == "assistant":
        raise ValueError(f"{path}:{number}: 'messages' ends with an assistant turn; the last "
                         f"turn is the one to answer (user)")
    return last["content"], extra, messages


def read_prompts(path: str) -> PromptSet:
    """Read ``--input-file``; errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input-file {path!r}: no such file")
    jsonl = path.lower().endswith(JSONL_SUFFIXES)
    prompts = PromptSet(path)
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                text, extra, messages = line.rstrip("\r\n"), None, None
                if jsonl and text.strip():
                    text, extra, messages = _record_of(text, path, number)
                if not text.strip():
                    prompts.skipped_empty += 1
                    continue
                prompts.texts.append(text)
                prompts.lines.append(number)
                prompts.inputs.append(extra)
                prompts.messages.append(messages)
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
