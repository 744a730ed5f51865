"""Reward models: HF ``*ForSequenceClassification`` (one label) <-> Megatron with a scalar head,
bit-identical both ways; every position's score equals HF's ``score`` over its trunk at TP1;
training's first loss equals the Bradley-Terry loss of transformers' model at TP1 and
TP2 x PP2, a resumed run equals the straight one, a keyword preference is learned, and the
scoring CLI gives HF's own scores."""
import json
import os
import random
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, run_python, run_torchrun, save_tiny_hf, train_tiny_tokenizer
from megatron_patch.convert import engine

VOCAB, PAD = 300, 299
# bloom, OPT: tied embeddings in their configs; chatglm: transformers' glm and glm4 layouts
RM_CASES = [("llama", "tiny"), ("bloom", "tiny"), ("falcon", "tiny"), ("galactica", "tiny"),
            ("chatglm", "tiny"), ("chatglm", "tiny-glm4")]
RM_FAMILIES = [f"{name}-{size}" if size != "tiny" else name for name, size in RM_CASES]


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    tokenizer = train_tiny_tokenizer(str(root / "tokenizer"), vocab_size=280)
    made = {}
    for (family, size), name in zip(RM_CASES, RM_FAMILIES):
        hf = save_tiny_hf(family, str(root / name / "hf"), size=size, vocab_size=VOCAB,
                          qk_scale=10.0, reward_head=True, hf_extra={"pad_token_id": PAD})
        if name == "llama":
            for file in os.listdir(tokenizer):
                shutil.copy(os.path.join(tokenizer, file), hf)
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


WORDS = "the a module value file data read write number list return object".split()


def write_pairs(path, count: int, seed: int, keyword: bool = False) -> str:
    """Short prompt/chosen/rejected records; ``keyword``: the chosen response says
    "excellent" where the rejected one says "terrible", the rest random and shared."""
    rng = random.Random(seed)
    with open(path, "w") as out:
        for _ in range(count):
            stem = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
            tail = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 2)))
            if keyword:
                chosen, rejected = f" {stem} excellent {tail}", f" {stem} terrible {tail}"
            else:
                chosen, rejected = (" " + " ".join(rng.choice(WORDS) for _ in range(
                    rng.randint(1, 4))) for _ in range(2))
            out.write(json.dumps({"prompt": f"Q: {stem}\nA:", "chosen": chosen,
                                  "rejected": rejected}) + "\n")
    return str(path)


def train_rm(load, data, metrics, *extra, nproc=1, iters=4):
    args = ["-m", "megatron_patch.reward_model", "--load", str(load), "--train-data", str(data),
            "--train-iters", str(iters), "--micro-batch-size", "2", "--global-batch-size", "8",
            "--seq-length", "48", "--lr", "1e-3", "--log-interval", "1", "--metrics-file",
            str(metrics), *extra]
    proc = run_torchrun(args, nproc=nproc)
    rows = [json.loads(line) for line in open(metrics)]
    return {row["iteration"]: (row["rm_loss"], row["accuracy"], row["margin"], row["grad_norm"])
            for row in rows if "rm_loss" in row}, proc


def hf_pair_loss(hf_dir, data, pairs: int, length: int = 48) -> float:
    """transformers' LlamaForSequenceClassification on each side alone (our token ids):
    the mean of -log sigmoid(r_chosen - r_rejected) over the first ``pairs`` pairs."""
    from transformers import AutoModelForSequenceClassification

    from megatron_patch.rlhf.reward import encode_pairs
    from megatron_patch.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("llamabpe", hf_dir)
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32)
    encoded, _ = encode_pairs(data, tokenizer, length)
    hf_tokenizer = tokenizer.hf_tokenizer
    for pair, line in zip(encoded, open(data)):  # our ids = transformers' own tokenization
        record = json.loads(line)
        for side in ("chosen", "rejected"):
            ids = (hf_tokenizer(record["prompt"]).input_ids + hf_tokenizer(
                record[side], add_special_tokens=False).input_ids + [hf_tokenizer.eos_token_id])
            if len(ids) <= length:
                assert list(pair[side]) == ids
    losses = []
    with torch.no_grad():
        for pair in encoded[:pairs]:
            chosen, rejected = (model(torch.tensor([pair[k]])).logits[0, 0]
                                for k in ("chosen", "rejected"))
            losses.append(-torch.nn.functional.logsigmoid(chosen - rejected))
    return torch.stack(losses).mean().item()


