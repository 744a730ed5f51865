"""The decode kernels (megatron_patch.kernels) against what they replace, in one run on one GPU.

- Matrix-vector products: ``gemv`` against ``torch.nn.functional.linear`` (cuBLAS) for the
  linear layers of the ~1B Llama of bench_generation.py (hidden 2048, FFN 5632, vocab 32000)
  at 1, 2, 4 and 16 rows, bf16. Figures: microseconds a call and the weight bytes read per
  second as a fraction of the measured copy bandwidth.
- Decode attention: ``decode_attention`` against the SDPA path our core attention takes
  (permute, boolean mask, ``scaled_dot_product_attention``) for one query per row, 16 heads of
  128, over 128 / 256 / 384 cache slots, batch 1 and 16.

Every kernel's output is compared with its baseline's before it is timed (max abs difference
printed). Times come from CUDA graphs (as in a decode step: no Python launch overhead) that
call the kernel over enough copies of its operands (512 MiB) that they stream from memory,
not from the L2 cache.

    python toolkits/benchmarks/bench_kernels.py [--sweep] [--output kernels.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from toolkits.benchmarks.bench_generation import copy_bandwidth  # noqa: E402

LINEARS = {"qkv": (6144, 2048), "proj": (2048, 2048), "fc1 (gate+up)": (11264, 2048),
           "fc2": (2048, 5632), "output": (32000, 2048)}
ROWS = (1, 2)
WINDOWS = (128, 256, 384)
BATCHES = (1, 16)
HEADS, HEAD_DIM = 16, 128


ROTATE_BYTES = 512 * 2**20  # each timed graph cycles through this many bytes of operands
GEMV_SWEEP = [(n, k, w) for n in (2, 4) for k in (512, 1024, 2048) for w in (2, 4, 8)]
ATTENTION_SWEEP = [(splits, block, w) for splits in (4, 8, 16) for block in (16, 32)
                   for w in (2, 4)]


def graph_us(calls, repeats: int = 20) -> float:
    """Microseconds per call of ``calls`` (launchers without arguments), captured in order into
    one CUDA graph and replayed: no Python launch overhead, as inside a decode step's graph."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):  # compilation and cuBLAS workspaces before the capture
        for call in calls:
            call()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (repeats * len(calls))


