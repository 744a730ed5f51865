"""Training throughput: megatron_patch's pretrain loop against HF transformers, same shape,
same run.

Default shape (~0.95B parameters): llama, hidden 2048, 16 layers, 16 heads, FFN 5632, vocab
32000, sequence 2048, micro-batch 4, bf16, one GPU. For each stack it prints tokens/s,
TFLOP/s (Megatron-LM's formula, the same for every stack) and peak memory:

  ours            python -m megatron_patch.pretrain --mock-data --bf16 (SDPA core attention,
                  fused AdamW)
  ours+compile    same with --compile-layers (each transformer layer under torch.compile)
  ours+compile+output  also --compile-output-layer (the output layer and its cross-entropy)
  ours+...+foreach-optimizer  with --no-fused-optimizer (megatron-core's own fallbacks)
  ours+...+unfused-wgrad  with --no-gradient-accumulation-fusion (bf16 weight gradients, then
                  added to main_grad)
  ours+...+fp8    with --fp8-format hybrid (FP8 GEMMs in the transformer layers, tensorwise
                  scaling; fp8-e4m3: --fp8-format e4m3; fp8-delayed: --fp8-recipe delayed);
                  --fp8 adds a +fp8 row per ours stack
  ours+...+mbN    micro-batch N instead of --micro-batch-size (tokens/s is per token either way)
  ours(local)     megatron-core's unfused DotProductAttention, for reference
  hf eager        LlamaForCausalLM (sdpa), bf16 autocast, fused AdamW
  hf compiled     the same under torch.compile

    python toolkits/benchmarks/bench_training.py            # on a GPU
    python toolkits/benchmarks/bench_training.py --tiny     # small shape on CPU (smoke test)
    python toolkits/benchmarks/bench_training.py --family bloom --size 1b1
    python toolkits/benchmarks/bench_training.py --family falcon --size 7b --num-layers 16
    python toolkits/benchmarks/bench_training.py --shape 7B --fp8 \
        --ours-args "--recompute-granularity full --global-batch-size 8"

Same work (``--same-work``, on by default when ours and HF stacks both run llama's shapes; with
``--family`` only when asked, not yet run per family): the HF model's
random weights (``--seed``) are saved and converted, every ours stack ``--load``s them
(``--finetune``), and ours and HF train on one batch (an mmap dataset of one random document
repeated, read by megatron-core's GPTDataset); the first losses are printed side by side after
the table, so the speed comparison is of the same computation.

``--shape 7B``: llama2-7B (32 layers, hidden 4096, FFN 11008, vocab 32000) at sequence 4096,
micro-batch 1; its default stacks are ours only (HF's fp32 weights, gradients and AdamW state
take 108 GB before any activation). MFU is TFLOP/s (Megatron-LM's formula: model FLOPs, not
counting recompute) over ``--peak-tflops`` (989: H100/H200 SXM dense bf16).

``--reward``: a reward model instead (python -m megatron_patch.reward_model --mock-data: pairs
of random sequences, the scalar head, the Bradley-Terry loss) against HF's
``*ForSequenceClassification`` on the same rows; ``--micro-batch-size`` counts sequences (two
make a pair), so every stack trains on the same tokens per step.

With ``--family F --size S`` the shape is that family's sizes row (``--num-layers`` fewer
layers when memory demands) and the HF model is the family's own transformers class, built
from the config.json our converter would write for it (sdpa attention).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

SHAPE = dict(num_layers=16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
             vocab_size=32000)
SHAPE_7B = dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
                vocab_size=32000)
SHAPES = {"1B": (SHAPE, 2048, 4), "7B": (SHAPE_7B, 4096, 1)}  # shape, seq, micro-batch
TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4,
            vocab_size=512)


def model_args(shape: dict, opts):
    """The ModelArgs of the benchmarked model: --family's --size row, else llama's shape."""
    from megatron_patch.families.base import ModelArgs
    from megatron_patch.registry import get_family

    reward = {"reward_head": True} if opts.reward else {}
    if opts.family:
        overrides = {"num_layers": opts.num_layers} if opts.num_layers else {}
        return get_family(opts.family).args_for_size(opts.size, **overrides, **reward)
    return ModelArgs(family="llama", **shape, **reward)


def megatron_flops(args, batch: int, seq: int) -> float:
    """Megatron-LM's FLOPs per iteration (the trainer's own formula)."""
    from megatron_patch.training.metrics import flops_per_iteration

    return flops_per_iteration(args, batch, seq, 1 if args.reward_head else args.vocab_size)


def run_ours(shape, opts, extra: list[str]) -> dict:
    """Our pretrain loop in a subprocess; figures from its metrics file (after warm-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "metrics.jsonl")
        if opts.same_work is not None:  # the HF stacks' weights and batch
            model = opts.same_work["ours"]
        elif opts.family:
            model = ["--model-family", opts.family, "--model-size", opts.size, "--mock-data"] + (
                ["--num-layers", str(opts.num_layers)] if opts.num_layers else [])
        else:
            model = ["--model-family", "llama", "--model-size",
                     opts.shape if not opts.tiny else "tiny", "--mock-data"]
        entry, batch = "megatron_patch.pretrain", opts.micro_batch_size
        for flag in extra:  # a +mbN lever
            if flag.startswith("--micro-batch-size="):
                batch = int(flag.partition("=")[2])
        if opts.reward:  # pairs: half as many samples, two sequences each
            entry, batch = "megatron_patch.reward_model", opts.micro_batch_size // 2
            extra = [*extra, "--global-batch-size", str(batch)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
               "--master-port=29517", "-m", entry, *model,
               "--micro-batch-size", str(batch),
               "--seq-length", str(opts.seq_length), "--lr", "1e-4",
               "--train-iters", str(opts.steps), "--eval-iters", "0",
               "--log-interval", str(opts.steps), "--metrics-file", metrics] + extra \
            + opts.ours_args.split()
        if not opts.tiny:
            cmd.append("--bf16")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            return {"error": proc.stderr[-2000:]}
        key = "rm_loss" if opts.reward else "lm_loss"
        rows = [json.loads(line) for line in open(metrics) if key in line]
    first = rows[0][key]
    rows = rows[opts.warmup:]
    return {"tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in rows),
            "tflops": statistics.median(r["tflops_per_gpu"] for r in rows),
            "peak_gib": max(r["memory_gib"] for r in rows), "loss": rows[-1][key],
            "first_loss": first}