def test_first_loss_equals_transformers_and_resume_is_exact(reward_models, tmp_path):
    """Iteration 1's loss (before any update) at TP1 and TP2 x PP2 = transformers' over the
    same 8 pairs (one global batch: the whole file, so its shuffle cannot matter), and the
    later iterations agree too, with TP2 x PP2 under sequence parallelism (the head gathers
    the sequence) and 2 micro-batches of 4 pairs against TP1's 4 of 2; a run stopped at 2 and
    resumed = the straight run, grad norms too."""
    root = reward_models["llama"]
    data = write_pairs(tmp_path / "pairs.jsonl", 8, seed=1)
    expected = hf_pair_loss(str(root / "hf"), data, 8)
    straight, _ = train_rm(root / "tp1", data, tmp_path / "straight.jsonl")
    wide, _ = train_rm(root / "wide", data, tmp_path / "wide.jsonl", "--tensor-model-parallel-size",
                       "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
                       "--micro-batch-size", "4", nproc=4)
    assert straight[1][0] == pytest.approx(expected, abs=1e-5)
    assert wide[1][0] == pytest.approx(expected, abs=1e-5)
    for iteration in straight:
        assert wide[iteration] == pytest.approx(straight[iteration], rel=1e-4), iteration
    ckpt = tmp_path / "ckpt"
    train_rm(root / "tp1", data, tmp_path / "part.jsonl", "--save", str(ckpt),
             "--exit-interval", "2")
    resumed, _ = train_rm(ckpt, data, tmp_path / "part.jsonl", "--save", str(ckpt))
    assert resumed == straight