def copies(make, nbytes: int) -> list:
    """Enough independent operands that one pass over them streams ``ROTATE_BYTES`` (the L2
    cache cannot hold them, as it cannot hold a model's layers)."""
    return [make() for _ in range(max(2, min(64, -(-ROTATE_BYTES // nbytes))))]


def linear_rows(bandwidth: float, sweep: bool) -> list[dict]:
    from megatron_patch.kernels import gemv as gemv_module

    rows_out = []
    for name, (outputs, inner) in LINEARS.items():
        nbytes = outputs * inner * 2
        weights = copies(lambda: torch.randn(outputs, inner, dtype=torch.bfloat16,
                                             device="cuda") * 0.02, nbytes)
        for rows in ROWS:
            x = torch.randn(rows, inner, dtype=torch.bfloat16, device="cuda")
            y = torch.empty(rows, outputs, dtype=torch.bfloat16, device="cuda")
            diff = (gemv_module.gemv(x, weights[0]).float()
                    - F.linear(x, weights[0]).float()).abs().max().item()

            def timed(config):
                us = graph_us([lambda w=w: gemv_module.launch(x, w, y, config) for w in weights])
                return us, nbytes / (us * 1e-6) / bandwidth

            cublas_us = graph_us([lambda w=w: torch.matmul(x, w.t(), out=y) for w in weights])
            chosen = gemv_module.choose_config(rows, outputs, inner)
            gemv_us, gemv_of_copy = timed(chosen)
            row = {"layer": name, "rows": rows, "N": outputs, "K": inner, "max_abs_diff": diff,
                   "cublas_us": cublas_us,
                   "cublas_of_copy": nbytes / (cublas_us * 1e-6) / bandwidth,
                   "config": chosen, "gemv_us": gemv_us, "gemv_of_copy": gemv_of_copy}
            if sweep:
                swept = sorted((timed(c)[0], c) for c in GEMV_SWEEP)
                row["best"] = {"config": swept[0][1], "us": swept[0][0]}
                row["top5"] = swept[:5]
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    return rows_out


def attention_rows(sweep: bool) -> list[dict]:
    from megatron_patch.kernels import decode_attention as attention_module

    rows_out = []
    scale = HEAD_DIM ** -0.5
    for batch in BATCHES:
        for window in WINDOWS:
            cache_bytes = 2 * window * batch * HEADS * HEAD_DIM * 2
            caches = copies(lambda: torch.randn(2, window, batch, HEADS, HEAD_DIM,
                                                dtype=torch.bfloat16, device="cuda"),
                            cache_bytes)
            query = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
            masked = torch.rand(batch, window, device="cuda") < 0.1
            masked[:, -1] = False
            out = torch.empty_like(query)

            def sdpa(cache):  # SDPAttention's path: [1, b, h, d] query, [s, b, g, d] keys
                q, k, v = (t.permute(1, 2, 0, 3) for t in (query[None], cache[0], cache[1]))
                return F.scaled_dot_product_attention(q, k, v, attn_mask=~masked[:, None, None],
                                                      scale=scale)[:, :, 0]

            def timed(splits, block_s, warps):
                return graph_us([lambda c=c: attention_module.launch(
                    query, c[0], c[1], masked, window, scale, out, splits, block_s, warps)
                    for c in caches])

            chosen = attention_module.choose_launch(batch * HEADS, window, query.device)
            attention_module.launch(query, caches[0][0], caches[0][1], masked, window, scale,
                                    out, *chosen)
            diff = (out.float() - sdpa(caches[0]).float()).abs().max().item()
            row = {"batch": batch, "window": window, "max_abs_diff": diff, "splits": chosen,
                   "sdpa_us": graph_us([lambda c=c: sdpa(c) for c in caches]),
                   "kernel_us": timed(*chosen)}
            if sweep:
                swept = sorted((timed(*c), c) for c in ATTENTION_SWEEP)
                row["best"] = {"config": swept[0][1], "us": swept[0][0]}
                row["top5"] = swept[:5]
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    return rows_out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--sweep", action="store_true",
                        help="also time every launch configuration of GEMV_SWEEP and "
                             "ATTENTION_SWEEP and report the fastest")
    opts = parser.parse_args(argv)
    if opts.output and not os.path.isdir(os.path.dirname(os.path.abspath(opts.output))):
        parser.error(f"--output {opts.output}: its directory does not exist")
    if not torch.cuda.is_available():
        parser.error("needs a GPU (the kernels' CPU tests are tests/test_kernels.py)")
    bandwidth = copy_bandwidth(torch.device("cuda"), 2048)
    print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s", flush=True)
    results = {"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth,
               "linear": linear_rows(bandwidth, opts.sweep),
               "attention": attention_rows(opts.sweep)}
    print("| layer | rows | cuBLAS us | gemv us | cuBLAS of copy bw | gemv of copy bw |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results["linear"]:
        print(f"| {r['layer']} | {r['rows']} | {r['cublas_us']:.1f} | {r['gemv_us']:.1f} | "
              f"{r['cublas_of_copy']:.0%} | {r['gemv_of_copy']:.0%} |")
    print("\n| batch | window | SDPA us | decode_attention us | splits, BLOCK_S, warps |")
    print("| --- | --- | --- | --- | --- |")
    for r in results["attention"]:
        print(f"| {r['batch']} | {r['window']} | {r['sdpa_us']:.1f} | {r['kernel_us']:.1f} | "
              f"{r['splits']} |")
    if opts.output:
        with open(f"{opts.output}.tmp", "w") as handle:
            json.dump(results, handle, indent=1)
        os.replace(f"{opts.output}.tmp", opts.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
