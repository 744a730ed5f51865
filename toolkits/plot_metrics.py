#!/usr/bin/env python3
"""Draw the curves of one or more training runs from their ``--metrics-file`` JSON lines.

    python toolkits/plot_metrics.py OUT/metrics/run.jsonl [more.jsonl ...] -o curves.png

Three panels against the iteration: loss (training, and validation where logged), learning
rate, and throughput (tokens/s). Each input file is one run, labelled with its file name.
Needs matplotlib (``pip install matplotlib``, or the ``plot`` extra of setup.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# (panel title, y label, [(metrics key, line style, label suffix)])
PANELS = (
    ("loss", "lm loss", (("lm_loss", "-", "train"), ("valid_lm_loss", "o--", "valid"))),
    ("learning rate", "lr", (("lr", "-", ""),)),
    ("throughput", "tokens/s", (("tokens_per_sec", "-", ""),)),
)


class MetricsError(ValueError):
    """A metrics file that cannot be read; the message names the file and line."""


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
        raise MetricsError(f"{path}: no metrics (is it a --metrics-file of pretrain/finetune?)")
    return series


def run_labels(paths: list[str]) -> list[str]:
    """File names without .jsonl; the full path where two runs share a name."""
    names = [os.path.basename(p).removesuffix(".jsonl") for p in paths]
    return [p if names.count(n) > 1 else n for p, n in zip(paths, names)]


def draw(runs: list[tuple[str, dict]], output: str) -> None:
    """One figure, a panel per PANELS row, a line per run and key; written to ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(PANELS), 1, figsize=(10, 3.2 * len(PANELS)), sharex=True)
    for axis, (title, ylabel, keys) in zip(axes, PANELS):
        for color, (label, series) in enumerate(runs):  # one colour per run in every panel
            for key, style, suffix in keys:
                if key in series:
                    xs, ys = zip(*series[key])
                    axis.plot(xs, ys, style, color=f"C{color % 10}", markersize=3,
                              label=f"{label} {suffix}".strip())
        axis.set_title(title)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize="small")
    axes[-1].set_xlabel("iteration")
    figure.tight_layout()
    tmp = f"{output}.tmp.png"
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    os.replace(tmp, output)  # never a half-written PNG under the real name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", nargs="+", help="metrics JSONL files, one run each")
    parser.add_argument("-o", "--output", default="metrics.png", help="PNG to write")
    args = parser.parse_args(argv)
    try:
        runs = list(zip(run_labels(args.metrics), map(read_metrics, args.metrics)))
    except MetricsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        draw(runs, args.output)
    except ImportError:
        print("error: plot_metrics.py needs matplotlib: pip install matplotlib "
              "(or pip install -e '.[plot]')", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {len(runs)} run(s), "
          f"{sum(len(s.get('lm_loss', [])) for _, s in runs)} training iterations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