def test_a_keyword_preference_is_learned_from_a_language_model(tmp_path):
    """From a converted causal LM (its trunk; the head starts from the init): held-out
    accuracy >= 90% and the margin grows."""
    hf = save_tiny_hf("llama", str(tmp_path / "lm"), vocab_size=VOCAB)
    tokenizer = train_tiny_tokenizer(str(tmp_path / "tokenizer"), vocab_size=280)
    for file in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, file), hf)
    engine.convert_hf_to_megatron(hf, str(tmp_path / "mg"), progress=False)
    train = write_pairs(tmp_path / "train.jsonl", 256, seed=2, keyword=True)
    valid = write_pairs(tmp_path / "valid.jsonl", 64, seed=3, keyword=True)
    metrics = tmp_path / "metrics.jsonl"
    trained, proc = train_rm(tmp_path / "mg", train, metrics, "--valid-data", valid,
                             "--eval-interval", "30", "--eval-iters", "8", "--lr", "2e-3",
                             "--global-batch-size", "16", "--micro-batch-size", "8",
                             "--save", str(tmp_path / "rm"), "--seq-length", "128", iters=30)
    assert "gives no output_layer.weight" in proc.stdout
    assert "256 pairs read, 256 kept; 0 sides truncated" in proc.stdout
    (validation,) = [json.loads(line) for line in open(metrics) if "valid_accuracy" in line]
    assert validation["valid_accuracy"] >= 0.9
    assert trained[30][2] > trained[1][2] + 1.0  # the mean margin, r_chosen - r_rejected
    meta = json.loads((tmp_path / "rm" / "megatron_patch.json").read_text())
    assert meta["model_args"]["reward_head"]
    # to HF: a LlamaForSequenceClassification whose pad_token_id is the tokenizer's
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    engine.convert_megatron_to_hf(str(tmp_path / "rm"), str(tmp_path / "rm-hf"), progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm-hf"))
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == AutoTokenizer.from_pretrained(hf).pad_token_id


def test_scoring_cli_gives_hfs_scores(reward_models, tmp_path):
    """The imported HF reward model's scores through ``--score`` = HF's pooled logits
    (transformers finds the last non-pad token itself, in a right-padded batch)."""
    from transformers import AutoModelForSequenceClassification

    from megatron_patch.rlhf.score import read_texts
    from megatron_patch.tokenizers import build_tokenizer

    root = reward_models["llama"]
    data = write_pairs(tmp_path / "pairs.jsonl", 6, seed=4)
    with open(data, "a") as out:
        out.write(json.dumps({"text": "a text alone"}) + "\n")
    out = tmp_path / "scores.jsonl"
    proc = run_python(["-m", "megatron_patch.reward_model", "--score", "--load",
                       str(root / "tp1"), "--input-file", data, "--output-file", str(out),
                       "--micro-batch-size", "4"])
    scores = [json.loads(line) for line in open(out)]
    tokenizer = build_tokenizer("llamabpe", str(root / "hf"))
    texts, _, _ = read_texts(data, tokenizer, 10**6)  # our ids, fed to HF as they are
    model = AutoModelForSequenceClassification.from_pretrained(str(root / "hf"),
                                                               dtype=torch.float32)
    width = max(len(t) for t in texts)
    batch = torch.tensor([t + [PAD] * (width - len(t)) for t in texts])
    with torch.no_grad():
        hf = model(batch, attention_mask=(batch != PAD).long()).logits[:, 0].tolist()
    ours = [value for row in scores for value in
            ((row["chosen_score"], row["rejected_score"]) if "chosen_score" in row
             else (row["score"],))]
    assert ours == pytest.approx(hf, abs=1e-5)
    right = sum(row["chosen_score"] > row["rejected_score"] for row in scores[:-1])
    assert f"accuracy {right / 6:.4f} ({right} of 6 pairs" in proc.stderr


def test_score_index_under_left_and_right_padding(reward_models):
    """The score read at each row's last token is the same with the row left-padded (padding
    masked, positions from 0 at the first real token) as right-padded, and as alone."""
    from megatron_patch import compat
    from megatron_patch.generation.batching import causal_padding_mask, positions_of
    from megatron_patch.generation.loading import load_model, open_checkpoint

    rows = [[5, 9, 13, 2], [7, 8, 9, 10, 11, 12, 2], [40, 2]]
    width = max(map(len, rows))
    compat.initialize_parallel(1, 1)
    try:
        model = load_model(open_checkpoint(str(reward_models["llama"] / "tp1")), 1)
        with torch.no_grad():
            alone = [model(torch.tensor([r]), torch.arange(len(r))[None], None)[0, -1, 0]
                     for r in rows]
            right = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
            right_scores = model(right, torch.arange(width).expand(3, width), None)
            left = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
            valid = left != PAD
            left_scores = model(left, positions_of(valid), causal_padding_mask(valid))
    finally:
        compat.destroy_parallel()
    for i, r in enumerate(rows):
        assert right_scores[i, len(r) - 1, 0] == pytest.approx(alone[i].item(), abs=1e-5)
        assert left_scores[i, -1, 0] == pytest.approx(alone[i].item(), abs=1e-5)


def test_bad_pairs_are_named_by_file_and_line(reward_models, tmp_path):
    from megatron_patch.rlhf.reward import encode_pairs
    from megatron_patch.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("llamabpe", str(reward_models["llama"] / "hf"))
    path = tmp_path / "bad.jsonl"
    for line, message in (
            ('{"prompt": "p", "chosen": "a", "rejected": ["b"]}', "both be strings or both"),
            ('{"prompt": "p", "chosen": "a"}', "expected a preference record"),
            ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "x"}', "'margin'")):
        path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + line + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
            encode_pairs(str(path), tokenizer, 32)
    path.write_text('{"prompt": "p", "chosen": "same", "rejected": "same"}\n')
    pairs, stats = encode_pairs(str(path), tokenizer, 32)
    assert pairs == [] and stats.dropped_identical == 1 and stats.read == 1
    proc = run_python(["-m", "megatron_patch.reward_model", "--load",
                       str(reward_models["llama"] / "tp1"), "--train-data", str(path),
                       "--train-iters", "1", "--micro-batch-size", "1",
                       "--global-batch-size", "1", "--seq-length", "32", "--lr", "1e-4"],
                      check=False)
    assert proc.returncode == 2 and "no pair is left" in proc.stderr


def test_seed_style_launcher_trains_a_reward_model(reward_models, tmp_path):
    """examples/llama/run_train_reward_model_llama.sh with the SFT launcher's 22 arguments."""
    from test_launchers import launch

    data = write_pairs(tmp_path / "pairs.jsonl", 16, seed=5)
    args = ["dsw", "none", REPO, "tiny", "2", "1e-3", "1e-4", "64", "48", "0", "fp32", "1", "1",
            "none", "false", "true", "false", data, data, str(reward_models["llama"] / "tp1"),
            "1", str(tmp_path / "out")]
    script = os.path.join(REPO, "examples", "llama", "run_train_reward_model_llama.sh")
    proc = launch(script, args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (metrics,) = (tmp_path / "out" / "metrics").iterdir()
    assert metrics.name.startswith("dsw-reward-megatron-llama-tiny-")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len([row for row in rows if "rm_loss" in row]) == 8  # 16 pairs, batch 2, 1 epoch
    bad = launch(script, args[:17] + ["/nonexistent.jsonl"] + args[18:])
    assert bad.returncode == 2
    assert "TRAIN_DATASET_PATH '/nonexistent.jsonl' is not a JSON/JSONL file of preference" \
        in bad.stderr


def test_seed_reward_model_convertor_wrapper(reward_models, tmp_path):
    """toolkits/.../reward_model_convertor_megatron.sh: HF reward model -> Megatron TP2 -> HF,
    bit-identical; a language model given to it is refused before any work."""
    import subprocess

    wrapper = os.path.join(REPO, "toolkits", "model_checkpoints_convertor", "llama",
                           "reward_model_convertor_megatron.sh")
    hf = str(reward_models["llama"] / "hf")

    def convert(*args):
        return subprocess.run(["bash", wrapper, "none", *map(str, args)], capture_output=True,
                              text=True, cwd=REPO, env={**os.environ, "PYTHON": sys.executable})

    assert convert(hf, tmp_path / "mg", 2, 1, "false").returncode == 0
    assert convert(tmp_path / "mg", tmp_path / "back", 1, 1, "true").returncode == 0
    original, back = (load_file(os.path.join(d, "model.safetensors")) for d in (hf, tmp_path / "back"))
    assert sorted(back) == sorted(original) and all(torch.equal(back[k], original[k])
                                                    for k in original)
    lm = save_tiny_hf("llama", str(tmp_path / "lm"), vocab_size=VOCAB)
    refused = convert(lm, tmp_path / "lm-mg", 1, 1, "false")
    assert refused.returncode == 2 and not (tmp_path / "lm-mg").exists()
    assert "--model-type reward: --load" in refused.stderr
    assert "holds a language model (LlamaForCausalLM)" in refused.stderr


def test_sft_rm_model_prepare_writes_the_four_roles(reward_models, tmp_path):
    """toolkits/rlhf/sft_rm_model_prepare.sh: a Megatron reward model (resharded) and an HF SFT
    model (converted) -> rw_pred / rw_train / sft_pred / sft_train (TP 2, the train copies also
    PP 2); sources swapped, or a wrong number of arguments, are refused with the usage."""
    import subprocess

    script = os.path.join(REPO, "toolkits", "rlhf", "sft_rm_model_prepare.sh")
    rm = str(reward_models["llama"] / "tp1")
    sft = save_tiny_hf("llama", str(tmp_path / "sft"), vocab_size=VOCAB)

    def prepare(*args, **env):
        return subprocess.run(["bash", script, *map(str, args)], capture_output=True, text=True,
                              env={**os.environ, "PYTHON": sys.executable, **env})

    done = prepare(rm, sft, tmp_path / "rm", tmp_path / "policy", TP="2", PP="2")
    assert done.returncode == 0, done.stderr
    for role, reward, pp in (("rm/rw_pred", True, 1), ("rm/rw_train", True, 2),
                             ("policy/sft_pred", False, 1), ("policy/sft_train", False, 2)):
        meta = json.loads((tmp_path / role / "megatron_patch.json").read_text())
        assert meta["model_args"]["reward_head"] is reward, role
        assert (meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]) == \
            (2, pp), role
    swapped = prepare(sft, rm, tmp_path / "a", tmp_path / "b")
    assert swapped.returncode == 2 and "SOURCE_RM_PATH" in swapped.stderr
    assert "holds a language model; it must hold a reward model" in swapped.stderr
    usage = prepare(rm, sft, tmp_path / "a")
    assert usage.returncode == 2 and "usage: sft_rm_model_prepare.sh SOURCE_RM_PATH" in \
        usage.stderr


def test_reward_models_without_a_transformers_class_are_refused():
    from megatron_patch.registry import get_family

    chatglm = get_family("chatglm")
    with pytest.raises(ValueError, match="chatglm2 layout is remote code"):
        chatglm.hf_config_from_args(chatglm.args_for_size("tiny-chatglm2", reward_head=True))
    glm130b = get_family("glm130b")
    with pytest.raises(ValueError, match="glm130b has no transformers sequence-classification"):
        glm130b.hf_config_from_args(glm130b.args_for_size("tiny", reward_head=True))
    bad = {"architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "a", "1": "b"}}
    from megatron_patch.families.base import is_reward_config

    with pytest.raises(ValueError, match="with 2 labels is a classifier"):
        is_reward_config(bad, "x/config.json")


def test_packed_pairs_give_each_pair_its_own_loss(reward_models, tmp_path):
    """--packing: several pairs per sample (chosen sides in one row, rejected in another, each
    side attending only to itself): the first loss over all pairs = transformers' on each side
    alone."""
    from megatron_patch.rlhf.reward import encode_pairs, pack_pairs
    from megatron_patch.tokenizers import build_tokenizer

    root = reward_models["llama"]
    data = write_pairs(tmp_path / "pairs.jsonl", 8, seed=1)
    pairs, _ = encode_pairs(data, build_tokenizer("llamabpe", str(root / "hf")), 96)
    packs = len(pack_pairs(pairs, 96))
    assert packs < 8  # several pairs share a sample
    rows, proc = train_rm(root / "tp1", data, tmp_path / "packed.jsonl", "--packing",
                          "--seq-length", "96", "--micro-batch-size", "1",
                          "--global-batch-size", str(packs), iters=1)
    assert f"8 kept, packed into {packs} samples" in proc.stdout
    assert rows[1][0] == pytest.approx(hf_pair_loss(str(root / "hf"), data, 8, 96), abs=1e-5)


def test_chat_pairs_render_through_the_chat_pieces(reward_models, tmp_path):
    """{prompt: [messages], chosen: [messages], rejected: [messages]}: each side is the whole
    conversation as SFT renders it (shared prompt tokens first, eod last)."""
    from megatron_patch.data.sft import chat_pieces, encode_pieces
    from megatron_patch.rlhf.reward import encode_pairs
    from megatron_patch.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("llamabpe", str(reward_models["llama"] / "hf"))
    prompt = [{"role": "user", "content": "Name a file."}]
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "data.txt"}],
              "rejected": [{"role": "assistant", "content": "no"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (pair,), stats = encode_pairs(str(path), tokenizer, 64)
    for side in ("chosen", "rejected"):
        expected, _ = encode_pieces(chat_pieces(prompt + record[side], tokenizer), tokenizer)
        assert pair[side].tolist() == expected.tolist() and expected[-1] == tokenizer.eod
    head, _ = encode_pieces(chat_pieces(prompt, tokenizer), tokenizer)
    assert pair["chosen"][:len(head)].tolist() == head.tolist() == \
        pair["rejected"][:len(head)].tolist()
    assert stats.kept == 1