def build_hf(shape, opts):
    """The HF model (LlamaForCausalLM, or --family's class) with random weights, on the CPU;
    from ``opts.same_work``'s saved weights when there are some."""
    from transformers import (AutoConfig, AutoModelForCausalLM,
                              AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM)

    if isinstance(opts.same_work, dict):
        model = AutoModelForCausalLM.from_pretrained(opts.same_work["hf_dir"],
                                                     attn_implementation=opts.same_work["attn"])
        print(f"hf: {type(model).__name__} from the weights ours loads (converted)", flush=True)
        return model
    if opts.reward:
        from megatron_patch.registry import get_family

        fields = get_family(opts.family or "llama").hf_config_from_args(model_args(shape, opts))
        config = AutoConfig.for_model(**fields, pad_token_id=0)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
        print(f"hf: {type(model).__name__}", flush=True)
    elif opts.family:
        from megatron_patch.registry import get_family

        from megatron_patch.families.chatglm import transformers_layout

        fields = get_family(opts.family).hf_config_from_args(
            transformers_layout(model_args(shape, opts)))
        config = AutoConfig.for_model(**fields)
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        except ValueError:  # BLOOM has no SDPA path in transformers: its own (eager) attention
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        print(f"hf: {type(model).__name__}, attention {model.config._attn_implementation}",
              flush=True)
    else:
        config = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                             intermediate_size=shape["ffn_hidden_size"],
                             num_hidden_layers=shape["num_layers"],
                             num_attention_heads=shape["num_attention_heads"],
                             max_position_embeddings=opts.seq_length, attn_implementation="sdpa")
        model = LlamaForCausalLM(config)
    return model


def prepare_same_work(shape, opts, root: str) -> dict:
    """The HF stacks' weights and batch for the ours stacks too: the HF model's random weights
    saved and converted (megatron_patch.convert's engine), and an mmap dataset of one random
    document of --seq-length tokens repeated, so that every sample, ours and HF's, is that
    document with its first token as the last label."""
    import numpy as np

    from megatron_patch.convert import engine
    from megatron_patch.data.indexed import IndexedDatasetWriter, token_dtype

    torch.manual_seed(opts.seed)
    model = build_hf(shape, opts)
    hf_dir, mg_dir = os.path.join(root, "hf"), os.path.join(root, "megatron")
    model.save_pretrained(hf_dir, safe_serialization=True)
    attn = model.config._attn_implementation
    vocab = model.config.vocab_size
    del model
    engine.convert_hf_to_megatron(hf_dir, mg_dir, target=engine.Target(1, 1), progress=False)
    document = torch.randint(1, vocab, (opts.seq_length,),
                             generator=torch.Generator().manual_seed(opts.seed))
    prefix = os.path.join(root, "data_text_document")
    copies = 64  # more epochs of it are built as needed
    with IndexedDatasetWriter(prefix, token_dtype(vocab)) as writer:
        writer.add_documents(np.tile(document.numpy(), copies),
                             np.full(copies, opts.seq_length), np.ones(copies, np.int64))
        writer.finalize()
    return {"hf_dir": hf_dir, "attn": attn, "document": document,
            "ours": ["--load", mg_dir, "--finetune", "--data-path", prefix, "--split", "100,0,0",
                     "--data-cache-path", os.path.join(root, "cache"), "--seed", str(opts.seed)]}


