"""Command-line arguments of ``python -m megatron_patch.pretrain`` / ``finetune``, with
Megatron-LM's names wherever Megatron-LM has the same concept."""
from __future__ import annotations

import argparse
import math

from megatron_patch.argtypes import positive_int
from megatron_patch.training import megatron_lm, profiling


def _model(parser):
    g = parser.add_argument_group(
        "model (shape: a --load checkpoint's, else a --model-size row, else these flags with "
        "Megatron-LM's defaults; a flag given with --load must agree with the checkpoint)")
    g.add_argument("--model-family", help="llama, ...; default: the --load checkpoint's family, "
                                          "else the one the architecture flags describe")
    g.add_argument("--model-size", help="a row of the family's sizes table (e.g. 7B, tiny)")
    for name in ("num-layers", "hidden-size", "num-attention-heads"):
        g.add_argument(f"--{name}", type=positive_int)
    g.add_argument("--ffn-hidden-size", type=positive_int,
                   help="default (no --model-size): 4 x hidden, or Megatron-LM's 2/3 of that "
                        "rounded down to a multiple of 64 for gated (SwiGLU) families")
    g.add_argument("--group-query-attention", action="store_true", default=None,
                   help="grouped-query attention with --num-query-groups (default 1)")
    g.add_argument("--num-query-groups", type=positive_int,
                   help="key/value heads (grouped-query attention)")
    g.add_argument("--kv-channels", type=positive_int, help="head dim; default hidden / heads")
    g.add_argument("--max-position-embeddings", type=positive_int,
                   help="default (no --model-size): --seq-length")
    g.add_argument("--vocab-size", type=positive_int,
                   help="vocabulary without a tokenizer file (--mock-data, NullTokenizer; "
                        "NullTokenizer adds its end-of-document token as Megatron-LM does)")
    g.add_argument("--rotary-base", type=float, help="RoPE theta; default 10000")
    g.add_argument("--norm-epsilon", type=float, help="default 1e-5")
    g.add_argument("--use-rope-scaling", action="store_true", default=None,
                   help="Llama-3.1 RoPE scaling by --rope-scaling-factor (default 8)")
    g.add_argument("--rope-scaling-factor", type=float)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None,
                   help="a separate output layer; Megatron-LM ties them by default, and so "
                        "does a model defined by flags alone (size rows say their own)")
    g.add_argument("--attention-backend", default="sdpa",
                   choices=("sdpa", "local", "auto", "flash", "fused", "unfused"),
                   help="core attention: torch SDPA (flash on GPU; Megatron-LM's auto, flash "
                        "and fused mean the same here) or megatron-core's unfused one (local, "
                        "unfused)")
    g.add_argument("--use-flash-attn", action="store_true",
                   help="accepted for Megatron-LM compatibility: SDPA picks flash on GPU")
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine",
                                                  "inference_optimized"),
                   help="local is what runs (Transformer Engine is never required)")
    g.add_argument("--hidden-dropout", type=float, default=0.0,
                   help="0 as in the HF families (Megatron-LM's default is 0.1)")
    g.add_argument("--attention-dropout", type=float, default=0.0,
                   help="0 as in the HF families (Megatron-LM's default is 0.1)")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--use-cpu-initialization", action="store_true", default=None,
                   help="build weights on the CPU first (random weights are drawn per tensor "
                        "and are the same at any layout either way); default on without a GPU")


