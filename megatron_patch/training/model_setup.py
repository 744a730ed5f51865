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
from megatron_patch.tokenizers.glm_files import check_special_ids

# ModelArgs fields that Megatron-LM flags of the same names set.
_SHAPE_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "max_position_embeddings", "norm_epsilon",
                "rotary_base")
_FLAG_NAMES = {"tie_embeddings": "--untie-embeddings-and-output-weights",
               "rope_scaling_factor": "--use-rope-scaling/--rope-scaling-factor"}


@dataclasses.dataclass
class ModelPlan:
    """Everything needed to build the model and to describe its checkpoints."""

    family: object
    model_args: ModelArgs
    padded_vocab_size: int
    tokenizer: object          # megatron_patch tokenizer or None
    tokenizer_dir: str | None  # copied into saved checkpoints
    meta: dict                 # megatron_patch.json of the checkpoints this run writes
    fresh_params: tuple = ()   # parameters --load does not give (a new reward head)


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


def model_flags(args) -> dict:
    """ModelArgs fields given on the command line with Megatron-LM's flags."""
    given = {f: getattr(args, f) for f in _SHAPE_FLAGS if getattr(args, f) is not None}
    if args.group_query_attention and "num_query_groups" not in given:
        given["num_query_groups"] = 1  # Megatron-LM's default --num-query-groups
    if args.use_rope_scaling:
        given["rope_scaling_factor"] = args.rope_scaling_factor or 8.0
    if args.untie_embeddings_and_output_weights:
        given["tie_embeddings"] = False
    return given


def _flag(field: str) -> str:
    return _FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


def _args_from_flags(args, family, given: dict) -> ModelArgs:
    """A model defined by Megatron-LM's shape flags alone, with Megatron-LM's defaults."""
    missing = [f"--{f.replace('_', '-')}" for f in ("num_layers", "hidden_size",
                                                   "num_attention_heads") if f not in given]
    if missing:
        raise ValueError(f"without --load or --model-size the shape comes from Megatron-LM's "
                         f"flags: give {', '.join(missing)} (or --model-family and --model-size)")
    hidden, heads = given["hidden_size"], given["num_attention_heads"]
    if "kv_channels" not in given and hidden % heads:
        raise ValueError(f"--hidden-size {hidden} is not divisible by --num-attention-heads "
                         f"{heads}; give --kv-channels")
    gated = family.architecture.get("gated_linear_unit", False)
    fields = dict(ffn_hidden_size=int(4 * hidden * 2 / 3 / 64) * 64 if gated else 4 * hidden,
                  max_position_embeddings=args.seq_length, tie_embeddings=True)
    return ModelArgs(family=family.name, **{**family.architecture, **fields, **given})


def _model_args(args, meta) -> tuple[object, ModelArgs]:
    """The family and shape: the --load checkpoint's (flags must agree), a --model-size row
    (flags override it), or the flags alone."""
    from megatron_patch.registry import FAMILIES
    from megatron_patch.training.megatron_lm import (check_architecture, given_architecture,
                                                     infer_family)

    given = model_flags(args)
    if meta is not None:
        family = get_family(meta["family"])
        if args.model_family and args.model_family != family.name:
            raise ValueError(f"--model-family {args.model_family} does not match --load "
                             f"{args.load} (family {family.name})")
        check_architecture(args, family)
        model_args = ModelArgs.from_dict(meta["model_args"])
        clashes = [f for f, v in given.items() if v != getattr(model_args, f)]
        if clashes:
            field = clashes[0]
            value = "" if field == "tie_embeddings" else f" {given[field]}"
            raise ValueError(f"{_flag(field)}{value} differs from the --load checkpoint "
                             f"({field} {getattr(model_args, field)}); drop it, or convert the "
                             f"checkpoint to the shape you want")
        return family, model_args
    if args.model_size and not args.model_family and not given_architecture(args):
        raise ValueError(f"--model-size {args.model_size} needs --model-family (a size is a row "
                         f"of one family's table)")
    family = get_family(args.model_family) if args.model_family else \
        infer_family(args, list(FAMILIES.values()))
    check_architecture(args, family)
    if args.model_size:
        return family, family.args_for_size(args.model_size, **given)
    return family, _args_from_flags(args, family, given)


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


def _flag_vocab_size(args, tokenizer) -> int | None:
    """The true vocabulary the command line gives: the tokenizer's, or --vocab-size (plus the
    end-of-document token Megatron-LM's NullTokenizer adds)."""
    if tokenizer is not None:
        if args.vocab_size is not None and args.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"--vocab-size {args.vocab_size} differs from the tokenizer's "
                             f"{tokenizer.vocab_size} tokens")
        return tokenizer.vocab_size
    if args.vocab_size is None:
        return None
    return args.vocab_size + (args.tokenizer_type == "NullTokenizer")


