"""The quickstart's Python entry (examples/quickstart.py) on its --fast setting: every stage
writes its output, the pretraining loss falls, and the exported HF model generates."""
import json
import os

from helpers import run_python


def test_quickstart_fast_runs_every_stage(tmp_path):
    proc = run_python(["examples/quickstart.py", "--fast", "--output-dir", str(tmp_path)],
                      env={"OMP_NUM_THREADS": "2"})
    assert "[11/11] plot" in proc.stdout and "Done in" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["setting"] == "fast" and summary["iterations"] == 30
    assert summary["last_loss"] < summary["first_loss"] - 0.3
    assert len(os.listdir(tmp_path / "raw")) == 4
    assert any(name.endswith(".jsonl.zst") for name in os.listdir(tmp_path / "shards"))
    assert (tmp_path / "cleaned.summary.json").is_file()
    for name in ("tokenizer/tokenizer.json", "data/stdlib_text_document.bin",
                 "data/stdlib_text_document.idx", "hf_init/model.safetensors",
                 "megatron_init/release", "hf_trained/model.safetensors",
                 "hf_trained/tokenizer.json", "curves.png"):
        assert (tmp_path / name).exists(), name
    checkpoint = summary["checkpoint"]
    with open(os.path.join(checkpoint, "latest_checkpointed_iteration.txt")) as handle:
        assert handle.read().strip() == "30"
    assert os.path.isfile(summary["metrics"]) and os.path.isfile(summary["log"])
    samples = (tmp_path / "sample.txt").read_text().splitlines()
    assert [s.split()[0] for s in samples] == ["Return", "This"]
    assert max(len(s) for s in samples) > len("This module provides")  # something was generated
    # HF's loss on the corpus's last documents is of the order of Megatron's validation loss.
    assert abs(summary["hf_loss"] - summary["valid_loss"]) < 1.0
