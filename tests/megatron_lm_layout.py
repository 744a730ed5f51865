"""Checkpoints laid out as Megatron-LM core_v0.16.1 saves them, built with megatron-core's own
model and save paths (CI has no Megatron-LM checkout).

What Megatron-LM writes was read off its own ``megatron.training.checkpointing.save_checkpoint``,
called on the CPU (compat's CPU mode) for a tiny llama whose Namespace came from its own parser
(``pretrain_gpt.py`` flags: ``--use-mcore-models --num-layers 2 --hidden-size 64
--ffn-hidden-size 160 --num-attention-heads 4 --group-query-attention --num-query-groups 2
--normalization RMSNorm --norm-epsilon 1e-5 --swiglu --disable-bias-linear
--position-embedding-type rope --untie-embeddings-and-output-weights --tokenizer-type
NullTokenizer --vocab-size 249 --bf16 ...``), at TP1/PP1 and TP2/PP2, in both formats:

* ``torch``: ``latest_checkpointed_iteration.txt`` ("3") and
  ``iter_0000003/mp_rank_TT[_PPP]/model_optim_rng.pt`` holding ``args`` (the Namespace, 655
  fields), ``checkpoint_version`` (3.0), ``iteration``, ``model``
  (``state_dict_for_save_checkpoint()``: the local spec's names, ``_extra_state`` None for each
  linear layer), ``optimizer`` (``optimizer``, ``fp32_from_fp16_params``),
  ``opt_param_scheduler``, ``rng_state`` (a list of one dict per data-parallel rank:
  ``random_rng_state``, ``np_rng_state``, ``torch_rng_state``, ``cuda_rng_state``,
  ``rng_tracker_states``) and ``num_floating_point_operations_so_far``;
* ``torch_dist``: ``iter_0000003/`` with ``.metadata``, ``__R_N.distcp``, ``metadata.json`` and
  ``common.pt`` (``args``, ``checkpoint_version``, ``content_metadata``, ``iteration``,
  ``num_floating_point_operations_so_far``, ``opt_param_scheduler``, ``optimizer``); the sharded
  part holds the model under megatron-core's keys (``decoder.layers.self_attention.linear_qkv.
  layer_norm_weight`` with a leading layer axis, ``..._extra_state/shard_L_N`` objects),
  ``optimizer.state.fp32_param.<key>`` and a ``rng_state`` object.

The Transformer Engine spec's names (``transformer_engine``) are the local ones renamed as
Megatron-LM's ``tools/checkpoint/schema_core.py`` lists them (``CoreTESchema``), with
``_extra_state`` entries as Transformer Engine saves them. Run under torchrun with TP x PP
processes: ``megatron_lm_layout.py OUT --tp 2 --pp 2 --ckpt-format torch --transformer-impl
transformer_engine``; it also writes ``OUT.logits.pt``, megatron-core's own logits (the first
``vocab`` columns) for :data:`TOKENS`.
"""
from __future__ import annotations

import argparse
import io
import os
import sys

import torch

# The true vocabulary: NullTokenizer --vocab-size 299 has 300 tokens (its eod last), padded to
# 384 rows at TP1 and 512 at TP2 (make_vocab_size_divisible_by 128 x TP).
VOCAB = 300
NULL_TOKENIZER_VOCAB_SIZE = VOCAB - 1
TOKENS = torch.Generator().manual_seed(0)
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=TOKENS)

# schema_core.py, CoreLocalSchema -> CoreTESchema (the layer names that differ).
TE_LAYER_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                  "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
                  "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
                  "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias"}
