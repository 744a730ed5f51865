"""``python -m megatron_patch.training.launcher_check pretrain|finetune|reward_model FAMILY
ARGS...``: the checks and flag translation behind the seed's training launchers
(``examples/common/run_pretrain.sh``, ``run_finetune.sh``, ``run_train_reward_model.sh``: the
SFT launcher's arguments, pairs for data), kept here so the shell stays thin.

ARGS are the seed's positional arguments (``PRETRAIN_ARGS`` / ``FINETUNE_ARGS``). On a wrong
value this prints the problem, naming the argument, and exits 2. Otherwise it creates the output
directories and prints, one per line: the number of processes a CPU-only machine needs (TP x PP),
the log file, then the ``python -m megatron_patch.pretrain|finetune|reward_model`` flags. The environment
variable ``EXTRA_TRAIN_ARGS`` (shell words) is appended to the flags.

Outputs go where the seed put them: ``OUTPUT_BASEPATH/checkpoint/NAME``, ``tensorboard/NAME``,
``log/NAME.log`` and ``metrics/NAME.jsonl``, NAME being built from the settings. When
``checkpoint/NAME`` already holds a checkpoint, the run resumes from it (a relaunch after a crash
loses only the steps since the last save); otherwise it starts from the weights of
PRETRAIN_CHECKPOINT_PATH (``none``: random weights of the MODEL_SIZE row).
"""
from __future__ import annotations

import math
import os
import shlex
import sys
from typing import Callable

from megatron_patch.families.base import SHAPE_FIELDS

PRETRAIN_ARGS = ("ENV", "MEGATRON_PATH", "MEGATRON_PATCH_PATH", "MODEL_SIZE", "BATCH_SIZE",
                 "GLOBAL_BATCH_SIZE", "LR", "MIN_LR", "SEQ_LEN", "EXTRA_VOCAB_SIZE", "PR", "TP",
                 "PP", "AC", "DO", "FL", "SP", "SAVE_INTERVAL", "DATASET_PATH",
                 "PRETRAIN_CHECKPOINT_PATH", "TRAIN_TOKENS", "WARMUP_TOKENS", "OUTPUT_BASEPATH")
FINETUNE_ARGS = ("ENV", "MEGATRON_PATH", "MEGATRON_PATCH_PATH", "MODEL_SIZE", "BATCH_SIZE", "LR",
                 "MIN_LR", "SEQ_LEN", "PAD_LEN", "EXTRA_VOCAB_SIZE", "PR", "TP", "PP", "AC", "DO",
                 "FL", "SP", "TRAIN_DATASET_PATH", "VALID_DATASET_PATH",
                 "PRETRAIN_CHECKPOINT_PATH", "EPOCH", "OUTPUT_BASEPATH")

# The run name, as the seed's launchers built it: (label, argument) pairs after the prefix.
NAME_FIELDS = {
    "pretrain": (("", "MODEL_SIZE"), ("lr", "LR"), ("bs", "BATCH_SIZE"),
                 ("gbs", "GLOBAL_BATCH_SIZE"), ("seqlen", "SEQ_LEN"), ("pr", "PR"), ("tp", "TP"),
                 ("pp", "PP"), ("ac", "AC"), ("do", "DO"), ("sp", "SP"), ("tt", "TRAIN_TOKENS"),
                 ("wt", "WARMUP_TOKENS")),
    "finetune": (("", "MODEL_SIZE"), ("lr", "LR"), ("ep", "EPOCH"), ("bs", "BATCH_SIZE"),
                 ("seqlen", "SEQ_LEN"), ("pad", "PAD_LEN"), ("pr", "PR"), ("tp", "TP"),
                 ("pp", "PP"), ("ac", "AC"), ("do", "DO"), ("sp", "SP")),
}
NAME_FIELDS["reward_model"] = NAME_FIELDS["finetune"]
KIND_NAMES = {"pretrain": "pretrain", "finetune": "finetune", "reward_model": "reward"}
TRACKER = "latest_checkpointed_iteration.txt"


class LauncherError(ValueError):
    """A wrong positional argument; the message names it."""


