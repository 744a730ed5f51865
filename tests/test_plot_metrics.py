"""toolkits/plot_metrics.py: a PNG of loss / lr / throughput curves for several runs, and errors
that name the file and line."""
import json
import os
import runpy
import subprocess
import sys

import pytest

from helpers import REPO, run_python

PLOT = "toolkits/plot_metrics.py"


def write_metrics(path, iterations=20, start_loss=6.0):
    rows = []
    for it in range(1, iterations + 1):
        rows.append(dict(iteration=it, lm_loss=start_loss - 0.1 * it, lr=1e-3 * min(1, it / 5),
                         grad_norm=1.0, loss_scale=1.0, skipped=False, tokens_per_sec=1000.0 + it,
                         consumed_samples=8 * it))
        if it % 10 == 0:
            rows.append(dict(iteration=it, valid_lm_loss=start_loss - 0.09 * it))
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_plot_two_runs_writes_a_png(tmp_path):
    first = write_metrics(tmp_path / "run_a.jsonl")
    second = write_metrics(tmp_path / "run_b.jsonl", iterations=30, start_loss=7.0)
    with open(second, "a") as handle:
        handle.write('{"iteration": 31, "lm_l')  # a line the trainer is still writing
    out = tmp_path / "curves.png"
    proc = run_python([PLOT, first, second, "-o", str(out)])
    assert "2 run(s), 50 training iterations" in proc.stdout
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    from matplotlib import image

    assert image.imread(str(out)).shape[:2] == (960, 1000)  # decodes: 10 x 9.6 in at 100 dpi
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "run_a.jsonl",
                                                          "run_b.jsonl"]


@pytest.mark.parametrize("content, message", [
    ('{"iteration": 1, "lm_loss": 5.0}\n{"iteration": 2, lm_loss}\n{"iteration": 3}\n',
     "bad.jsonl:2: not valid JSON"),
    ('{"iteration": 1, "lm_loss": 5.0}\n\n[1, 2]\n', "bad.jsonl:3: expected a JSON object with"),
    ('{"lm_loss": 5.0}\n', "bad.jsonl:1: expected a JSON object with an integer 'iteration'"),
    ("", "bad.jsonl: no metrics"),
])
def test_malformed_line_is_named(tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    proc = run_python([PLOT, str(bad), "-o", str(tmp_path / "x.png")], check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_says_how_to_install(tmp_path):
    metrics = write_metrics(tmp_path / "run.jsonl")
    hide = ("import runpy, sys; sys.modules['matplotlib'] = None; "  # import matplotlib fails
            f"sys.argv = [{PLOT!r}, {metrics!r}, '-o', {str(tmp_path / 'x.png')!r}]; "
            f"runpy.run_path({PLOT!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1 and "pip install matplotlib" in proc.stderr


def test_run_labels_keep_what_differs():
    run_labels = runpy.run_path(os.path.join(REPO, PLOT))["run_labels"]
    title, labels = run_labels(["a/dsw-pretrain-llama-tiny-lr-1e-3-tp-1.jsonl",
                                "b/dsw-pretrain-llama-tiny-lr-1e-4-tp-1.jsonl"])
    assert title == "dsw-pretrain-llama-tiny-lr-1e-*-tp-1" and labels == ["1e-3", "1e-4"]
    assert run_labels(["a/x.jsonl", "b/x.jsonl"]) == ("", ["a/x.jsonl", "b/x.jsonl"])
    assert run_labels(["out/run.jsonl"]) == ("run", [""])


def test_an_output_that_cannot_be_written_is_named(tmp_path):
    """/proc refuses new files even to root: the write fails in draw, after the checks."""
    metrics = write_metrics(tmp_path / "run.jsonl")
    proc = run_python([PLOT, metrics, "-o", "/proc/curves.png"], check=False)
    assert proc.returncode == 2 and "error: --output /proc/curves.png:" in proc.stderr
    assert "Traceback" not in proc.stderr