TE_EXTRA_STATE = ("self_attention.linear_qkv", "self_attention.core_attention",
                  "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def megatron_lm_args(tp=1, pp=1, ckpt_format="torch", transformer_impl="local", bf16=False,
                     tied=False, **changes) -> argparse.Namespace:
    """The fields of Megatron-LM's saved Namespace that describe the model, the tokenizer and
    the layout, with the values its parser and validate_args gave (others left out)."""
    from megatron_patch.tokenizers.vocab import padded_vocab_size

    dtype = torch.bfloat16 if bf16 else torch.float32
    fields = dict(
        num_layers=2, encoder_num_layers=2, hidden_size=64, ffn_hidden_size=160,
        num_attention_heads=4, group_query_attention=True, num_query_groups=2, kv_channels=16,
        seq_length=64, max_position_embeddings=128, normalization="RMSNorm",
        layernorm_epsilon=1e-05, layernorm_zero_centered_gamma=False, swiglu=True,
        squared_relu=False, quick_geglu=False, add_bias_linear=False, add_qkv_bias=False,
        position_embedding_type="rope", use_rotary_position_embeddings=False,
        add_position_embedding=True, rotary_base=10000, rotary_percent=1.0,
        rotary_interleaved=False, rotary_seq_len_interpolation_factor=None,
        use_rope_scaling=False, rope_scaling_factor=8.0, qk_layernorm=False,
        apply_residual_connection_post_layernorm=False, num_experts=None,
        multi_latent_attention=False, mtp_num_layers=None,
        untie_embeddings_and_output_weights=not tied, tokenizer_type="NullTokenizer",
        tokenizer_model=None, vocab_size=NULL_TOKENIZER_VOCAB_SIZE,
        make_vocab_size_divisible_by=128, padded_vocab_size=padded_vocab_size(VOCAB, 128, tp),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        transformer_pipeline_model_parallel_size=pp, context_parallel_size=1,
        expert_model_parallel_size=1, data_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, num_layers_per_virtual_pipeline_stage=None,
        decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
        pipeline_model_parallel_layout=None, account_for_embedding_in_pipeline_split=False,
        account_for_loss_in_pipeline_split=False, heterogeneous_layers_config_path=None,
        transformer_impl=transformer_impl, ckpt_format=ckpt_format,
        use_dist_ckpt=ckpt_format != "torch", params_dtype=dtype, main_params_dtype=torch.float32,
        bf16=bf16, fp16=False, hidden_dropout=0.1, attention_dropout=0.1, micro_batch_size=1,
        global_batch_size=1, train_iters=3, lr=0.0001, iteration=3, no_save_optim=None,
        no_save_rng=None, use_distributed_optimizer=False, seed=1234, mock_data=True)
    fields.update(changes)
    return argparse.Namespace(**fields)


def build_model(args):
    """megatron-core's GPTModel with its local spec (what Megatron-LM's gpt_builder builds for
    --transformer-impl local), random weights, one stage of the current layout."""
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, kv_channels=args.kv_channels,
        layernorm_epsilon=args.layernorm_epsilon, normalization=args.normalization,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        params_dtype=torch.float32, pipeline_dtype=torch.float32, bias_activation_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False)
    tied = not args.untie_embeddings_and_output_weights
    model = GPTModel(config, get_gpt_layer_local_spec(normalization=args.normalization),
                     vocab_size=args.padded_vocab_size,
                     max_sequence_length=args.max_position_embeddings,
                     pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=tied,
                     position_embedding_type="rope", rotary_base=args.rotary_base)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    sharded = torch.Generator().manual_seed(1 + tp_rank + 10 * pp_rank)
    replicated = torch.Generator().manual_seed(100 + pp_rank)  # the same on every TP rank
    with torch.no_grad():  # every rank's piece its own random values; norms around 1
        for name, param in model.named_parameters():
            split = getattr(param, "tensor_model_parallel", False)
            noise = torch.randn(param.shape, generator=sharded if split else replicated)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
        if model.share_embeddings_and_output_weights and args.pipeline_model_parallel_size > 1:
            _tie_output_layer(model)
    return model


