"""A Megatron checkpoint (the converter's or the trainer's) as a model and a tokenizer ready for
generation: the model shape comes from the checkpoint's metadata, the tokenizer from its
``tokenizer/`` directory or ``--tokenizer-path``."""
from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_patch import compat
from megatron_patch.convert.io_utils import CheckpointError
from megatron_patch.families.base import SHAPE_FIELDS


@dataclass
class Checkpoint:
    """What ``open_megatron`` found at ``--load``; the reader is reused to load the weights."""

    path: str
    reader: object
    family: object
    args: object              # ModelArgs
    meta: dict

    @property
    def root(self) -> str:
        return self.reader.root


def open_checkpoint(load: str) -> Checkpoint:
    """Open ``--load`` (a checkpoint root or one of its iteration directories)."""
    from megatron_patch.convert.engine import open_megatron

    try:
        return Checkpoint(load, *open_megatron(load))
    except CheckpointError as err:
        raise CheckpointError(f"--load: {err}") from None


def tokenizer_location(checkpoint: Checkpoint, tokenizer_path: str | None,
                       tokenizer_type: str | None) -> tuple[str, str]:
    """(tokenizer type, directory or model file): ``--tokenizer-path`` wins, else the
    checkpoint's own tokenizer; the type defaults to the checkpoint's, then the family's."""
    recorded = checkpoint.meta.get("tokenizer") or {}
    kind = tokenizer_type or recorded.get("type") or checkpoint.family.tokenizer
    if tokenizer_path:
        path, source = tokenizer_path, "--tokenizer-path"
    elif recorded.get("path"):
        path = os.path.join(checkpoint.root, recorded["path"])
        source = f"--load {checkpoint.path!r}: its tokenizer"
    else:
        raise ValueError(
            f"--load {checkpoint.path!r} carries no tokenizer (its megatron_patch.json has no "
            f"'tokenizer' entry: the HF directory it was converted from had no tokenizer "
            f"files). Pass --tokenizer-path with the model's HF tokenizer directory.")
    # Checked here: the tokenizers' own messages name the trainer's --tokenizer-model.
    if not os.path.exists(path):
        raise FileNotFoundError(f"{source} {path!r}: no such file or directory")
    return kind, path


def load_tokenizer(checkpoint: Checkpoint, tokenizer_path: str | None,
                   tokenizer_type: str | None):
    """The tokenizer, refused when it has more tokens than the model's vocabulary."""
    from megatron_patch.tokenizers import build_tokenizer
    from megatron_patch.tokenizers.glm_files import check_special_ids

    kind, path = tokenizer_location(checkpoint, tokenizer_path, tokenizer_type)
    tokenizer = build_tokenizer(kind, path)
    if tokenizer.vocab_size > checkpoint.args.vocab_size:
        raise ValueError(f"tokenizer {path!r} has {tokenizer.vocab_size} tokens but the model "
                         f"of --load {checkpoint.path!r} only {checkpoint.args.vocab_size}: "
                         f"wrong --tokenizer-path?")
    check_special_ids(tokenizer, checkpoint.args.prefix_lm_ids, f"tokenizer {path!r}")
    return tokenizer


def load_model(checkpoint: Checkpoint, tensor_parallel: int, precision: str = "fp32"):
    """GPTModel with this rank's slice of the weights, on this rank's device, in eval mode.
    Needs ``compat.initialize_parallel`` first."""
    from megatron.core import parallel_state as ps

    from megatron_patch.convert.model_io import load_model_weights, runtime_padded_vocab
    from megatron_patch.families.model import build_gpt_model, transformer_config

    family, args, meta = checkpoint.family, checkpoint.args, checkpoint.meta
    args.validate_parallel(tensor_parallel, 1)
    config = transformer_config(family, args, tensor_parallel=tensor_parallel,
                                precision=precision)
    model = build_gpt_model(family, args, config, runtime_padded_vocab(meta, tensor_parallel))
    load_model_weights(model, checkpoint.path, ps.get_tensor_model_parallel_rank(),
                       tensor_parallel, 0, 1, (checkpoint.reader, family, args, meta))
    return model.to(compat.device()).eval()


def size_mismatch(checkpoint: Checkpoint, model_size: str | None) -> str | None:
    """A warning when the checkpoint's shape is not the family's ``model_size`` row (the shape
    always comes from the checkpoint); ValueError for a size the family does not have."""
    if not model_size:
        return None
    try:
        expected = checkpoint.family.args_for_size(model_size)
    except ValueError as err:
        raise ValueError(f"--model-size: {err}") from None
    differ = [f"{name} {getattr(checkpoint.args, name)} (not {getattr(expected, name)})"
              for name in SHAPE_FIELDS if getattr(checkpoint.args, name) != getattr(expected, name)]
    if not differ:
        return None
    return (f"warning: --load {checkpoint.path!r} is not a {checkpoint.family.name} "
            f"{model_size}: {', '.join(differ)}; using the checkpoint's shape")
