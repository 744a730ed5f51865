#!/usr/bin/env python3
"""Draw the curves of one or more training runs from their ``--metrics-file`` JSON lines.

    python toolkits/plot_metrics.py OUT/metrics/run.jsonl [more.jsonl ...] -o curves.png

Three panels against the iteration: loss (training, and validation where logged), learning
rate, and throughput (tokens/s). An RLHF run's file (``rlhf.metrics_file``) gets its own panels
against the episode: reward, KL, losses, agreement, generation tokens/s. Each input file is one
run, labelled with its file name.
Needs matplotlib (``pip install matplotlib``, or the ``plot`` extra of setup.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

# (panel title, y label, [(metrics key, line style, label suffix)])
PANELS = (
    ("loss", "lm loss", (("lm_loss", "-", "train"), ("valid_lm_loss", "o--", "valid"))),
    ("learning rate", "lr", (("lr", "-", ""),)),
    ("throughput", "tokens/s", (("tokens_per_sec", "-", ""),)),
)


# An RLHF run's metrics (python -m megatron_patch.rlhf: one row per episode).
RLHF_PANELS = (
    ("reward", "score", (("reward_mean", "-", "mean"),)),
    ("KL to the reference", "nats per token", (("kl", "-", ""),)),
    ("losses", "loss", (("policy_loss", "-", "policy"), ("value_loss", "--", "value"),
                        ("kl_loss", ":", "kl"))),
    ("train / generation agreement", "mean exp|dlogp|", (("agreement", "-", ""),)),
    ("generation throughput", "tokens/s", (("generation_tokens_per_sec", "-", ""),)),
)


def panels_for(runs) -> tuple:
    """RLHF_PANELS when every run is an RLHF run, else the training PANELS."""
    if runs and all("reward_mean" in series for _, series in runs):
        return RLHF_PANELS
    return PANELS


class MetricsError(ValueError):
    """A metrics file that cannot be read (the message names the file and line), or an output
    that cannot be written."""


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
    """{key: [(iteration, value), ...]} of every numeric field in a metrics JSONL file.

    A last line without its newline that does not parse is a line the trainer is still writing:
    it is skipped. Any other line that is not a JSON object with an ``iteration`` is an error.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise MetricsError(f"{path}: cannot read ({err})") from err
    series: dict[str, list[tuple[int, float]]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            if number == len(lines):  # unterminated last line: still being written
                continue
            raise MetricsError(f"{path}:{number}: not valid JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise MetricsError(f"{path}:{number}: expected a JSON object with an integer "
                               f"'iteration', got {line[:80]!r}")
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                series.setdefault(key, []).append((record["iteration"], value))
    if not series:
        raise MetricsError(f"{path}: no metrics (is it a --metrics-file of pretrain/finetune, or an rlhf.metrics_file?)")
    return series


def run_labels(paths: list[str]) -> tuple[str, list[str]]:
    """(figure title, a label per run). Run names are the file names without .jsonl (the full
    paths where two share a name); the '-'-separated words all of them share go to the title,
    the words that differ label the runs (the launchers name runs by their settings)."""
    names = [os.path.basename(p).removesuffix(".jsonl") for p in paths]
    if len(set(names)) < len(names):
        names = list(paths)
    if len(names) == 1:
        return names[0], [""]
    words = [name.split("-") for name in names]
    shortest = min(map(len, words))
    head = next((i for i in range(shortest) if len({w[i] for w in words}) > 1), shortest)
    tail = next((i for i in range(shortest - head)
                 if len({w[len(w) - 1 - i] for w in words}) > 1), shortest - head)
    # The word before the first that differs is usually its key ("lr-1e-4"): keep it.
    labels = [_elide("-".join(w[max(0, head - 1):len(w) - tail]) or n)
              for w, n in zip(words, names)]
    title = "-".join(words[0][:head] + ["*"] + words[0][len(words[0]) - tail:])
    return (title if head or tail else ""), labels


def _elide(label: str, width: int = 60) -> str:
    """``label``, its middle replaced by '...' when longer than ``width``."""
    if len(label) <= width:
        return label
    keep = (width - 3) // 2
    return f"{label[:keep]}...{label[-keep:]}"


def draw(title: str, runs: list[tuple[str, dict]], output: str) -> None:
    """One figure, a panel per PANELS row, a line per run and key; written to ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels_for(runs)
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), sharex=True)
    for axis, (panel, ylabel, keys) in zip(axes, panels):
        for color, (label, series) in enumerate(runs):  # one colour per run in every panel
            for key, style, suffix in keys:
                if key in series:
                    xs, ys = zip(*series[key])
                    axis.plot(xs, ys, style, color=f"C{color % 10}", markersize=3,
                              label=f"{label} {suffix}".strip() or None)
        axis.set_title(panel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[1]:
            axis.legend(fontsize="small")
    axes[-1].set_xlabel("episode" if panels is RLHF_PANELS else "iteration")
    figure.suptitle(textwrap.fill(title, 100), fontsize="small")
    figure.tight_layout()
    tmp = f"{output}.tmp.png"
    try:
        figure.savefig(tmp, dpi=100)
        os.replace(tmp, output)  # never a half-written PNG under the real name
    finally:
        plt.close(figure)
        if os.path.exists(tmp):
            os.remove(tmp)


def check_output(path: str) -> None:
    """Refuse an ``--output`` that cannot be written, before any work."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise MetricsError(f"--output {path}: is a directory (give a .png file name)")
    if not os.path.isdir(directory):
        raise MetricsError(f"--output {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise MetricsError(f"--output {path}: directory {directory} is not writable")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", nargs="+", help="metrics JSONL files, one run each")
    parser.add_argument("-o", "--output", default="metrics.png", help="PNG to write")
    args = parser.parse_args(argv)
    try:
        check_output(args.output)
        series = [read_metrics(path) for path in args.metrics]
    except MetricsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    title, labels = run_labels(args.metrics)
    runs = list(zip(labels, series))
    try:
        draw(title, runs, args.output)
    except ImportError:
        print("error: plot_metrics.py needs matplotlib: pip install matplotlib "
              "(or pip install -e '.[plot]')", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. a full disk; draw leaves no partial PNG behind
        print(f"error: --output {args.output}: {err}", file=sys.stderr)
        return 2
    if panels_for(runs) is RLHF_PANELS:
        print(f"wrote {args.output}: {len(runs)} RLHF run(s), "
              f"{sum(len(s['reward_mean']) for _, s in runs)} episodes")
    else:
        print(f"wrote {args.output}: {len(runs)} run(s), "
              f"{sum(len(s.get('lm_loss', [])) for _, s in runs)} training iterations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
