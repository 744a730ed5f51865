"""Decode speed of ``megatron_patch.generation`` against HF transformers and the memory-bandwidth
bound, in one run on one device.

Shape (default): the ~1B Llama of the GPU baseline (registry size ``1B``: hidden 2048, 16
layers, 16 heads, FFN 5632, vocab 32000), bf16, random weights built in-process, 128-token
prompts, 256 new tokens, greedy, EOS ignored, batch 1 and 16. ``--tiny`` runs the registry's
``tiny`` shape in fp32 with short sequences, so the script runs (and is tested) on a CPU.

Stacks: our engine with each backend (megatron-core's ``StaticInferenceContext``; our static
cache eager; with CUDA graphs; with CUDA graphs over a ``torch.compile``d step), HF ``generate``
eager (its dynamic cache) and HF ``generate`` with a static cache, which transformers compiles
on a GPU (``torch.compile`` mode ``reduce-overhead``: CUDA graphs).

Decode tokens/s = batch x (new tokens - 1) / (time from the first sampled token to the end), the
same clock for every stack (HF's is read by a logits processor at its first call). The bound is
batch x copy bandwidth / weight bytes: every decode step reads all weights once; the copy
bandwidth is measured here (bytes read + written per second of a large device copy).

Before timing, a parity check: a tiny random fp32 Llama is converted to a Megatron checkpoint
and every backend's greedy tokens (a batch of prompts of different lengths) are compared with
HF ``generate(do_sample=False)`` on each prompt alone.

    python toolkits/benchmarks/bench_generation.py [--tiny] [--output results.json]
    python toolkits/benchmarks/bench_generation.py --family bloom --size 1b1 --skip-parity

``--family F --size S``: that family's sizes row (``--num-layers`` to shorten it) and its own
transformers class, from the config.json our converter writes (the parity check stays llama's).
A GLM prefix-LM row (ChatGLM-6B, GLM-130B: transformers has no class for them, so no HF rows)
decodes prompts ending ``[gMASK] <sop>``, and its parity check compares every backend's greedy
tokens with the eager static cache's (whose tokens equal SAT's on the CPU: tests/test_glm.py)
on the family's tiny prefix-LM row in fp32, 2-D positions included.

    python toolkits/benchmarks/bench_generation.py --family chatglm --size chatglm-6b --num-layers 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from megatron_patch import compat  # noqa: E402
from megatron_patch.generation.engine import Limits, build_backend, generate_batch  # noqa: E402
from megatron_patch.generation.sampling import SamplingParams  # noqa: E402
from megatron_patch.registry import get_family  # noqa: E402

SHAPES = {
    "1b": dict(size="1B", precision="bf16", prompt=128, new=256, batches=(1, 16)),
    "tiny": dict(size="tiny", precision="fp32", prompt=8, new=8, batches=(1, 2)),
}
OURS = {  # table label -> backend name (+kernels: decode steps through megatron_patch.kernels)
    "ours: static cache + CUDA graphs": "graph",
    "ours: CUDA graphs + Triton decode kernels": "graph+kernels",
    "ours: mcore (StaticInferenceContext)": "mcore",
    "ours: static cache (eager)": "static",
    "ours: CUDA graphs + torch.compile": "graph-compiled",
    "ours: CUDA graphs + torch.compile + Triton decode kernels": "graph-compiled+kernels",
}
HF = {"HF generate (eager)": {}, "HF static cache + torch.compile": {"cache_implementation":
                                                                    "static"}}
# Run order: the slow-to-compile and least certain stacks last (--max-seconds may cut them).
ORDER = ("ours: static cache + CUDA graphs", "ours: CUDA graphs + Triton decode kernels",
         "HF generate (eager)", "HF static cache + torch.compile",
         "ours: mcore (StaticInferenceContext)", "ours: static cache (eager)",
         "ours: CUDA graphs + torch.compile",
         "ours: CUDA graphs + torch.compile + Triton decode kernels")
GPU_ONLY = {"ours: static cache + CUDA graphs", "ours: CUDA graphs + Triton decode kernels",
            "ours: CUDA graphs + torch.compile",
            "ours: CUDA graphs + torch.compile + Triton decode kernels",
            "HF static cache + torch.compile"}
COMPILED = ("graph-compiled", "graph-compiled+kernels")  # parity checked after the timings
GREEDY = SamplingParams(top_k=1)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, mebibytes: int, repeats: int = 20) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` of a large buffer."""
    src = torch.empty(mebibytes * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    return 2 * src.numel() * repeats / (time.perf_counter() - began)


def build_models(size: str, precision: str, device, family_name: str = "llama",
                 num_layers: int | None = None):
    """Our GPTModel and HF's model (LlamaForCausalLM, or the family's class) of one registry
    size, random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_patch.families.model import (PRECISION_DTYPES, build_gpt_model,
                                               transformer_config)
    from megatron_patch.tokenizers.vocab import padded_vocab_size

    family = get_family(family_name)
    args = family.args_for_size(size, **({"num_layers": num_layers} if num_layers else {}))
    config = transformer_config(family, args, precision=precision,
                                use_cpu_initialization=device.type == "cpu")
    ours = build_gpt_model(family, args, config, padded_vocab_size(args.vocab_size, 128, 1, 0))
    ours = ours.to(device).eval()
    if getattr(ours, "prefix_lm_ids", None):  # no transformers class (module docstring)
        return ours, None, args
    from megatron_patch.families.chatglm import transformers_layout

    hf_config = AutoConfig.for_model(**family.hf_config_from_args(transformers_layout(args)))
    hf_config.eos_token_id = None
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_config).to(PRECISION_DTYPES[precision]).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return ours, hf, args


def make_backend(name: str, model, max_length: int, opts):
    """Backend ``name`` (a value of OURS); the CUDA-graph ones with ``--window-bucket`` /
    ``--compile-mode``, and the Triton decode kernels when it ends in ``+kernels``."""
    name, _, extra = name.partition("+")
    kernels = extra == "kernels"
    if not name.startswith("graph"):
        return build_backend(name, model, max_length, "on" if kernels else "off")
    from megatron_patch.generation.cuda_graphs import GraphBackend

    mode = opts.compile_mode if name == "graph-compiled" else None
    return GraphBackend(model, max_length, compile_mode=mode, window_bucket=opts.window_bucket,
                        kernels=kernels)


def time_ours(model, backend_name, prompts, new_tokens, vocab_size, warmup_tokens, opts):
    """Decode and prompt+decode tokens/s of our engine, and the warm-up's seconds (CUDA-graph
    captures and compilation happen there)."""
    began = time.perf_counter()
    backend = make_backend(backend_name, model, prompts.size(1) + new_tokens, opts)
    rows = prompts.tolist()
    generate_batch(backend, rows, GREEDY, Limits(warmup_tokens, None, 0, vocab_size))
    warmup = time.perf_counter() - began
    _, stats = generate_batch(backend, rows, GREEDY, Limits(new_tokens, None, 0, vocab_size))
    batch = len(rows)
    return dict(decode_tps=batch * stats.decode_steps / stats.decode_seconds,
                e2e_tps=batch * new_tokens / (stats.prefill_seconds + stats.decode_seconds),
                warmup_s=warmup)


class FirstStepClock:
    """A logits processor that only notes when HF samples its first token (after prefill)."""

    def __init__(self, device):
        self.device, self.first = device, None

    def __call__(self, input_ids, scores):
        if self.first is None:
            synchronize(self.device)
            self.first = time.perf_counter()
        return scores


def time_hf(model, prompts, new_tokens, extra: dict, warmup_tokens):
    """Decode and prompt+decode tokens/s of HF ``generate``, and the warm-up's seconds."""
    from transformers import LogitsProcessorList

    device = prompts.device

    def run(tokens):
        clock = FirstStepClock(device)
        synchronize(device)
        began = time.perf_counter()
        model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                       max_new_tokens=tokens, min_new_tokens=tokens,
                       logits_processor=LogitsProcessorList([clock]), **extra)
        synchronize(device)
        return began, clock.first, time.perf_counter()

    began, _, end = run(warmup_tokens)
    warmup = end - began
    began, first, end = run(new_tokens)
    batch = prompts.size(0)
    return dict(decode_tps=batch * (new_tokens - 1) / (end - first),
                e2e_tps=batch * new_tokens / (end - began), warmup_s=warmup)


