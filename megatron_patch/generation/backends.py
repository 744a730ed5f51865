"""How a batch's forward passes are run: the reference without a cache, and megatron-core's own
KV cache (``StaticInferenceContext``). ``static_cache.py`` and ``cuda_graphs.py`` add our static
cache and its CUDA-graph replay; ``engine.BACKENDS`` names them all.

Every backend has the same two calls, so the generation loop (engine.py) never knows which one
runs: ``start(tokens, valid)`` runs the left-padded prompts and ``step(tokens)`` one new token per
row; both return the logits of the last position, [batch, padded vocab], gathered over the
tensor-parallel ranks. Greedy decoding calls ``step_greedy``, which returns the argmax instead.
"""
from __future__ import annotations

import torch

from megatron_patch.generation.batching import causal_padding_mask, decode_mask, positions_of


class Backend:
    """A generation backend over one GPTModel (whole model on this rank: no pipeline stages)."""

    def __init__(self, model, max_length: int):
        self.model = model
        self.max_length = max_length

    def start(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Run left-padded prompts ``tokens`` [b, s] (``valid`` False on padding); returns the
        last position's logits [b, padded vocab]."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row ([b]); returns the new position's logits."""
        raise NotImplementedError

    def step_greedy(self, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """:meth:`step`, then each row's most likely token among the first ``vocab_size``
        (the engine's greedy loop; the CUDA-graph backend runs both in one graph)."""
        return self.step(tokens)[:, :vocab_size].argmax(dim=-1)

    def _check_room(self, length: int) -> None:
        if length > self.max_length:
            raise ValueError(f"sequence of {length} tokens exceeds --seq-length "
                             f"{self.max_length}")


class UncachedBackend(Backend):
    """The reference: every step re-runs the whole sequence (no KV cache)."""

    def start(self, tokens, valid):
        self._check_room(tokens.size(1))
        self.tokens, self.valid = tokens, valid
        return self._forward()

    def step(self, tokens):
        self.tokens = torch.cat([self.tokens, tokens[:, None]], dim=1)
        self.valid = torch.cat([self.valid, torch.ones_like(self.valid[:, :1])], dim=1)
        self._check_room(self.tokens.size(1))
        return self._forward()

    def _forward(self):
        ids = getattr(self.model, "prefix_lm_ids", None)
        if ids:  # GLM: the whole sequence's prefix-LM mask and positions, every step
            from megatron_patch.layers.glm_positions import generation_inputs, uses_rotary_2d

            mask, positions = generation_inputs(self.tokens, self.valid, ids,
                                                uses_rotary_2d(self.model))
        else:
            mask, positions = causal_padding_mask(self.valid), positions_of(self.valid)
        logits = self.model(self.tokens, positions, mask, runtime_gather_output=True)
        return logits[:, -1]


class McoreBackend(Backend):
    """megatron-core's KV cache: ``StaticInferenceContext`` through ``GPTModel.forward``.

    Prefill fills the cache's first ``s`` slots; each step appends one slot. All rows share the
    slot numbering, so rotary positions count slots: a padded row's positions are shifted by its
    padding, which rotary attention does not see (it depends on distances only)."""

    def start(self, tokens, valid):
        from megatron.core.inference.contexts import StaticInferenceContext

        batch, width = tokens.shape
        self._check_room(width)
        self.context = StaticInferenceContext(batch, self.max_length)
        self.key_valid = torch.zeros(batch, self.max_length, dtype=torch.bool,
                                     device=tokens.device)
        self.key_valid[:, :width] = valid
        # In megatron-core 0.16.1 inference must gather the TP logits (it asserts so).
        logits = self.model(tokens, positions_of(valid), causal_padding_mask(valid),
                            inference_context=self.context, runtime_gather_output=True)
        self.positions = positions_of(valid)[:, -1:] + 1
        self.context.sequence_len_offset += width
        self.context.enable_decode_mode()
        return logits[:, -1]

    def step(self, tokens):
        slot = self.context.sequence_len_offset
        self._check_room(slot + 1)
        self.key_valid[:, slot] = True
        logits = self.model(tokens[:, None], self.positions, decode_mask(self.key_valid, slot + 1),
                            inference_context=self.context, runtime_gather_output=True)
        self.context.sequence_len_offset += 1
        self.positions = self.positions + 1
        return logits[:, -1]
