"""Our static KV cache: the same GPTModel modules and weights, with the cache behind each layer's
core attention and rotary angles given per row.

megatron-core's ``StaticInferenceContext`` (backends.McoreBackend) keeps the write offset as a
Python int and slices the cache with it, so every decode step is a different program and cannot
be replayed from a CUDA graph. Here everything that changes between decode steps is a device
tensor (``DecodeState``): the slot each row writes, its rotary position, which cache slots hold
real tokens. One decode step is then a fixed sequence of kernels that cuda_graphs.py captures
once and replays. On CPU this backend runs eagerly; the tests compare it token for token with
megatron-core's cache, the uncached reference and HF transformers.

What differs from ``GPTModel.forward`` (see :func:`forward_with_rope`): rotary angles are
looked up per row from the table megatron-core's ``RotaryEmbedding`` builds (rope scaling
included), so padded rows get their true positions; the attention mask comes from
``DecodeState.key_valid``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from megatron_patch.generation import decode_kernels
from megatron_patch.generation.backends import Backend
from megatron_patch.generation.batching import causal_padding_mask, decode_mask, positions_of
from megatron_patch.layers.glm_positions import generation_inputs, rotary_2d, uses_rotary_2d


class CacheHolder:
    """What the wrapped attentions of one model do during a forward: while ``active``, write
    this forward's keys/values at cache ``slots`` (a device tensor, shared by all rows) and
    attend over the first ``window`` slots (a Python int: one CUDA graph per window)."""

    def __init__(self):
        self.active = False
        self.slots: torch.Tensor | None = None
        self.window = 0
        self.batch = 0
        self.allocation = 0  # counts allocations: a backend's graphs hold the buffers of one
        self.kernels = False  # decode steps through megatron_patch.kernels (decode_kernels.py)


class CachedCoreAttention(torch.nn.Module):
    """A layer's core attention (SDPA) behind its static cache. The cache tensors are
    non-persistent buffers of this module, [max_length, batch, query groups, head dim]: not in
    the state dict, and inputs (not constants) to torch.compile, so one compiled layer serves
    every layer. The keys reaching it already carry their rotary rotation."""

    def __init__(self, inner: torch.nn.Module, holder: CacheHolder):
        super().__init__()
        self.inner = inner
        self.holder = holder
        self.register_buffer("cached_keys", None, persistent=False)
        self.register_buffer("cached_values", None, persistent=False)

    def forward(self, query, key, value, attention_mask, **kwargs):
        holder = self.holder
        if holder.active:
            self.cached_keys.index_copy_(0, holder.slots, key)
            self.cached_values.index_copy_(0, holder.slots, value)
            one_token = query.size(0) == 1 and query.size(1) <= decode_kernels.MAX_BATCH
            if holder.kernels and one_token:
                return self._decode_attention(query, attention_mask)
            key = self.cached_keys[: holder.window]
            value = self.cached_values[: holder.window]
        return self.inner(query, key, value, attention_mask, **kwargs)

    def _decode_attention(self, query, attention_mask):
        """One query per row through the flash-decoding kernel: [1, b, h, d] -> [1, b, h x d]."""
        batch = query.size(1)
        out = torch.ops.megatron_patch.decode_attention(
            query[0].contiguous(), self.cached_keys, self.cached_values,
            attention_mask.reshape(batch, -1), self.holder.window, self.inner.softmax_scale,
            last_slot=self.holder.slots)
        return out.view(1, batch, -1)


def install_static_cache(model) -> CacheHolder:
    """Wrap each layer's core attention of ``model`` once; returns the shared holder. The
    wrappers pass through while the holder is inactive (other backends run on the same
    model)."""
    holder = getattr(model, "_static_cache_holder", None)
    if holder is None:
        holder = CacheHolder()
        for layer in model.decoder.layers:
            attention = layer.self_attention
            attention.core_attention = CachedCoreAttention(attention.core_attention, holder)
        model._static_cache_holder = holder
    return holder


def allocate_static_cache(model, holder: CacheHolder, batch: int, max_length: int) -> None:
    """Zeroed cache buffers for ``batch`` rows in every wrapped attention."""
    config = model.config
    groups = config.num_query_groups // config.tensor_model_parallel_size
    shape = (max_length, batch, groups, config.kv_channels)
    device = next(model.parameters()).device
    for layer in model.decoder.layers:
        wrapper = layer.self_attention.core_attention
        wrapper.cached_keys = torch.zeros(shape, dtype=config.params_dtype, device=device)
        wrapper.cached_values = torch.zeros(shape, dtype=config.params_dtype, device=device)
    holder.batch = batch
    holder.allocation += 1


def release_static_cache(model) -> None:
    """Free the cache buffers of ``model`` (an RLHF run trains between rollouts); a backend
    used afterwards allocates them again."""
    holder = getattr(model, "_static_cache_holder", None)
    if holder is None:
        return
    for layer in model.decoder.layers:
        wrapper = layer.self_attention.core_attention
        wrapper.cached_keys = wrapper.cached_values = None
    holder.batch = 0
    holder.allocation += 1


def forward_with_rope(model, tokens, positions, rope, mask, run_layer=None) -> torch.Tensor:
    """``GPTModel.forward`` for inference with explicit rotary angles ``rope`` [s, b, 1, dim];
    returns the last position's logits [b, vocab], gathered over tensor-parallel ranks.

    ``run_layer(layer, hidden, mask, rope) -> hidden`` replaces the decoder block's own loop
    over its layers (the compiled decode step runs each layer through one compiled function)."""
    hidden = model.embedding(input_ids=tokens, position_ids=positions)
    if run_layer is None:
        hidden = model.decoder(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rope)
    else:
        for layer in model.decoder.layers:
            hidden = run_layer(layer, hidden, mask, rope)
        hidden = model.decoder.final_layernorm(hidden)
    weight = (model.shared_embedding_or_output_weight()
              if model.share_embeddings_and_output_weights else None)
    logits, _ = model.output_layer(hidden[-1:], weight=weight, runtime_gather_output=True)
    return logits[-1]


@dataclass
class DecodeState:
    """Device tensors a decode step reads and advances (the step's only inputs)."""

    tokens: torch.Tensor      # [b, 1] this step's input token of each row
    slot: torch.Tensor        # [1] cache slot this step writes (shared by all rows)
    positions: torch.Tensor   # [b, 1] rotary position of each row's token ([b, 2, 1]: GLM's 2-D)
    key_valid: torch.Tensor   # [b, max_length] slots holding real tokens

    @classmethod
    def empty(cls, batch: int, max_length: int, device, two_d: bool = False) -> "DecodeState":
        """Zeroed state for ``batch`` rows (``StaticBackend.start`` fills it)."""
        long = dict(dtype=torch.long, device=device)
        positions = torch.zeros(batch, 2, 1, **long) if two_d else torch.zeros(batch, 1, **long)
        return cls(torch.zeros(batch, 1, **long), torch.zeros(1, **long), positions,
                   torch.zeros(batch, max_length, dtype=torch.bool, device=device))


class StaticBackend(Backend):
    """Static KV cache with tensor positions, run eagerly (the CUDA-graph backend replays
    :meth:`decode_step`). A decode step reads the cache up to the next multiple of
    ``window_bucket`` slots; the slots past the current one are masked."""

    def __init__(self, model, max_length: int, window_bucket: int = 1, kernels: bool = False):
        super().__init__(model, max_length)
        self.window_bucket = window_bucket
        self.holder = install_static_cache(model)
        self.kernels = kernels  # decode steps through Triton kernels (decode_kernels.py)
        if kernels:
            decode_kernels.install(model, self.holder)
        self.rope_table = None  # learned positions, ALiBi: the embedding / attention place them
        if getattr(model, "rotary_pos_emb", None) is not None:
            table = model.rotary_pos_emb(max_length)  # [max_length, 1, 1, dim], fp32
            self.rope_table = table.reshape(max_length, table.size(-1))
        # GLM's prefix-LM: the prompt (through <sop>) attends both ways in the prefill; decode
        # steps are causal. ChatGLM-6B's 2-D positions: a generated token keeps the mask
        # position and counts up the block position.
        self.prefix_lm = getattr(model, "prefix_lm_ids", None)
        self.two_d = uses_rotary_2d(model)
        self.position_step = (torch.tensor([[0], [1]], device=next(model.parameters()).device)
                              if self.two_d else 1)
        self.state: DecodeState | None = None
        self.allocation = -1
        self.next_slot = 0
        self.run_layer = None  # decode steps' per-layer function (compiled: cuda_graphs.py)

    def start(self, tokens, valid):
        batch, width = tokens.shape
        self._check_room(width)
        self._prepare(batch, tokens.device)
        state = self.state
        state.key_valid.zero_()
        state.key_valid[:, :width] = valid
        state.slot.fill_(width)
        if self.prefix_lm:
            mask, positions = generation_inputs(tokens, valid, self.prefix_lm, self.two_d)
        else:
            mask, positions = causal_padding_mask(valid), positions_of(valid)
        state.positions.copy_(positions[..., -1:] + self.position_step)
        self.next_slot = width
        slots = torch.arange(width, device=tokens.device)
        with self.cache_active():
            return self._forward(tokens, positions, slots, width, mask)

    def step(self, tokens):
        self._check_room(self.next_slot + 1)
        self.state.tokens.copy_(tokens[:, None])
        logits = self._run_decode_step(self.window())
        self.next_slot += 1
        return logits

    def _run_decode_step(self, window: int) -> torch.Tensor:
        """:meth:`decode_step`, eagerly (the CUDA-graph backend replays it instead)."""
        with self.cache_active():
            return self.decode_step(window)

    def window(self) -> int:
        """Cache slots the next decode step reads: its own slot, rounded up to the bucket."""
        buckets = -(-(self.next_slot + 1) // self.window_bucket)
        return min(buckets * self.window_bucket, self.max_length)

    def decode_step(self, window: int) -> torch.Tensor:
        """One token per row from ``self.state``, reading the first ``window`` cache slots
        (inside :meth:`cache_active`). Only device tensors change between calls, so a CUDA graph
        can capture it, and it has no try/finally, so torch.compile can trace it."""
        state = self.state
        state.key_valid.index_fill_(1, state.slot, True)
        logits = self._forward(state.tokens, state.positions, state.slot, window,
                               decode_mask(state.key_valid, window), self.run_layer)
        state.slot.add_(1)
        state.positions.add_(self.position_step)
        return logits

    @contextlib.contextmanager
    def cache_active(self):
        """The wrapped attentions use the static cache inside the block, and pass through
        outside it (other backends may run on the same model)."""
        self.holder.active, self.holder.kernels = True, self.kernels
        try:
            yield
        finally:
            self.holder.active = False

    def _needs_allocation(self, batch: int) -> bool:
        """True unless this backend's buffers for ``batch`` rows are still the model's."""
        return self.allocation != self.holder.allocation or self.holder.batch != batch

    def _prepare(self, batch: int, device) -> None:
        """Cache and state for ``batch`` rows; kept while the batch size stays the same."""
        if not self._needs_allocation(batch):
            return
        allocate_static_cache(self.model, self.holder, batch, self.max_length)
        self.allocation = self.holder.allocation
        self.state = DecodeState.empty(batch, self.max_length, device, self.two_d)

    def _forward(self, tokens, positions, slots, window, mask, run_layer=None):
        self.holder.slots, self.holder.window = slots, window
        if self.two_d:
            rope = rotary_2d(positions, self.model.config.kv_channels)
        else:
            rope = None if self.rope_table is None else self.rope_table[positions.t()].unsqueeze(2)
        return forward_with_rope(self.model, tokens, positions, rope, mask, run_layer)
