"""Megatron-LM's command-line vocabulary, so that a Megatron-LM training script runs as it is.

Every Megatron-LM flag the trainer accepts is one of:

* **honoured**: it does what it does in Megatron-LM (most live in ``arguments.py``);
* **checked**: an architecture flag. megatron_patch's families fix their architecture, so the
  flag must agree with the family (``--normalization LayerNorm`` for llama is an error naming
  the flag, never a silent override); without ``--model-family`` (and without ``--load``) the
  architecture these flags describe, with Megatron-LM's defaults for those not given, picks the
  family;
* **no effect**: performance or tooling flags that have no counterpart here; each given one is
  reported in one line at start-up;
* **refused**: flags that would change the math in ways megatron_patch does not implement
  (context/expert parallelism, batch-size ramp-up): an error unless left at Megatron-LM's
  default.

``FLAG_TABLE`` lists them all for README's table (a test keeps the two equal). Checked against
Megatron-LM core_v0.16.1's ``megatron/training/arguments.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# Megatron-LM's architecture when a flag is absent (a GPT-2-like model).
MEGATRON_DEFAULTS = dict(
    normalization="LayerNorm", gated_linear_unit=False, activation="gelu", add_bias_linear=True,
    add_qkv_bias=False, position_embedding_type="learned_absolute", rotary_percent=1.0,
    rotary_interleaved=False, layernorm_zero_centered_gamma=False, qk_layernorm=False,
    apply_residual_connection_post_layernorm=False, num_moe_experts=None)


@dataclass(frozen=True)
class ArchitectureFlag:
    """A Megatron-LM flag that decides part of the architecture: ``implies(value)`` gives the
    architecture keys it sets, ``flag_for(key value)`` the flag that asks for it."""

    flag: str
    dest: str
    implies: Callable[[Any], dict]
    kwargs: dict


ARCHITECTURE_FLAGS = (
    ArchitectureFlag("--normalization", "normalization", lambda v: {"normalization": v},
                     dict(choices=("LayerNorm", "RMSNorm"))),
    ArchitectureFlag("--swiglu", "swiglu",
                     lambda v: {"gated_linear_unit": True, "activation": "silu"},
                     dict(action="store_true")),
    ArchitectureFlag("--squared-relu", "squared_relu", lambda v: {"activation": "squared_relu"},
                     dict(action="store_true")),
    ArchitectureFlag("--disable-bias-linear", "disable_bias_linear",
                     lambda v: {"add_bias_linear": False}, dict(action="store_true")),
    ArchitectureFlag("--add-qkv-bias", "add_qkv_bias", lambda v: {"add_qkv_bias": True},
                     dict(action="store_true")),
    ArchitectureFlag("--position-embedding-type", "position_embedding_type",
                     lambda v: {"position_embedding_type": v},
                     dict(choices=("learned_absolute", "rope", "mrope", "relative", "none"))),
    ArchitectureFlag("--use-rotary-position-embeddings", "use_rotary_position_embeddings",
                     lambda v: {"position_embedding_type": "rope"}, dict(action="store_true")),
    ArchitectureFlag("--no-position-embedding", "no_position_embedding",
                     lambda v: {"position_embedding_type": "none"}, dict(action="store_true")),
    ArchitectureFlag("--rotary-percent", "rotary_percent", lambda v: {"rotary_percent": v},
                     dict(type=float)),
    ArchitectureFlag("--rotary-interleaved", "rotary_interleaved",
                     lambda v: {"rotary_interleaved": True}, dict(action="store_true")),
    ArchitectureFlag("--apply-layernorm-1p", "apply_layernorm_1p",
                     lambda v: {"layernorm_zero_centered_gamma": True}, dict(action="store_true")),
    ArchitectureFlag("--qk-layernorm", "qk_layernorm", lambda v: {"qk_layernorm": True},
                     dict(action="store_true")),
    ArchitectureFlag("--apply-residual-connection-post-layernorm",
                     "apply_residual_connection_post_layernorm",
                     lambda v: {"apply_residual_connection_post_layernorm": True},
                     dict(action="store_true")),
    ArchitectureFlag("--num-experts", "num_experts", lambda v: {"num_moe_experts": v},
                     dict(type=int)),
)


def _request(key: str, value) -> str:
    """The Megatron-LM flag(s) that ask for architecture ``key`` = ``value``."""
    if key == "normalization":
        return f"--normalization {value}"
    if key in ("gated_linear_unit", "activation"):
        return {"silu": "--swiglu", "squared_relu": "--squared-relu"}.get(value, "no --swiglu")
    if key == "add_bias_linear":
        return "no --disable-bias-linear" if value else "--disable-bias-linear"
    if key == "position_embedding_type":
        return f"--position-embedding-type {value}"
    flag = next(f.flag for f in ARCHITECTURE_FLAGS if key in f.implies(True))
    return f"{flag} {value}" if not isinstance(value, bool) else (flag if value else f"no {flag}")


# Flags that are accepted and do nothing here: flag -> (argparse kwargs, why).
_SWITCH, _VALUE = dict(action="store_true"), dict()
NO_EFFECT = {
    "--cross-entropy-loss-fusion": (_SWITCH, "the loss is megatron-core's vocab-parallel "
                                             "cross-entropy"),
    "--manual-gc": (_SWITCH, "Python's garbage collector runs as usual"),
    "--manual-gc-interval": (_VALUE, "Python's garbage collector runs as usual"),
    "--empty-unused-memory-level": (_VALUE, "the CUDA cache is not emptied between steps"),
    "--fp8-param-gather": (_SWITCH, "the parameters stay in bf16 (FP8 is in the GEMMs)"),
    "--tp-comm-overlap": (_SWITCH, "needs Transformer Engine's userbuffers"),
    "--log-params-norm": (_SWITCH, "not logged"),
    "--log-num-zeros-in-grad": (_SWITCH, "not logged"),
    "--log-timers-to-tensorboard": (_SWITCH, "not logged"),
    "--log-memory-to-tensorboard": (_SWITCH, "not logged (the log line has the memory)"),
    "--log-validation-ppl-to-tensorboard": (_SWITCH, "validation perplexity is in the log line"),
    "--log-world-size-to-tensorboard": (_SWITCH, "not logged"),
    "--timing-log-level": (_VALUE, "no timers"),
    "--tiktoken-pattern": (_VALUE, "no tiktoken tokenizer here"),
    "--distributed-backend": (_VALUE, "the backend follows the device: NCCL on GPUs, gloo on "
                                      "the CPU"),
    "--num-layers-per-virtual-pipeline-stage": (_VALUE, "the pipeline schedule is 1F1B, not "
                                                        "interleaved"),
    "--virtual-pipeline-model-parallel-size": (_VALUE, "the pipeline schedule is 1F1B, not "
                                                       "interleaved"),
    "--no-align-grad-reduce": (_SWITCH, "gradient reduces start as each stage finishes"),
    "--no-align-param-gather": (_SWITCH, "parameter gathers start with the forward pass"),
    "--exit-signal-handler": (_SWITCH, "a signal stops the run; it resumes from the last save"),
    "--te-rng-tracker": (_SWITCH, "Transformer Engine is not used"),
    "--wandb-project": (_VALUE, "no Weights & Biases logging; see --metrics-file"),
    "--wandb-exp-name": (_VALUE, "no Weights & Biases logging; see --metrics-file"),
    "--wandb-save-dir": (_VALUE, "no Weights & Biases logging; see --metrics-file"),
    "--dataloader-type": (_VALUE, "samples are read in Megatron-LM's 'single' order"),
    "--no-async-tensor-model-parallel-allreduce": (_SWITCH, "megatron-core decides"),
}
# Given a value other than ``allowed`` these are refused: flag -> (argparse kwargs, allowed, why).
REFUSED = {
    "--context-parallel-size": (dict(type=int), 1, "context parallelism is not supported; "
                                                   "split the model with TP/PP instead"),
    "--expert-model-parallel-size": (dict(type=int), 1, "mixture-of-experts models are not "
                                                        "supported"),
    "--rampup-batch-size": (dict(nargs="+"), None, "batch-size ramp-up is not supported; use "
                                                   "a fixed --global-batch-size"),
    "--use-torch-fsdp2": (_SWITCH, None, "FSDP is not supported; use "
                                         "--use-distributed-optimizer"),
    "--use-megatron-fsdp": (_SWITCH, None, "FSDP is not supported; use "
                                           "--use-distributed-optimizer"),
}
# Flags whose Megatron-LM meaning is what always happens here; they only need to parse.
ALWAYS = {
    "--use-mcore-models": (_SWITCH, "megatron-core's GPTModel is the only model"),
    "--log-throughput": (_SWITCH, "tokens/s and TFLOP/s per GPU are in every log line"),
    "--no-create-attention-mask-in-dataloader": (_SWITCH, "causal masks are built in "
                                                          "attention, not in the data"),
    "--use-checkpoint-args": (_SWITCH, "a --load checkpoint's shape is always used"),
    "--attention-softmax-in-fp32": (_SWITCH, "SDPA accumulates the softmax in fp32"),
    "--no-masked-softmax-fusion": (_SWITCH, "core attention is SDPA; the fusions are off"),
    "--no-bias-gelu-fusion": (_SWITCH, "megatron_patch runs these unfused"),
    "--no-bias-swiglu-fusion": (_SWITCH, "megatron_patch runs these unfused"),
    "--no-bias-dropout-fusion": (_SWITCH, "megatron_patch runs these unfused"),
    "--no-rope-fusion": (_SWITCH, "megatron_patch runs these unfused"),
    "--no-persist-layer-norm": (_SWITCH, "megatron_patch runs these unfused"),
    "--exit-on-missing-checkpoint": (_SWITCH, "a --load that does not exist is an error"),
}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_arguments(parser) -> None:
    """The checked, no-effect, refused and always-on flags (defaults None: given or not is
    visible)."""
    g = parser.add_argument_group(
        "Megatron-LM architecture flags (checked against the family; without --model-family "
        "or --load they pick it)")
    for spec in ARCHITECTURE_FLAGS:
        g.add_argument(spec.flag, dest=spec.dest, default=None, **spec.kwargs)
    g = parser.add_argument_group("Megatron-LM flags accepted for compatibility (see README)")
    for table in (NO_EFFECT, ALWAYS):
        for flag, (kwargs, why) in table.items():
            g.add_argument(flag, dest=_dest(flag), default=None, help=f"no effect: {why}"
                           if table is NO_EFFECT else f"always: {why}", **kwargs)
    for flag, (kwargs, _, why) in REFUSED.items():
        g.add_argument(flag, dest=_dest(flag), default=None, help=f"refused: {why}", **kwargs)


# Honoured flags whose other values do nothing here: dest -> (the value honoured, why not).
OTHER_VALUES = {
    "transformer_impl": ("local", "Transformer Engine layers are not used: megatron-core's "
                                  "local spec with torch SDPA attention runs instead"),
    "ckpt_format": ("torch", "training checkpoints are written in Megatron-LM's torch format "
                             "(Megatron-LM loads them with --ckpt-format torch; "
                             "python -m megatron_patch.convert --ckpt-format torch_dist "
                             "converts them)"),
}


def _given(flag: str, value) -> str:
    return flag if value is True else f"{flag} {' '.join(map(str, value))}" \
        if isinstance(value, list) else f"{flag} {value}"


def no_effect_notes(args) -> list[str]:
    """One line per given flag (or value) that does nothing here; ValueError naming a refused
    one."""
    for flag, (_, allowed, why) in REFUSED.items():
        value = getattr(args, _dest(flag))
        if value is not None and value != allowed:
            raise ValueError(f"{_given(flag, value)}: {why}")
    notes = [f"{flag} has no effect here: {why}" for flag, (_, why) in NO_EFFECT.items()
             if getattr(args, _dest(flag)) is not None]
    for dest, (honoured, why) in OTHER_VALUES.items():
        value = getattr(args, dest)
        if value is not None and value != honoured:
            notes.append(f"--{dest.replace('_', '-')} {value} has no effect here: {why}")
    return notes


def given_architecture(args) -> dict:
    """Architecture key -> (flag as given, value) for the architecture flags on the command
    line."""
    given = {}
    for spec in ARCHITECTURE_FLAGS:
        value = getattr(args, spec.dest, None)
        if value is None or value is False:
            continue
        text = spec.flag if value is True else f"{spec.flag} {value}"
        for key, implied in spec.implies(value).items():
            given[key] = (text, implied)
    return given


def family_architecture(family) -> dict:
    """A family's value for every architecture key (Megatron-LM's default where the family's
    declaration does not name the key)."""
    return {**MEGATRON_DEFAULTS, **{k: v for k, v in family.architecture.items()
                                    if k in MEGATRON_DEFAULTS}}


def check_architecture(args, family) -> None:
    """Refuse architecture flags that contradict ``family``, naming the flag."""
    fixed = family_architecture(family)
    for key, (text, value) in given_architecture(args).items():
        if fixed[key] != value:
            raise ValueError(f"{text} contradicts the {family.name} family, which has "
                             f"{_request(key, fixed[key])}; drop the flag, or choose the "
                             f"--model-family it describes")


# What no Megatron-LM flag can ask for: families with these need --model-family.
_NOT_IN_MEGATRON_LM = dict(embedding_norm=True, parallel_attention=True, deepnorm=True,
                          post_sublayer_norms=True)


def describable(family) -> bool:
    """Whether Megatron-LM's flags can describe ``family`` (no ALiBi, embedding norm, parallel
    attention, DeepNorm, sublayer output norms or position offset)."""
    arch = family.architecture
    return (arch.get("position_embedding_type") in ("rope", "learned_absolute", "none")
            and not arch.get("position_embedding_offset")
            and not any(arch.get(k) == v for k, v in _NOT_IN_MEGATRON_LM.items()))


def infer_family(args, families):
    """The one registered family whose architecture the flags describe (Megatron-LM's defaults
    for the flags not given), among those Megatron-LM's flags can describe at all."""
    described = {**MEGATRON_DEFAULTS, **{k: v for k, (_, v) in given_architecture(args).items()}}
    families = [f for f in families if describable(f)]
    differences = {}
    for family in families:
        fixed = family_architecture(family)
        differences[family.name] = sorted({_request(k, fixed[k]) for k in MEGATRON_DEFAULTS
                                           if fixed[k] != described[k]})
    matches = [f for f in families if not differences[f.name]]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"the architecture flags fit several families "
                         f"({', '.join(f.name for f in matches)}); give --model-family")
    hints = "; ".join(f"{name} needs {' '.join(need)}" for name, need in differences.items())
    raise ValueError(f"no --model-family, and no registered family has the architecture these "
                     f"flags describe (Megatron-LM's defaults for the flags not given): {hints}. "
                     f"Add those flags or give --model-family")


