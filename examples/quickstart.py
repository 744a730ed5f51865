#!/usr/bin/env python3
"""The quickstart: megatron_patch's whole pipeline on an embedded corpus, with no downloads.

    bash examples/quickstart.sh [OUTPUT_DIR]      # installs what is missing, then runs this
    python examples/quickstart.py [--output-dir DIR] [--fast] [--train-iters N]

Stages, each through the tool a user would run:

 1. corpus     the installed standard library's docstrings, written as WuDao-style JSON
 2. clean      toolkits/pretrain_data_preprocessing/clean_raw_text.py
 3. shard      toolkits/pretrain_data_preprocessing/shard_jsonl.py (jsonl.zst shards)
 4. tokenizer  a byte-level BPE tokenizer trained on the shards
 5. dataset    python -m megatron_patch.data.preprocess (megatron-core mmap .bin/.idx)
 6. model      a random HF llama of a sizes-table row, saved with the tokenizer
 7. convert    model_convertor_huggingface_megatron.sh (HF -> Megatron)
 8. pretrain   examples/llama/run_pretrain_megatron_llama.sh (the seed launcher, torchrun)
 9. export     model_convertor_huggingface_megatron.sh (Megatron -> HF)
10. generate   HF transformers: loss on corpus text, and a sample from ``generate``
11. plot       toolkits/plot_metrics.py (when matplotlib is installed)

On a GPU machine the run is larger (the ``small`` row, bf16, every visible GPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLKITS = os.path.join(REPO, "toolkits")
CONVERTER = os.path.join(TOOLKITS, "model_checkpoints_convertor", "llama",
                         "model_convertor_huggingface_megatron.sh")
LAUNCHER = os.path.join(REPO, "examples", "llama", "run_pretrain_megatron_llama.sh")
# What a run writes under OUTPUT_DIR; a new run removes these (and nothing else) first.
OUTPUTS = ("raw", "cleaned", "cleaned.summary.json", "shards", "tokenizer", "data", "hf_init",
           "megatron_init", "train", "hf_trained", "sample.txt", "curves.png")
PROMPTS = ("Return the", "This module provides")


@dataclasses.dataclass(frozen=True)
class Setting:
    """How big a quickstart run is."""

    model_size: str          # a row of the llama sizes table (its vocabulary: the tokenizer's)
    vocab_size: int          # BPE vocabulary trained on the corpus
    max_docs: int | None     # corpus documents (None: every docstring, about 1.2 MB)
    seq_length: int
    micro_batch_size: int
    train_iters: int
    lr: float
    precision: str           # the launcher's PR
    lines_per_shard: int


SETTINGS = {
    "cpu": Setting("tiny", 2048, None, 128, 16, 500, 5e-3, "fp32", 500),
    # 400 iterations: about 12 passes over the corpus; more only lowers the training loss (the
    # validation loss rose again from about 450 on in a 600-iteration run on an H200).
    "gpu": Setting("small", 4096, None, 256, 32, 400, 2e-3, "bf16", 500),
    "fast": Setting("tiny", 512, 300, 64, 8, 30, 5e-3, "fp32", 100),
}


class Report:
    """Numbered stage headers with their durations, and indented figures."""

    def __init__(self, total: int):
        self.total, self.number = total, 0
        self.started = self.stage_start = time.time()

    def stage(self, title: str) -> None:
        """Start the next stage."""
        self.number += 1
        self.stage_start = time.time()
        print(f"\n[{self.number}/{self.total}] {title}", flush=True)

    def line(self, text: str) -> None:
        """A figure of the current stage."""
        print(f"    {text}", flush=True)

    def done(self, text: str = "") -> None:
        """The stage's last line, with its duration."""
        self.line(f"{text}{'; ' if text else ''}{time.time() - self.stage_start:.1f} s")


