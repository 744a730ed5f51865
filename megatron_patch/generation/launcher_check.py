"""``python -m megatron_patch.generation.launcher_check FAMILY ARGS...``: the checks and flag
translation behind the seed's generation launcher (``examples/common/run_text_generation.sh``),
kept here so the shell stays thin; the argument kinds and the MODEL_SIZE check are the training
launchers' (``megatron_patch.training.launcher_check``).

ARGS are the seed's 17 positional arguments (``GENERATE_ARGS``). On a wrong value this prints
the problem, naming the argument, and exits 2. Otherwise it prints, one per line, the number of
processes a CPU-only machine needs (TP), then the ``python -m megatron_patch.generate`` flags.
ENV, MEGATRON_PATH and MEGATRON_PATCH_PATH are the shell's (rendezvous and PYTHONPATH). The
environment variables ``BF16=1`` (bf16 weights), ``INFERENCE_BACKEND`` (default auto) and
``PROMPT_FORMAT`` (raw, alpaca or chat; unset: the checkpoint's recorded format, else raw) add
their flags: the positional arguments are the seed's, so new options come as variables.
"""
from __future__ import annotations

import os
import sys

from megatron_patch.generation.prompt_format import FORMATS
from megatron_patch.training.launcher_check import (COUNT, POSITIVE_INT, LauncherError,
                                                    check_megatron_core, check_model_size,
                                                    number_kind)

GENERATE_ARGS = ("ENV", "MEGATRON_PATH", "MEGATRON_PATCH_PATH", "TOKENIZER", "CHECKPOINT_PATH",
                 "MODEL_SIZE", "TP", "BS", "SEQ_LEN", "TOP_K", "INPUT_SEQ_LEN", "OUTPUT_SEQ_LEN",
                 "INPUT_FILE", "OUTPUT_FILE", "TOP_P", "TEMPERATURE", "REPETITION_PENALTY")
_ABOVE_ZERO = number_kind("> 0", positive=True)
KINDS = {"TP": POSITIVE_INT, "BS": POSITIVE_INT, "SEQ_LEN": POSITIVE_INT, "TOP_K": COUNT,
         "INPUT_SEQ_LEN": POSITIVE_INT, "OUTPUT_SEQ_LEN": POSITIVE_INT,
         "TOP_P": number_kind("in [0, 1]"), "TEMPERATURE": _ABOVE_ZERO,
         "REPETITION_PENALTY": _ABOVE_ZERO}


def check_values(raw: dict) -> dict:
    """The numbers by name, each checked for its kind and against the others, and the paths."""
    values = {name: kind(name, raw[name]) for name, kind in KINDS.items()}
    if values["TOP_P"] > 1:
        raise LauncherError(f"TOP_P must be in [0, 1], got '{raw['TOP_P']}'")
    if values["TOP_K"] > 0 and values["TOP_P"] > 0:
        raise LauncherError(f"TOP_K={raw['TOP_K']} and TOP_P={raw['TOP_P']}: one of them must be "
                            f"0 (top-k and top-p sampling cannot be combined)")
    if values["OUTPUT_SEQ_LEN"] >= values["SEQ_LEN"]:
        raise LauncherError(f"OUTPUT_SEQ_LEN ({values['OUTPUT_SEQ_LEN']}) must be smaller than "
                            f"SEQ_LEN ({values['SEQ_LEN']})")
    if not os.path.exists(raw["CHECKPOINT_PATH"]):
        raise LauncherError(f"CHECKPOINT_PATH '{raw['CHECKPOINT_PATH']}' does not exist")
    if not os.path.isfile(raw["INPUT_FILE"]):
        raise LauncherError(f"INPUT_FILE '{raw['INPUT_FILE']}' does not exist")
    if not os.path.isdir(os.path.dirname(raw["OUTPUT_FILE"]) or "."):
        raise LauncherError(f"OUTPUT_FILE '{raw['OUTPUT_FILE']}': its directory does not exist")
    return values


def tokenizer_flag(tokenizer: str) -> list[str]:
    """``--tokenizer-path`` for a directory or file, else ``--tokenizer-type`` for a name."""
    from megatron_patch.tokenizers import canonical_tokenizer_type

    if os.path.exists(tokenizer):
        return ["--tokenizer-path", tokenizer]
    try:
        return ["--tokenizer-type", canonical_tokenizer_type(tokenizer)]
    except ValueError as err:
        raise LauncherError(f"TOKENIZER '{tokenizer}' is not a tokenizer directory, and "
                            f"{err}") from err


def plan(family_name: str, argv: list[str]) -> tuple[int, list[str]]:
    """(processes needed on a CPU-only machine, generate flags) for a launcher call."""
    if len(argv) != len(GENERATE_ARGS):
        raise LauncherError(f"expected {len(GENERATE_ARGS)} arguments, got {len(argv)}")
    raw = dict(zip(GENERATE_ARGS, argv))
    values = check_values(raw)
    check_model_size(family_name, raw["MODEL_SIZE"])
    flags = ["--load", raw["CHECKPOINT_PATH"], "--input-file", raw["INPUT_FILE"],
             "--output-file", raw["OUTPUT_FILE"], *tokenizer_flag(raw["TOKENIZER"]),
             "--model-size", raw["MODEL_SIZE"], "--tensor-model-parallel-size", raw["TP"],
             "--micro-batch-size", raw["BS"], "--seq-length", raw["SEQ_LEN"],
             "--max-prompt-length", raw["INPUT_SEQ_LEN"],
             "--max-new-tokens", raw["OUTPUT_SEQ_LEN"], "--top-k", raw["TOP_K"],
             "--top-p", raw["TOP_P"], "--temperature", raw["TEMPERATURE"],
             "--repetition-penalty", raw["REPETITION_PENALTY"],
             "--inference-backend", os.environ.get("INFERENCE_BACKEND") or "auto"]
    if os.environ.get("BF16") == "1":
        flags.append("--bf16")
    return values["TP"], flags + prompt_format_flag(os.environ.get("PROMPT_FORMAT"))


def prompt_format_flag(value: str | None) -> list[str]:
    """``--prompt-format`` from the PROMPT_FORMAT variable; unset or empty: none (the
    generator's default, the checkpoint's recorded format)."""
    if not value:
        return []
    if value not in FORMATS:
        raise LauncherError(f"PROMPT_FORMAT must be {', '.join(FORMATS[:-1])} or {FORMATS[-1]}, "
                            f"got '{value}'")
    return ["--prompt-format", value]


def main(argv=None) -> int:
    """Command line: exit code 0 (processes and flags printed) or 2 (problem printed)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m megatron_patch.generation.launcher_check FAMILY ARGS...",
              file=sys.stderr)
        return 2
    try:
        nproc, flags = plan(argv[0], argv[1:])
        check_megatron_core()
    except LauncherError as err:
        print(err)
        return 2
    print("\n".join([str(nproc), *flags]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
