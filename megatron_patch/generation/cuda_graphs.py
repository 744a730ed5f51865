"""Decode steps replayed from CUDA graphs (GPU only).

Decoding a small model at small batch is bound by kernel launches, not by memory
(shared/notes/gpu_baseline.md: HF eager reaches 3% of the bandwidth bound): each step is
hundreds of small kernels launched from Python. :class:`GraphBackend` captures
``StaticBackend.decode_step`` once per attention window and replays it, so a step costs one
launch. Windows are rounded up to ``WINDOW_BUCKET`` slots: a step reads at most that many
masked, empty slots more than it needs, and a whole generation uses a handful of graphs.

With ``compile_mode`` set (``"default"``, or another ``torch.compile`` mode) each decode step
runs its transformer layers through one ``torch.compile``d function (regional compilation:
every layer has the same code, so one compiled graph serves all of them; it fuses the rotary
embedding, norms and SwiGLU, most of a layer's small kernels), and the compiled step is what is
captured.

Measured on one H200 (toolkits/benchmarks/bench_generation.py, ~1B Llama, bf16, 2026-11-28):
graph 507 / 7,198 decode tokens/s at batch 1 / 16 (696 kernels a step); compiled 953 / 13,343
(216 kernels, 0.96 ms a step of which 0.93 ms is kernel time). What is left: cuBLAS's skinny
GEMMs read the weights at ~68% of the copy bandwidth (0.65 ms against 0.45), and cuDNN's SDPA
with one query row takes 8 us a layer at batch 1 (0.13 ms a step).
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_patch.generation.static_cache import StaticBackend

WINDOW_BUCKET = 128


def run_layer(layer, hidden, mask, rope):
    """One TransformerLayer of a decode step (the unit torch.compile compiles)."""
    output, _ = layer(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rope)
    return output


def compile_layer_function(mode: str):
    """``run_layer`` under ``torch.compile``, one static-shape compilation per batch size and
    window (a shape compiled dynamically runs slower kernels; the benchmark measured it).
    :func:`megatron_patch.compat.compile_megatron` keeps megatron-core's deprecation warning
    from splitting the graph."""
    from megatron_patch import compat

    return compat.compile_megatron(run_layer, mode=None if mode == "default" else mode,
                                   dynamic=False)


class GraphBackend(StaticBackend):
    """:class:`StaticBackend` whose decode steps are CUDA-graph replays."""

    def __init__(self, model, max_length: int, compile_mode: Optional[str] = None,
                 window_bucket: int = WINDOW_BUCKET):
        if not torch.cuda.is_available():
            raise ValueError("the 'graph' backend needs a GPU; use --inference-backend static "
                             "(the same math, eager) or mcore")
        super().__init__(model, max_length, window_bucket)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        if compile_mode:
            self.run_layer = compile_layer_function(compile_mode)

    def _run_decode_step(self, window):
        graph, logits = self.graphs.get(window) or self._capture(window)
        graph.replay()
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
