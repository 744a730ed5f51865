"""argparse value types shared by the command-line entry points."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse reports the flag with this message otherwise)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value