def run_hf(shape, opts, compiled: bool) -> dict:
    """The HF model's training steps in this process (LlamaForCausalLM, or --family's class)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_hf(shape, opts).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    step_model = torch.compile(model) if compiled else model
    ids = torch.randint(1, model.config.vocab_size, (opts.micro_batch_size, opts.seq_length),
                        device=device)
    labels = {"labels": ids}
    if opts.same_work is not None:  # ours' sample: the next token of the last is the first
        ids = opts.same_work["document"].to(device).expand(opts.micro_batch_size, -1)
        labels = {"labels": ids, "shift_labels": ids.roll(-1, dims=1)}
    times, first_loss = [], None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(opts.steps):
        start = time.time()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=not opts.tiny):
            if opts.reward:  # rows [chosen..., rejected...], no padding: the last token scores
                scores = step_model(input_ids=ids).logits.float()[:, 0]
                half = scores.numel() // 2
                loss = -torch.nn.functional.logsigmoid(scores[:half] - scores[half:]).mean()
            else:
                loss = step_model(input_ids=ids, **labels).loss
        first_loss = loss.item() if first_loss is None else first_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - start)
    seconds = statistics.median(times[opts.warmup:])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del model, optimizer, step_model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"tokens_per_sec": opts.micro_batch_size * opts.seq_length / seconds,
            "seconds": seconds, "peak_gib": peak, "loss": loss.item(), "first_loss": first_loss}


# ``ours+LEVER+...`` stacks: each lever adds its flags to the pretrain command line.
LEVERS = {
    "compile": ["--compile-layers"],
    "output": ["--compile-output-layer"],
    "foreach-optimizer": ["--no-fused-optimizer"],
    "unfused-wgrad": ["--no-gradient-accumulation-fusion"],
    "fp8": ["--fp8-format", "hybrid"],
    "fp8-e4m3": ["--fp8-format", "e4m3"],
    "fp8-delayed": ["--fp8-format", "hybrid", "--fp8-recipe", "delayed"],
}


def ours_flags(name: str) -> list[str] | None:
    """The pretrain flags of stack ``ours[+LEVER...]``; None for another name."""
    head, *levers = name.split("+")
    flags = []
    for lever in levers:
        if lever.startswith("mb") and lever[2:].isdigit():
            flags.append(f"--micro-batch-size={lever[2:]}")
        elif lever in LEVERS:
            flags += LEVERS[lever]
        else:
            return None
    return flags if head == "ours" else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shape, CPU smoke test")
    parser.add_argument("--steps", type=int, default=None, help="iterations per stack")
    parser.add_argument("--warmup", type=int, default=None, help="iterations not timed")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1B",
                        help="llama's 0.95B benchmark shape (seq 2048, micro-batch 4) or "
                             "llama2-7B's (seq 4096, micro-batch 1)")
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--seq-length", type=int, default=None)
    parser.add_argument("--stacks", default=None,
                        help="comma-separated: ours[+LEVER...] (levers: "
                             f"{', '.join(LEVERS)}, mbN), ours(local), hf eager, hf compiled "
                             "(default 1B: ours, ours+compile, ours+compile+output, hf eager, "
                             "hf compiled; 7B: ours+compile+output)")
    parser.add_argument("--fp8", action="store_true",
                        help="after each ours stack, the same stack with +fp8")
    parser.add_argument("--ours-args", default="",
                        help="extra pretrain flags for every ours stack, e.g. "
                             "\"--recompute-granularity full --global-batch-size 8\"")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak for the MFU column")
    parser.add_argument("--family", help="a registered family (default: llama's 1B shape)")
    parser.add_argument("--size", help="--family's sizes row, e.g. bloom 1b1, falcon 7b")
    parser.add_argument("--num-layers", type=int, help="with --family: fewer layers than the row")
    parser.add_argument("--reward", action="store_true",
                        help="a reward model (scalar head, pairwise loss) against HF's "
                             "*ForSequenceClassification")
    parser.add_argument("--same-work", action=argparse.BooleanOptionalAction, default=None,
                        help="ours stacks load the HF stacks' random weights (converted) and "
                             "train on the same batch, and the first losses are compared "
                             "(default: on when ours and HF stacks both run, for llama's "
                             "shapes; --family F --same-work asks for it, untested per family)")
    parser.add_argument("--seed", type=int, default=1234, help="weights and batch")
    opts = parser.parse_args(argv)
    if opts.family and not opts.size:
        parser.error("--family needs --size (a row of its sizes table)")
    shape, seq, micro = SHAPES[opts.shape]
    shape = TINY if opts.tiny else shape
    opts.seq_length = opts.seq_length or (64 if opts.tiny else seq)
    opts.micro_batch_size = opts.micro_batch_size or (4 if opts.tiny else micro)
    opts.stacks = opts.stacks or ("ours+compile+output" if opts.shape == "7B" else
                                  "ours,ours+compile,ours+compile+output,hf eager,hf compiled")
    opts.steps = opts.steps or (6 if opts.tiny else 20)
    opts.warmup = opts.warmup if opts.warmup is not None else (2 if opts.tiny else 5)
    stacks = {
        "ours(local)": lambda: run_ours(shape, opts, ["--attention-backend", "local"]),
        "hf eager": lambda: run_hf(shape, opts, False),
        "hf compiled": lambda: run_hf(shape, opts, True),
    }
    args = model_args(shape, opts)
    flops = megatron_flops(args, opts.micro_batch_size, opts.seq_length)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if opts.family:
        shape = {k: getattr(args, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                               "num_attention_heads", "num_query_groups",
                                               "vocab_size")}
        shape = {"family": f"{opts.family} {opts.size}", **shape}
    print(f"shape {shape}, seq {opts.seq_length}, micro-batch {opts.micro_batch_size}, "
          f"{'fp32' if opts.tiny else 'bf16'}, {opts.steps} steps ({opts.warmup} warm-up), {gpu}")
    names = [s.strip() for s in opts.stacks.split(",")]
    if opts.fp8:
        names = [n for name in names for n in
                 ([name, name + "+fp8"] if name.startswith("ours+") or name == "ours"
                  else [name])]
    both = any(n.startswith("ours") for n in names) and any(n.startswith("hf") for n in names)
    if opts.same_work and opts.reward:
        parser.error("--same-work is for language models (not --reward)")
    if opts.same_work is None:
        opts.same_work = both and not opts.reward and not opts.family
    scratch = tempfile.TemporaryDirectory()
    if opts.same_work:
        started = time.time()
        opts.same_work = prepare_same_work(shape, opts, scratch.name)
        print(f"same work: ours loads the HF model's random weights (seed {opts.seed}, "
              f"converted in {time.time() - started:.0f} s) and both train on one batch",
              flush=True)
    else:
        opts.same_work = None
    if opts.ours_args:
        print(f"ours stacks also take: {opts.ours_args}")
    width = max(14, *(len(name) for name in names))
    print(f"{'stack':<{width}} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} "
          f"{'loss':>8}")
    results = {}
    for name in names:
        if name not in stacks and ours_flags(name) is None:
            parser.error(f"--stacks: unknown stack {name!r}; one of {', '.join(stacks)} or "
                         f"ours[+LEVER...] with levers {', '.join(LEVERS)}, mbN")
    for name in names:
        run = stacks.get(name) or (lambda: run_ours(shape, opts, ours_flags(name)))
        result = results[name] = run()
        if "error" in result:
            print(f"{name:<{width}} failed: {result['error']}")
            continue
        tflops = result.get("tflops") or flops / result["seconds"] / 1e12
        print(f"{name:<{width}} {result['tokens_per_sec']:>10.0f} {tflops:>8.1f} "
              f"{tflops / opts.peak_tflops:>6.1%} {result['peak_gib']:>9.1f} "
              f"{result['loss']:>8.3f}", flush=True)
    base = results.get("hf compiled", {}).get("tokens_per_sec")
    ours = {k: r["tokens_per_sec"] for k, r in results.items()
            if k.startswith("ours") and "tokens_per_sec" in r}
    if base and ours:
        best = max(ours, key=ours.get)
        print(f"best of ours ({best}) / hf compiled: {ours[best] / base:.2f}x")
    if opts.same_work is not None:
        print_first_losses(results)
    scratch.cleanup()
    return 0


def print_first_losses(results: dict) -> None:
    """Each ours stack's first loss against the first HF stack's: the same weights and batch,
    so they differ by the arithmetic only (bf16, the kernels)."""
    hf = next((k for k, r in results.items() if k.startswith("hf") and "first_loss" in r), None)
    if hf is None:
        return
    reference = results[hf]["first_loss"]
    print(f"first loss on the same batch from the same weights: {hf} {reference:.5f}")
    for name, result in results.items():
        if name != hf and "first_loss" in result:
            diff = result["first_loss"] - reference
            print(f"  {name}: {result['first_loss']:.5f} ({name} - {hf}: {diff:+.2e}, "
                  f"relative {abs(diff) / abs(reference):.1e})")


if __name__ == "__main__":
    sys.exit(main())
