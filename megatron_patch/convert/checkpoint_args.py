"""The ``args`` Megatron-LM keeps in its checkpoints: the ``argparse.Namespace`` of its command
line, in every ``torch`` rank file and in a ``torch_dist`` checkpoint's common state.

A checkpoint that Megatron-LM trained carries no megatron_patch metadata; its model's shape is
read from these args (:func:`metadata_from_args`), the family comes from ``--model-family``
and its architecture in the args must agree with the family's. The true vocabulary is not in
them (only the padded one): it comes from ``--vocab-size``, ``--tokenizer-path``, Megatron-LM's
NullTokenizer args, or the megatron_patch.json of a converted checkpoint that Megatron-LM
trained in place. Our own checkpoints carry the same args (:func:`megatron_lm_args`), so that
Megatron-LM's ``--use-checkpoint-args`` reads them.

Field names are the destinations of Megatron-LM core_v0.16.1's flags (``--norm-epsilon`` is
stored as ``layernorm_epsilon``, ``--apply-layernorm-1p`` as ``layernorm_zero_centered_gamma``,
``--disable-bias-linear`` as ``add_bias_linear``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os

from megatron_patch.convert.io_utils import CheckpointError
from megatron_patch.families.base import ModelArgs

# ModelArgs field <- Megatron-LM args field (each must be in the args).
SHAPE_FIELDS = (("num_layers", "num_layers"), ("hidden_size", "hidden_size"),
                ("ffn_hidden_size", "ffn_hidden_size"),
                ("num_attention_heads", "num_attention_heads"),
                ("max_position_embeddings", "max_position_embeddings"),
                ("norm_epsilon", "layernorm_epsilon"), ("rotary_base", "rotary_base"))
# Megatron-LM features that no ModelArgs describes, or that lay weights out in a way the engine
# does not read: (args field, its value when off, what it is). None, 0 and False mean off.
UNSUPPORTED = (
    ("squared_relu", False, "squared-ReLU MLPs"),
    ("quick_geglu", False, "quick-GeGLU MLPs"),
    ("qk_layernorm", False, "query/key layer norms"),
    ("layernorm_zero_centered_gamma", False, "zero-centred layer-norm weights (1p)"),
    ("apply_layernorm_1p", False, "zero-centred layer-norm weights (1p)"),
    ("rotary_interleaved", False, "interleaved rotary embeddings"),
    ("apply_residual_connection_post_layernorm", False, "post-layer-norm residuals"),
    ("num_experts", None, "mixture-of-experts layers"),
    ("virtual_pipeline_model_parallel_size", None, "virtual pipeline stages"),
    ("num_layers_per_virtual_pipeline_stage", None, "virtual pipeline stages"),
    ("decoder_first_pipeline_num_layers", None, "an uneven first pipeline stage"),
    ("decoder_last_pipeline_num_layers", None, "an uneven last pipeline stage"),
    ("pipeline_model_parallel_layout", None, "a custom pipeline layout"),
    ("account_for_embedding_in_pipeline_split", False, "an uneven pipeline split"),
    ("account_for_loss_in_pipeline_split", False, "an uneven pipeline split"),
    ("multi_latent_attention", False, "multi-latent attention"),
    ("mtp_num_layers", None, "multi-token prediction layers"),
    ("heterogeneous_layers_config_path", None, "heterogeneous layers"),
    ("rotary_seq_len_interpolation_factor", None, "rotary sequence-length interpolation"),
)


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """What the command line says about a checkpoint's true vocabulary (``--vocab-size``,
    ``--tokenizer-path``); needed where the checkpoint does not say it itself."""

    size: int | None = None
    tokenizer_path: str | None = None


def _get(args, name: str, where: str):
    if not hasattr(args, name) or getattr(args, name) is None:
        raise CheckpointError(f"{where}: Megatron-LM's args have no '{name}'")
    return getattr(args, name)


def model_args_from(args, family, vocab_size: int, where: str) -> ModelArgs:
    """The model (shape and architecture) from Megatron-LM's ``args``, checked against what
    ``family`` fixes (``where``: the file, for messages)."""
    values = {ours: _get(args, theirs, where) for ours, theirs in SHAPE_FIELDS}
    heads = values["num_attention_heads"]
    groups = _get(args, "num_query_groups", where) if getattr(
        args, "group_query_attention", False) else heads
    factor = getattr(args, "rope_scaling_factor", None) or 8.0  # Megatron-LM's default
    architecture = architecture_of(args, where)
    defaults = {f.name: f.default for f in dataclasses.fields(ModelArgs)}
    for field, value in family.architecture.items():
        # Fields architecture_of lacks have no Megatron-LM option: its GPT has the default.
        text, given = architecture.get(field, (None, defaults[field]))
        if given != value:
            said = f"args.{text}" if text else f"GPT model has no {field} option ({given!r})"
            raise CheckpointError(f"{where}: Megatron-LM's {said} contradicts the "
                                  f"{family.name} family ({field} {value!r}); give the "
                                  f"--model-family that Megatron-LM trained")
    return ModelArgs(
        family=family.name, vocab_size=vocab_size, num_query_groups=groups,
        kv_channels=getattr(args, "kv_channels", None) or values["hidden_size"] // heads,
        tie_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        rope_scaling_factor=float(factor) if getattr(args, "use_rope_scaling", False) else None,
        **{field: value for field, (_, value) in architecture.items()},
        **{**values, "rotary_base": float(values["rotary_base"]),
           "norm_epsilon": float(values["norm_epsilon"])})


def architecture_of(args, where: str) -> dict:
    """ModelArgs architecture field -> (the args that decide it, as they read; its value).
    Absent args take Megatron-LM's defaults, as its own loader does; what ModelArgs cannot
    describe is an error naming the args field."""
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    for name, _, what in UNSUPPORTED:
        if get(name) not in (None, 0, False):
            raise CheckpointError(f"{where}: args.{name} {get(name)!r}: not supported "
                                  f"({what})")
    bias = get("add_bias_linear", not get("disable_bias_linear", False))
    activation = "silu" if get("swiglu") else "gelu_tanh" if get("openai_gelu") else "gelu"
    position = "rope" if get("use_rotary_position_embeddings") else \
        get("position_embedding_type", "learned_absolute")
    if position not in ("rope", "learned_absolute", "none"):
        raise CheckpointError(f"{where}: args.position_embedding_type {position!r} is not "
                              f"supported (rope, learned_absolute or none)")
    return {
        "normalization": (f"normalization {get('normalization', 'LayerNorm')!r}",
                          get("normalization", "LayerNorm")),
        "gated_linear_unit": (f"swiglu {bool(get('swiglu'))}", bool(get("swiglu"))),
        "activation": (f"swiglu {bool(get('swiglu'))} (openai_gelu "
                       f"{bool(get('openai_gelu'))})", activation),
        "add_bias_linear": (f"add_bias_linear {bias}", bias),
        "add_qkv_bias": (f"add_qkv_bias {bool(get('add_qkv_bias'))}", bool(get("add_qkv_bias"))),
        "position_embedding_type": (f"position_embedding_type {position!r}", position),
        "rotary_percent": (f"rotary_percent {get('rotary_percent', 1.0)}",
                           float(get("rotary_percent", 1.0))),
    }


def count_tokenizer(path: str) -> int:
    """Tokens (added ones included) of an HF tokenizer directory or a SentencePiece file."""
    from megatron_patch.convert.vocab_rows import tokenizer_tokens

    if not os.path.exists(path):
        raise CheckpointError(f"--tokenizer-path '{path}' does not exist")
    return tokenizer_tokens("", {"tokenizer": {"path": os.path.abspath(path)}})


def true_vocabulary(args, vocabulary: Vocabulary, stored: int | None, where: str
                    ) -> tuple[int, str]:
    """(the true vocabulary, where it came from). Every source given must agree: the flags,
    ``stored`` (a megatron_patch.json's) and Megatron-LM's NullTokenizer args (vocab_size + 1
    tokens, its end-of-document token last)."""
    sources = []
    if vocabulary.size is not None:
        sources.append((f"--vocab-size {vocabulary.size}", vocabulary.size))
    if vocabulary.tokenizer_path:
        tokens = count_tokenizer(vocabulary.tokenizer_path)
        sources.append((f"--tokenizer-path {vocabulary.tokenizer_path} ({tokens} tokens)", tokens))
    if stored is not None:
        sources.append((f"megatron_patch.json (vocab_size {stored})", stored))
    if getattr(args, "tokenizer_type", None) == "NullTokenizer" and \
            getattr(args, "vocab_size", None) is not None:
        sources.append((f"Megatron-LM's args (NullTokenizer with vocab_size {args.vocab_size}: "
                        f"{args.vocab_size + 1} tokens)", args.vocab_size + 1))
    if not sources:
        raise CheckpointError(
            f"{where}: the true vocabulary is unknown (Megatron-LM's args give only "
            f"padded_vocab_size {getattr(args, 'padded_vocab_size', None)}; its tokenizer: "
            f"args.tokenizer_type {getattr(args, 'tokenizer_type', None)}, "
            f"args.tokenizer_model {getattr(args, 'tokenizer_model', None)}): give "
            f"--tokenizer-path (that tokenizer's directory) or --vocab-size")
    for text, value in sources[1:]:
        if value != sources[0][1]:
            raise CheckpointError(f"{where}: {sources[0][0]} contradicts {text}")
    return sources[0][1], sources[0][0]


def dtype_of(args) -> str:
    """The weights' dtype Megatron-LM trained with (params_dtype, else --bf16/--fp16)."""
    dtype = getattr(args, "params_dtype", None)
    if dtype is not None and str(dtype).startswith("torch."):
        return str(dtype).replace("torch.", "")
    return "bfloat16" if getattr(args, "bf16", False) else \
        "float16" if getattr(args, "fp16", False) else "float32"


def _shape_note(ours: str) -> str:
    theirs = dict(SHAPE_FIELDS).get(ours, {"tie_embeddings": "untie_embeddings_and_output_"
                                           "weights", "rope_scaling_factor": "use_rope_scaling"
                                           "/rope_scaling_factor"}.get(ours, ours))
    return f"args.{theirs}"


def check_against_metadata(model_args: ModelArgs, stored: dict, where: str) -> None:
    """The shape in Megatron-LM's args must be the one a megatron_patch.json beside them
    records (a converted checkpoint that Megatron-LM trained in place)."""
    for field, value in model_args.to_dict().items():
        if field in stored and field != "vocab_size" and stored[field] != value:
            raise CheckpointError(f"{where}: Megatron-LM's {_shape_note(field)} gives {field} "
                                  f"{value}, megatron_patch.json {stored[field]}")


def metadata_from_args(args, family, vocabulary: Vocabulary, root_meta: dict | None,
                       ckpt_format: str, where: str) -> tuple[dict, str]:
    """(megatron_patch metadata, a note saying where it came from) for a checkpoint that
    Megatron-LM wrote: shape, layout and dtype from its ``args``; family, true vocabulary, HF
    config and tokenizer from the command line and any ``root_meta`` (megatron_patch.json)."""
    root_meta = root_meta or {}
    vocab, source = true_vocabulary(args, vocabulary, root_meta.get("model_args", {}).get(
        "vocab_size"), where)
    model_args = model_args_from(args, family, vocab, where)
    check_against_metadata(model_args, root_meta.get("model_args", {}), where)
    padded, extra = _get(args, "padded_vocab_size", where), root_meta.get("extra_vocab_size", 0)
    if vocab + extra > padded:
        raise CheckpointError(f"{where}: {source} is more than the embedding's "
                              f"args.padded_vocab_size {padded} rows"
                              + (f" less {extra} extra rows" if extra else ""))
    tokenizer = root_meta.get("tokenizer")
    if vocabulary.tokenizer_path:
        tokenizer = {"type": family.tokenizer, "path": os.path.abspath(vocabulary.tokenizer_path)}
    meta = {
        "format": "megatron_patch/1", "family": family.name, "model_args": model_args.to_dict(),
        "padded_vocab_size": padded, "extra_vocab_size": extra,
        "make_vocab_size_divisible_by": getattr(args, "make_vocab_size_divisible_by", 128),
        "tensor_model_parallel_size": _get(args, "tensor_model_parallel_size", where),
        "pipeline_model_parallel_size": _get(args, "pipeline_model_parallel_size", where),
        "ckpt_format": ckpt_format, "hf_config": root_meta.get("hf_config"),
        "tokenizer": tokenizer, "dtype": dtype_of(args),
        "transformer_impl": getattr(args, "transformer_impl", "local"),
    }
    return meta, (f"model shape from Megatron-LM's args in {where} (no megatron_patch "
                  f"metadata), vocabulary {vocab} from {source}")


def megatron_lm_args(meta: dict) -> argparse.Namespace:
    """The ``args`` Megatron-LM stores, for our checkpoints (``--use-checkpoint-args``): the
    shape and the family's architecture under Megatron-LM's names."""
    m = meta["model_args"]
    arch = ModelArgs.from_dict(m)  # metadata from before the architecture fields: llama's
    return argparse.Namespace(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"],
        ffn_hidden_size=m["ffn_hidden_size"], num_attention_heads=m["num_attention_heads"],
        group_query_attention=m["num_query_groups"] != m["num_attention_heads"],
        num_query_groups=m["num_query_groups"], kv_channels=m["kv_channels"],
        max_position_embeddings=m["max_position_embeddings"],
        layernorm_epsilon=m["norm_epsilon"], rotary_base=m["rotary_base"],
        use_rope_scaling=m.get("rope_scaling_factor") is not None,
        rope_scaling_factor=m.get("rope_scaling_factor") or 8.0,
        padded_vocab_size=meta["padded_vocab_size"],
        make_vocab_size_divisible_by=meta["make_vocab_size_divisible_by"],
        untie_embeddings_and_output_weights=not m["tie_embeddings"],
        tensor_model_parallel_size=meta["tensor_model_parallel_size"],
        pipeline_model_parallel_size=meta["pipeline_model_parallel_size"],
        position_embedding_type=arch.position_embedding_type,
        use_rotary_position_embeddings=arch.position_embedding_type == "rope",
        rotary_percent=arch.rotary_percent, normalization=arch.normalization,
        swiglu=arch.gated_linear_unit and arch.activation == "silu",
        openai_gelu=arch.activation == "gelu_tanh", add_bias_linear=arch.add_bias_linear,
        add_qkv_bias=arch.add_qkv_bias,
        transformer_impl=meta.get("transformer_impl", "local"),
        ckpt_format=meta.get("ckpt_format", "torch"),
    )
