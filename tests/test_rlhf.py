"""The RLHF loop (python -m megatron_patch.rlhf, examples/rlhf/run_rlhf.sh) on the tiny example's
random models (examples/rlhf/make_tiny.py):

- an episode's experience against transformers: the actor's and the reference's
  log-probabilities of the sampled tokens, the critic's values at every position and the reward
  model's scores are those of LlamaForCausalLM / LlamaForSequenceClassification on the same ids;
- the prompt formats, the rule reward and the YAML's variables, with errors naming file / line;
- the launcher end to end, as a user runs it: PPO with the six roles (TP1, TP2 and DP2) and
  GRPO, where the mean reward of the synthetic task rises and the agreement stays <= 1.001;
  TP2 gives TP1's figures; a run resumed from its episode-2 checkpoint logs the uninterrupted
  run's episodes 3-4 exactly; the saved actor and critic convert to HF;
- the launcher's and the config's errors.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import REPO, child_env, free_port, run_python

LAUNCHER = os.path.join(REPO, "examples", "rlhf", "run_rlhf.sh")
TINY = os.path.join(REPO, "examples", "rlhf", "configs", "tiny")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_rlhf")
    run_python(["examples/rlhf/make_tiny.py", str(root), "--prompts", "32"])
    return root


def launcher_env(tiny, out, **env) -> dict:
    return child_env({"TINY_RLHF_DIR": str(tiny), "RLHF_SAVE": str(out),
                      "PYTHON": sys.executable, **env})


def launch(tiny, out, gpus="0", config="ppo.yaml", check=True, **env):
    proc = subprocess.run(["bash", LAUNCHER, gpus, os.path.join(TINY, config)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=launcher_env(tiny, out, **env))
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def launch_two_nodes(tiny, out, **env) -> str:
    """run_rlhf.sh on two "nodes" of this machine (one process each, torchrun's static
    rendezvous on 127.0.0.1): node 0's output."""
    port = str(free_port())
    nodes = [subprocess.Popen(["bash", LAUNCHER, "0", os.path.join(TINY, "ppo.yaml")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO, env=launcher_env(
                                  tiny, out, NNODES="2", NODE_RANK=str(rank),
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env))
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return outputs[0][0]


def episodes(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


# ---------------------------------------------------------------- experience against transformers
def experience_of(actor_dir, critic_dir, prompts, eod, pad, vocab) -> dict:
    """An episode's rollouts, log-probabilities, values and scores, in this process (TP1)."""
    from megatron_patch import compat
    from megatron_patch.generation.engine import Limits, build_backend
    from megatron_patch.generation.loading import load_model, open_checkpoint
    from megatron_patch.generation.sampling import SamplingParams
    from megatron_patch.rlhf import experience as xp
    from megatron_patch.rlhf.rollout import sample

    compat.initialize_parallel(1, 1)
    try:
        actor = load_model(open_checkpoint(str(actor_dir)), 1)
        critic = load_model(open_checkpoint(str(critic_dir)), 1)
        limits = Limits(10, eod, pad, vocab)
        batches = [sample(build_backend("static", actor, 64), prompts[i:i + 3],
                          SamplingParams(), limits, torch.Generator().manual_seed(i))
                   for i in (0, 3)]
        exp = xp.merge_rollouts(batches, pad, multiple=4)
        assert exp["tokens"].shape[1] % 4 == 0
        exp["logps"] = xp.policy_logps(actor, exp, 2)
        exp["values"] = xp.critic_values(critic, exp, 4)
        exp["scores"] = xp.reward_model_scores(critic, exp, 4, eod, pad)
    finally:
        compat.destroy_parallel()
    return exp


def check_against_transformers(exp, hf_lm, hf_rm, eod) -> None:
    """Per row, alone and unpadded: transformers' log-probabilities of the sampled tokens, its
    classifier's score at every position (the values) and at the last token after an eod."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    lm = AutoModelForCausalLM.from_pretrained(str(hf_lm), dtype=torch.float32).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(str(hf_rm),
                                                            dtype=torch.float32).eval()
    assert (exp["mask"].sum(1) > 0).all()
    for row in range(exp["tokens"].shape[0]):
        mask = exp["mask"][row].bool()
        n = int(mask.nonzero().max()) + 2  # prompt and response
        ids = exp["tokens"][row, :n][None]
        with torch.no_grad():
            hf_logps = torch.log_softmax(lm(ids).logits[0].float(), -1)
            expected = hf_logps[:-1].gather(1, ids[0, 1:, None])[:, 0]
            hf_values = rm.score(rm.base_model(ids).last_hidden_state)[0, :, 0]
            scored = ids if ids[0, -1] == eod else torch.cat([ids, torch.tensor([[eod]])], 1)
            hf_score = rm.score(rm.base_model(scored).last_hidden_state)[0, -1, 0]
        learned = mask[:n - 1]
        assert torch.allclose(exp["logps"][row, :n - 1][learned], expected[learned], atol=1e-4)
        assert torch.allclose(exp["values"][row, :n - 1][learned], hf_values[:-1][learned],
                              atol=1e-4)
        assert exp["scores"][row].item() == pytest.approx(hf_score.item(), abs=1e-4)
        assert (exp["logps"][row][~mask] == 0).all() and (exp["values"][row][~mask] == 0).all()


def test_experience_equals_transformers(tiny, tmp_path):
    from megatron_patch.convert import engine
    from megatron_patch.rlhf import experience as xp
    from megatron_patch.tokenizers import build_tokenizer

    for name in ("sft", "rm"):
        engine.convert_megatron_to_hf(str(tiny / name), str(tmp_path / name), progress=False)
    tokenizer = build_tokenizer("llamabpe", str(tiny / "tokenizer"))
    prompts = xp.read_prompt_data(str(tiny / "prompts.jsonl"), tokenizer, "raw", 40)
    exp = experience_of(tiny / "sft", tiny / "rm", prompts.ids, tokenizer.eod, tokenizer.pad,
                        300)  # make_tiny's vocabulary
    check_against_transformers(exp, tmp_path / "sft", tmp_path / "rm", tokenizer.eod)


# the other causal families: ALiBi, parallel attention with one KV head, OPT, GLM-4's layout
@pytest.mark.parametrize("family, size", [("bloom", "tiny"), ("falcon", "tiny"),
                                          ("galactica", "tiny"), ("chatglm", "tiny-glm4")])
def test_experience_equals_transformers_for_every_causal_family(family, size, tmp_path):
    from helpers import save_tiny_hf

    from megatron_patch.convert import engine

    for name, reward in (("lm", False), ("rm", True)):
        save_tiny_hf(family, str(tmp_path / f"{name}_hf"), size=size, vocab_size=300,
                     qk_scale=5.0, seed=int(reward), **({"reward_head": True} if reward else {}))
        engine.convert_hf_to_megatron(str(tmp_path / f"{name}_hf"), str(tmp_path / name),
                                      progress=False)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (int(n),), generator=generator).tolist()
               for n in torch.randint(2, 9, (6,), generator=generator)]
    exp = experience_of(tmp_path / "lm", tmp_path / "rm", prompts, 2, 0, 300)
    check_against_transformers(exp, tmp_path / "lm_hf", tmp_path / "rm_hf", 2)


def test_prompt_formats_and_their_errors(tiny, tmp_path):
    from megatron_patch.generation.prompt_format import encode_prompt
    from megatron_patch.rlhf import experience as xp
    from megatron_patch.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("llamabpe", str(tiny / "tokenizer"))
    data = tmp_path / "prompts.jsonl"
    records = [{"prompt": "What is it?"}, {"query": "Where is it?"},
               {"instruction": "Sort the list", "input": "3 1 2", "output": "1 2 3"},
               {"messages": [{"role": "user", "content": "Hi there"},
                             {"role": "assistant", "content": "Hello"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts = xp.read_prompt_data(str(data), tokenizer, "raw", 1000)
    assert prompts.ids == [encode_prompt(tokenizer, "raw", "What is it?"),
                           encode_prompt(tokenizer, "raw", "Where is it?"),
                           encode_prompt(tokenizer, "alpaca", "Sort the list", "3 1 2"),
                           encode_prompt(tokenizer, "chat", "Hi there", None,
                                         records[3]["messages"][:1])]
    assert prompts.texts[2] == "Sort the list" and prompts.truncated == 0
    cut = xp.read_prompt_data(str(data), tokenizer, "raw", 3)
    assert cut.truncated >= 2 and all(len(ids) <= 3 for ids in cut.ids)
    assert cut.ids[2] == prompts.ids[2][-3:]  # the end of a prompt is kept
    data.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: expected a string 'prompt'"):
        xp.read_prompt_data(str(data), tokenizer, "raw", 100)
    with pytest.raises(ValueError, match="rlhf.prompt_data .* no such file"):
        xp.read_prompt_data(str(tmp_path / "none.jsonl"), tokenizer, "raw", 100)


def test_episode_prompts_cover_the_data_and_repeat_per_episode():
    from megatron_patch.rlhf.experience import episode_prompts

    first = [episode_prompts(4, episode, 7, 10) for episode in range(5)]
    assert first == [episode_prompts(4, episode, 7, 10) for episode in range(5)]
    flat = [i for chosen in first for i in chosen]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new shuffle each pass


def test_rule_rewards_and_yaml_variables(tmp_path, monkeypatch):
    from megatron_patch.rlhf.config import expand_variables
    from megatron_patch.rlhf.experience import load_reward_fn, rule_scores

    (tmp_path / "my_rules.py").write_text(
        "def length(text):\n    return len(text)\n"
        "def both(prompt, text):\n    return len(prompt) - len(text)\n"
        "def many(a, b, c):\n    return 0\n"
        "def words(text):\n    return 'many'\n")
    fn = load_reward_fn("my_rules:length", str(tmp_path))
    assert rule_scores(fn, ["p", "q"], ["ab", "abcd"], "cpu").tolist() == [2.0, 4.0]
    fn = load_reward_fn("my_rules:both", str(tmp_path))
    assert rule_scores(fn, ["pppp"], ["ab"], "cpu").tolist() == [2.0]
    with pytest.raises(ValueError, match="takes 3 arguments"):
        load_reward_fn("my_rules:many", str(tmp_path))
    with pytest.raises(ValueError, match="has no function nothing"):
        load_reward_fn("my_rules:nothing", str(tmp_path))
    with pytest.raises(ValueError, match="cannot import no_such_module"):
        load_reward_fn("no_such_module:f", str(tmp_path))
    with pytest.raises(ValueError, match="returned 'many' for a response"):
        rule_scores(load_reward_fn("my_rules:words", str(tmp_path)), ["p"], ["x"], "cpu")
    monkeypatch.setenv("RLHF_TEST_TP", "4")
    monkeypatch.delenv("RLHF_TEST_UNSET", raising=False)
    assert expand_variables({"a": "${RLHF_TEST_TP:1}", "b": ["${RLHF_TEST_UNSET:x}/y"],
                             "c": "${RLHF_TEST_UNSET:2}"}, "f.yaml") == \
        {"a": 4, "b": ["x/y"], "c": 2}
    with pytest.raises(ValueError, match=r"f.yaml: \$\{RLHF_TEST_UNSET\} is not set"):
        expand_variables("${RLHF_TEST_UNSET}", "f.yaml")


def test_the_llama_7b_example_config_maps_to_the_roles(monkeypatch):
    from megatron_patch.rlhf.config import ROLES, load_config

    for name, value in (("SFT_CKPT", "/ckpt/sft"), ("RM_CKPT", "/ckpt/rm"),
                        ("PROMPTS", "/data/p.jsonl"), ("OUTPUT", "/exp")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("NUM_DEVICE", raising=False)
    config = load_config(os.path.join(REPO, "examples", "rlhf", "configs", "llama-7b",
                                      "rlhf.yaml"))
    assert set(config.roles) == set(ROLES) and config.rlhf["save"] == "/exp"
    assert {name: role.megatron["load"] for name, role in config.roles.items()} == {
        **{r: "/ckpt/sft" for r in ("ppo_policy", "policy", "reference")},
        **{r: "/ckpt/rm" for r in ("reward_train", "reward_forward", "reward_ref")}}
    assert all(role.num_device == 8 and role.megatron["tensor_model_parallel_size"] == 4
               for role in config.roles.values())
    assert config.roles["ppo_policy"].megatron["lr"] == 1e-6


# ---------------------------------------------------------------- the launcher end to end
@pytest.fixture(scope="module")
def ppo_tp1(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_tp1")
    proc = launch(tiny, out)
    return out, proc


def rises(rows, key="reward_mean", by=0.0):
    first = sum(r[key] for r in rows[:3]) / 3
    last = sum(r[key] for r in rows[-3:]) / 3
    return last - first > by, (first, last)


def test_tiny_ppo_with_six_roles_raises_the_reward(ppo_tp1, tmp_path):
    out, proc = ppo_tp1
    rows = episodes(out)
    assert [r["episode"] for r in rows] == list(range(1, 17))
    ok, means = rises(rows, by=0.5)  # the scores spread about 1.2 (their std per episode)
    assert ok, means
    assert all(1.0 <= r["agreement"] <= 1.001 for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the actor is the reference, at first
    for key in ("policy_loss", "value_loss", "clip_fraction", "entropy", "reward_std",
                "response_length", "generation_seconds", "training_seconds",
                "generation_tokens_per_sec"):
        assert all(key in r for r in rows), key
    for role in ("ppo_policy", "policy", "reference", "reward_train", "reward_forward",
                 "reward_ref"):
        assert f"{role} " in proc.stdout
    assert "policy          inference" in proc.stdout and "(ppo_policy's module)" in proc.stdout
    plotted = run_python(["toolkits/plot_metrics.py", str(out / "metrics.jsonl"), "-o",
                          str(tmp_path / "rlhf.png")])
    assert "1 RLHF run(s), 16 episodes" in plotted.stdout
    from matplotlib import image

    assert image.imread(str(tmp_path / "rlhf.png")).shape[:2] == (1600, 1000)  # five panels
    # the checkpoints convert to HF: a causal LM and a sequence classifier
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from megatron_patch.convert import engine

    assert sorted(os.listdir(out / "ppo_policy"))[:4] == [
        "iter_0000004", "iter_0000008", "iter_0000012", "iter_0000016"]
    engine.convert_megatron_to_hf(str(out / "ppo_policy"), str(tmp_path / "actor"),
                                  progress=False)
    engine.convert_megatron_to_hf(str(out / "reward_train"), str(tmp_path / "critic"),
                                  progress=False)
    assert type(AutoModelForCausalLM.from_pretrained(str(tmp_path / "actor"))).__name__ == \
        "LlamaForCausalLM"
    assert type(AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "critic"))).__name__ == "LlamaForSequenceClassification"


FIGURES = ("reward_mean", "reward_std", "kl", "response_length", "policy_loss", "value_loss",
           "entropy", "clip_fraction")


def same_episodes(rows, reference, episodes):
    for a, b in zip(reference[:episodes], rows[:episodes]):
        for key in FIGURES:
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), (key, a["episode"])


def test_tp2_gives_tp1s_episodes(tiny, ppo_tp1, tmp_path):
    proc = launch(tiny, tmp_path, gpus="0,1", TP="2", EPISODES="3")
    assert "world 2 = TP 2 x DP 1" in proc.stdout
    same_episodes(episodes(tmp_path), episodes(ppo_tp1[0]), 3)


def test_dp2_gives_tp1s_episodes_and_resumes_exactly(tiny, ppo_tp1, tmp_path):
    """DP2 samples the same rows (each generation batch is seeded by its place among all
    rows) and trains on the same global steps (whitening and token means over both ranks),
    here with the distributed optimizer (its state sharded over the two ranks); the first run
    is two nodes of one process (torchrun's rendezvous), the resumed one node of two."""
    from megatron_patch.convert.megatron_io import TRACKER

    full = tmp_path / "full"
    stdout = launch_two_nodes(tiny, full, EPISODES="4", SAVE_EPISODE_INTERVAL="2",
                              DISTRIBUTED_OPTIMIZER="True")
    assert "2 processes (1 on this node" in stdout and "world 2 = TP 1 x DP 2" in stdout
    same_episodes(episodes(full), episodes(ppo_tp1[0]), 3)
    # a crash after episode 2's save: its checkpoints, the tracker back at 2
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for role in ("ppo_policy", "reward_train"):
        shutil.rmtree(resumed / role / "iter_0000004")
        (resumed / role / TRACKER).write_text("2")
    again = launch(tiny, resumed, gpus="0,1", EPISODES="4", SAVE_EPISODE_INTERVAL="2",
                   DISTRIBUTED_OPTIMIZER="True")
    assert "resuming at episode 2" in again.stdout
    assert "dropped 2 rows after iteration 2" in again.stdout
    a, b = episodes(full), episodes(resumed)
    assert [r["episode"] for r in b] == [1, 2, 3, 4]
    for row_a, row_b in zip(a[2:], b[2:]):
        for key in FIGURES:
            assert row_a[key] == row_b[key], (key, row_a["episode"])


def test_tiny_grpo_raises_the_rule_reward(tiny, tmp_path):
    proc = launch(tiny, tmp_path, config="grpo.yaml", EPISODES="12")
    rows = episodes(tmp_path)
    ok, means = rises(rows, by=0.05)
    assert ok, means
    assert all(r["agreement"] <= 1.001 for r in rows)
    assert "kl_loss" in rows[-1] and "value_loss" not in rows[-1]  # no critic
    assert "(8 prompts x 4)" in proc.stdout and "reward: rules:letter_e" in proc.stdout
    assert not os.path.exists(tmp_path / "reward_train")


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("args, message", [
    ((), "error: expected 1 or 2 arguments, got 0"),
    (("0;1",), "GPU_LIST must be GPU numbers separated by commas"),
    (("0", "/nonexistent/rlhf.yaml"), "CONFIG '/nonexistent/rlhf.yaml': no such file"),
])
def test_launcher_usage_errors(args, message):
    proc = subprocess.run(["bash", LAUNCHER, *args], capture_output=True, text=True,
                          env=child_env())
    assert proc.returncode == 2 and message in proc.stderr
    assert "usage: run_rlhf.sh GPU_LIST [CONFIG]" in proc.stderr


def test_config_errors_name_the_file_and_the_fix(tiny, tmp_path, monkeypatch, capsys):
    """In this process (world size 1): each error names the file or key and the way out."""
    from megatron_patch.rlhf.__main__ import main
    from megatron_patch.rlhf.trainer import Schedule

    monkeypatch.setenv("TINY_RLHF_DIR", str(tiny))
    monkeypatch.setenv("RLHF_SAVE", str(tmp_path / "out"))
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "config"
    shutil.copytree(TINY, config)
    ppo = config / "ppo.yaml"
    text = ppo.read_text()

    def refused(changed: str) -> str:
        ppo.write_text(changed)
        assert main(["--config", str(ppo)]) == 2
        return capsys.readouterr().err

    # the reward model in the reference's slot
    err = refused(text.replace("reference:\n        model_config_file: models/policy.yaml",
                               "reference:\n        model_config_file: models/reward.yaml"))
    assert "models.reference: load" in err and "holds a reward model; reference needs the " \
        "SFT model" in err
    # policy generates with ppo_policy's weights: another load is refused
    err = refused(text.replace("\n    policy:\n        model_config_file: models/policy.yaml",
                               "\n    policy:\n        model_config_file: models/reward.yaml"))
    assert "differs from ppo_policy's" in err and "give both the same load" in err
    err = refused(text.replace("${NUM_DEVICE:1}", "4"))
    assert "models.*.num_device is 4 but the run has 1 processes" in err
    err = refused(text.replace("prompts.jsonl", "missing.jsonl"))
    assert "rlhf.prompt_data" in err and "missing.jsonl': no such file" in err
    for name in ("policy", "reward"):
        model = config / "models" / f"{name}.yaml"
        model.write_text(model.read_text().replace("pipeline_model_parallel_size: 1",
                                                   "pipeline_model_parallel_size: 2"))
    err = refused(text)
    assert "pipeline_model_parallel_size 2: the RLHF loop generates with the whole model" in err
    rlhf = {"algorithm": "ppo", "group_size": 4, "sample_per_episode": 3,
            "train_global_batch_size": None, "train_micro_batch_size": 1,
            "num_ppo_episode": 2, "num_training_epoch": 1}
    with pytest.raises(ValueError, match="sample_per_episode 3 is not divisible by the "
                                         "data-parallel size 2"):
        Schedule(rlhf, 2, "rlhf.yaml")
    with pytest.raises(ValueError, match="train_global_batch_size 4 must divide the episode's "
                                         "6 samples"):
        Schedule({**rlhf, "sample_per_episode": 6, "train_global_batch_size": 4}, 1, "r.yaml")
    grpo = Schedule({**rlhf, "algorithm": "grpo", "sample_per_episode": 2,
                     "train_micro_batch_size": 2, "train_global_batch_size": 4}, 2, "r.yaml")
    assert (grpo.samples, grpo.rank_prompts, grpo.steps_per_epoch, grpo.steps) == (8, 1, 2, 4)
