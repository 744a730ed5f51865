"""The output layer + cross-entropy, forward and backward, three ways on one device in one run:
megatron-core's path (bf16 logits, its vocab-parallel cross-entropy in fp32), the same under
torch.compile, and kernels/linear_cross_entropy.py at several chunk sizes (per-token losses,
and the weighted sum whose gradients are made in the forward); milliseconds per
step (median of ``--steps``) and peak memory above the inputs.

    python toolkits/benchmarks/bench_linear_ce.py [--tokens 8192 --hidden 2048 --vocab 32000]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402


def timed(step, steps: int, device) -> tuple[float, float]:
    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - began)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else 0.0
    return statistics.median(times) * 1000, peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--chunks", default="1024,2048,4096,8192")
    opts = parser.parse_args(argv)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_patch import compat
    from megatron_patch.kernels.linear_cross_entropy import (linear_cross_entropy,
                                                             weighted_linear_cross_entropy)

    compat.initialize_parallel(1, 1)
    device = compat.device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden = torch.randn(opts.tokens, 1, opts.hidden, device=device, dtype=dtype,
                         requires_grad=True)
    weight = (torch.randn(opts.vocab, opts.hidden, device=device, dtype=dtype) * 0.02
              ).requires_grad_()
    labels = torch.randint(0, opts.vocab, (opts.tokens, 1), device=device)

    def plain():
        logits = hidden @ weight.t()
        return vocab_parallel_cross_entropy(logits.float(), labels)

    compiled = torch.compile(plain)
    rows = []
    cases = [("megatron-core (bf16 logits, fp32 vocab-parallel CE)", plain),
             ("same, torch.compile", compiled)]
    for chunk in map(int, opts.chunks.split(",")):
        cases.append((f"linear_cross_entropy, chunk {chunk}",
                      lambda chunk=chunk: linear_cross_entropy(hidden, weight, labels,
                                                               chunk=chunk)))
    mean = torch.full((opts.tokens, 1), 1.0 / opts.tokens, device=device)
    for chunk in map(int, opts.chunks.split(",")):
        cases.append((f"weighted_linear_cross_entropy (gradients in the forward), chunk {chunk}",
                      lambda chunk=chunk: weighted_linear_cross_entropy(
                          hidden, weight, labels, mean, chunk=chunk)))
    reference = None
    for name, loss_of in cases:
        def step():
            hidden.grad = weight.grad = None
            out = loss_of()
            (out[0] if isinstance(out, tuple) else out.mean()).backward()
        ms, peak = timed(step, opts.steps, device)
        out = loss_of()
        losses = (out[1] if isinstance(out, tuple) else out).detach().float()
        reference = losses if reference is None else reference
        rows.append((name, ms, peak, (losses - reference).abs().max().item()))
    print(f"tokens {opts.tokens}, hidden {opts.hidden}, vocab {opts.vocab}, {dtype}, "
          f"{device}")
    print("| path | forward+backward ms | peak GiB above inputs | max loss difference |")
    print("| --- | --- | --- | --- |")
    for name, ms, peak, diff in rows:
        print(f"| {name} | {ms:.2f} | {peak:.2f} | {diff:.2e} |")
    compat.destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
