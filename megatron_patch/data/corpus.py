"""A corpus of real English text found on every machine with Python: the standard library's
docstrings. Used by the quickstart and the tests, so nothing is ever downloaded."""
from __future__ import annotations

import ast
import os
import sysconfig
from typing import Iterator


def iter_stdlib_docstrings(min_chars: int = 200, max_files: int | None = None) -> Iterator[str]:
    """Yield docstrings (modules, classes, functions) of the installed standard library.

    Files are visited in sorted order, so the corpus is the same on every run of one Python.
    """
    yield from iter_docstrings(sysconfig.get_paths()["stdlib"], min_chars, max_files)


def iter_docstrings(root: str, min_chars: int = 200,
                    max_files: int | None = None) -> Iterator[str]:
    """Yield the docstrings of the ``.py`` files under ``root`` (a package directory), in
    sorted order; tests, IDLE, site-packages and caches are skipped."""
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "idlelib",
                                                               "site-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            if max_files is not None and seen >= max_files:
                return
            seen += 1
            yield from _docstrings(os.path.join(dirpath, name), min_chars)


def _docstrings(path: str, min_chars: int) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text and len(text) >= min_chars:
                yield text
