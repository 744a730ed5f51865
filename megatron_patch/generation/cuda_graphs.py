"""Decode steps replayed from CUDA graphs (GPU only).

Decoding a small model at small batch is bound by kernel launches, not by memory
(shared/notes/gpu_baseline.md: HF eager reaches 3% of the bandwidth bound): each step is
hundreds of small kernels launched from Python. :class:`GraphBackend` captures
``StaticBackend.decode_step`` once per attention window and replays it, so a step costs one
launch. Windows are rounded up to ``WINDOW_BUCKET`` slots: a step reads at most that many
masked, empty slots more than it needs, and a whole generation uses a handful of graphs.

With ``compile=True`` each decode step runs its transformer layers through one
``torch.compile``d function (regional compilation: every layer has the same code, so one
compiled graph serves all of them; it fuses the rotary embedding, norms and SwiGLU, about half
of a layer's kernels), and the compiled step is what is captured.
"""
from __future__ import annotations

import torch

from megatron_patch.generation.static_cache import StaticBackend

WINDOW_BUCKET = 128


def run_layer(layer, hidden, mask, rope):
    """One TransformerLayer of a decode step (the unit torch.compile compiles)."""
    output, _ = layer(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rope)
    return output


class GraphBackend(StaticBackend):
    """:class:`StaticBackend` whose decode steps are CUDA-graph replays."""

    def __init__(self, model, max_length: int, compile: bool = False):
        if not torch.cuda.is_available():
            raise ValueError("the 'graph' backend needs a GPU; use --inference-backend static "
                             "(the same math, eager) or mcore")
        super().__init__(model, max_length, WINDOW_BUCKET)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        if compile:
            self.run_layer = torch.compile(run_layer)

    def step(self, tokens):
        self._check_room(self.next_slot + 1)
        self.state.tokens.copy_(tokens[:, None])
        window = self.window()
        graph, logits = self.graphs.get(window) or self._capture(window)
        graph.replay()
        self.next_slot += 1
        return logits

    def _prepare(self, batch, device):
        if self._needs_allocation(batch):
            self.graphs.clear()  # they point at the old buffers
        super()._prepare(batch, device)

    def _capture(self, window: int):
        """Warm up (cuBLAS handles, compilation) on a side stream, then capture one step. The
        warm-up steps write the current slot, which the real step overwrites; the counters are
        restored."""
        state = self.state
        slot, positions = state.slot.clone(), state.positions.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self.cache_active():
            for _ in range(2):
                self.decode_step(window)
                state.slot.copy_(slot)
                state.positions.copy_(positions)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), self.cache_active():
            logits = self.decode_step(window)
        self.graphs[window] = (graph, logits)
        return graph, logits
