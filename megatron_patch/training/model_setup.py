"""What to train: the family, model shape, tokenizer and vocabulary (from the --load
checkpoint's metadata, a sizes-table row, or flags), and megatron-core's model, DDP wrapper,
optimizer and learning-rate schedule built from them."""
from __future__ import annotations

import dataclasses
import os

import torch

from megatron_patch import compat
from megatron_patch.convert import megatron_io as mio
from megatron_patch.convert.io_utils import CheckpointError
from megatron_patch.convert.engine import TOKENIZER_DIR, Target, build_metadata
from megatron_patch.families.model import PRECISION_DTYPES
from megatron_patch.families.base import ModelArgs
from megatron_patch.registry import get_family
from megatron_patch.tokenizers.vocab import padded_vocab_size

_SHAPE_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "max_position_embeddings")


@dataclasses.dataclass
class ModelPlan:
    """Everything needed to build the model and to describe its checkpoints."""

    family: object
    model_args: ModelArgs
    padded_vocab_size: int
    tokenizer: object          # megatron_patch tokenizer or None
    tokenizer_dir: str | None  # copied into saved checkpoints
    meta: dict                 # megatron_patch.json of the checkpoints this run writes


def _source_metadata(load: str | None) -> tuple[dict | None, str | None]:
    """Metadata and root directory of the --load checkpoint, if it has any."""
    if not load or not os.path.isdir(load):
        if load:
            raise FileNotFoundError(f"--load '{load}' does not exist")
        return None, None
    try:
        root, _ = mio.resolve_checkpoint(load)
        return mio.read_metadata(root), root
    except CheckpointError as err:
        raise CheckpointError(f"--load: {err}") from err


def _model_args(args, meta) -> tuple[object, ModelArgs]:
    if meta is not None:
        family = get_family(meta["family"])
        if args.model_family and args.model_family != family.name:
            raise ValueError(f"--model-family {args.model_family} does not match --load "
                             f"{args.load} (family {family.name})")
        model_args = ModelArgs.from_dict(meta["model_args"])
        clashes = [f for f in _SHAPE_FLAGS if getattr(args, f) not in (None, getattr(model_args, f))]
        if clashes:
            raise ValueError(f"--{clashes[0].replace('_', '-')} differs from the --load "
                             f"checkpoint's shape; drop it or use --finetune with a new model")
        return family, model_args
    if not args.model_family or not args.model_size:
        raise ValueError("without a --load checkpoint, give --model-family and --model-size")
    family = get_family(args.model_family)
    overrides = {f: getattr(args, f) for f in _SHAPE_FLAGS if getattr(args, f) is not None}
    return family, family.args_for_size(args.model_size, **overrides)


def _tokenizer(args, family, meta, root):
    """The tokenizer named by flags, else the one the checkpoint carries, else None."""
    from megatron_patch.tokenizers import build_tokenizer

    carried = (meta or {}).get("tokenizer") or {}
    path = args.tokenizer_model
    if path is None and root and carried:
        path = os.path.join(root, carried["path"])
    if path is None:
        return None, None
    kind = args.tokenizer_type or carried.get("type") or family.tokenizer
    return build_tokenizer(kind, path), path


def plan_model(args) -> ModelPlan:
    """Resolve family, shape, tokenizer and vocabulary for this run."""
    meta, root = _source_metadata(args.load)
    family, model_args = _model_args(args, meta)
    tokenizer, tokenizer_dir = _tokenizer(args, family, meta, root)
    if meta is None and tokenizer is not None:
        model_args.vocab_size = tokenizer.vocab_size
    if tokenizer is not None and tokenizer.vocab_size > model_args.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocabulary is {model_args.vocab_size}")
    extra = args.extra_vocab_size if args.extra_vocab_size is not None else \
        (meta or {}).get("extra_vocab_size", 0)
    divisible = args.make_vocab_size_divisible_by or (meta or {}).get(
        "make_vocab_size_divisible_by", 128)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    model_args.validate_parallel(tp, pp)
    padded = max(padded_vocab_size(model_args.vocab_size, divisible, tp, extra),
                 (meta or {}).get("padded_vocab_size", 0))
    out_meta = build_metadata(family, model_args, Target(tp, pp, extra, divisible),
                              (meta or {}).get("hf_config"), tokenizer_dir is not None)
    out_meta.update(padded_vocab_size=padded,
                    dtype=str(PRECISION_DTYPES[args.precision]).replace("torch.", ""))
    if tokenizer is not None:  # the type actually used, not the family's default
        out_meta["tokenizer"]["type"] = tokenizer.tokenizer_type
    if tokenizer_dir and os.path.isfile(tokenizer_dir):  # a SentencePiece file: saved by name
        out_meta["tokenizer"]["path"] = os.path.join(TOKENIZER_DIR, os.path.basename(tokenizer_dir))
    return ModelPlan(family, model_args, padded, tokenizer, tokenizer_dir, out_meta)


def build_model(args, plan: ModelPlan):
    """This rank's pipeline stage as a list of one DDP-wrapped chunk, plus the bare GPTModel."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from megatron_patch.families.model import build_gpt_model, transformer_config

    cpu_init = args.use_cpu_initialization if args.use_cpu_initialization is not None \
        else not compat.on_gpu()
    config = transformer_config(
        plan.family, plan.model_args, tensor_parallel=args.tensor_model_parallel_size,
        pipeline_parallel=args.pipeline_model_parallel_size, precision=args.precision,
        sequence_parallel=args.sequence_parallel, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, init_method_std=args.init_method_std,
        use_cpu_initialization=cpu_init, recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method if args.recompute_granularity == "full" else None,
        recompute_num_layers=args.recompute_num_layers if args.recompute_granularity == "full"
        else None, calculate_per_token_loss=args.calculate_per_token_loss)
    model = build_gpt_model(plan.family, plan.model_args, config, plan.padded_vocab_size,
                            ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(),
                            attention=args.attention_backend)
    if compat.on_gpu():
        model.cuda(torch.cuda.current_device())
    if args.compile_layers:
        for layer in model.decoder.layers:
            layer.forward = compat.compile_megatron(layer.forward)
    wrapped = Float16Module(config, model) if args.precision != "fp32" else model
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.precision != "fp32", overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer)
    return [DistributedDataParallel(config, ddp_config, wrapped)], model


def build_optimizer(args, chunks):
    """megatron-core's optimizer (Adam; distributed when asked) and LR/WD schedule."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16,
        params_dtype=PRECISION_DTYPES[args.precision], loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale, min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis,
        use_distributed_optimizer=args.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(config, chunks)
    gbs = args.global_batch_size
    decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters >= decay_iters:  # megatron-core's scheduler would only assert
        raise ValueError(f"the learning-rate warm-up ({args.lr_warmup_iters} iterations, from "
                         f"--lr-warmup-iters/--warmup-tokens) must be shorter than the decay "
                         f"({decay_iters} iterations, --lr-decay-iters or --train-iters)")
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs, lr_decay_steps=decay_iters * gbs,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters * gbs,
        wd_incr_style="constant")
    return optimizer, scheduler