# README's table: (flag, status, what happens). "honoured" rows are the flags arguments.py
# implements with Megatron-LM's meaning.
HONOURED = (
    "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
    "--group-query-attention", "--num-query-groups", "--kv-channels", "--seq-length",
    "--max-position-embeddings", "--vocab-size", "--rotary-base", "--norm-epsilon",
    "--use-rope-scaling", "--rope-scaling-factor", "--untie-embeddings-and-output-weights",
    "--init-method-std", "--hidden-dropout", "--attention-dropout", "--attention-backend",
    "--use-flash-attn", "--transformer-impl", "--tokenizer-type", "--tokenizer-model",
    "--make-vocab-size-divisible-by", "--tensor-model-parallel-size",
    "--pipeline-model-parallel-size", "--sequence-parallel", "--use-distributed-optimizer",
    "--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size",
    "--grad-reduce-in-bf16", "--bf16", "--fp16", "--loss-scale", "--initial-loss-scale",
    "--min-loss-scale", "--loss-scale-window", "--hysteresis", "--recompute-granularity",
    "--recompute-method", "--recompute-num-layers", "--recompute-activations",
    "--micro-batch-size", "--global-batch-size", "--train-iters", "--train-samples", "--seed",
    "--optimizer", "--lr", "--min-lr", "--decoupled-lr", "--decoupled-min-lr", "--lr-decay-style",
    "--lr-warmup-iters", "--lr-warmup-samples", "--lr-warmup-fraction", "--lr-decay-iters",
    "--lr-decay-samples", "--lr-wsd-decay-style", "--lr-wsd-decay-iters",
    "--lr-wsd-decay-samples", "--weight-decay", "--start-weight-decay", "--end-weight-decay",
    "--weight-decay-incr-style", "--adam-beta1", "--adam-beta2", "--adam-eps", "--sgd-momentum",
    "--clip-grad", "--calculate-per-token-loss", "--data-path", "--split", "--data-cache-path",
    "--mock-data", "--num-workers", "--eod-mask-loss", "--reset-position-ids",
    "--reset-attention-mask", "--no-mmap-bin-files", "--save", "--load", "--save-interval",
    "--exit-interval", "--exit-duration-in-mins", "--ckpt-format", "--finetune", "--no-load-optim",
    "--no-load-rng", "--eval-interval", "--eval-iters", "--log-interval", "--tensorboard-dir",
    "--distributed-timeout-minutes", "--use-cpu-initialization", "--profile",
    "--use-pytorch-profiler", "--profile-step-start", "--profile-step-end", "--profile-ranks",
    "--no-gradient-accumulation-fusion", "--fp8-format", "--fp8-recipe", "--fp8-margin",
    "--fp8-amax-history-len", "--fp8-amax-compute-algo",
)


def flag_table() -> list[tuple[str, str, str]]:
    """Every Megatron-LM flag the trainer accepts, with its status here."""
    rows = [(flag, "honoured", "") for flag in HONOURED]
    rows += [(f.flag, "checked", "must agree with the family; picks it without --model-family")
             for f in ARCHITECTURE_FLAGS]
    rows += [(flag, "honoured (always)", why) for flag, (_, why) in ALWAYS.items()]
    rows += [(flag, "no effect", why) for flag, (_, why) in NO_EFFECT.items()]
    rows += [(flag, "refused", why) for flag, (_, _, why) in REFUSED.items()]
    return rows