def tiny_checkpoint(scratch: str) -> str:
    """A random tiny fp32 Llama (registry size ``tiny``) saved by HF and converted."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_patch.convert.engine import Target, convert_hf_to_megatron

    family = get_family("llama")
    torch.manual_seed(0)
    config = LlamaConfig(**family.hf_config_from_args(family.args_for_size("tiny")))
    LlamaForCausalLM(config).save_pretrained(os.path.join(scratch, "hf"))
    convert_hf_to_megatron(os.path.join(scratch, "hf"), os.path.join(scratch, "mg"),
                           target=Target(1, 1), progress=False)
    return scratch


def glm_prompts(model, prompts):
    """Prompts ending ``[gMASK] <sop>`` for a prefix-LM model (ids kept below the special ones),
    as they are for any other model."""
    special = getattr(model, "prefix_lm_ids", None)
    if not special:
        return prompts
    floor = min(special[key] for key in ("sop", "gmask", "mask", "eop"))
    rows = [[3 + (i % (floor - 3)) for i in row] for row in
            (prompts.tolist() if torch.is_tensor(prompts) else prompts)]
    rows = [row[:-2] + [special["gmask"], special["sop"]] for row in rows]
    return torch.tensor(rows, device=prompts.device) if torch.is_tensor(prompts) else rows


def prefix_lm_parity(backends, device, opts, new_tokens: int = 16) -> dict:
    """Greedy tokens of each backend = the eager static cache's, on the family's tiny
    prefix-LM row (random fp32 weights, prompts of different lengths)."""
    from megatron_patch.families.model import build_gpt_model, transformer_config

    family = get_family(opts.family)
    size = next(name for name in family.sizes if name.startswith("tiny")
                and family.args_for_size(name).prefix_lm_ids)
    args = family.args_for_size(size)
    torch.manual_seed(0)
    config = transformer_config(family, args, precision="fp32",
                                use_cpu_initialization=device.type == "cpu")
    model = build_gpt_model(family, args, config, args.vocab_size).to(device).eval()
    with torch.no_grad():  # sharper attention: tokens that depend on the (2-D) positions
        for name, param in model.named_parameters():
            if "linear_qkv.weight" in name or "word_embeddings" in name:
                param.mul_(20)
            if "linear_proj.weight" in name or "linear_fc2.weight" in name:
                param.mul_(10)  # DeepNorm's alpha x input would drown the sublayers
    prompts = glm_prompts(model, [torch.randint(3, args.vocab_size, (n,)).tolist()
                                  for n in (5, 17, 9, 30)])
    limits = Limits(new_tokens, None, 0, args.vocab_size)
    expected = [c.ids for c in generate_batch(make_backend("static", model, 64, opts),
                                              prompts, GREEDY, limits)[0]]
    report = {"reference": f"static cache (eager), {opts.family} {size}",
              "distinct_tokens": len({t for row in expected for t in row})}
    for name in backends:
        try:
            got = [c.ids for c in generate_batch(make_backend(name, model, 64, opts), prompts,
                                                 GREEDY, limits)[0]]
        except Exception as err:  # report it with the rest
            report[name] = {"equal": False, "error": f"{type(err).__name__}: {err}"[:400]}
            continue
        same = sum(a == b for c, e in zip(got, expected) for a, b in zip(c, e))
        report[name] = {"equal": got == expected,
                        "tokens_equal": f"{same}/{len(prompts) * new_tokens}"}
    return report


def parity(backends, device, opts, new_tokens: int = 16) -> dict:
    """Greedy tokens of each backend (one batch, prompts of different lengths) against HF
    ``generate`` on each prompt alone, through a converted tiny fp32 checkpoint."""
    from transformers import LlamaForCausalLM

    from megatron_patch.generation.loading import load_model, open_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        tiny_checkpoint(scratch)
        checkpoint = open_checkpoint(os.path.join(scratch, "mg"))
        model = load_model(checkpoint, 1)
        hf = LlamaForCausalLM.from_pretrained(os.path.join(scratch, "hf"),
                                              dtype=torch.float32).to(device).eval()
    vocab = checkpoint.args.vocab_size
    prompts = [torch.randint(3, vocab, (n,)).tolist() for n in (5, 17, 9, 30)]
    expected = [hf.generate(torch.tensor([ids], device=device), do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
                for ids in prompts]
    report = {}
    for name in backends:
        try:
            got, _ = generate_batch(make_backend(name, model, 64, opts), prompts, GREEDY,
                                    Limits(new_tokens, None, 0, vocab))
        except Exception as err:  # report it with the rest
            report[name] = {"equal": False, "error": f"{type(err).__name__}: {err}"[:400]}
            continue
        same = sum(a == b for c, e in zip(got, expected) for a, b in zip(c.ids, e))
        report[name] = {"equal": [c.ids for c in got] == expected,
                        "tokens_equal": f"{same}/{len(prompts) * new_tokens}"}
    return report


def kernel_table(prof, steps: int) -> dict:
    """Per decode step: kernel count, GPU busy time and the 12 most expensive kernels."""
    def time_of(event):  # renamed from self_cuda_time_total in torch 2.4
        total = getattr(event, "self_device_time_total", None)
        return event.self_cuda_time_total if total is None else total

    kernels = [e for e in prof.key_averages() if str(e.device_type).endswith("CUDA")
               and time_of(e) > 0]
    kernels.sort(key=time_of, reverse=True)
    return {"kernels_per_step": sum(e.count for e in kernels) / steps,
            "busy_us_per_step": sum(time_of(e) for e in kernels) / steps,
            "top": [(e.key[:90], round(time_of(e) / steps, 1), e.count / steps)
                    for e in kernels[:12]]}


def profile_step(ours, name: str, batch: int, shape: dict, vocab_size: int, opts) -> dict:
    """The kernels of one decode step of a CUDA-graph backend (run eagerly: the same kernels
    its graph replays) and the time of one replay, so launch gaps show as the difference."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_patch.generation.batching import left_pad

    device, steps = next(ours.parameters()).device, 10
    backend = make_backend(name, ours, shape["prompt"] + shape["new"], opts)
    rows = torch.randint(3, vocab_size, (batch, shape["prompt"])).tolist()
    generate_batch(backend, rows, GREEDY, Limits(shape["new"], None, 0, vocab_size))
    backend.start(*left_pad(rows, 0, device))
    window = backend.window()
    with torch.no_grad(), backend.cache_active(), \
            profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            backend.decode_step(window)
        synchronize(device)
    report = kernel_table(prof, steps)
    if not hasattr(backend, "graphs"):
        return report
    graph, _ = backend.graphs.get((window, vocab_size)) or backend.graphs[(window, None)]
    synchronize(device)
    began = time.perf_counter()
    for _ in range(50):
        graph.replay()
    synchronize(device)
    report["replay_us_per_step"] = (time.perf_counter() - began) / 50 * 1e6
    return report


