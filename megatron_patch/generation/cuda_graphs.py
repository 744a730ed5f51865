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
graph 513 / 7,215 decode tokens/s at batch 1 / 16; compiled 963 / 13,474; compiled with the
Triton decode kernels (decode_kernels.py) 1,123 at batch 1, 51% of the memory-bandwidth bound
(at batch 16 they measured 13,097, slower: they apply at batch 1 only). Greedy decoding runs
the argmax inside the graph too (:meth:`step_greedy`).
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
                 window_bucket: int = WINDOW_BUCKET, kernels: bool = False):
        if not torch.cuda.is_available():
            name = "graph-compiled" if compile_mode else "graph"  # the one asked for
            raise ValueError(f"the {name!r} backend needs a GPU; use --inference-backend "
                             f"static (the same math, eager) or mcore")
        super().__init__(model, max_length, window_bucket, kernels)
        # (window, vocab size of the in-graph argmax or None) -> (graph, its output)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        if compile_mode:
            self.run_layer = compile_layer_function(compile_mode)

    def _run_decode_step(self, window):
        graph, logits = self.graphs.get((window, None)) or self._capture(window)
        graph.replay()
        return logits

    def step_greedy(self, tokens, vocab_size):
        """One graph replay: the decode step, the argmax over the first ``vocab_size`` logits,
        and that argmax written as the next step's input. ``tokens`` returned by the previous
        call are already in place; others (the first step) are copied in."""
        self._check_room(self.next_slot + 1)
        window = self.window()
        graph, chosen = (self.graphs.get((window, vocab_size))
                         or self._capture(window, vocab_size))
        if tokens is not chosen:
            self.state.tokens.copy_(tokens[:, None])
        graph.replay()
        self.next_slot += 1
        return chosen

    def _prepare(self, batch, device):
        if self._needs_allocation(batch):
            self.graphs.clear()  # they point at the old buffers
        super()._prepare(batch, device)

    def _graph_body(self, window: int, vocab_size: Optional[int]) -> torch.Tensor:
        logits = self.decode_step(window)
        if vocab_size is None:
            return logits
        chosen = logits[:, :vocab_size].argmax(dim=-1)
        self.state.tokens.copy_(chosen[:, None])
        return chosen

    def _capture(self, window: int, vocab_size: Optional[int] = None):
        """Warm up (cuBLAS handles, compilation, Triton autotuning) on a side stream, then
        capture one step (with the argmax when ``vocab_size`` is given). The warm-up steps write
        the current slot, which the real step overwrites; the counters and input tokens are
        restored."""
        state = self.state
        saved = [t.clone() for t in (state.slot, state.positions, state.tokens)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self.cache_active():
            for _ in range(2):
                self._graph_body(window, vocab_size)
                for tensor, value in zip((state.slot, state.positions, state.tokens), saved):
                    tensor.copy_(value)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), self.cache_active():
            output = self._graph_body(window, vocab_size)
        self.graphs[(window, vocab_size)] = (graph, output)
        return graph, output