def _vocab_padding_flag(args, meta, name: str, default: int) -> int:
    """--extra-vocab-size / --make-vocab-size-divisible-by: the --load checkpoint decides its
    embedding's rows, so a different value is an error naming both (a new size needs a
    conversion with that flag)."""
    given, stored = getattr(args, name), (meta or {}).get(name)
    if meta is not None and given is not None and given != stored:
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{flag} {given} differs from the --load checkpoint's {stored} (its "
                         f"embedding has {meta['padded_vocab_size']} rows); pass {stored}, or "
                         f"convert the checkpoint again with {flag} {given}")
    return given if given is not None else stored if stored is not None else default


def check_sequence_length(args, model_args) -> None:
    """Megatron-LM's rule: --seq-length fits the model's max_position_embeddings."""
    if args.seq_length > model_args.max_position_embeddings:
        flag = "--max-padding-length" if getattr(args, "max_padding_length", None) else \
            "--seq-length"
        raise ValueError(f"{flag} {args.seq_length} is longer than the model's "
                         f"max_position_embeddings {model_args.max_position_embeddings}; "
                         f"shorten it (Megatron-LM refuses it too)")


def plan_model(args, adjust=None) -> ModelPlan:
    """Resolve family, shape, tokenizer and vocabulary for this run. ``adjust(model_args,
    meta)`` changes the model an objective trains (a reward model's head) and returns the
    parameters the --load checkpoint does not give."""
    meta, root = _source_metadata(args.load)
    family, model_args = _model_args(args, meta)
    fresh = tuple(adjust(model_args, meta) or ()) if adjust else ()
    tokenizer, tokenizer_dir = _tokenizer(args, family, meta, root)
    vocab = _flag_vocab_size(args, tokenizer)
    if meta is None and vocab is not None:
        model_args.vocab_size = vocab
    elif meta is None and not args.model_size:
        raise ValueError("the vocabulary size is unknown: give --tokenizer-model, or "
                         "--vocab-size (with --mock-data / --tokenizer-type NullTokenizer)")
    elif vocab is not None and vocab != model_args.vocab_size and tokenizer is None:
        raise ValueError(f"--vocab-size {args.vocab_size} differs from the --load checkpoint's "
                         f"vocabulary ({model_args.vocab_size})")
    if tokenizer is not None and tokenizer.vocab_size > model_args.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocabulary is {model_args.vocab_size}")
    check_special_ids(tokenizer, model_args.prefix_lm_ids, f"--tokenizer-model {tokenizer_dir}")
    extra = _vocab_padding_flag(args, meta, "extra_vocab_size", 0)
    divisible = _vocab_padding_flag(args, meta, "make_vocab_size_divisible_by", 128)
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
    return ModelPlan(family, model_args, padded, tokenizer, tokenizer_dir, out_meta, fresh)