def run(cmd: list[str], env: dict | None = None) -> str:
    """Run a tool; its output on success, its output and a clear failure otherwise."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})))
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"quickstart: `{' '.join(cmd)}` failed with exit code {proc.returncode}")
    return proc.stdout + proc.stderr


def human_size(path: str) -> str:
    """Size of a file or directory tree, in KB or MB."""
    size = os.path.getsize(path) if os.path.isfile(path) else sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return f"{size / 1e6:.2f} MB" if size >= 1e6 else f"{size / 1e3:.1f} KB"


def write_corpus(out: str, setting: Setting, report: Report) -> str:
    """WuDao-style JSON lists ({id, title, content, ...}) of the stdlib docstrings."""
    import itertools

    from megatron_patch.data.corpus import iter_stdlib_docstrings

    report.stage("corpus: the standard library's docstrings, written as WuDao-style JSON")
    docs = list(itertools.islice(iter_stdlib_docstrings(), setting.max_docs))
    raw = os.path.join(out, "raw")
    os.makedirs(raw)
    per_file = -(-len(docs) // 4)
    for part in range(4):
        records = []
        for number, text in enumerate(docs[part * per_file:(part + 1) * per_file],
                                      start=part * per_file):
            title, _, content = text.partition("\n")
            records.append({"id": number, "uniqueKey": f"stdlib-{number:05d}",
                            "dataType": "docstring", "title": title, "content": content})
        with open(os.path.join(raw, f"part-{part:02d}.json"), "w", encoding="utf-8") as handle:
            json.dump(records, handle, ensure_ascii=False, indent=1)
    report.done(f"{len(docs)} documents, {sum(map(len, docs)):,} characters, 4 files "
                f"({human_size(raw)}) -> {raw}")
    return raw


def clean(out: str, raw: str, report: Report) -> str:
    """clean_raw_text.py over the raw files; the figures from its summary."""
    report.stage("clean: clean_raw_text.py (normalise, filter, deduplicate)")
    cleaned = os.path.join(out, "cleaned")
    run([sys.executable, os.path.join(TOOLKITS, "pretrain_data_preprocessing", "clean_raw_text.py"),
         "-i", raw, "-o", cleaned, "-p", str(min(4, os.cpu_count() or 1))])
    with open(f"{cleaned}.summary.json", encoding="utf-8") as handle:
        summary = json.load(handle)
    dropped = ", ".join(f"{n} {why}" for why, n in summary["dropped"].items() if n) or "none"
    report.done(f"{summary['documents_read']} read, {summary['documents_kept']} kept "
                f"(dropped: {dropped}) -> {cleaned}")
    return cleaned


def shard(out: str, cleaned: str, setting: Setting, report: Report) -> str:
    """shard_jsonl.py: the cleaned JSON lines cut into zstd-compressed shards."""
    report.stage("shard: shard_jsonl.py (split into shards, zstd-compressed)")
    shards = os.path.join(out, "shards")
    run([sys.executable, os.path.join(TOOLKITS, "pretrain_data_preprocessing", "shard_jsonl.py"),
         "--input", cleaned, "--output-dir", shards,
         "--lines-per-shard", str(setting.lines_per_shard)])
    report.done(f"{len(os.listdir(shards))} shards of up to {setting.lines_per_shard} documents, "
                f"{human_size(shards)} (from {human_size(cleaned)}) -> {shards}")
    return shards


def shard_texts(shards: str) -> list[str]:
    """The ``text`` of every line of the shards, in order."""
    from megatron_patch.data.readers import expand_inputs, iter_chunks, parse_lines

    texts = []
    for chunk in iter_chunks(expand_inputs([shards])):
        _, values, _ = parse_lines(chunk.data.splitlines(), chunk.first_line, ["text"])
        texts += [" ".join(parts) for parts in values["text"]]
    return texts


def train_tokenizer(out: str, shards: str, setting: Setting, report: Report) -> str:
    """A byte-level BPE tokenizer trained on the shards."""
    from megatron_patch.tokenizers.train import train_bpe_tokenizer

    report.stage(f"tokenizer: byte-level BPE, {setting.vocab_size} tokens, trained on the shards")
    from transformers import AutoTokenizer

    texts = shard_texts(shards)
    tokenizer = train_bpe_tokenizer(texts, setting.vocab_size, os.path.join(out, "tokenizer"))
    example = "Return the number of items in the list."
    trained = AutoTokenizer.from_pretrained(tokenizer)
    pieces = [trained.decode([i]) for i in trained(example)["input_ids"]]
    report.line(f"trained on {len(texts)} documents; {example!r} -> {len(pieces)} tokens: "
                f"{'|'.join(pieces)}")
    report.done(f"-> {tokenizer}")
    return tokenizer


def build_dataset(out: str, shards: str, tokenizer: str, report: Report) -> tuple[str, int]:
    """megatron_patch.data.preprocess: the shards as a megatron-core mmap dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    report.stage("dataset: python -m megatron_patch.data.preprocess (mmap .bin/.idx)")
    prefix = os.path.join(out, "data", "stdlib")
    run([sys.executable, "-m", "megatron_patch.data.preprocess", "--input", shards,
         "--output-prefix", prefix, "--tokenizer-type", "llamabpe", "--tokenizer-model",
         tokenizer, "--append-eod", "--workers", str(min(4, os.cpu_count() or 1))])
    prefix += "_text_document"
    dataset = IndexedDataset(prefix)
    tokens = int(dataset.sequence_lengths.sum())
    report.done(f"{len(dataset)} documents, {tokens:,} tokens ({human_size(prefix + '.bin')}) "
                f"-> {prefix}.bin/.idx")
    return prefix, tokens


