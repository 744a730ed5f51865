"""Benchmark checkpoint conversion: wall time and peak host memory (issue 9, "Conversion
streams").

Builds a random HF ``LlamaForCausalLM`` checkpoint (safetensors shards written tensor by tensor,
so the builder never holds more than one tensor), then runs each conversion in a fresh
subprocess, so that the peaks are independent:

    hf -> megatron TP1, TP2, PP2 (torch format)    megatron TP2 -> hf
    (+ hf -> megatron torch_dist and back with --torch-dist)

Each subprocess imports the converter (torch, safetensors, megatron_patch.convert), reads its
resident set size then (the runtime baseline), restarts the kernel's RSS high-water mark
(``/proc/self/clear_refs``), converts through the CLI's ``main`` and reports its peak RSS
(``VmHWM``; ``ru_maxrss`` where there is no /proc), which counts the touched pages of
memory-mapped files too. The table gives the peak, the peak minus the
baseline (what the conversion itself holds) and that as a multiple of the checkpoint's tensor
bytes. Wall time and CPU time (user + system) are both given: on a shared machine the CPU
time is the steadier figure. The Megatron -> HF output is checked to be bit-identical to the
source.

    python toolkits/benchmarks/bench_convert.py          # 22 layers, hidden 2048: 2.2 GB bf16
    python toolkits/benchmarks/bench_convert.py --layers 2 --hidden 256 --ffn 512 --vocab 1000
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

DTYPES = {"bf16": ("bfloat16", "BF16"), "fp16": ("float16", "F16"), "fp32": ("float32", "F32")}
CLI = [sys.executable, os.path.abspath(__file__), "--child"]


def hf_tensor_shapes(opts) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of an untied LlamaForCausalLM, in HF's order."""
    h, f, d = opts.hidden, opts.ffn, opts.hidden // opts.heads
    layer = [("input_layernorm.weight", (h,)), ("self_attn.q_proj.weight", (h, h)),
             ("self_attn.k_proj.weight", (opts.kv_heads * d, h)),
             ("self_attn.v_proj.weight", (opts.kv_heads * d, h)),
             ("self_attn.o_proj.weight", (h, h)), ("post_attention_layernorm.weight", (h,)),
             ("mlp.gate_proj.weight", (f, h)), ("mlp.up_proj.weight", (f, h)),
             ("mlp.down_proj.weight", (h, f))]
    shapes = [("model.embed_tokens.weight", (opts.vocab, h))]
    for i in range(opts.layers):
        shapes += [(f"model.layers.{i}.{name}", shape) for name, shape in layer]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (opts.vocab, h))]