def number_kind(what: str, integer: bool = False,
                positive: bool = False) -> Callable[[str, str], float]:
    """A parser of a non-negative (``positive``: > 0) finite number, refusing anything else as
    ``NAME must be WHAT``. The generation launcher's check uses these kinds too."""
    def parse(name: str, text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise LauncherError(f"{name} must be {what}, got '{text}'")
        return value
    return parse


def choice_kind(*options: str) -> Callable[[str, str], str]:
    """A parser of one of ``options``."""
    def parse(name: str, text: str):
        if text not in options:
            raise LauncherError(f"{name} must be {' or '.join(options)}, got '{text}'")
        return text
    return parse


def _text(name: str, text: str) -> str:
    if not text.strip():
        raise LauncherError(f"{name} must not be empty")
    return text


POSITIVE_INT = number_kind("a positive integer", integer=True, positive=True)
COUNT = number_kind("a non-negative integer", integer=True)
_POSITIVE_NUMBER = number_kind("a positive number", positive=True)
_BOOL = choice_kind("true", "false")
KINDS = {
    "ENV": choice_kind("dsw", "dlc"), "MEGATRON_PATH": _text, "MEGATRON_PATCH_PATH": _text,
    "MODEL_SIZE": _text, "BATCH_SIZE": POSITIVE_INT, "GLOBAL_BATCH_SIZE": POSITIVE_INT,
    "LR": _POSITIVE_NUMBER, "MIN_LR": number_kind("a non-negative number"),
    "SEQ_LEN": POSITIVE_INT, "PAD_LEN": POSITIVE_INT, "EXTRA_VOCAB_SIZE": COUNT,
    "PR": choice_kind("fp16", "bf16", "fp32"), "TP": POSITIVE_INT, "PP": POSITIVE_INT,
    "AC": choice_kind("full", "sel", "none"), "DO": _BOOL, "FL": _BOOL, "SP": _BOOL,
    "SAVE_INTERVAL": POSITIVE_INT, "DATASET_PATH": _text, "TRAIN_DATASET_PATH": _text,
    "VALID_DATASET_PATH": _text, "PRETRAIN_CHECKPOINT_PATH": _text, "TRAIN_TOKENS": POSITIVE_INT,
    "WARMUP_TOKENS": COUNT, "EPOCH": _POSITIVE_NUMBER, "OUTPUT_BASEPATH": _text,
}


def parse_values(kind: str, argv: list[str]) -> dict:
    """The seed's positional arguments by name, each checked for its kind."""
    names = PRETRAIN_ARGS if kind == "pretrain" else FINETUNE_ARGS
    if len(argv) != len(names):
        raise LauncherError(f"expected {len(names)} arguments, got {len(argv)}")
    values = {name: KINDS[name](name, text) for name, text in zip(names, argv)}
    values["raw"] = dict(zip(names, argv))
    return values


def check_values(kind: str, values: dict) -> None:
    """Cross-argument checks and the paths that must exist."""
    if values["MIN_LR"] > values["LR"]:
        raise LauncherError(f"MIN_LR ({values['MIN_LR']}) must not exceed LR ({values['LR']})")
    source = values["PRETRAIN_CHECKPOINT_PATH"]
    if source != "none" and not os.path.isdir(source):
        raise LauncherError(f"PRETRAIN_CHECKPOINT_PATH '{source}' is not a directory (give a "
                            f"Megatron checkpoint, or none for random weights)")
    if kind == "pretrain":
        _check_pretrain_values(values)
    else:
        _check_finetune_values(values, pairs=kind == "reward_model")


def _check_pretrain_values(values: dict) -> None:
    if values["GLOBAL_BATCH_SIZE"] % values["BATCH_SIZE"]:
        raise LauncherError(f"GLOBAL_BATCH_SIZE ({values['GLOBAL_BATCH_SIZE']}) must be a "
                            f"multiple of BATCH_SIZE ({values['BATCH_SIZE']})")
    batch_tokens = values["GLOBAL_BATCH_SIZE"] * values["SEQ_LEN"]
    if values["TRAIN_TOKENS"] < batch_tokens:
        raise LauncherError(f"TRAIN_TOKENS ({values['TRAIN_TOKENS']}) is less than one global "
                            f"batch (GLOBAL_BATCH_SIZE x SEQ_LEN = {batch_tokens} tokens)")
    if values["WARMUP_TOKENS"] > values["TRAIN_TOKENS"]:
        raise LauncherError(f"WARMUP_TOKENS ({values['WARMUP_TOKENS']}) must not exceed "
                            f"TRAIN_TOKENS ({values['TRAIN_TOKENS']})")
    for prefix in data_prefixes(values["DATASET_PATH"]):
        if not os.path.isfile(prefix + ".idx") or not os.path.isfile(prefix + ".bin"):
            raise LauncherError(f"DATASET_PATH: {prefix}.bin/.idx not found (give the mmap "
                                f"prefix that megatron_patch.data.preprocess wrote)")


def _check_finetune_values(values: dict, pairs: bool = False) -> None:
    """``pairs``: reward-model data, JSON / JSONL files only."""
    if values["PAD_LEN"] > values["SEQ_LEN"]:
        raise LauncherError(f"PAD_LEN ({values['PAD_LEN']}) must not exceed SEQ_LEN "
                            f"({values['SEQ_LEN']})")
    for name in ("TRAIN_DATASET_PATH", "VALID_DATASET_PATH"):
        path = values[name]
        if os.path.isfile(path) or (name == "VALID_DATASET_PATH" and path == "none"):
            continue
        if pairs:
            raise LauncherError(f"{name} '{path}' is not a JSON/JSONL file of preference pairs")
        if not os.path.isfile(f"{path}_tokens_document.idx"):
            raise LauncherError(f"{name} '{path}' is neither a JSON/JSONL file nor an "
                                f"sft_preprocess prefix")


def data_prefixes(dataset_path: str) -> list[str]:
    """The mmap prefixes of DATASET_PATH: ``PREFIX`` or a blend ``'W1 P1 W2 P2 ...'``."""
    words = dataset_path.split()
    if len(words) == 1:
        return words
    if len(words) % 2 or not all(_is_weight(word) for word in words[::2]):
        raise LauncherError(f"DATASET_PATH must be one mmap prefix or a blend 'W1 P1 W2 P2 ...' "
                            f"of weights and prefixes, got '{dataset_path}'")
    return words[1::2]


def _is_weight(word: str) -> bool:
    try:
        return math.isfinite(float(word)) and float(word) >= 0
    except ValueError:
        return False


def check_model_size(family_name: str, size: str) -> object:
    """The family, if ``size`` is one of its rows."""
    from megatron_patch.registry import get_family

    try:
        family = get_family(family_name)
    except ValueError as err:
        raise LauncherError(f"FAMILY: {err}") from err
    if size not in family.sizes:
        raise LauncherError(f"MODEL_SIZE '{size}' is not a {family.name} size; choose one of: "
                            f"{', '.join(family.sizes)}")
    return family


def run_name(kind: str, family: str, raw: dict) -> str:
    """``dsw-pretrain-megatron-llama-7B-lr-1e-5-bs-4-...``: the settings, as the seed named runs."""
    parts = [raw["ENV"], KIND_NAMES[kind], "megatron", family]
    for label, name in NAME_FIELDS[kind]:
        parts += [label, raw[name]] if label else [raw[name]]
    return "-".join(parts).replace("/", "_")


def model_source_flags(kind: str, family, values: dict, save_dir: str) -> list[str]:
    """Where the weights come from: this run's own last checkpoint (resume), the
    PRETRAIN_CHECKPOINT_PATH weights (iteration 0), or random weights of the MODEL_SIZE row."""
    flags = ["--model-family", family.name]
    if os.path.isfile(os.path.join(save_dir, TRACKER)):
        print(f"note: resuming from {save_dir} (remove it to start over from "
              f"PRETRAIN_CHECKPOINT_PATH)", file=sys.stderr)
        return flags + ["--load", save_dir]
    source = values["PRETRAIN_CHECKPOINT_PATH"]
    if source == "none":
        if kind != "pretrain":
            what = "fine-tuning" if kind == "finetune" else "reward-model training"
            raise LauncherError(f"PRETRAIN_CHECKPOINT_PATH none: {what} needs a checkpoint "
                                f"that carries its tokenizer (a converted or trained one)")
        return flags + ["--model-size", values["MODEL_SIZE"]]
    _note_shape_mismatch(family, values["MODEL_SIZE"], source)
    return flags + ["--load", source, "--finetune"]


def _note_shape_mismatch(family, size: str, checkpoint: str) -> None:
    """The checkpoint's own shape is trained; say so when MODEL_SIZE names another one."""
    from megatron_patch.convert import megatron_io as mio

    try:
        meta = mio.read_metadata(mio.resolve_checkpoint(checkpoint)[0]) or {}
    except ValueError as err:
        raise LauncherError(f"PRETRAIN_CHECKPOINT_PATH: {err} (convert an HF checkpoint with "
                            f"model_convertor_huggingface_megatron.sh first)") from err
    have = {key: meta.get("model_args", {}).get(key) for key in SHAPE_FIELDS}
    row = {key: family.sizes[size].get(key) for key in SHAPE_FIELDS}
    if meta and have != row:
        print(f"note: PRETRAIN_CHECKPOINT_PATH has the shape {have}, not MODEL_SIZE {size}'s "
              f"{row}; the checkpoint's shape is trained", file=sys.stderr)


def precision_flags(values: dict) -> list[str]:
    """PR, AC, DO, FL, SP and the parallel sizes."""
    flags = {"fp16": ["--fp16"], "bf16": ["--bf16"], "fp32": []}[values["PR"]]
    flags += {"full": ["--recompute-granularity", "full"],
              "sel": ["--recompute-granularity", "selective"], "none": []}[values["AC"]]
    switches = (("DO", "--use-distributed-optimizer"), ("FL", "--use-flash-attn"),
                ("SP", "--sequence-parallel"))
    flags += [flag for name, flag in switches if values[name] == "true"]
    return flags + ["--tensor-model-parallel-size", str(values["TP"]),
                    "--pipeline-model-parallel-size", str(values["PP"])]


def data_flags(kind: str, values: dict) -> list[str]:
    """The data and schedule arguments of each launcher (the seed's evaluation cadence)."""
    if kind == "pretrain":
        return ["--data-path", *values["DATASET_PATH"].split(),
                "--global-batch-size", str(values["GLOBAL_BATCH_SIZE"]),
                "--train-tokens", str(values["TRAIN_TOKENS"]),
                "--warmup-tokens", str(values["WARMUP_TOKENS"]),
                "--save-interval", str(values["SAVE_INTERVAL"]),
                "--eval-interval", "10000", "--eval-iters", "10"]
    # A reward model's pairs are padded to --seq-length: PAD_LEN is that length.
    length = ["--max-padding-length", str(values["PAD_LEN"])] if kind == "finetune" else \
        ["--seq-length", str(values["PAD_LEN"])]
    flags = ["--train-data", values["TRAIN_DATASET_PATH"], "--epochs", str(values["EPOCH"]),
             *length, "--eval-interval", "1000", "--eval-iters", "10"]
    if values["VALID_DATASET_PATH"] != "none":
        flags += ["--valid-data", values["VALID_DATASET_PATH"]]
    return flags


def output_paths(kind: str, family: str, values: dict) -> dict:
    """checkpoint/NAME, tensorboard/NAME, log/NAME.log and metrics/NAME.jsonl under
    OUTPUT_BASEPATH."""
    name = run_name(kind, family, values["raw"])
    base = values["OUTPUT_BASEPATH"]
    return {"save": os.path.join(base, "checkpoint", name),
            "tensorboard": os.path.join(base, "tensorboard", name),
            "log": os.path.join(base, "log", f"{name}.log"),
            "metrics": os.path.join(base, "metrics", f"{name}.jsonl")}


def plan(kind: str, family_name: str, argv: list[str]) -> tuple[int, str, list[str]]:
    """(processes needed on a CPU-only machine, log file, trainer flags) for a launcher call."""
    values = parse_values(kind, argv)
    family = check_model_size(family_name, values["MODEL_SIZE"])
    check_values(kind, values)
    paths = output_paths(kind, family.name, values)
    flags = model_source_flags(kind, family, values, paths["save"])
    for directory in (paths["tensorboard"], os.path.dirname(paths["log"]),
                      os.path.dirname(paths["metrics"])):
        os.makedirs(directory, exist_ok=True)
    flags += ["--micro-batch-size", str(values["BATCH_SIZE"]),
              "--seq-length", str(values["SEQ_LEN"]), "--lr", values["raw"]["LR"],
              "--min-lr", values["raw"]["MIN_LR"],
              "--extra-vocab-size", str(values["EXTRA_VOCAB_SIZE"]),
              *precision_flags(values), *data_flags(kind, values),
              "--save", paths["save"], "--tensorboard-dir", paths["tensorboard"],
              "--metrics-file", paths["metrics"], "--log-interval", "1",
              *shlex.split(os.environ.get("EXTRA_TRAIN_ARGS", ""))]
    return values["TP"] * values["PP"], paths["log"], flags


def check_megatron_core() -> None:
    """The megatron-core that MEGATRON_PATH (or the installation) gives, checked once here
    rather than in a traceback per rank."""
    from megatron_patch.compat import UnsupportedMegatronCore, require_megatron_core

    try:
        require_megatron_core()
    except UnsupportedMegatronCore as err:
        raise LauncherError(str(err)) from None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in NAME_FIELDS:
        print("usage: python -m megatron_patch.training.launcher_check "
              "pretrain|finetune|reward_model FAMILY ARGS...", file=sys.stderr)
        return 2
    try:
        nproc, log, flags = plan(argv[0], argv[1], argv[2:])
        check_megatron_core()
    except LauncherError as err:
        print(err)
        return 2
    print("\n".join([str(nproc), log, *flags]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