def build_model(out: str, tokenizer_dir: str, setting: Setting, report: Report) -> str:
    """A random HF llama of the sizes-table row (vocabulary: the tokenizer's), with the
    tokenizer saved beside it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from megatron_patch.registry import get_family

    report.stage(f"model: a random HF llama of the sizes-table row '{setting.model_size}'")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    family = get_family("llama")
    args = family.args_for_size(setting.model_size, vocab_size=len(tokenizer))
    config = family.hf_config_from_args(args)
    config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"),
                                                                  **config))
    hf_dir = os.path.join(out, "hf_init")
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    params = sum(p.numel() for p in model.parameters())
    report.done(f"{args.num_layers} layers, hidden {args.hidden_size}, {args.num_attention_heads} "
                f"heads, vocab {args.vocab_size}: {params / 1e6:.2f}M parameters -> {hf_dir}")
    return hf_dir


def convert(source: str, target: str, to_hf: bool, report: Report) -> str:
    """The seed's converter script, HF -> Megatron (TP 1, PP 1) or back."""
    direction = "Megatron -> HF" if to_hf else "HF -> Megatron"
    report.stage(f"convert: model_convertor_huggingface_megatron.sh ({direction})")
    output = run(["bash", CONVERTER, "none", source, target, "1", "1", str(to_hf).lower()])
    report.line(next(line for line in output.splitlines() if line.startswith("converted")))
    report.done(f"{human_size(target)} -> {target}")
    return target


ITERATION_LINE = re.compile(r"iteration\s+(\d+)/\s*(\d+) .*?learning rate: (\S+) .*?"
                            r"lm loss: (\S+) .*?tokens/s: (\S+)")


