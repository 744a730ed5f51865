"""One PPO episode of ``python -m megatron_patch.rlhf``, timed per phase, with the generation's
tokens/s against the memory-bandwidth bound measured in the same run.

Shape (default): the ~1B llama of the GPU baseline (registry size ``1B``) as actor and
reference, and a reward model of the same shape as critic and reward model (random weights,
bf16, built by examples/rlhf/make_tiny.py --size 1B), all six roles colocated on one GPU. Each
episode samples ``--samples`` responses of ``--new-tokens`` tokens (EOS is rare from random
weights, so nearly every response is full length) in generation batches of ``--batch``, then
trains actor and critic on them in one optimizer step each. Episode 1 includes the one-time
costs (CUDA-graph capture, allocator warm-up); the table reports every episode.

The generation bound is batch x copy bandwidth / weight bytes (bench_generation.py's: each
decode step reads every weight once); generation tokens/s counts the sampled tokens over the
whole generation phase (prefill included).

    python toolkits/benchmarks/bench_rlhf.py [--backends graph,static] [--output out.json]
    python toolkits/benchmarks/bench_rlhf.py --tiny      # the tiny shape on the CPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PHASES = ("generation", "reference", "value", "reward", "training")
ROLES = {"ppo_policy": ("sft", True), "policy": ("sft", False), "reference": ("sft", False),
         "reward_train": ("rm", True), "reward_forward": ("rm", False),
         "reward_ref": ("rm", False)}


def write_config(root: str, models: str, opts, backend: str, offload: bool = True) -> str:
    os.makedirs(os.path.join(root, "models"), exist_ok=True)
    for name in ("sft", "rm"):
        lines = [f"load: {os.path.join(models, name)}", "tensor_model_parallel_size: 1",
                 f"seq_length: {opts.prompt_room + opts.new_tokens}", "lr: 1.0e-6",
                 "lr_decay_style: constant", "clip_grad: 1.0"]
        if not opts.tiny:
            lines.append("bf16: True")
        with open(os.path.join(root, "models", f"{name}.yaml"), "w") as handle:
            handle.write("\n".join(lines) + "\n")
    roles = "\n".join(f"    {role}: {{model_config_file: models/{file}.yaml, num_device: 1, "
                      f"trainable: {trained}}}" for role, (file, trained) in ROLES.items())
    path = os.path.join(root, "rlhf.yaml")
    with open(path, "w") as handle:
        handle.write(f"""models:
{roles}
rlhf:
    prompt_data: {os.path.join(models, "prompts.jsonl")}
    generation_batch_size: {opts.batch}
    train_micro_batch_size: {opts.micro_batch}
    sample_per_episode: {opts.samples}
    num_ppo_episode: {opts.episodes}
    max_new_tokens: {opts.new_tokens}
    inference_backend: {backend}
    offload_training_state: {offload}
    metrics_file: metrics.jsonl