def _tie_output_layer(model) -> None:
    """Tied embeddings with PP > 1: the last stage's output layer is a copy of the first
    stage's embedding, made as megatron-core makes it (LanguageModule.
    setup_embeddings_and_output_layer: zero the copy, all-reduce over the embedding group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.is_pipeline_first_stage():
        weight = model.embedding.word_embeddings.weight
    else:
        weight = model.output_layer.weight
        weight.zero_()
    dist.all_reduce(weight.data, group=ps.get_embedding_group())


@torch.no_grad()
def logits(model, args):
    """megatron-core's logits for TOKENS on the last stage's TP rank 0 (else None)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    model.eval()
    ids = TOKENS
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(ids.shape[1], ids.shape[0], args.hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(ids, positions, None, runtime_gather_output=True)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out[..., :VOCAB] if ps.get_tensor_model_parallel_rank() == 0 else None


def _te_state(state: dict) -> dict:
    """A local-spec state dict under the Transformer Engine spec's names, with the
    ``_extra_state`` entries TE saves (a BytesIO from TE 1.x, an empty uint8 tensor from 2.x)."""
    renamed, layers = {}, set()
    for key, value in state.items():
        prefix, _, rest = key.partition("decoder.layers.")
        number, _, name = rest.partition(".")
        if rest:
            layers.add(number)
            key = f"{prefix}decoder.layers.{number}.{TE_LAYER_NAMES.get(name, name)}"
        renamed[key] = value
    for number in sorted(layers, key=int):
        for i, module in enumerate(TE_EXTRA_STATE):
            renamed[f"decoder.layers.{number}.{module}._extra_state"] = \
                io.BytesIO(b"te fp8 meta") if i % 2 else torch.empty(0, dtype=torch.uint8)
    return renamed


def _rng_state() -> dict:
    import random

    import numpy as np

    return {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
            "rng_tracker_states": {}}


def _common(args) -> dict:
    scheduler = {"max_lr": 0.0001, "lr_warmup_steps": 0, "num_steps": 12, "lr_decay_style":
                 "linear", "lr_decay_steps": 3, "min_lr": 0, "start_wd": 0.01, "end_wd": 0.01,
                 "wd_incr_style": "constant", "wd_incr_steps": 3}
    return {"args": args, "checkpoint_version": 3.0, "iteration": 3,
            "opt_param_scheduler": scheduler, "num_floating_point_operations_so_far": 12345}


def save_torch(model, args, root: str) -> None:
    """One rank's model_optim_rng.pt, as Megatron-LM's save_checkpoint writes it."""
    from megatron.core import parallel_state as ps

    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    name = f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if args.pipeline_model_parallel_size > 1 else "")
    state = model.state_dict_for_save_checkpoint()
    state = {k: v.to(args.params_dtype) if torch.is_tensor(v) else v for k, v in state.items()}
    if args.transformer_impl == "transformer_engine":
        state = _te_state(state)
    payload = {**_common(args), "model": state, "rng_state": [_rng_state()],
               "optimizer": {"optimizer": {"state": {}, "param_groups": []},
                             "fp32_from_fp16_params": []}}
    os.makedirs(os.path.join(root, "iter_0000003", name))
    torch.save(payload, os.path.join(root, "iter_0000003", name, "model_optim_rng.pt"))


def save_torch_dist(model, args, root: str) -> None:
    """The collective dist_checkpointing.save of Megatron-LM's torch_dist format."""
    import dataclasses

    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    model.to(args.params_dtype)
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    sharded = model.sharded_state_dict(metadata=metadata)
    optimizer = {}
    for key, value in sharded.items():
        if isinstance(value, ShardedObject) and args.transformer_impl == "transformer_engine":
            value.data = io.BytesIO(b"te fp8 meta")
        elif isinstance(value, ShardedTensor):
            optimizer[key] = dataclasses.replace(value, key="optimizer.state.fp32_param."
                                                 + value.key, data=value.data.float().clone(),
                                                 dtype=torch.float32)
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    rng = ShardedObject("rng_state", [_rng_state()], (args.pipeline_model_parallel_size,
                        args.tensor_model_parallel_size), (pp, tp), replica_id=0)
    content = {k: v for k, v in metadata.items() if k != "dp_cp_group"}
    state = {**_common(args), "model": sharded, "rng_state": rng,
             "optimizer": {"state": optimizer, "param_groups": []},
             "content_metadata": content}
    path = os.path.join(root, "iter_0000003")
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(state, path, content_metadata=content)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ckpt-format", default="torch")
    parser.add_argument("--transformer-impl", default="local")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--tied", action="store_true")
    opts = parser.parse_args()
    from megatron_patch import compat
    import torch.distributed as dist

    compat.initialize_parallel(opts.tp, opts.pp)
    args = megatron_lm_args(opts.tp, opts.pp, opts.ckpt_format, opts.transformer_impl,
                            opts.bf16, opts.tied)
    model = build_model(args)
    out = logits(model, args)
    if out is not None:
        torch.save(out, opts.out + ".logits.pt")
    dist.barrier()
    if opts.ckpt_format == "torch":
        save_torch(model, args, opts.out)
    else:
        save_torch_dist(model, args, opts.out)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(opts.out, "latest_checkpointed_iteration.txt"), "w") as handle:
            handle.write("3")
    compat.destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
