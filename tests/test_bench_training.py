"""toolkits/benchmarks/bench_training.py on CPU at its tiny shape: the ours stacks load the HF
stack's random weights through the converter and train on the same batch (megatron-core's
GPTDataset over a repeated document), so their first losses must agree to fp32 rounding."""
import re

from helpers import run_python


def test_first_loss_of_ours_equals_transformers_on_the_same_weights_and_batch():
    out = run_python(["toolkits/benchmarks/bench_training.py", "--tiny", "--stacks",
                      "ours,hf eager", "--steps", "3", "--warmup", "1"], timeout=600).stdout
    assert "same work: ours loads the HF model's random weights (seed 1234" in out, out
    assert re.search(r"^ours +\d+ ", out, re.MULTILINE) and \
        re.search(r"^hf eager +\d+ ", out, re.MULTILINE), out
    reference = float(re.search(r"from the same weights: hf eager ([\d.]+)", out).group(1))
    ours = float(re.search(r"^  ours: ([\d.]+) ", out, re.MULTILINE).group(1))
    assert abs(ours - reference) <= 1e-5 * reference, out