def _tokenizer(parser):
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", help="bloombpe, llamabpe, ..., HuggingFaceTokenizer, "
                                            "SentencePieceTokenizer, NullTokenizer (with "
                                            "--vocab-size); default: the --load checkpoint's")
    g.add_argument("--tokenizer-model", help="tokenizer directory or file; default: the "
                                             "--load checkpoint's tokenizer/ directory")
    g.add_argument("--extra-vocab-size", type=int, default=None,
                   help="extra embedding rows (default: the checkpoint's, else 0)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="default: the checkpoint's, else 128")


def _parallel(parser):
    g = parser.add_argument_group("parallelism and precision")
    g.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state over data-parallel ranks (ZeRO-1)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce gradients bucket by bucket during the backward pass")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="gather updated parameters during the next forward pass (needs "
                        "--use-distributed-optimizer)")
    g.add_argument("--ddp-bucket-size", type=positive_int,
                   help="elements per gradient bucket with --overlap-grad-reduce (default "
                        "Megatron-LM's: max(40M, 1M x data-parallel size))")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="reduce gradients in bf16 (default fp32 with --bf16)")
    g.add_argument("--distributed-timeout-minutes", type=positive_int,
                   help="timeout of collective operations (default torch's)")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling")
    g.add_argument("--loss-scale", type=float, help="static loss scale (fp16); default dynamic")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--recompute-granularity", choices=("full", "selective"))
    g.add_argument("--recompute-activations", action="store_true",
                   help="Megatron-LM's name for --recompute-granularity selective")
    g.add_argument("--recompute-method", choices=("uniform", "block"), default="uniform")
    g.add_argument("--recompute-num-layers", type=int, default=1)
    g.add_argument("--no-gradient-accumulation-fusion", action="store_true",
                   help="unfused weight gradients: a bf16 gradient per linear layer, then "
                        "added to the fp32 main_grad (default: the GEMM accumulates into "
                        "main_grad, as Megatron-LM does with apex; with --compile-layers a "
                        "linear that compiles, not with --overlap-grad-reduce)")
    g.add_argument("--fp8-format", choices=("e4m3", "hybrid"),
                   help="FP8 GEMMs in the transformer layers' linear layers (torch._scaled_mm, "
                        "no Transformer Engine): e4m3 everywhere, or hybrid (E5M2 gradients); "
                        "the embedding and output layer stay in --bf16/--fp16")
    g.add_argument("--fp8-recipe", choices=("tensorwise", "delayed", "mxfp8", "blockwise"),
                   default="tensorwise",
                   help="scaling: tensorwise (each tensor scaled by its current absolute max; "
                        "the default here, the one measured on GPU) or delayed (Megatron-LM's "
                        "default: scales from an amax history, reduced over the TP/DP ranks "
                        "each iteration and checkpointed); mxfp8 and blockwise need Transformer "
                        "Engine")
    g.add_argument("--fp8-margin", type=int, default=0,
                   help="scale down by 2**margin below the format's maximum")
    g.add_argument("--fp8-amax-history-len", type=positive_int, default=None,
                   help="delayed recipe: iterations of amax history per tensor (default 1, "
                        "Megatron-LM's)")
    g.add_argument("--fp8-amax-compute-algo", choices=("most_recent", "max"), default=None,
                   help="delayed recipe: the scale comes from the newest amax or the history's "
                        "max (default most_recent, Megatron-LM's)")
    g.add_argument("--compile-layers", action="store_true",
                   help="torch.compile each transformer layer's forward (GPU)")
    g.add_argument("--compile-output-layer", action="store_true",
                   help="torch.compile the last stage's output layer with its cross-entropy "
                        "(being measured for the training-speed issue; the same math)")


def _training(parser):
    g = parser.add_argument_group(
        "training and schedule (iteration-based: --train-iters with --lr-*-iters; sample-based: "
        "--train-samples with --lr-*-samples, as in Megatron-LM)")
    g.add_argument("--micro-batch-size", type=positive_int, required=True)
    g.add_argument("--global-batch-size", type=positive_int,
                   help="default: micro-batch-size x data-parallel size (no accumulation)")
    g.add_argument("--seq-length", type=positive_int, required=True)
    g.add_argument("--train-iters", type=positive_int)
    g.add_argument("--train-samples", type=positive_int,
                   help="train for this many samples: train-samples // global batch iterations")
    g.add_argument("--train-tokens", type=int, help="the seed's TRAIN_TOKENS: sets --train-iters "
                                                    "to tokens / (global batch x seq length)")
    g.add_argument("--warmup-tokens", type=int, help="the seed's WARMUP_TOKENS: sets "
                                                     "--lr-warmup-iters the same way")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--decoupled-lr", type=float,
                   help="learning rate of the embedding and output layer")
    g.add_argument("--decoupled-min-lr", type=float)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine",
                                                "inverse-square-root", "WSD"), default="cosine",
                   help="(Megatron-LM's default is linear)")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float,
                   help="warm-up as a fraction of the decay (Megatron-LM's meaning)")
    g.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    g.add_argument("--lr-decay-samples", type=int, help="default: --train-samples")
    g.add_argument("--lr-wsd-decay-style", default="exponential",
                   choices=("exponential", "linear", "cosine", "minus_sqrt"))
    g.add_argument("--lr-wsd-decay-iters", type=int, help="WSD: iterations of the final decay")
    g.add_argument("--lr-wsd-decay-samples", type=int, help="WSD: samples of the final decay")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--start-weight-decay", type=float, help="default --weight-decay")
    g.add_argument("--end-weight-decay", type=float, help="default --weight-decay")
    g.add_argument("--weight-decay-incr-style", choices=("constant", "linear", "cosine"),
                   default="constant")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--no-fused-optimizer", action="store_true",
                   help="megatron-core's own fallbacks (torch's foreach Adam, per-tensor "
                        "gradient norm and copies) instead of torch's fused Adam and foreach "
                        "kernels; the same update up to rounding, for measurements")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="average the loss over all tokens of the global batch instead of per "
                        "micro-batch (finetune turns it on)")


