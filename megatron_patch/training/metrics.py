"""Training logs: a Megatron-style line every --log-interval iterations, one JSON object per
iteration in --metrics-file, and TensorBoard scalars when tensorboard is installed."""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from megatron_patch import compat


def flops_per_iteration(model_args, batch_size: int, seq_length: int, padded_vocab: int) -> float:
    """Megatron-LM's ``num_floating_point_operations`` for a dense GPT with grouped-query
    attention: forward + backward (x3), two FLOPs per multiply-add (x2), plus the logit layer;
    a gated MLP has three matrices instead of two."""
    m = model_args
    expansion = 3 * 2 * 2
    query_ratio = m.kv_channels * m.num_attention_heads / m.hidden_size
    attention = (1 + m.num_query_groups / m.num_attention_heads + seq_length / m.hidden_size) \
        * query_ratio
    mlp = m.ffn_hidden_size / m.hidden_size * (1.5 if m.gated_linear_unit else 1.0)
    logits = padded_vocab / (2 * m.num_layers * m.hidden_size)
    return (expansion * batch_size * seq_length * m.num_layers * m.hidden_size ** 2
            * (attention + mlp + logits))


def _memory_gib() -> float:
    if compat.on_gpu():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class TrainingLogger:
    """Collects per-iteration figures on the rank that reports (the last one)."""

    def __init__(self, args, model_args, padded_vocab: int, world_size: int, reporting: bool,
                 objective=None):
        from megatron_patch.training.loop import LanguageModelObjective

        objective = objective or LanguageModelObjective
        self.args = args
        self.reporting = reporting
        self.world_size = world_size
        self.loss_name = objective.loss_name  # "lm loss": the metrics file's "lm_loss"
        self.loss_key = self.loss_name.replace(" ", "_")
        self.rows = args.global_batch_size * objective.rows_per_sample  # sequences per step
        self.flops = flops_per_iteration(model_args, self.rows, args.seq_length,
                                         1 if model_args.reward_head else padded_vocab)
        self.window: list[dict] = []
        self.extras: list[str] = []
        self.metrics = open(args.metrics_file, "a") if reporting and args.metrics_file else None
        self.tensorboard = self._tensorboard() if reporting and args.tensorboard_dir else None

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("[megatron_patch] --tensorboard-dir given but tensorboard is not installed "
                  "(pip install tensorboard); skipping TensorBoard", file=sys.stderr)
            return None
        return SummaryWriter(log_dir=self.args.tensorboard_dir)

    def record(self, iteration: int, seconds: float, stats: dict, lr: float, grad_norm,
               loss_scale: float, skipped: bool, consumed_samples: int) -> None:
        """One finished iteration (only the reporting rank keeps and writes anything).
        ``stats``: the step's ``{name: value}``, the objective's loss among them."""
        if not self.reporting:
            return
        tokens = self.rows * self.args.seq_length
        entry = {"iteration": iteration, self.loss_key: float("nan"),
                 **{name.replace(" ", "_"): value for name, value in (stats or {}).items()},
                 "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                 "loss_scale": loss_scale, "skipped": bool(skipped),
                 "consumed_samples": consumed_samples, "consumed_tokens": consumed_samples
                 * self.rows // self.args.global_batch_size * self.args.seq_length,
                 "iteration_time_s": seconds, "tokens_per_sec": tokens / seconds,
                 "tflops_per_gpu": self.flops / seconds / self.world_size / 1e12,
                 "memory_gib": _memory_gib()}
        self.extras = [name.replace(" ", "_") for name in (stats or {})
                       if name != self.loss_name]
        self.window.append(entry)
        if self.metrics:
            self.metrics.write(json.dumps(entry) + "\n")
            self.metrics.flush()
        if self.tensorboard:
            for key in (self.loss_key, *self.extras, "lr", "grad_norm", "loss_scale",
                        "tokens_per_sec"):
                if entry[key] is not None:
                    self.tensorboard.add_scalar(f"train/{key}", entry[key], iteration)
        if iteration % self.args.log_interval == 0 or iteration == self.args.train_iters:
            self._print(iteration)

    def _print(self, iteration: int) -> None:
        w, self.window = self.window, []
        seconds = sum(e["iteration_time_s"] for e in w) / len(w)
        losses = [e[self.loss_key] for e in w if not e["skipped"]]
        norms = [e["grad_norm"] for e in w if e["grad_norm"] is not None]
        last = w[-1]
        remaining = (self.args.train_iters - iteration) * seconds
        line = (f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {iteration:8d}/"
                f"{self.args.train_iters:8d} | consumed samples: {last['consumed_samples']:12d}"
                f" | consumed tokens: {last['consumed_tokens']:14d} | elapsed time per "
                f"iteration (ms): {seconds * 1000:.1f} | learning rate: {last['lr']:.6E} | "
                f"global batch size: {self.args.global_batch_size:5d} | {self.loss_name}: "
                + (f"{sum(losses) / len(losses):.6E} | " if losses else
                   f"- (every iteration skipped: the gradients overflowed, so the loss scale "
                   f"backs off) | "))
        for key in self.extras:  # an objective's other figures (a reward model's accuracy)
            values = [e[key] for e in w if not e["skipped"] and key in e]
            if values:
                line += f"{key.replace('_', ' ')}: {sum(values) / len(values):.4f} | "
        if norms:
            line += f"grad norm: {sum(norms) / len(norms):.3f} | "
        line += (f"loss scale: {last['loss_scale']:.1f} | number of skipped iterations: "
                 f"{sum(e['skipped'] for e in w):3d} | tokens/s: "
                 f"{self.rows * self.args.seq_length / seconds:.1f} | "
                 f"throughput per GPU (TFLOP/s/GPU): {self.flops / seconds / self.world_size / 1e12:.2f}"
                 f" | memory (GiB): {last['memory_gib']:.2f} | ETA: {_duration(remaining)}")
        print(line, flush=True)

    def record_validation(self, iteration: int, stats: dict) -> None:
        """``stats``: the validation ``{name: value}`` (:func:`loop.evaluate`)."""
        if not self.reporting:
            return
        import math

        loss = stats.get(self.loss_name, float("nan"))
        line = f" validation loss at iteration {iteration} | {self.loss_name} value: {loss:.6E}"
        if self.loss_name == "lm loss":
            line += f" | lm loss PPL: {math.exp(min(loss, 50)):.6E}"
        line += "".join(f" | {name}: {value:.4f}" for name, value in stats.items()
                        if name != self.loss_name)
        print(line, flush=True)
        row = {"iteration": iteration, **{"valid_" + name.replace(" ", "_"): value
                                          for name, value in stats.items()}}
        if self.metrics:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
        if self.tensorboard:
            for key, value in row.items():
                if key != "iteration":
                    self.tensorboard.add_scalar(f"valid/{key[len('valid_'):]}", value, iteration)

    def close(self) -> None:
        for handle in (self.metrics, self.tensorboard):
            if handle:
                handle.close()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _iteration_of(line: str) -> int | None:
    """A row's iteration; None for a line cut short by a crash mid-write."""
    try:
        return int(json.loads(line).get("iteration"))
    except (ValueError, TypeError, AttributeError):
        return None


def prepare_metrics_file(path: str, iteration: int) -> str | None:
    """Make ``path`` describe the run that exists before the run appends to it: after a resume
    at ``iteration`` the rows past it (the iterations the resume threw away) go; a run from
    iteration 0 starts the file anew. Rewritten through a temporary file, so a crash leaves the
    old file or the new one. Returns a note for the log, or None."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    kept = [line for line in lines if iteration and _iteration_of(line) is not None
            and _iteration_of(line) <= iteration]
    if len(kept) == len(lines):
        return None
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(kept)
    os.replace(tmp, path)
    if iteration:
        return (f"--metrics-file {path}: dropped {len(lines) - len(kept)} rows after iteration "
                f"{iteration} (from the run before this resume)")
    return f"--metrics-file {path}: started anew (it held {len(lines)} rows of an earlier run)"
