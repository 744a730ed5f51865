"""Reward models: HF ``*ForSequenceClassification`` (one label) <-> Megatron with a scalar head,
bit-identical both ways; every position's score equals HF's ``score`` over its trunk at TP1 and
TP2 x PP2."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_torchrun, save_tiny_hf
from megatron_patch.convert import engine

VOCAB, PAD = 300, 299
RM_FAMILIES = ["llama", "bloom", "falcon", "galactica"]  # bloom, OPT: tied embeddings in config


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    made = {}
    for name in RM_FAMILIES:
        hf = save_tiny_hf(name, str(root / name / "hf"), vocab_size=VOCAB, qk_scale=10.0,
                          reward_head=True, hf_extra={"pad_token_id": PAD})
        engine.convert_hf_to_megatron(hf, str(root / name / "tp1"), progress=False)
        made[name] = root / name
    engine.convert_hf_to_megatron(str(root / "llama" / "hf"), str(root / "llama" / "wide"),
                                  target=engine.Target(2, 2), progress=False)
    return made


@pytest.mark.parametrize("name", RM_FAMILIES)
def test_hf_reward_model_round_trip_is_bit_identical(reward_models, name, tmp_path):
    from transformers import AutoModelForSequenceClassification

    root = reward_models[name]
    source = "wide" if name == "llama" else "tp1"
    meta = json.loads((root / source / "megatron_patch.json").read_text())
    assert meta["model_args"]["reward_head"] and not meta["model_args"]["tie_embeddings"]
    engine.convert_megatron_to_hf(str(root / source), str(tmp_path / "back"), progress=False)
    original, back = (load_file(os.path.join(d, "model.safetensors"))
                      for d in (root / "hf", tmp_path / "back"))
    assert "score.weight" in back and back["score.weight"].shape[0] == 1
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
    config, first = (json.loads(open(os.path.join(d, "config.json")).read())
                     for d in (tmp_path / "back", root / "hf"))
    assert config["architectures"] == first["architectures"]
    assert config["architectures"][0].endswith("ForSequenceClassification")
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "back"))
    assert model.num_labels == 1


@pytest.mark.parametrize("name", RM_FAMILIES)
def test_scores_equal_hf_at_tp1(reward_models, name):
    from dist import check_logits
    from megatron_patch import compat

    compat.initialize_parallel(1, 1)
    try:
        _, diff = check_logits.compare(str(reward_models[name] / "hf"),
                                       str(reward_models[name] / "tp1"), 1, 1)
    finally:
        compat.destroy_parallel()
    assert diff <= 1e-5


def test_scores_equal_hf_at_tp2_pp2(reward_models):
    root = reward_models["llama"]
    proc = run_torchrun(["tests/dist/check_logits.py", "--hf", str(root / "hf"), "--mg",
                         str(root / "wide"), "--tp", "2", "--pp", "2", "--tolerance", "1e-5"],
                        nproc=4)
    assert proc.stdout.count("max_abs_diff=") == 2  # both TP ranks of the last stage
