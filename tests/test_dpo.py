"""DPO: the first loss is ln 2 when the policy is the reference; with another
--ref-load it equals the DPO loss computed from transformers' log-probabilities (TP2 x PP2 for
the policy, the reference at TP1); the loss formulas; exact resume; a keyword preference raises
the margin."""
import json
import math
import os
import shutil

import pytest
import torch

from helpers import run_torchrun, save_tiny_hf, train_tiny_tokenizer
from megatron_patch.convert import engine
from megatron_patch.rlhf.dpo import dpo_loss, sequence_logps
from test_reward_model import write_pairs

VOCAB = 300


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny llamas (policy, another reference) with a tokenizer, converted at TP1; the
    policy at TP2 x PP2 too."""
    root = tmp_path_factory.mktemp("dpo")
    tokenizer = train_tiny_tokenizer(str(root / "tokenizer"), vocab_size=280)
    for name, seed in (("policy", 0), ("reference", 7)):
        hf = save_tiny_hf("llama", str(root / name / "hf"), seed=seed, vocab_size=VOCAB,
                          qk_scale=5.0)
        for file in os.listdir(tokenizer):
            shutil.copy(os.path.join(tokenizer, file), hf)
        engine.convert_hf_to_megatron(hf, str(root / name / "tp1"), progress=False)
    engine.convert_hf_to_megatron(str(root / "policy" / "hf"), str(root / "policy" / "wide"),
                                  target=engine.Target(2, 2), progress=False)
    return root


def run_dpo(load, data, metrics, *extra, nproc=1, iters=2):
    args = ["-m", "megatron_patch.dpo", "--load", str(load), "--train-data", str(data),
            "--train-iters", str(iters), "--micro-batch-size", "2", "--global-batch-size", "8",
            "--seq-length", "64", "--lr", "1e-3", "--log-interval", "1", "--metrics-file",
            str(metrics), *extra]
    proc = run_torchrun(args, nproc=nproc)
    rows = [json.loads(line) for line in open(metrics)]
    return {row["iteration"]: row for row in rows if "dpo_loss" in row}, proc


def test_loss_formulas():
    chosen, rejected = torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -0.5])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -1.0]), torch.tensor([-3.0, -1.5])
    h = torch.tensor([(-3.0 + 4.0) - (-3.5 + 3.0), (-1.0 + 0.5) - (-1.0 + 1.5)])  # 1.5, -1.0
    losses, good, bad = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.1 * x)) for x in h.tolist()])
    assert good.tolist() == pytest.approx([0.05, 0.0]) and bad.tolist() == pytest.approx(
        [-0.1, 0.1])
    ipo, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1, "ipo")
    assert ipo.tolist() == pytest.approx([(x - 5.0) ** 2 for x in h.tolist()])
    token_losses = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert sequence_logps(token_losses, mask).tolist() == [-5.0, -0.5]


def test_first_loss_is_ln2_when_policy_is_the_reference(models, tmp_path):
    """At TP1, and at DP2 with the distributed optimizer, whose reference table is gathered
    over the data-parallel ranks: the second iteration agrees too. (TP2 x PP2's
    log-probabilities are checked against transformers' below.)"""
    data = write_pairs(tmp_path / "pairs.jsonl", 16, seed=1)
    rows, proc = run_dpo(models / "policy" / "tp1", data, tmp_path / "tp1.jsonl")
    dp2, _ = run_dpo(models / "policy" / "tp1", data, tmp_path / "dp2.jsonl",
                     "--use-distributed-optimizer", nproc=2)
    assert rows[1]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["margin"] == pytest.approx(0, abs=1e-6)
    assert "reference log-probabilities of 16 pairs" in proc.stdout
    for key in ("dpo_loss", "margin", "accuracy"):
        assert dp2[1][key] == pytest.approx(rows[1][key], abs=1e-6)
        assert dp2[2][key] == pytest.approx(rows[2][key], rel=1e-4, abs=1e-6), key


def hf_sides(hf_dir, data):
    """Each record's sides built with transformers' tokenizer alone: (ids, response-label mask)
    for prompt + response + eos, the mask over the response and its eos."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    out = {"chosen": [], "rejected": []}
    for line in open(data):
        record = json.loads(line)
        prompt = tokenizer(record["prompt"]).input_ids
        for side in out:
            response = tokenizer(record[side], add_special_tokens=False).input_ids + [
                tokenizer.eos_token_id]
            mask = [0] * (len(prompt) - 1) + [1] * len(response)  # labels of the response
            out[side].append((prompt + response, mask))
    return out


def hf_logps(hf_dir, sides):
    """Sum of log p(response tokens) under transformers' LlamaForCausalLM."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for ids, mask in sides:
            ids = torch.tensor([ids])
            logps = torch.log_softmax(model(ids).logits[0, :-1], -1)
            token = logps.gather(1, ids[0, 1:, None])[:, 0]
            out.append((token * torch.tensor(mask, dtype=torch.float32)).sum())
    return torch.stack(out)


def test_loss_with_another_reference_equals_transformers(models, tmp_path):
    """Policy at TP2 x PP2, --ref-load at TP1: the first loss and implicit rewards = the DPO
    formula over transformers' log-probabilities (each side alone)."""
    from megatron_patch.rlhf.dpo import encode_dpo_pairs
    from megatron_patch.tokenizers import build_tokenizer

    data = write_pairs(tmp_path / "pairs.jsonl", 8, seed=2)
    tokenizer = build_tokenizer("llamabpe", str(models / "policy" / "hf"))
    pairs, _ = encode_dpo_pairs(data, tokenizer, 64)
    sides = hf_sides(str(models / "policy" / "hf"), data)
    for side in sides:  # the trainer's ids are transformers' (nothing truncated at 64)
        assert [list(p[side]) for p in pairs] == [ids for ids, _ in sides[side]]
    logps = {(m, s): hf_logps(str(models / m / "hf"), sides[s])
             for m in ("policy", "reference") for s in ("chosen", "rejected")}
    losses, good, bad = dpo_loss(logps["policy", "chosen"], logps["policy", "rejected"],
                                 logps["reference", "chosen"], logps["reference", "rejected"],
                                 0.5)
    rows, _ = run_dpo(models / "policy" / "wide", data, tmp_path / "m.jsonl",
                      "--ref-load", str(models / "reference" / "tp1"), "--beta", "0.5",
                      "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                      nproc=4, iters=1)
    assert abs(losses.mean().item() - math.log(2)) > 0.01  # the two models differ
    assert rows[1]["dpo_loss"] == pytest.approx(losses.mean().item(), abs=1e-5)
    assert rows[1]["chosen_reward"] == pytest.approx(good.mean().item(), abs=1e-5)
    assert rows[1]["rejected_reward"] == pytest.approx(bad.mean().item(), abs=1e-5)


def test_resume_is_exact_and_the_margin_grows(models, tmp_path):
    """A keyword preference: 12 iterations straight raise the implicit reward margin; stopped at
    6 and resumed (the reference table read back from --save) = straight, bit for bit."""
    data = write_pairs(tmp_path / "pairs.jsonl", 96, seed=3, keyword=True)
    extra = ("--seq-length", "128", "--lr", "3e-3")
    straight, _ = run_dpo(models / "policy" / "tp1", data, tmp_path / "straight.jsonl", *extra,
                          iters=12)
    assert straight[12]["margin"] > straight[1]["margin"] + 0.5
    assert straight[12]["accuracy"] >= 0.9
    ckpt = tmp_path / "ckpt"
    run_dpo(models / "policy" / "tp1", data, tmp_path / "part.jsonl", *extra, "--save",
            str(ckpt), "--exit-interval", "6", iters=12)
    assert (ckpt / "dpo_reference.pt").is_file()
    resumed, proc = run_dpo(ckpt, data, tmp_path / "part.jsonl", *extra, "--save", str(ckpt),
                            iters=12)
    assert "reference log-probabilities" not in proc.stdout  # read back, not recomputed
    keys = ("dpo_loss", "accuracy", "margin", "grad_norm")
    assert {i: [r[k] for k in keys] for i, r in resumed.items()} == \
        {i: [r[k] for k in keys] for i, r in straight.items()}


def test_collated_batches_can_be_pinned():
    """The DataLoader pins batches on a GPU (pin_memory copies into empty_like(t), keeping its
    strides): no tensor of a pair batch may broadcast a stride-0 dimension (an expand()ed
    arange did, and failed on the H200)."""
    import numpy as np

    from megatron_patch.rlhf.dpo import collate_dpo
    from megatron_patch.rlhf.reward import collate_pairs

    item = {"chosen": np.array([5, 6, 2]), "rejected": np.array([5, 7, 8, 2]), "margin": 0.0,
            "chosen_mask": np.array([0, 1, 1], dtype=np.uint8),
            "rejected_mask": np.array([0, 1, 1, 1], dtype=np.uint8), "index": 0,
            "reference": torch.zeros(2, dtype=torch.float64)}
    for batch in (collate_pairs([item, item], 8, 0), collate_dpo([item, item], 8, 0)):
        for name, tensor in batch.items():
            assert 0 not in tensor.stride() or tensor.numel() <= 1, name
