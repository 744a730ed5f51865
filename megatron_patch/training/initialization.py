"""Random initial weights that do not depend on the parallel layout.

megatron-core draws each weight from one running RNG stream, so what a tensor gets depends on
what was drawn before it: PP2 builds only half the layers per rank, and the embedding's padded
size changes with TP (a tiny llama from the same --seed measured iteration-1 loss 4.876 at TP1,
4.859 at PP2). Here every tensor is drawn in the HF layout of the family's weight table (one
tensor per HF name, the true vocabulary without padding rows) from a generator seeded by its
name and --seed, then joined and cut exactly as a converted checkpoint is (the table's op, then
this rank's TP piece). So TP, PP and DP runs start from the same model, and a random model is
the same function as the HF checkpoint that the same draws would make.

Which tensors are drawn and how follows megatron-core: the weights it initialises with
``config.init_method`` (column-parallel linears, embeddings) or ``output_layer_init_method``
(row-parallel linears: the attention projection and the second MLP matrix); biases and norms
keep their constructors' constant values.
"""
from __future__ import annotations

import hashlib

import torch

from megatron_patch.convert.engine import dims_for, stage_bindings
from megatron_patch.convert.sharding import GroupedQKV, shard_tensor


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for tensor ``name`` (an HF name: global layer numbers, no padding)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _is_drawn(model: torch.nn.Module, name: str, param: torch.Tensor) -> bool:
    """megatron-core initialises this parameter randomly: a weight of a tensor-parallel linear
    or embedding, or of a plain embedding (learned positions)."""
    if name.endswith("bias"):
        return False
    module = model.get_submodule(name.rpartition(".")[0])
    return bool(getattr(param, "tensor_model_parallel", False)) or \
        isinstance(module, torch.nn.Embedding)


def _draw(shape, init_method, seed: int, device: torch.device) -> torch.Tensor:
    """``init_method`` applied to a new fp32 tensor under its own seed; the process's RNG
    streams (dropout, data order) are left as they were."""
    tensor = torch.empty(shape, dtype=torch.float32, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        init_method(tensor)
    return tensor


@torch.no_grad()
def initialize_weights(model: torch.nn.Module, family, model_args, padded_vocab: int, config,
                       seed: int, tp: int, tp_rank: int, pp: int, pp_rank: int) -> int:
    """Redraw this stage's random weights (bare GPTModel, before any wrapper or optimizer).
    Returns how many tensors were drawn."""
    dims = dims_for(model_args, padded_vocab)
    params = dict(model.named_parameters())
    bound = {b.megatron_local: b for b in stage_bindings(family, model_args, pp, pp_rank)}
    drawn = 0
    for name, param in params.items():
        if not _is_drawn(model, name, param):
            continue
        if name not in bound:
            raise ValueError(f"{family.name}: parameter '{name}' is not in the weight table")
        binding = bound[name]
        row_parallel = getattr(param, "partition_dim", 0) == 1
        init = config.output_layer_init_method if row_parallel else config.init_method
        full_shape = list(param.shape)
        if binding.row.tp is not None:
            full_shape[binding.row.tp.dim] *= tp
        if isinstance(binding.row.tp, GroupedQKV):  # without the key/value copies of TP > groups
            heads = dims.num_attention_heads + 2 * dims.num_query_groups
            full_shape[0] = heads * dims.kv_channels
        hf_shapes = [t.shape for t in binding.row.op.to_hf(
            torch.empty(full_shape, device="meta"), dims)]
        parts = [_draw(shape, init, tensor_seed(seed, hf_name), param.device)
                 for shape, hf_name in zip(hf_shapes, binding.hf)]
        full = binding.row.op.to_megatron(parts, dims)
        param.copy_(shard_tensor(full, binding.row.tp, tp, tp_rank, dims))
        drawn += 1
    return drawn