def table(rows: list[dict]) -> str:
    """Markdown table; each row against the bound and against HF compiled at its batch."""
    compiled = {r["batch"]: r["decode_tps"] for r in rows
                if r["stack"] == "HF static cache + torch.compile" and "decode_tps" in r}
    lines = ["| stack | batch | decode tokens/s | prompt+decode tokens/s | of bound | "
             "x HF compiled | warm-up s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "decode_tps" not in row:
            lines.append(f"| {row['stack']} | {row['batch']} | {row['note']} | | | | |")
            continue
        versus = compiled.get(row["batch"])
        ratio = f"{row['decode_tps'] / versus:.2f}" if versus else ""
        lines.append(f"| {row['stack']} | {row['batch']} | {row['decode_tps']:,.0f} | "
                     f"{row['e2e_tps']:,.0f} | {row['of_bound']:.0%} | {ratio} | "
                     f"{row['warmup_s']:.1f} |")
    return "\n".join(lines)


def measure(stack: str, ours, hf, prompts, shape: dict, vocab_size: int, opts) -> dict:
    """decode_tps, e2e_tps (prompt+decode) and warmup_s of one stack at one batch."""
    warm = shape["new"] if stack in GPU_ONLY else 8  # graphs/compile: capture every window
    if stack in OURS:
        return time_ours(ours, OURS[stack], prompts, shape["new"], vocab_size, warm, opts)
    return time_hf(hf, prompts, shape["new"], HF[stack], warm)


def save(results: dict, path: str | None) -> None:
    """``results`` to ``path`` (rewritten after every row) through a temporary file, so an
    interrupted run leaves the last complete results, never a truncated file."""
    if path:
        with open(f"{path}.tmp", "w") as handle:
            json.dump(results, handle, indent=1)
        os.replace(f"{path}.tmp", path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shape, runs on a CPU")
    parser.add_argument("--stacks", nargs="*", help="labels to run (default: all)")
    parser.add_argument("--output", help="write the results as JSON here (after every row)")
    parser.add_argument("--max-seconds", type=float, default=1e9,
                        help="skip the remaining stacks once this much time has passed")
    parser.add_argument("--window-bucket", type=int, default=128,
                        help="cache slots a CUDA-graph decode step reads, rounded up to this")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode of the compiled CUDA-graph backend")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--family", default="llama", help="a registered family (default llama)")
    parser.add_argument("--size", help="its sizes row (default: 1B, or tiny with --tiny)")
    parser.add_argument("--num-layers", type=int, help="fewer layers than the sizes row")
    parser.add_argument("--profile", action="store_true",
                        help="GPU: the kernels of one decode step of the CUDA-graph stacks")
    opts = parser.parse_args(argv)
    unknown = [label for label in opts.stacks or () if label not in ORDER]
    if unknown:
        parser.error(f"--stacks {unknown}: not a stack label; the labels are {list(ORDER)}")
    if opts.output and not os.path.isdir(os.path.dirname(os.path.abspath(opts.output))):
        parser.error(f"--output {opts.output}: its directory does not exist")
    return opts


def timed_rows(stacks, shape, models, results, opts, started) -> None:
    """One row per stack and batch size, appended to ``results`` (saved after each)."""
    ours, hf, args = models
    device = next(ours.parameters()).device
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    bandwidth = copy_bandwidth(device, 2048 if device.type == "cuda" else 64)
    results.update(weight_bytes=weight_bytes, copy_bandwidth=bandwidth, rows=[])
    print(f"weights {weight_bytes / 1e9:.3f} GB, copy bandwidth {bandwidth / 1e12:.3f} TB/s, "
          f"batch-1 bound {bandwidth / weight_bytes:,.0f} tokens/s", flush=True)
    for stack in stacks:
        for batch in shape["batches"]:
            row = {"stack": stack, "batch": batch}
            if time.perf_counter() - started > opts.max_seconds:
                row["note"] = "skipped (time budget)"
            elif hf is None and stack not in OURS:
                row["note"] = "no transformers class for this model"
            else:
                prompts = glm_prompts(ours, torch.randint(3, args.vocab_size,
                                                          (batch, shape["prompt"]),
                                                          device=device))
                try:
                    row.update(measure(stack, ours, hf, prompts, shape, args.vocab_size, opts))
                    row["of_bound"] = row["decode_tps"] / (batch * bandwidth / weight_bytes)
                except Exception as err:  # report and go on: one stack must not lose the rest
                    row["note"] = f"failed: {type(err).__name__}: {str(err)[:300]}"
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            save(results, opts.output)


def profiles(stacks, shape, models, results, opts) -> None:
    """``--profile``: kernels of a decode step of each CUDA-graph stack at each batch size."""
    ours, _, args = models
    results["profile"] = {}
    for stack in stacks:
        if not OURS.get(stack, "").startswith("graph"):
            continue
        for batch in shape["batches"]:
            key = f"{stack} | batch {batch}"
            try:
                results["profile"][key] = profile_step(ours, OURS[stack], batch, shape,
                                                       args.vocab_size, opts)
            except Exception as err:  # a profile is a diagnosis; never lose the timings
                results["profile"][key] = f"failed: {type(err).__name__}: {str(err)[:300]}"
            print(key, json.dumps(results["profile"][key], indent=1), flush=True)
            save(results, opts.output)


def main(argv=None) -> int:
    opts = parse_args(argv)
    shape = dict(SHAPES["tiny" if opts.tiny else "1b"])
    if opts.size:
        shape["size"] = opts.size
    shape.update(family=opts.family, num_layers=opts.num_layers)
    compat.initialize_parallel(1, 1)
    device, started = compat.device(), time.perf_counter()
    gpu = device.type == "cuda"
    stacks = [s for s in ORDER if (gpu or s not in GPU_ONLY)
              and (not opts.stacks or s in opts.stacks)]
    # Compiling is slow: the compiled backend's parity is checked last, after the timings.
    early = [OURS[s] for s in stacks if s in OURS and OURS[s] not in COMPILED]
    results = {"device": torch.cuda.get_device_name() if gpu else "cpu", "shape": shape,
               "options": vars(opts), "parity": {}}
    prefix_lm = bool(get_family(opts.family).args_for_size(shape["size"]).prefix_lm_ids)
    check = prefix_lm_parity if prefix_lm else parity
    if not opts.skip_parity:
        results["parity"] = check([b for b in early if not prefix_lm or b != "mcore"]
                                  + ["uncached"], device, opts)
        print("parity (greedy tokens):", json.dumps(results["parity"]), flush=True)
    models = build_models(shape["size"], shape["precision"], device, opts.family,
                          opts.num_layers)
    timed_rows(stacks, shape, models, results, opts, started)
    if opts.profile and gpu:
        profiles(stacks, shape, models, results, opts)
    compiled = [OURS[s] for s in stacks if OURS.get(s) in COMPILED]
    if compiled and not opts.skip_parity and time.perf_counter() - started < opts.max_seconds:
        results["parity"].update(check(compiled, device, opts))
        print("parity of the compiled stacks:",
              json.dumps({name: results["parity"][name] for name in compiled}))
        from torch._dynamo.utils import counters  # graph breaks hide kernels from fusion

        results["dynamo"] = {key: dict(counters[key]) for key in ("stats", "graph_break")}
    save(results, opts.output)
    print(table(results["rows"]))
    compat.destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
