"""Load a converted (or trained) Megatron checkpoint into a live megatron-core model, at any
tensor/pipeline layout: each rank takes its slice of every full tensor through the same
mapping table and sharding rules the converter uses."""
from __future__ import annotations

import torch

from megatron_patch.convert.engine import (dims_for, megatron_full_fetcher, open_megatron,
                                           stage_bindings)
from megatron_patch.convert.io_utils import CheckpointError
from megatron_patch.convert.sharding import shard_tensor
from megatron_patch.tokenizers.vocab import padded_vocab_size


def runtime_padded_vocab(meta: dict, tensor_parallel: int) -> int:
    """Embedding rows for a model built at ``tensor_parallel`` from this checkpoint."""
    return max(meta["padded_vocab_size"], padded_vocab_size(
        meta["model_args"]["vocab_size"], meta["make_vocab_size_divisible_by"], tensor_parallel,
        meta["extra_vocab_size"]))


@torch.no_grad()
def load_model_weights(model: torch.nn.Module, load: str, tp_rank: int, tp: int, pp_rank: int,
                       pp: int, reader_bundle=None, keep: tuple = ()) -> dict:
    """Copy this rank's slice of every tensor of checkpoint ``load`` into ``model`` (one
    pipeline stage, unwrapped GPTModel). Vocabulary rows go up to the model's own padding
    (megatron-core's ``GPTModel.vocab_size``): a checkpoint Megatron-LM saved at another TP
    pads differently. ``keep``: the model's parameters left as they are (a reward head new to
    a language model's checkpoint, whose output layer is then not read). Returns the
    checkpoint's metadata."""
    reader, family, args, meta = reader_bundle or open_megatron(load)
    padded = getattr(model, "vocab_size", None) or runtime_padded_vocab(meta, tp)
    fetch = megatron_full_fetcher(reader, args, meta, padded)
    dims = dims_for(args, padded)
    state = model.state_dict(keep_vars=True)
    expected = {k for k in state if not k.endswith("_extra_state") and k not in keep}
    for binding in stage_bindings(family, args, pp, pp_rank):
        if binding.megatron_local in keep:
            continue
        if binding.megatron_local not in state:
            raise CheckpointError(f"{load}: model has no parameter '{binding.megatron_local}'")
        piece = shard_tensor(fetch(binding), binding.row.tp, tp, tp_rank, dims)
        target = state[binding.megatron_local]
        if target.shape != piece.shape:
            raise CheckpointError(f"{load}: '{binding.megatron_local}' has shape "
                                  f"{tuple(piece.shape)} in the checkpoint, {tuple(target.shape)} "
                                  f"in the model")
        target.copy_(piece)
        expected.discard(binding.megatron_local)
    if expected:
        raise CheckpointError(f"{load}: no weights for {sorted(expected)}")
    return meta