def build_model(args, plan: ModelPlan):
    """This rank's pipeline stage as a list of one DDP-wrapped chunk, plus the bare GPTModel."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    config, model = build_bare_model(args, plan)
    wrapped = Float16Module(config, model) if args.precision != "fp32" else model
    chunk = DistributedDataParallel(config, ddp_config(args), wrapped)
    # Compiled layers: gradient-accumulation fusion through a linear that compiles (it needs the
    # DDP main_grad buffers, made just now, and no grad hooks: not with --overlap-grad-reduce).
    args.compiled_wgrad_fusion = 0
    if args.compile_layers and not getattr(args, "no_gradient_accumulation_fusion", False) \
            and not args.overlap_grad_reduce and not getattr(args, "fp8_format", None):
        from megatron_patch.kernels.grad_accumulation import use_compiled_wgrad_fusion

        args.compiled_wgrad_fusion = use_compiled_wgrad_fusion(model)
    return [chunk], model


def build_frozen_model(args, plan: ModelPlan):
    """This rank's stage of a model that is never trained (an RLHF reference or reward model):
    the bare GPTModel in eval mode, gradients off, no DDP buffers."""
    _, model = build_bare_model(args, plan)
    return model.eval().requires_grad_(False)


def build_bare_model(args, plan: ModelPlan):
    """(TransformerConfig, this rank's GPTModel stage) on the device, initialised unless
    --load will replace its weights."""
    from megatron.core import parallel_state as ps

    from megatron_patch.families.model import build_gpt_model, transformer_config

    cpu_init = args.use_cpu_initialization if args.use_cpu_initialization is not None \
        else not compat.on_gpu()
    # Under --compile-layers megatron-core's linear backward (attribute writes) breaks the
    # compiled graph at every linear: measured slower on an H200 (65,668 vs 77,555 tokens/s);
    # build_model gives those layers a linear that compiles instead.
    fuse_wgrad = not getattr(args, "no_gradient_accumulation_fusion", False) \
        and not args.compile_layers
    if fuse_wgrad:
        compat.enable_gradient_accumulation_fusion()
    config = transformer_config(
        plan.family, plan.model_args, tensor_parallel=args.tensor_model_parallel_size,
        pipeline_parallel=args.pipeline_model_parallel_size, precision=args.precision,
        sequence_parallel=args.sequence_parallel, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, init_method_std=args.init_method_std,
        use_cpu_initialization=cpu_init, recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method if args.recompute_granularity == "full" else None,
        recompute_num_layers=args.recompute_num_layers if args.recompute_granularity == "full"
        else None, calculate_per_token_loss=args.calculate_per_token_loss,
        gradient_accumulation_fusion=fuse_wgrad)
    model = build_gpt_model(plan.family, plan.model_args, config, plan.padded_vocab_size,
                            ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(),
                            attention=args.attention_backend)
    if compat.on_gpu():
        model.cuda(torch.cuda.current_device())
    if not args.load:  # random weights, the same at any layout (a --load replaces them all)
        from megatron_patch.training.initialization import initialize_weights

        initialize_weights(model, plan.family, plan.model_args, plan.padded_vocab_size, config,
                           args.seed, args.tensor_model_parallel_size,
                           ps.get_tensor_model_parallel_rank(),
                           args.pipeline_model_parallel_size, ps.get_pipeline_model_parallel_rank())
    if getattr(args, "fp8_format", None):
        from megatron_patch.kernels import fp8

        args.fp8_linears = fp8.use_fp8_linears(model, fp8_recipe(args))
    if args.compile_layers:
        for layer in model.decoder.layers:
            layer.forward = compat.compile_megatron(layer.forward)
    if getattr(args, "compile_output_layer", False) and ps.is_pipeline_last_stage():
        model._postprocess = compat.compile_megatron(model._postprocess)
    return config, model


def fp8_recipe(args):
    """The FP8 recipe of Megatron-LM's --fp8-* flags."""
    from megatron_patch.kernels import fp8

    return fp8.Fp8Recipe(args.fp8_format, args.fp8_margin, args.fp8_recipe,
                         args.fp8_amax_history_len, args.fp8_amax_compute_algo)


def ddp_config(args):
    """megatron-core DDP settings from Megatron-LM's flags (and its bucket-size default)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig

    bucket = None  # one bucket: nothing to overlap
    if args.overlap_grad_reduce:
        bucket = args.ddp_bucket_size or max(40_000_000, 1_000_000 * ps.get_data_parallel_world_size())
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.precision != "fp32" and not args.grad_reduce_in_bf16,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather, align_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer, bucket_size=bucket)


def build_optimizer(args, chunks):
    """megatron-core's optimizer (Adam or SGD; distributed when asked) and LR/WD schedule."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_patch.training.arguments import lr_schedule_steps

    steps = lr_schedule_steps(args)
    config = OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr,
        decoupled_lr=args.decoupled_lr, decoupled_min_lr=args.decoupled_min_lr,
        weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps, sgd_momentum=args.sgd_momentum, clip_grad=args.clip_grad,
        bf16=args.bf16, fp16=args.fp16, params_dtype=PRECISION_DTYPES[args.precision],
        loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale, loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis, use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather)
    optimizer = get_megatron_optimizer(config, chunks,
                                       config_overrides=compat.optimizer_config_overrides(config))
    args.optimizer_kernels = compat.use_fused_optimizer_ops(
        optimizer, not getattr(args, "no_fused_optimizer", False))
    start_wd = args.weight_decay if args.start_weight_decay is None else args.start_weight_decay
    end_wd = args.weight_decay if args.end_weight_decay is None else args.end_weight_decay
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=steps["lr_warmup_steps"], lr_decay_steps=steps["lr_decay_steps"],
        lr_decay_style=args.lr_decay_style, start_wd=start_wd, end_wd=end_wd,
        wd_incr_steps=steps["wd_incr_steps"], wd_incr_style=args.weight_decay_incr_style,
        wsd_decay_steps=steps["wsd_decay_steps"], lr_wsd_decay_style=args.lr_wsd_decay_style)
    return optimizer, scheduler
