"""What some families add around megatron-core's LanguageModelEmbedding, attached to a built
GPTModel's ``embedding`` (first pipeline stage) without changing megatron-core:

* an embedding LayerNorm (BLOOM's ``word_embeddings_layernorm``): a norm module registered as
  ``embedding.word_embeddings_layernorm`` (so it is in the state dict and the optimizer) and
  applied to the embedding's output;
* learned positions that start at a row offset (OPT's ``embed_positions`` keeps 2 rows before
  position 0): the table has ``max_positions + offset`` rows and the positions fed to it are
  shifted by the offset, so the extra rows stay in the checkpoint as they were.
"""
from __future__ import annotations

import torch

from megatron_patch.layers.norms import Norm


def add_embedding_norm(embedding: torch.nn.Module, config, eps: float) -> None:
    """Normalise the embedding's output with a new ``word_embeddings_layernorm``."""
    embedding.word_embeddings_layernorm = Norm(config, config.hidden_size, eps=eps)
    embedding.register_forward_hook(
        lambda module, inputs, output: module.word_embeddings_layernorm(output))


def offset_positions(embedding: torch.nn.Module, offset: int) -> None:
    """Look positions up ``offset`` rows further down the learned table."""
    def shift(module, args, kwargs):
        if "position_ids" in kwargs and kwargs["position_ids"] is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + offset
        elif len(args) > 1 and args[1] is not None:
            args = (args[0], args[1] + offset, *args[2:])
        return args, kwargs

    embedding.register_forward_pre_hook(shift, with_kwargs=True)
