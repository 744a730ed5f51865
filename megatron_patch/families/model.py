"""Build megatron-core's TransformerConfig, layer spec and GPTModel for a family's ModelArgs."""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

from megatron_patch import compat
from megatron_patch.families.base import Family, ModelArgs

# ModelArgs.activation -> the function megatron-core's MLP applies (to the gate half when gated)
_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu,
                "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}
# ModelArgs.position_embedding_type -> GPTModel's (ALiBi lives in core attention instead)
_GPT_POSITIONS = {"rope": "rope", "learned_absolute": "learned_absolute", "alibi": "none",
                  "none": "none", "rope_2d": "none"}  # rope_2d: Rotary2DGPTModel's own angles
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(family: Family, args: ModelArgs, *, tensor_parallel: int = 1,
                       pipeline_parallel: int = 1, precision: str = "fp32", **overrides):
    """megatron-core ``TransformerConfig`` for one model and parallel layout.

    ``overrides`` are TransformerConfig fields (dropout, recompute, sequence_parallel, ...).
    Dropout defaults to 0, as in the HF families (Llama has none)."""
    compat.require_megatron_core()
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = PRECISION_DTYPES[precision]
    fields = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        # Fewer key/value groups than TP ranks: each rank holds a copy of its group's heads
        # (convert/sharding.py GroupedQKV; the copies' gradients: training/replicated_kv.py).
        num_query_groups=max(args.num_query_groups, tensor_parallel),
        kv_channels=args.kv_channels,
        layernorm_epsilon=args.norm_epsilon,
        normalization=args.normalization,
        gated_linear_unit=args.gated_linear_unit,
        activation_func=_ACTIVATIONS[args.activation],
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        rotary_interleaved=args.rotary_interleaved,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # Initialise the full weight on the CPU, then scatter: the same model whatever the TP.
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        # megatron-core 0.16's default "full" is its own deprecated spelling of [] and warns
        # on every config; [] is the same scope, without the warning.
        cuda_graph_scope=[],
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def layer_spec(family: Family, args: ModelArgs, config, attention: str = "sdpa"):
    """The family's transformer-layer spec: megatron-core's local spec with core attention
    through torch SDPA (``attention="local"`` keeps megatron-core's unfused
    DotProductAttention) and norms that support sequence parallelism."""
    if family.layer_spec is not None:
        return family.layer_spec(args, config)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_patch.layers.norms import Norm

    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=config.normalization))
    spec.submodules.input_layernorm = Norm
    spec.submodules.pre_mlp_layernorm = Norm
    if args.parallel_attention:  # differs from llama: attention and MLP read the same input
        from megatron.core.transformer.identity_op import IdentityOp

        from megatron_patch.layers.parallel_layer import ParallelAttentionMLPLayer

        spec.module = ParallelAttentionMLPLayer
        if args.parallel_attention_norms == 1:
            spec.submodules.pre_mlp_layernorm = IdentityOp
    if args.deepnorm:  # differs from llama: the residual is the scaled normalised input
        if args.parallel_attention or args.post_sublayer_norms:
            raise ValueError("deepnorm with parallel attention or sublayer norms is not supported")
        from megatron_patch.layers.deepnorm_layer import DeepNormLayer

        spec.module = DeepNormLayer
    if args.post_sublayer_norms:  # differs from llama: sublayer outputs are normalised too
        if args.parallel_attention:
            raise ValueError("post_sublayer_norms with parallel attention is not supported")
        from megatron_patch.layers.sandwich_norm_layer import SandwichNormLayer

        spec.module = SandwichNormLayer
    if attention not in ("sdpa", "local"):
        raise ValueError(f"unknown attention backend '{attention}' (sdpa or local)")
    if args.position_embedding_type == "alibi":
        if attention == "local":
            raise ValueError("ALiBi needs the sdpa attention backend: megatron-core's local "
                             "attention has no ALiBi (drop --attention-backend local)")
        from megatron_patch.layers.alibi_attention import ALiBiAttention

        spec.submodules.self_attention.submodules.core_attention = ALiBiAttention
    elif attention == "sdpa":
        from megatron_patch.layers.sdpa_attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def block_spec(family: Family, args: ModelArgs, config, attention: str = "sdpa"):
    """The decoder block of this pipeline stage: the layer spec repeated, and our final norm."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from megatron_patch.layers.norms import Norm

    layer = layer_spec(family, args, config, attention)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=Norm)


def build_gpt_model(family: Family, args: ModelArgs, config, padded_vocab_size: int,
                    pre_process: bool = True, post_process: bool = True,
                    attention: str = "sdpa"):
    """megatron-core ``GPTModel`` for one pipeline stage; on the last stage its logits past the
    true vocabulary (``args.vocab_size``) are -inf (layers/padded_vocab.py)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from megatron_patch.layers import embedding_extras
    from megatron_patch.layers.padded_vocab import mask_padded_logits

    factor = args.rope_scaling_factor
    model_class = GPTModel
    if args.position_embedding_type == "rope_2d":
        from megatron_patch.layers.rotary_2d_model import Rotary2DGPTModel as model_class
    model = model_class(
        config=config,
        transformer_layer_spec=block_spec(family, args, config, attention),
        vocab_size=padded_vocab_size,
        max_sequence_length=args.max_position_embeddings + args.position_embedding_offset,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=args.tie_embeddings,
        position_embedding_type=_GPT_POSITIONS[args.position_embedding_type],
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=factor is not None,
        rope_scaling_factor=factor or 8.0,
    )
    model.prefix_lm_ids = args.prefix_lm_ids  # GLM: generation builds its masks from them
    if pre_process and args.embedding_norm:
        embedding_extras.add_embedding_norm(model.embedding, config, args.norm_epsilon)
    if pre_process and args.position_embedding_offset:
        embedding_extras.offset_positions(model.embedding, args.position_embedding_offset)
    if post_process and args.reward_head:
        from megatron_patch.layers import reward_head

        reward_head.install(model, config)
    elif post_process:
        mask_padded_logits(model.output_layer, args.vocab_size, padded_vocab_size,
                           ps.get_tensor_model_parallel_rank(), config.tensor_model_parallel_size)
    return model
