"""ALiBi core attention on a GPU: forward + backward time of megatron_patch's ALiBiAttention
(flex_attention with an ALiBi score_mod and a causal block mask, compiled) against plain
causal SDPA without ALiBi (the floor: SDPA's default, cuDNN's kernel on an H200, and
FlashAttention-2's), SDPA with a dense ALiBi + causal bias tensor (what a bias per layer per
step costs; its bf16 bias is transformers' BLOOM's ``slope * j``) and ALiBiAttention's own
bias-tensor path (fp32, padding masks, decode), all in the same run; and how far each ALiBi
path's output and gradients are from an fp32 computation of the same attention. Times are
medians over groups of 10 back-to-back steps (the GPU's time, not the launches').

    python toolkits/benchmarks/bench_alibi.py                # batch 4, 16 heads, seq 2048, dim 128
    python toolkits/benchmarks/bench_alibi.py --seq 4096 --heads 32
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F


def timed(fn, steps: int, warmup: int, group: int = 10) -> float:
    """Median milliseconds of ``fn()`` over groups of ``group`` back-to-back calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, steps // group)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(group):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / group)
    return statistics.median(times)


def build_attention(heads: int, head_dim: int):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_patch import compat
    from megatron_patch.families.bloom import BLOOM
    from megatron_patch.families.model import transformer_config
    from megatron_patch.layers.alibi_attention import ALiBiAttention

    compat.initialize_parallel(1, 1)
    args = BLOOM.args_for_size("tiny", num_attention_heads=heads, num_query_groups=heads,
                               hidden_size=heads * head_dim, kv_channels=head_dim)
    return ALiBiAttention(transformer_config(BLOOM, args), 1, AttnMaskType.causal, "self").cuda()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    opts = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench_alibi.py needs a GPU (the CPU tests check the math: "
              "tests/test_alibi.py)", file=sys.stderr)
        return 2
    attention = build_attention(opts.heads, opts.head_dim)
    b, h, s, d = opts.batch, opts.heads, opts.seq, opts.head_dim
    torch.manual_seed(0)
    # megatron-core's layout: [s, b, heads, dim]
    q, k, v = (torch.randn(s, b, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn(s, b, h * d, device="cuda", dtype=torch.bfloat16)
    slopes = attention.slopes.cuda()
    positions = torch.arange(s, device="cuda", dtype=torch.float32)

    def dense_bias(dtype):
        bias = (slopes[:, None, None] * positions[None, None, :]).expand(h, s, s)
        causal = torch.ones(s, s, dtype=torch.bool, device="cuda").tril()
        return bias.masked_fill(~causal, float("-inf")).to(dtype)[None]

    bias_bf16 = dense_bias(torch.bfloat16)

    def sdpa(query, key, value, bias=None):
        qq, kk, vv = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=bias, is_causal=bias is None)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash2(query, key, value):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(query, key, value)

    stacks = {
        "SDPA, causal, no ALiBi": lambda: sdpa(q, k, v),
        "FlashAttention-2, no ALiBi": lambda: flash2(q, k, v),
        "SDPA + dense ALiBi bias": lambda: sdpa(q, k, v, bias_bf16),
        "ALiBiAttention (flex)": lambda: attention(q, k, v, None),
        "ALiBiAttention (bias path)": lambda: sdpa_path(q, k, v),
    }

    def sdpa_path(query, key, value):  # the path fp32, padding masks and decode take
        attention.fused = False
        try:
            return attention(query, key, value, None)
        finally:
            attention.fused = None

    def step(forward):
        torch.autograd.grad(forward(), (q, k, v), grad)

    print(f"batch {b}, {h} heads, seq {s}, head dim {d}, bf16, {torch.cuda.get_device_name()}; "
          f"forward + backward, median of {opts.steps}")
    results = {}
    for name, forward in stacks.items():
        results[name] = timed(lambda: step(forward), opts.steps, opts.warmup)
        print(f"  {name:<28} {results[name]:7.3f} ms", flush=True)
    floor = results["SDPA, causal, no ALiBi"]
    print("  / plain SDPA: " + ", ".join(
        f"{name} {results[name] / floor:.2f}x" for name in list(results)[1:]))

    # Exactness: each bf16 ALiBi path against the same attention in fp32 (dense bias).
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    reference = sdpa(q32, k32, v32, dense_bias(torch.float32))
    reference_grads = torch.autograd.grad(reference, (q32, k32, v32), grad.float())
    print("  distance from fp32 (max abs: output, dq, dk, dv):")
    for name in list(stacks)[2:]:
        out = stacks[name]()
        grads = torch.autograd.grad(out, (q, k, v), grad)
        diffs = [(out.float() - reference).abs().max().item()] + [
            (g.float() - r).abs().max().item() for g, r in zip(grads, reference_grads)]
        print(f"  {name:<28} " + ", ".join(f"{x:.2e}" for x in diffs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