""")
    return path


def run_episodes(config: str, timeout: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           "1", "--master-port", str(free_port()), "-m", "megatron_patch.rlhf",
                           "--config", config], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if "episode" in line or "RLHF" in line]
    print("\n".join(lines[:2]), flush=True)
    if proc.returncode:
        raise SystemExit(f"the RLHF run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-5000:]}")
    with open(os.path.join(os.path.dirname(config), "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def table(rows: list[dict], bound: float) -> str:
    head = ("| backend | episode | " + " | ".join(f"{p} s" for p in PHASES)
            + " | episode s | generation tokens/s | of bound | agreement | generation peak GiB"
            " | episode peak GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        total = sum(row[f"{p}_seconds"] for p in PHASES)
        lines.append(f"| {row['backend']} | {row['episode']} | "
                     + " | ".join(f"{row[f'{p}_seconds']:.2f}" for p in PHASES)
                     + f" | {total:.2f} | {row['generation_tokens_per_sec']:,.0f} | "
                     f"{row['generation_tokens_per_sec'] / bound:.0%} | "
                     f"{row['agreement']:.4f} | {row.get('generation_memory_gib', 0):.1f} | "
                     f"{row.get('memory_gib', 0):.1f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny shape in fp32 (CPU)")
    parser.add_argument("--size", help="llama sizes row (default 1B; tiny with --tiny)")
    parser.add_argument("--backends", help="inference backends to time, comma-separated "
                        "(default graph on a GPU, static on the CPU; also graph-compiled, mcore)")
    parser.add_argument("--samples", type=int, help="responses per episode (default 64)")
    parser.add_argument("--batch", type=int, help="generation batch (default 16)")
    parser.add_argument("--micro-batch", type=int, default=4, help="training micro-batch")
    parser.add_argument("--new-tokens", type=int, help="tokens per response (default 256)")
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--compare-offload", action="store_true", help="also run the first "
                        "backend with offload_training_state off (memory during generation)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per RLHF run")
    parser.add_argument("--models", help="a directory of make_tiny.py's models to reuse (built "
                        "there when missing)")
    parser.add_argument("--output", help="JSON of every figure")
    opts = parser.parse_args(argv)
    tiny = dict(size="tiny", samples=8, batch=4, new_tokens=16)
    full = dict(size="1B", samples=64, batch=16, new_tokens=256)
    for key, value in (tiny if opts.tiny else full).items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    opts.prompt_room = 64
    return opts


def main(argv=None) -> int:
    import torch

    from bench_generation import copy_bandwidth

    opts = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not opts.tiny else "cpu")
    scratch = tempfile.mkdtemp(prefix="bench_rlhf_")
    models = opts.models or os.path.join(scratch, "models")
    if not os.path.isdir(os.path.join(models, "sft")):
        subprocess.run([sys.executable, os.path.join(ROOT, "examples", "rlhf", "make_tiny.py"),
                        models, "--size", opts.size, "--prompts", str(max(opts.samples, 256)),
                        "--dtype", "float32" if opts.tiny else "bfloat16"], check=True,
                       stdout=subprocess.DEVNULL)
    from megatron_patch.convert.megatron_io import read_metadata

    meta = read_metadata(os.path.join(models, "sft"))
    weights = sum(os.path.getsize(os.path.join(dirpath, name)) for dirpath, _, names
                  in os.walk(os.path.join(models, "sft")) for name in names if name.endswith(".pt"))
    opts.backends = opts.backends or ("graph" if device.type == "cuda" else "static")
    bandwidth = copy_bandwidth(device, 2048 if device.type == "cuda" else 64)
    bound = opts.batch * bandwidth / weights
    print(f"{opts.size} llama ({meta['model_args']['num_layers']} layers, hidden "
          f"{meta['model_args']['hidden_size']}): weights {weights / 1e9:.3f} GB, copy "
          f"bandwidth {bandwidth / 1e12:.3f} TB/s, generation bound at batch {opts.batch}: "
          f"{bound:,.0f} tokens/s | {opts.samples} samples x {opts.new_tokens} new tokens per "
          f"episode", flush=True)
    rows = []
    runs = [(backend, True) for backend in opts.backends.split(",")]
    if opts.compare_offload:
        runs.append((runs[0][0], False))
    for backend, offload in runs:
        label = backend if offload else f"{backend}, no offload"
        run_dir = os.path.join(scratch, label.replace(", ", "_").replace(" ", "_"))
        for row in run_episodes(write_config(run_dir, models, opts, backend, offload),
                                opts.timeout):
            rows.append({"backend": label, **row})
    print(table(rows, bound), flush=True)
    if opts.output:
        with open(opts.output, "w") as handle:
            json.dump({"size": opts.size, "weight_bytes": weights, "copy_bandwidth": bandwidth,
                       "bound": bound, "rows": rows, "device": str(device),
                       "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
                      handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