def _data(parser):
    g = parser.add_argument_group("data loading")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")


def pretrain_data_arguments(parser) -> None:
    """The mmap datasets of ``pretrain`` (finetune reads --train-data/--valid-data instead)."""
    g = parser.add_argument_group("pretraining data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="mmap prefixes, optionally weighted: 'P' or 'W1 P1 W2 P2 ...'")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    g.add_argument("--data-cache-path", help="where GPTDataset index caches go")
    g.add_argument("--mock-data", action="store_true", help="random tokens (benchmarks)")
    g.add_argument("--eod-mask-loss", action="store_true",
                   help="no loss on end-of-document tokens")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="positions restart after each end-of-document token")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="no attention across end-of-document tokens")
    g.add_argument("--no-mmap-bin-files", action="store_true",
                   help="read .bin files with file reads instead of memory maps")


def _checkpoint(parser):
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", help="checkpoint directory to write")
    g.add_argument("--load", help="checkpoint to start from: a converted checkpoint (weights "
                                  "only) or a training one (full resume)")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--exit-interval", type=int, help="save and exit at this iteration")
    g.add_argument("--exit-duration-in-mins", type=float,
                   help="save and exit once training has run this long")
    g.add_argument("--ckpt-format", choices=("torch", "torch_dist", "torch_dcp",
                                             "fsdp_dtensor"),
                   help="training checkpoints are written in the torch format")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only and start at iteration 0")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")


def _logging(parser):
    g = parser.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--log-interval", type=positive_int, default=10)
    g.add_argument("--metrics-file", help="append one JSON object per iteration here")
    g.add_argument("--tensorboard-dir")
    profiling.add_arguments(g)


def build_parser(prog: str, description: str, extra=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for group in (_model, _tokenizer, _parallel, _training, _data, _checkpoint, _logging,
                  megatron_lm.add_arguments):
        group(parser)
    if extra:
        extra(parser)
    return parser


def finalize(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Derived values and cross-flag checks (errors name the flags)."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by "
                         f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp}")
    args.data_parallel_size = world_size // (tp * pp)
    per_step = args.micro_batch_size * args.data_parallel_size
    args.global_batch_size = args.global_batch_size or per_step
    if args.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not a multiple of "
                         f"--micro-batch-size {args.micro_batch_size} x data-parallel size "
                         f"{args.data_parallel_size}")
    args.num_microbatches = args.global_batch_size // per_step
    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 are exclusive")
    args.precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    _finalize_schedule(args)
    _finalize_megatron_lm_names(args)
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # Megatron-LM does the same: nothing to split
    if args.save_interval and not args.save:
        raise ValueError("--save-interval needs --save")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ValueError("--overlap-param-gather needs --use-distributed-optimizer")
    if args.fp8_format and args.fp8_recipe not in ("tensorwise", "delayed"):
        raise ValueError(f"--fp8-recipe {args.fp8_recipe} is not implemented (it needs "
                         f"Transformer Engine); use --fp8-recipe tensorwise (per-tensor current "
                         f"scaling) or delayed (amax history), both through torch._scaled_mm")
    if args.fp8_format and (args.micro_batch_size * args.seq_length) % 16:
        raise ValueError(f"--fp8-format needs --micro-batch-size x --seq-length to be a multiple "
                         f"of 16 (FP8 GEMMs); got {args.micro_batch_size} x {args.seq_length}")
    profiling.check_arguments(args)
    args.compat_notes = megatron_lm.no_effect_notes(args) + _fp8_history_notes(args)
    args.fp8_amax_history_len = args.fp8_amax_history_len or 1
    args.fp8_amax_compute_algo = args.fp8_amax_compute_algo or "most_recent"
    return args


def _fp8_history_notes(args) -> list[str]:
    """The delayed recipe's flags, given with another recipe (Megatron-LM's FP8 scripts pass
    them and leave --fp8-recipe at its default there, delayed)."""
    if args.fp8_format and args.fp8_recipe == "delayed":
        return []
    why = ("the delayed recipe's (--fp8-recipe delayed); " +
           ("tensorwise, the default here, keeps no history" if args.fp8_format
            else "no --fp8-format"))
    return [f"{flag} has no effect here: {why}"
            for flag, value in (("--fp8-amax-history-len", args.fp8_amax_history_len),
                                ("--fp8-amax-compute-algo", args.fp8_amax_compute_algo))
            if value is not None]


