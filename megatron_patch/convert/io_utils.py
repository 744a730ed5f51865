"""Errors and atomic directory writes shared by the checkpoint readers and writers."""
from __future__ import annotations

import contextlib
import json
import os
import shutil


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not match what was asked."""


def require_dir(path: str, what: str) -> None:
    """``path`` must be an existing, non-empty directory."""
    if not os.path.exists(path):
        raise CheckpointError(f"{what} '{path}' does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"{what} '{path}' is not a directory")
    if not os.listdir(path):
        raise CheckpointError(f"{what} '{path}' is empty")


def read_json(path: str):
    """A JSON file's content; a malformed file is a CheckpointError that names it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from err


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False):
    """Yield a temporary sibling of ``path``; on success it is renamed to ``path``, on failure
    removed, so ``path`` is never left half-written."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"output '{path}' exists and is not a directory")
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise CheckpointError(f"output '{path}' exists and is not empty; remove it or pass "
                              f"--overwrite")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"cannot write into '{parent}'")
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