def stream_training(cmd: list[str], env: dict, every: int, report: Report) -> None:
    """Run the launcher, printing its banner, every ``every``-th iteration (condensed),
    validation and checkpoint lines; the whole output is in the launcher's log file."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore", **env))
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line])[-60:]
        match = ITERATION_LINE.search(line)
        if match and (int(match[1]) % every == 0 or match[1] == "1"):
            report.line(f"iteration {match[1]:>4}/{match[2]} | lm loss {float(match[4]):.3f} | "
                        f"lr {float(match[3]):.2e} | {float(match[5]):,.0f} tokens/s")
        elif not match and ("[megatron_patch]" in line or "validation loss" in line):
            report.line(line.strip())
    if proc.wait():
        sys.stderr.write("".join(tail))
        raise SystemExit(f"quickstart: the pretraining launcher failed (exit {proc.returncode})")


def pretrain(out: str, data: str, megatron: str, setting: Setting, report: Report) -> dict:
    """The seed's pretraining launcher (ENV dsw: every visible GPU, else one CPU process)."""
    import torch

    from megatron_patch.training.launcher_check import PRETRAIN_ARGS

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    global_batch = setting.micro_batch_size * max(1, gpus)
    tokens = setting.train_iters * global_batch * setting.seq_length
    report.stage(f"pretrain: run_pretrain_megatron_llama.sh, {setting.train_iters} iterations of "
                 f"{global_batch} x {setting.seq_length} tokens on "
                 f"{f'{gpus} GPU(s)' if gpus else 'the CPU'}")
    train_dir = os.path.join(out, "train")
    values = dict(ENV="dsw", MEGATRON_PATH="none", MEGATRON_PATCH_PATH=REPO,
                  MODEL_SIZE=setting.model_size, BATCH_SIZE=setting.micro_batch_size,
                  GLOBAL_BATCH_SIZE=global_batch, LR=setting.lr, MIN_LR=setting.lr / 10,
                  SEQ_LEN=setting.seq_length, EXTRA_VOCAB_SIZE=0, PR=setting.precision, TP=1,
                  PP=1, AC="none", DO="false", FL="false", SP="false",
                  SAVE_INTERVAL=setting.train_iters, DATASET_PATH=data,
                  PRETRAIN_CHECKPOINT_PATH=megatron, TRAIN_TOKENS=tokens,
                  WARMUP_TOKENS=tokens // 20, OUTPUT_BASEPATH=train_dir)
    args = [str(values[name]) for name in PRETRAIN_ARGS]
    every = max(1, setting.train_iters // 10)
    extra = f"--eval-interval {max(1, setting.train_iters // 4)} --eval-iters 4"
    stream_training(["bash", LAUNCHER, *args],
                    {"PYTHON": sys.executable, "EXTRA_TRAIN_ARGS": extra}, every, report)
    return training_figures(train_dir, report)


def training_figures(train_dir: str, report: Report) -> dict:
    """First and last loss, throughput and the output paths of the launcher's run."""
    (name,) = os.listdir(os.path.join(train_dir, "checkpoint"))
    metrics = os.path.join(train_dir, "metrics", f"{name}.jsonl")
    with open(metrics, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    train = [row for row in rows if "lm_loss" in row]
    valid = [row["valid_lm_loss"] for row in rows if "valid_lm_loss" in row]
    timed = train[1:] or train  # iteration 1 includes the start-up: left out unless alone
    figures = dict(first_loss=train[0]["lm_loss"], last_loss=train[-1]["lm_loss"],
                   valid_loss=valid[-1] if valid else None, iterations=len(train),
                   tokens_per_sec=statistics.median(r["tokens_per_sec"] for r in timed),
                   checkpoint=os.path.join(train_dir, "checkpoint", name), metrics=metrics,
                   log=os.path.join(train_dir, "log", f"{name}.log"))
    report.line(f"lm loss {figures['first_loss']:.3f} (iteration 1) -> {figures['last_loss']:.3f} "
                f"(iteration {len(train)}): fell by "
                f"{figures['first_loss'] - figures['last_loss']:.2f} nats; median "
                f"{figures['tokens_per_sec']:,.0f} tokens/s")
    report.done(f"checkpoint {figures['checkpoint']}, metrics {metrics}, log {figures['log']}")
    return figures


def sample(out: str, hf_dir: str, shards: str, seq_length: int, report: Report) -> dict:
    """HF transformers on the exported model: its loss on corpus text, and generated samples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report.stage("generate: HF transformers on the exported model")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    # The corpus's last documents: GPTDataset's validation split (--split 969,30,1) is there.
    ids = tokenizer(" ".join(shard_texts(shards)[-40:]), return_tensors="pt").input_ids
    rows = min(4, ids.shape[1] // seq_length)
    batch = ids[0, :rows * seq_length].view(rows, seq_length)
    with torch.no_grad():
        loss = model(batch, labels=batch).loss.item()
    report.line(f"HF loss on {rows} x {seq_length} tokens of the corpus's last documents: "
                f"{loss:.3f}")
    torch.manual_seed(0)
    lines = []
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=40, do_sample=True, top_k=40,
                                temperature=0.8, repetition_penalty=1.2,
                                pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(output[0], skip_special_tokens=True)
        lines.append(text)
        report.line(f"{prompt!r} -> {text!r}")
    path = os.path.join(out, "sample.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    report.done(f"-> {path}")
    return dict(hf_loss=loss, samples=lines)


def plot(out: str, metrics: str, report: Report) -> str | None:
    """toolkits/plot_metrics.py, when matplotlib is there."""
    import importlib.util

    report.stage("plot: toolkits/plot_metrics.py (loss, lr, tokens/s)")
    if importlib.util.find_spec("matplotlib") is None:
        report.done(f"skipped: pip install matplotlib, then python toolkits/plot_metrics.py "
                    f"{metrics} -o curves.png")
        return None
    path = os.path.join(out, "curves.png")
    run([sys.executable, os.path.join(TOOLKITS, "plot_metrics.py"), metrics, "-o", path])
    report.done(f"-> {path}")
    return path


def quiet_libraries() -> None:
    """No library warnings or progress bars between the stage reports (the tools' own output
    is in their logs)."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging

    logging.disable_progress_bar()


def choose_setting(args) -> tuple[str, Setting]:
    """--fast, else the GPU setting when there is a GPU, else the CPU one; --train-iters wins."""
    import torch

    name = "fast" if args.fast else "gpu" if torch.cuda.is_available() else "cpu"
    setting = SETTINGS[name]
    if args.train_iters:
        setting = dataclasses.replace(setting, train_iters=args.train_iters)
    return name, setting


def clear_outputs(out: str) -> None:
    """Remove what an earlier quickstart wrote to ``out`` (only the names it writes)."""
    for name in OUTPUTS + ("summary.json",):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def run_pipeline(out: str, setting: Setting, report: Report) -> dict:
    """Every stage in turn; the figures of the run."""
    raw = write_corpus(out, setting, report)
    shards = shard(out, clean(out, raw, report), setting, report)
    tokenizer = train_tokenizer(out, shards, setting, report)
    data, tokens = build_dataset(out, shards, tokenizer, report)
    megatron = convert(build_model(out, tokenizer, setting, report),
                       os.path.join(out, "megatron_init"), False, report)
    figures = pretrain(out, data, megatron, setting, report)
    hf_trained = convert(figures["checkpoint"], os.path.join(out, "hf_trained"), True, report)
    figures.update(sample(out, hf_trained, shards, setting.seq_length, report))
    figures.update(dataset_tokens=tokens, hf_trained=hf_trained,
                   curves=plot(out, figures["metrics"], report))
    return figures


def positive_int(text: str) -> int:
    """``--train-iters``: refused at once rather than by the launcher after the first stages."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="quickstart_output")
    parser.add_argument("--fast", action="store_true",
                        help="a small corpus and a few iterations (the test's setting)")
    parser.add_argument("--train-iters", type=positive_int,
                        help="override the setting's iterations")
    args = parser.parse_args(argv)
    quiet_libraries()
    out = os.path.abspath(args.output_dir)
    name, setting = choose_setting(args)
    os.makedirs(out, exist_ok=True)
    clear_outputs(out)
    print(f"megatron_patch quickstart ({name} setting: llama '{setting.model_size}', "
          f"{setting.train_iters} iterations) -> {out}")
    report = Report(total=11)
    figures = run_pipeline(out, setting, report)
    figures.update(setting=name, seconds=round(time.time() - report.started, 1))
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(figures, handle, indent=1)
    drop = figures["first_loss"] - figures["last_loss"]
    print(f"\nDone in {figures['seconds']:.0f} s: lm loss {figures['first_loss']:.3f} -> "
          f"{figures['last_loss']:.3f} ({drop:.2f} nats lower), "
          f"{figures['tokens_per_sec']:,.0f} tokens/s. Everything is under {out} "
          f"(summary.json lists it).")
    if drop <= 0:
        print("quickstart: the loss did not fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
