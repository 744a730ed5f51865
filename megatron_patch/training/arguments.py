"""Command-line arguments of ``python -m megatron_patch.pretrain`` / ``finetune``, with
Megatron-LM's names wherever Megatron-LM has the same concept."""
from __future__ import annotations

import argparse
import math

from megatron_patch.argtypes import positive_int


def _model(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--model-family", help="llama, ...; default: the --load checkpoint's family")
    g.add_argument("--model-size", help="a row of the family's sizes table (e.g. 7B, tiny); "
                                        "default: the --load checkpoint's shape")
    for name in ("num-layers", "hidden-size", "ffn-hidden-size", "num-attention-heads",
                 "num-query-groups", "max-position-embeddings"):
        g.add_argument(f"--{name}", type=int, help="override the model shape")
    g.add_argument("--attention-backend", choices=("sdpa", "local"), default="sdpa",
                   help="core attention: torch SDPA (flash on GPU) or megatron-core's unfused one")
    g.add_argument("--use-flash-attn", action="store_true",
                   help="accepted for Megatron-LM compatibility: SDPA picks flash on GPU")
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--use-cpu-initialization", action="store_true", default=None,
                   help="initialise full weights on the CPU then scatter (same weights for any "
                        "TP); default on when there is no GPU")


def _tokenizer(parser):
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", help="bloombpe, llamabpe, ..., HuggingFaceTokenizer; "
                                            "default: the --load checkpoint's tokenizer")
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
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling")
    g.add_argument("--loss-scale", type=float, help="static loss scale (fp16); default dynamic")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--recompute-granularity", choices=("full", "selective"))
    g.add_argument("--recompute-method", choices=("uniform", "block"), default="uniform")
    g.add_argument("--recompute-num-layers", type=int, default=1)
    g.add_argument("--compile-layers", action="store_true",
                   help="torch.compile each transformer layer's forward (GPU)")


def _training(parser):
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=positive_int, required=True)
    g.add_argument("--global-batch-size", type=positive_int,
                   help="default: micro-batch-size x data-parallel size (no accumulation)")
    g.add_argument("--seq-length", type=positive_int, required=True)
    g.add_argument("--train-iters", type=positive_int)
    g.add_argument("--train-tokens", type=int, help="the seed's TRAIN_TOKENS: sets --train-iters "
                                                    "to tokens / (global batch x seq length)")
    g.add_argument("--warmup-tokens", type=int, help="the seed's WARMUP_TOKENS: sets "
                                                     "--lr-warmup-iters the same way")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine",
                                                "inverse-square-root"), default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float)
    g.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="average the loss over all tokens of the global batch instead of per "
                        "micro-batch (finetune turns it on)")


def _data(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="mmap prefixes, optionally weighted: 'P' or 'W1 P1 W2 P2 ...'")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    g.add_argument("--data-cache-path", help="where GPTDataset index caches go")
    g.add_argument("--mock-data", action="store_true", help="random tokens (benchmarks)")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")


def _checkpoint(parser):
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", help="checkpoint directory to write")
    g.add_argument("--load", help="checkpoint to start from: a converted checkpoint (weights "
                                  "only) or a training one (full resume)")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--exit-interval", type=int, help="save and exit at this iteration")
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


def build_parser(prog: str, description: str, extra=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for group in (_model, _tokenizer, _parallel, _training, _data, _checkpoint, _logging):
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
    tokens_per_iter = args.global_batch_size * args.seq_length
    if args.train_tokens:
        args.train_iters = max(1, math.ceil(args.train_tokens / tokens_per_iter))
    if args.warmup_tokens:
        args.lr_warmup_iters = math.ceil(args.warmup_tokens / tokens_per_iter)
    if args.lr_warmup_fraction is not None and args.train_iters:
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.train_iters)
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # Megatron-LM does the same: nothing to split
    if args.save_interval and not args.save:
        raise ValueError("--save-interval needs --save")
    return args