def _refuse_mix(args, kind: str, flags: tuple[str, ...]) -> None:
    """Megatron-LM's rule: a schedule is either iteration-based or sample-based."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value not in (None, 0):
            raise ValueError(f"{flag} does not go with {kind} training; Megatron-LM's schedule "
                             f"is either iteration-based (--train-iters, --lr-*-iters) or "
                             f"sample-based (--train-samples, --lr-*-samples)")


def _finalize_schedule(args) -> None:
    tokens_per_iter = args.global_batch_size * args.seq_length
    if args.train_tokens is not None and args.train_tokens < tokens_per_iter:
        raise ValueError(f"--train-tokens {args.train_tokens} is less than one global batch "
                         f"({args.global_batch_size} x {args.seq_length} = {tokens_per_iter} "
                         f"tokens)")
    if args.train_tokens:
        args.train_iters = max(1, math.ceil(args.train_tokens / tokens_per_iter))
    if args.warmup_tokens:
        args.lr_warmup_iters = math.ceil(args.warmup_tokens / tokens_per_iter)
    if args.train_samples:
        _refuse_mix(args, "--train-samples (sample-based)",
                    ("--train-iters", "--lr-decay-iters", "--lr-warmup-iters",
                     "--lr-wsd-decay-iters"))
        args.train_iters = args.train_samples // args.global_batch_size
        if not args.train_iters:
            raise ValueError(f"--train-samples {args.train_samples} is less than one global "
                             f"batch ({args.global_batch_size} samples)")
    else:
        _refuse_mix(args, "iteration-based", ("--lr-decay-samples", "--lr-warmup-samples",
                                              "--lr-wsd-decay-samples"))
    if args.lr_warmup_fraction is not None and (args.lr_warmup_iters or args.lr_warmup_samples):
        raise ValueError("give one of --lr-warmup-fraction and --lr-warmup-iters/-samples")
    if args.decoupled_min_lr is not None and args.decoupled_lr is None:
        raise ValueError("--decoupled-min-lr needs --decoupled-lr")


def _finalize_megatron_lm_names(args) -> None:
    """Megatron-LM's spellings of what the trainer calls otherwise."""
    if args.recompute_activations:
        if args.recompute_granularity not in (None, "selective"):
            raise ValueError("--recompute-activations means --recompute-granularity selective, "
                             f"not {args.recompute_granularity}")
        args.recompute_granularity = "selective"
    args.attention_backend = {"auto": "sdpa", "flash": "sdpa", "fused": "sdpa",
                              "unfused": "local"}.get(args.attention_backend,
                                                      args.attention_backend)
    if args.rope_scaling_factor is not None and not args.use_rope_scaling:
        raise ValueError("--rope-scaling-factor needs --use-rope-scaling")


def lr_schedule_steps(args) -> dict:
    """OptimizerParamScheduler's step counts, in samples as Megatron-LM counts them: warm-up,
    decay, weight-decay increment and WSD's final decay. Called once --train-iters is known
    (finetune derives it from --epochs)."""
    gbs = args.global_batch_size
    if args.train_samples:
        decay = args.lr_decay_samples or args.train_samples
        warmup, wsd = args.lr_warmup_samples, args.lr_wsd_decay_samples
        wd_incr = args.train_samples
    else:
        decay = (args.lr_decay_iters or args.train_iters) * gbs
        warmup = args.lr_warmup_iters * gbs
        wsd = args.lr_wsd_decay_iters * gbs if args.lr_wsd_decay_iters else None
        wd_incr = args.train_iters * gbs
    if args.lr_warmup_fraction is not None:
        warmup = int(args.lr_warmup_fraction * decay)
    if warmup >= decay:  # megatron-core's scheduler would only assert
        unit = "samples, from --lr-warmup-samples/--lr-warmup-fraction" if args.train_samples \
            else "iterations, from --lr-warmup-iters/--warmup-tokens"
        count, total = (warmup, decay) if args.train_samples else (warmup // gbs, decay // gbs)
        raise ValueError(f"the learning-rate warm-up ({count} {unit}) must be shorter than the "
                         f"decay ({total}, --lr-decay-{'samples' if args.train_samples else 'iters'}"
                         f" or --train-{'samples' if args.train_samples else 'iters'})")
    if args.lr_decay_style == "WSD" and not wsd:
        raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters (or -samples)")
    return dict(lr_warmup_steps=warmup, lr_decay_steps=decay, wd_incr_steps=wd_incr,
                wsd_decay_steps=wsd)
