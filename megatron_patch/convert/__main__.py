"""``python -m megatron_patch.convert``: HF <-> Megatron checkpoints with TP/PP resharding.

    # HF -> Megatron at TP2 / PP2
    python -m megatron_patch.convert --load hf_dir --save mg_dir \\
        --target-tensor-model-parallel-size 2 --target-pipeline-model-parallel-size 2
    # Megatron (any layout) -> HF
    python -m megatron_patch.convert --megatron-to-hf --load mg_dir --save hf_dir
    # Megatron -> Megatron at another layout (flags not given keep the source's: here PP)
    python -m megatron_patch.convert --load mg_dir --save mg_tp1 --target-tensor-model-parallel-size 1
    # a checkpoint Megatron-LM saved (no megatron_patch metadata: the shape comes from its args)
    python -m megatron_patch.convert --megatron-to-hf --load mlm_ckpt --save hf_dir \\
        --model-family llama --tokenizer-path tokenizer_dir   # or --vocab-size N
"""
from __future__ import annotations

import argparse
import os
import sys
import time


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where the help text already says it (the flags whose
    default depends on the source) and where there is none to show (required flags, switches)."""

    def _get_help_string(self, action):
        if "default:" in (action.help or "") or action.required or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


SOURCE_DEFAULT = "default: {hf} from an HF --load; the source's when resharding a Megatron --load"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_patch.convert",
        description="Convert checkpoints between HuggingFace and Megatron (megatron-core) "
                    "layouts, losslessly, at any tensor/pipeline-parallel size. The direction "
                    "is HF->Megatron unless --megatron-to-hf is given; a Megatron --load with "
                    "no --megatron-to-hf reshards it.",
        formatter_class=_HelpFormatter)
    parser.add_argument("--load", required=True,
                        help="source: an HF directory (config.json + safetensors) or a Megatron "
                             "checkpoint (root or its release/iter_* directory)")
    parser.add_argument("--save", required=True, help="output directory (must not exist or be "
                                                      "empty unless --overwrite)")
    parser.add_argument("--model-family", default=None,
                        help="llama, ...; default: from config.json's model_type or the "
                             "checkpoint's metadata. Must match them when given.")
    parser.add_argument("--megatron-to-hf", action="store_true",
                        help="convert a Megatron checkpoint back to HF")
    parser.add_argument("--target-tensor-model-parallel-size", type=int, metavar="N",
                        help="tensor-parallel size written; " + SOURCE_DEFAULT.format(hf=1))
    parser.add_argument("--target-pipeline-model-parallel-size", type=int, metavar="N",
                        help="pipeline-parallel size written; " + SOURCE_DEFAULT.format(hf=1))
    parser.add_argument("--extra-vocab-size", type=int, metavar="N", default=None,
                        help="extra embedding rows for tokens added later (padded with zeros); "
                             + SOURCE_DEFAULT.format(hf=0))
    parser.add_argument("--make-vocab-size-divisible-by", type=int, metavar="N", default=None,
                        help="embedding rows are padded to a multiple of this x TP; "
                             + SOURCE_DEFAULT.format(hf=128))
    parser.add_argument("--ckpt-format", choices=("torch", "torch_dist"), default="torch",
                        help="torch: Megatron-LM's mp_rank_* files; torch_dist: a megatron-core "
                             "distributed checkpoint (reshardable at load time)")
    parser.add_argument("--transformer-impl", choices=("local", "transformer_engine"),
                        default=None,
                        help="the names written in torch rank files: megatron-core's local "
                             "spec's (input_layernorm.weight, ...) or the Transformer Engine "
                             "spec's (self_attention.linear_qkv.layer_norm_weight, ..., "
                             "_extra_state): use your Megatron-LM run's --transformer-impl. "
                             "Either is read (from the keys); torch_dist stores the same names "
                             "for both. " + SOURCE_DEFAULT.format(hf="local"))
    group = parser.add_argument_group(
        "checkpoints Megatron-LM saved (no megatron_patch metadata: the shape comes from the "
        "args stored in them; --model-family names the family)")
    group.add_argument("--tokenizer-path", metavar="DIR",
                       help="the tokenizer Megatron-LM trained with (an HF tokenizer directory, "
                            "or a SentencePiece model file): its tokens are the true "
                            "vocabulary, and its files go to the HF output")
    group.add_argument("--vocab-size", type=int, metavar="N",
                       help="the true vocabulary (rows past it are padding and are cut); "
                            "default: --tokenizer-path's, or N+1 for Megatron-LM's "
                            "NullTokenizer --vocab-size N")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    parser.add_argument("--sat-model-parallel-size", type=int, metavar="N", default=None,
                        help="with --megatron-to-hf: write SwissArmyTransformer's checkpoint "
                             "(GLM-130B's release format: latest, <iter>/mp_rank_XX_model_"
                             "states.pt and config.json) at N model-parallel ranks instead of "
                             "safetensors (glm130b). A SAT --load is read as such when it has "
                             "a 'latest' file and a config.json")
    parser.add_argument("--model-type", choices=("gpt", "reward"), default=None,
                        help="what --load must hold: a language model (gpt) or a reward model "
                             "(reward: HF *ForSequenceClassification with one label, or a "
                             "Megatron checkpoint with a scalar head); default: whichever it "
                             "is (config.json / megatron_patch.json say)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_patch import compat

    compat.exit_unless_supported()
    from megatron_patch.convert import engine
    from megatron_patch.convert.io_utils import CheckpointError, unmap_large_allocations_on_free

    import torch.distributed as dist

    unmap_large_allocations_on_free()
    start, report, had_group = time.time(), engine.Report(), dist.is_initialized()
    try:
        sides, meta = _convert(args, report)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if not had_group:  # the one torch_dist brought up (NCCL warns at exit otherwise)
            compat.destroy_parallel()
    print(summary_line(sides, meta, report, args.save, time.time() - start))
    return 0


def _convert(args, report) -> tuple[tuple[str, str], dict]:
    """Run the conversion ``args`` ask for -> ((source, target) with layouts, metadata)."""
    from megatron_patch.convert import engine

    from megatron_patch.convert.checkpoint_args import Vocabulary

    target = engine.Target(args.target_tensor_model_parallel_size,
                           args.target_pipeline_model_parallel_size, args.extra_vocab_size,
                           args.make_vocab_size_divisible_by, args.ckpt_format,
                           args.transformer_impl)
    common = dict(family_name=args.model_family, progress=not args.no_progress,
                  overwrite=args.overwrite, report=report)
    vocabulary = Vocabulary(args.vocab_size, args.tokenizer_path)
    from_hf = not args.megatron_to_hf and os.path.isfile(os.path.join(args.load, "config.json"))
    _check_flags(args, from_hf)
    if args.model_type:
        _check_model_type(args.load, args.model_type, from_hf)
    if args.megatron_to_hf:
        meta = engine.convert_megatron_to_hf(args.load, args.save, vocabulary=vocabulary,
                                             sat_model_parallel=args.sat_model_parallel_size,
                                             **common)
        target_name = (f"sat (mp {args.sat_model_parallel_size})"
                       if args.sat_model_parallel_size else "hf")
        return (f"megatron ({report.source_layout})", target_name), meta
    if from_hf:
        meta = engine.convert_hf_to_megatron(args.load, args.save, target=target, **common)
        return ("hf", f"megatron ({engine.layout_of(meta)})"), meta
    meta = engine.reshard_megatron(args.load, args.save, target, vocabulary=vocabulary,
                                   **common)
    return (f"megatron ({report.source_layout})", f"megatron ({engine.layout_of(meta)})"), meta


def _check_model_type(load: str, wanted: str, from_hf: bool) -> None:
    """--model-type: refuse a source of the other kind before any work."""
    import json

    from megatron_patch.convert import megatron_io as mio
    from megatron_patch.families.base import is_reward_config

    if from_hf:
        path = os.path.join(load, "config.json")
        with open(path) as handle:
            config = json.load(handle)
        reward, what = is_reward_config(config, path), (config.get("architectures") or ["?"])[0]
    else:
        meta = mio.read_metadata(mio.resolve_checkpoint(load)[0]) or {}
        reward = bool(meta.get("model_args", {}).get("reward_head"))
        what = "a scalar head" if reward else "an output layer over the vocabulary"
    if reward != (wanted == "reward"):
        have = "a reward model" if reward else "a language model"
        raise ValueError(f"--model-type {wanted}: --load {load} holds {have} ({what})")


def _check_flags(args, from_hf: bool) -> None:
    """Flags that mean nothing for this direction are errors, not silently ignored."""
    if args.megatron_to_hf and args.transformer_impl:
        raise ValueError("--transformer-impl names the scheme written to a Megatron checkpoint; "
                         "the source's is read from its keys (drop it with --megatron-to-hf)")
    given = [flag for flag, value in (("--vocab-size", args.vocab_size),
                                      ("--tokenizer-path", args.tokenizer_path)) if value]
    if from_hf and given:
        raise ValueError(f"{given[0]} is for Megatron checkpoints without metadata; an HF "
                         f"--load has its own vocabulary (config.json vocab_size)")
    if args.sat_model_parallel_size is not None and (not args.megatron_to_hf
                                                      or args.sat_model_parallel_size < 1):
        raise ValueError("--sat-model-parallel-size N (N >= 1) writes a SAT checkpoint: it "
                         "goes with --megatron-to-hf (a SAT --load is recognised by itself)")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise ValueError(f"--vocab-size must be at least 1, got {args.vocab_size}")


def summary_line(sides: tuple[str, str], meta: dict, report, save: str, seconds: float) -> str:
    """One line: direction and layout, model, tensors and bytes, then any notes. Tensors are
    counted whole (a TP-sharded tensor once)."""
    (source, target), m = sides, meta["model_args"]
    files = [os.path.join(d, name) for d, _, names in os.walk(save) for name in names]
    size = sum(os.path.getsize(f) for f in files)
    line = (f"converted {source} -> {target}: family {meta['family']}, {m['num_layers']} "
            f"layers, hidden {m['hidden_size']}, vocab {m['vocab_size']} (padded {meta['padded_vocab_size']}); "
            f"{report.tensors_read} {source.split()[0]} tensors read, {report.tensors_written} "
            f"{target.split()[0]} tensors written, "
            f"{_bytes(size)} in {len(files)} files, {seconds:.1f}s -> {os.path.abspath(save)}")
    return "; ".join([line] + report.notes)


def _bytes(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


if __name__ == "__main__":
    sys.exit(main())