def split_into_shards(shapes, shards: int, itemsize: int) -> list[list]:
    """Consecutive groups of tensors of about equal bytes (as HF's save_pretrained cuts)."""
    total = sum(itemsize * _numel(s) for _, s in shapes)
    groups, done = [[] for _ in range(shards)], 0
    for name, shape in shapes:
        groups[min(shards - 1, done * shards // total)].append((name, shape))
        done += itemsize * _numel(shape)
    return [g for g in groups if g]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def random_tensor(name: str, shape, dtype, generator):
    """Weights ~ N(0, 0.02), norms ~ U(0.5, 1.5): finite values, so bit comparisons hold."""
    import torch

    if name.endswith("norm.weight"):
        return torch.empty(shape).uniform_(0.5, 1.5, generator=generator).to(dtype)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def write_safetensors(path: str, group, dtype, tag: str, generator) -> None:
    """A safetensors file written one tensor at a time: header first (the shapes are known),
    then each tensor's bytes as it is drawn."""
    import torch

    itemsize, offset, header = torch.empty(0, dtype=dtype).element_size(), 0, {}
    for name, shape in group:
        size = itemsize * _numel(shape)
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in group:
            out.write(random_tensor(name, shape, dtype, generator).view(torch.uint8).numpy())


def build_checkpoint(path: str, opts) -> int:
    """Random HF Llama checkpoint in ``path``; returns its tensor bytes."""
    import torch
    from transformers import LlamaConfig

    dtype_name, tag = DTYPES[opts.dtype]
    dtype = getattr(torch, dtype_name)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    groups = split_into_shards(hf_tensor_shapes(opts), opts.shards, itemsize)
    generator = torch.Generator().manual_seed(opts.seed)
    os.makedirs(path)
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(os.path.join(path, file), group, dtype, tag, generator)
        weight_map.update({name: file for name, _ in group})
    total = sum(itemsize * _numel(s) for g in groups for _, s in g)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as out:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, out, indent=2)
    LlamaConfig(vocab_size=opts.vocab, hidden_size=opts.hidden, intermediate_size=opts.ffn,
                num_hidden_layers=opts.layers, num_attention_heads=opts.heads,
                num_key_value_heads=opts.kv_heads, max_position_embeddings=4096,
                tie_word_embeddings=False, torch_dtype=dtype_name).save_pretrained(path)
    return total


def reset_peak_rss() -> None:
    """Start the kernel's RSS high-water mark from now (Linux: 5 -> /proc/self/clear_refs), so
    that the imports' transient peak is not taken for the conversion's."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # elsewhere the peak since the process started is reported


def peak_rss() -> int:
    """The RSS high-water mark in bytes (VmHWM, or ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as handle:
            line = next(x for x in handle if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak * (1 if sys.platform == "darwin" else 1024)  # macOS: bytes, Linux: KiB


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(argv: list[str]) -> int:
    """One conversion in this (fresh) process; prints its timings and memory as JSON."""
    import psutil
    import safetensors.torch  # noqa: F401  what every conversion imports, before the baseline
    import torch  # noqa: F401
    import tqdm  # noqa: F401

    from megatron_patch.convert import engine  # noqa: F401
    from megatron_patch.convert.__main__ import main

    baseline = psutil.Process().memory_info().rss
    reset_peak_rss()
    start, cpu = time.perf_counter(), cpu_seconds()
    code = main(argv + ["--no-progress"])
    print(json.dumps({"code": code, "seconds": time.perf_counter() - start,
                      "cpu_seconds": cpu_seconds() - cpu, "peak": peak_rss(),
                      "baseline": baseline}))
    return code


def run_conversion(label: str, argv: list[str], ckpt_bytes: int) -> dict:
    proc = subprocess.run(CLI + argv, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    own = row["peak"] - row["baseline"]
    return {"conversion": label, "seconds": row["seconds"], "cpu_seconds": row["cpu_seconds"],
            "peak_gb": row["peak"] / 1e9,
            "baseline_gb": row["baseline"] / 1e9, "own_gb": own / 1e9, "ratio": own / ckpt_bytes}


def conversions(work: str, torch_dist: bool) -> list[tuple[str, list[str]]]:
    """(label, converter argv) in the order they run; later ones read earlier outputs."""
    hf, j = os.path.join(work, "hf"), os.path.join
    runs = [("hf -> megatron TP1", ["--load", hf, "--save", j(work, "mg_tp1")]),
            ("hf -> megatron TP2", ["--load", hf, "--save", j(work, "mg_tp2"),
                                    "--target-tensor-model-parallel-size", "2"]),
            ("hf -> megatron PP2", ["--load", hf, "--save", j(work, "mg_pp2"),
                                    "--target-pipeline-model-parallel-size", "2"]),
            ("megatron TP2 -> hf", ["--load", j(work, "mg_tp2"), "--save", j(work, "hf_back"),
                                    "--megatron-to-hf"])]
    if torch_dist:
        runs += [("hf -> megatron torch_dist", ["--load", hf, "--save", j(work, "mg_dist"),
                                                "--ckpt-format", "torch_dist"]),
                 ("megatron torch_dist -> hf", ["--load", j(work, "mg_dist"), "--save",
                                                j(work, "hf_back_dist"), "--megatron-to-hf"])]
    return runs


def tensor_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file of an HF directory (sharded or not)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as handle:
            return {k: os.path.join(path, v) for k, v in json.load(handle)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    with safe_open(single, framework="pt") as handle:
        return {name: single for name in handle.keys()}


def compare_hf(a: str, b: str) -> int:
    """Number of tensors, after checking that both directories hold the same ones bit for bit."""
    import torch
    from safetensors import safe_open

    left, right = tensor_files(a), tensor_files(b)
    if sorted(left) != sorted(right):
        raise SystemExit(f"{b} holds other tensors than {a}")
    for name in sorted(left):
        with safe_open(left[name], "pt") as x, safe_open(right[name], "pt") as y:
            s, t = x.get_tensor(name), y.get_tensor(name)
        if s.dtype != t.dtype or not torch.equal(s, t):
            raise SystemExit(f"{b}: '{name}' differs from {a}")
    return len(left)


def table(rows: list[dict], ckpt_bytes: int) -> str:
    lines = [f"checkpoint: {ckpt_bytes / 1e9:.3f} GB of tensors; baseline = RSS of a fresh "
             f"process after importing torch and megatron_patch.convert",
             "| conversion | seconds | CPU seconds | peak RSS GB | baseline GB "
             "| peak - baseline GB | (peak - baseline) / checkpoint |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['conversion']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
              f"{r['peak_gb']:.3f} | "
              f"{r['baseline_gb']:.3f} | {r['own_gb']:.3f} | {r['ratio']:.2f}x |" for r in rows]
    return "\n".join(lines)


def check_disk(work: str, ckpt_bytes_estimate: int, outputs: int) -> None:
    free = shutil.disk_usage(work).free
    if free < ckpt_bytes_estimate * (outputs + 1) * 1.1:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, need about "
                         f"{ckpt_bytes_estimate * (outputs + 1) * 1.1 / 1e9:.1f} GB; pass a "
                         f"smaller --layers/--hidden or another --workdir")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a "
                                                        "temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--torch-dist", action="store_true",
                        help="also hf -> megatron torch_dist and back")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench_convert_", dir=opts.workdir)
    try:
        itemsize = {"bf16": 2, "fp16": 2, "fp32": 4}[opts.dtype]
        estimate = itemsize * sum(_numel(s) for _, s in hf_tensor_shapes(opts))
        runs = conversions(work, opts.torch_dist)
        check_disk(work, estimate, len(runs))
        start = time.perf_counter()
        ckpt_bytes = build_checkpoint(os.path.join(work, "hf"), opts)
        print(f"built {work}/hf ({ckpt_bytes / 1e9:.3f} GB) in "
              f"{time.perf_counter() - start:.1f}s", flush=True)
        rows = []
        for label, convert_argv in runs:
            rows.append(run_conversion(label, convert_argv, ckpt_bytes))
            print(json.dumps(rows[-1]), flush=True)
        backs = [d for d in ("hf_back", "hf_back_dist") if os.path.isdir(os.path.join(work, d))]
        for back in backs:
            count = compare_hf(os.path.join(work, "hf"), os.path.join(work, back))
            print(f"round trip {back}: {count} tensors bit-identical", flush=True)
        print(table(rows, ckpt_bytes))
        if opts.json:
            with open(opts.json, "w") as out:
                json.dump({"checkpoint_bytes": ckpt_bytes, "workdir": work, "rows": rows}, out,
                          indent=2)
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(sys.argv[2:]))
    sys.exit(main())
