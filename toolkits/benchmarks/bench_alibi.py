"""ALiBi core attention on a GPU: forward + backward time of megatron_patch's ALiBiAttention
(flex_attention with an ALiBi score_mod and a causal block mask, compiled) against plain causal
flash SDPA (no ALiBi: the floor) and SDPA with a dense ALiBi + causal bias tensor (what a bias
per layer per step costs; its bf16 bias is transformers' BLOOM's ``slope * j``), all in the
same run; and how far each ALiBi path's output and gradients are from an fp32 computation of
the same attention.

    python toolkits/benchmarks/bench_alibi.py                # batch 4, 16 heads, seq 2048, dim 128
    python toolkits/benchmarks/bench_alibi.py --seq 4096 --heads 32
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F


def timed(fn, steps: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
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
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--flex-blocks", type=lambda text: tuple(map(int, text.split("x"))),
                        nargs="*", default=[], metavar="MxN",
                        help="also time flex_attention alone with these kernel block sizes")
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

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    block_mask = create_block_mask(lambda b_, h_, i, j: i >= j, None, None, s, s, device="cuda")
    qc, kc, vc = (t.detach().permute(1, 2, 0, 3).contiguous().requires_grad_() for t in (q, k, v))

    def raw_flex(options=None):  # the kernel alone, on [b, h, s, d] contiguous inputs
        out = flex(qc, kc, vc, block_mask=block_mask, kernel_options=options,
                   score_mod=lambda sc, b_, h_, i, j: sc + slopes[h_] * (j - i))
        return out, (qc, kc, vc)

    stacks = {
        "flash SDPA, causal, no ALiBi": lambda: sdpa(q, k, v),
        "SDPA + dense ALiBi bias": lambda: sdpa(q, k, v, bias_bf16),
        "ALiBiAttention (flex)": lambda: attention(q, k, v, None),
        "ALiBiAttention (SDPA path)": lambda: sdpa_path(q, k, v),
    }

    def sdpa_path(query, key, value):  # the path taken with dropout, masks, on the CPU
        attention.fused = False
        try:
            return attention(query, key, value, None)
        finally:
            attention.fused = None

    def step(forward):
        out = forward()
        if isinstance(out, tuple):  # raw flex: its own inputs, [b, h, s, d]
            torch.autograd.grad(out[0], out[1], grad.view(s, b, h, d).permute(1, 2, 0, 3))
        else:
            torch.autograd.grad(out, (q, k, v), grad)

    stacks["flex_attention alone ([b,h,s,d])"] = raw_flex
    for block_m, block_n in opts.flex_blocks:
        options = {"BLOCK_M": block_m, "BLOCK_N": block_n}
        stacks[f"  same, BLOCK_M {block_m} BLOCK_N {block_n}"] = (
            lambda options=options: raw_flex(options))

    print(f"batch {b}, {h} heads, seq {s}, head dim {d}, bf16, {torch.cuda.get_device_name()}; "
          f"forward + backward, median of {opts.steps}")
    results = {}
    for name, forward in stacks.items():
        results[name] = timed(lambda: step(forward), opts.steps, opts.warmup)
        print(f"  {name:<30} {results[name]:7.3f} ms", flush=True)
    floor = results["flash SDPA, causal, no ALiBi"]
    print(f"  ALiBiAttention / plain flash: {results['ALiBiAttention (flex)'] / floor:.2f}x; "
          f"dense bias / plain flash: {results['SDPA + dense ALiBi bias'] / floor:.2f}x")

    # Exactness: each bf16 ALiBi path against the same attention in fp32 (dense bias).
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    reference = sdpa(q32, k32, v32, dense_bias(torch.float32))
    reference_grads = torch.autograd.grad(reference, (q32, k32, v32), grad.float())
    print("  distance from fp32 (max abs: output, dq, dk, dv):")
    for name in ("SDPA + dense ALiBi bias", "ALiBiAttention (flex)",
                 "ALiBiAttention (SDPA path)"):
        out = stacks[name]()
        grads = torch.autograd.grad(out, (q, k, v), grad)
        diffs = [(out.float() - reference).abs().max().item()] + [
            (g.float() - r).abs().max().item() for g, r in zip(grads, reference_grads)]
        print(f"  {name:<30} " + ", ".join(f"{x:.2e}" for x in diffs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
