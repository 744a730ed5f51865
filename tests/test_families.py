"""Every registered family besides llama (whose own tests in test_convert / test_training /
test_generation go further) through every stage, against transformers' own class for it:
conversion round trips (a multi-query model's key/value head copied over TP ranks),
logits and loss, greedy generation with per-step log-probabilities,
layout invariance, exact resume and the seed launchers. The cases come from the registry: each
family's sizes rows named ``tiny*`` (falcon has a 7B-style and a 40B-style one), built by
helpers.save_tiny_hf from the family's own declaration with a 300-token vocabulary (384 rows at
TP1, 512 at TP2) and attention sharp enough that positions matter."""
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from helpers import REPO, run_python, run_torchrun, save_tiny_hf, train_tiny_tokenizer
from megatron_patch.convert import engine
from megatron_patch.registry import FAMILIES



def _in_transformers(family, size: str) -> bool:
    """Rows whose HF layout is a transformers class (chatglm's remote-code ChatGLM2 layout is
    not: tests/test_chatglm.py builds it from a glm model)."""
    from transformers import CONFIG_MAPPING

    return family.hf_config_from_args(family.args_for_size(size))["model_type"] in CONFIG_MAPPING


CASES = [(family.name, size) for family in FAMILIES.values() if family.name != "llama"
         for size in family.sizes if size.startswith("tiny") and _in_transformers(family, size)]
VOCAB = 300
ITERS = 4


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tokenizer and an mmap dataset made with it, for every family."""
    from megatron_patch.data.corpus import iter_stdlib_docstrings

    root = tmp_path_factory.mktemp("families")
    tokenizer = train_tiny_tokenizer(str(root / "tok"), vocab_size=VOCAB)
    with open(root / "docs.jsonl", "w") as handle:
        for _, text in zip(range(300), iter_stdlib_docstrings()):
            handle.write(json.dumps({"text": text}) + "\n")
    run_python(["-m", "megatron_patch.data.preprocess", "--input", str(root / "docs.jsonl"),
                "--output-prefix", str(root / "data"), "--tokenizer-type",
                "HuggingFaceTokenizer", "--tokenizer-model", tokenizer, "--append-eod",
                "--workers", "1"])
    return SimpleNamespace(root=root, tokenizer=tokenizer, data=str(root / "data_text_document"))


def prepare(shared, name: str, size: str) -> SimpleNamespace:
    """One family's tiny HF model (with the tokenizer) converted at TP1 and at TP2 x PP2 (a
    single key/value head, falcon-7B's multi-query attention, is copied to both TP ranks);
    made once per module."""
    root = shared.root / f"{name}-{size}"
    if not root.exists():
        hf = save_tiny_hf(name, str(root / "hf"), size=size, vocab_size=VOCAB, qk_scale=10.0)
        for file in os.listdir(shared.tokenizer):
            shutil.copy(os.path.join(shared.tokenizer, file), hf)
        engine.convert_hf_to_megatron(hf, str(root / "tp1"), progress=False)
        engine.convert_hf_to_megatron(hf, str(root / "wide"), target=engine.Target(2, 2),
                                      progress=False)
    return SimpleNamespace(name=name, size=size, root=root, hf=str(root / "hf"), tp=2, pp=2,
                           tp1=str(root / "tp1"), wide=str(root / "wide"))


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{s}" for f, s in CASES])
def case(request, shared):
    return prepare(shared, *request.param)


# Training, SFT and the converter wrapper run once per family, on its first tiny row: falcon's
# 40B-style row differs from the 7B-style one in its norms and key/value groups, which the
# logits, loss and generation tests compare with HF at TP2 x PP2 (and its seed pretraining
# launcher trains it); the 7B-style row is the one whose KV head is copied over TP.
TRAINED = [(name, size) for name, size in CASES if size == "tiny"]


@pytest.fixture(scope="module", params=TRAINED, ids=[f"{f}-{s}" for f, s in TRAINED])
def trained_case(request, shared):
    return prepare(shared, *request.param)


def test_round_trip_through_the_widest_layout_is_bit_identical(case, tmp_path):
    from safetensors.torch import load_file

    engine.convert_megatron_to_hf(case.wide, str(tmp_path / "back"), progress=False)
    original, back = (load_file(os.path.join(d, "model.safetensors"))
                      for d in (case.hf, tmp_path / "back"))
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype
               for k in original)
    config, source = (json.loads(open(os.path.join(d, "config.json")).read())
                      for d in (tmp_path / "back", case.hf))
    assert config["model_type"] == source["model_type"]  # glm4 goes back as glm4
    assert config["model_type"] in FAMILIES[case.name].hf_model_types


def test_logits_and_loss_equal_hf(case):
    """fp32: logits within 1e-6 at TP1 (in this process) and at the widest layout (each TP
    rank's full-vocabulary logits); the loss, which sums 48 tokens' terms, within 1e-5."""
    from dist import check_logits
    from megatron_patch import compat

    compat.initialize_parallel(1, 1)
    try:
        assert check_logits.compare(case.hf, case.tp1, 1, 1)[1] <= 1e-6
        assert check_logits.compare(case.hf, case.tp1, 1, 1, loss=True)[1] <= 1e-5
    finally:
        compat.destroy_parallel()
    args = ["tests/dist/check_logits.py", "--hf", case.hf, "--mg", case.wide, "--tp",
            str(case.tp), "--pp", str(case.pp), "--tolerance", "1e-6"]
    proc = run_torchrun(args, nproc=case.tp * case.pp)  # exits 1 past the tolerance
    assert proc.stdout.count("max_abs_diff=") == case.tp  # each TP rank compared


PROMPTS = ["Return the number of", "import", "The module provides a way to read and write"]


def test_greedy_generation_and_logprobs_equal_hf_generate(case, tmp_path):
    from test_generation import assert_logprobs_match, hf_greedy

    from megatron_patch.generation.loading import load_tokenizer, open_checkpoint

    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(PROMPTS) + "\n")
    tokenizer = load_tokenizer(open_checkpoint(case.tp1), None, None)
    reference = hf_greedy(case.hf, [tokenizer.tokenize(p) for p in PROMPTS], tokenizer, 8)
    for mg, tp, backend in ((case.tp1, 1, "static"), (case.wide, case.tp, "mcore")):
        out = tmp_path / f"tp{tp}-{backend}.jsonl"
        args = ["-m", "megatron_patch.generate", "--load", mg, "--input-file", str(source),
                "--output-file", str(out), "--top-k", "1", "--max-new-tokens", "8",
                "--tensor-model-parallel-size", str(tp), "--inference-backend", backend,
                "--output-logprobs"]
        run_torchrun(args, nproc=tp) if tp > 1 else run_python(args)
        records = [json.loads(line) for line in open(out)]
        assert [r["completion_ids"] for r in records] == reference.ids, (tp, backend)
        assert_logprobs_match([r["completion_logprobs"] for r in records], reference.logprobs)


def pretrain(shared, case, metrics, *extra, nproc=1):
    args = ["-m", "megatron_patch.pretrain", "--load", case.tp1, "--data-path", shared.data,
            "--data-cache-path", str(shared.root / "cache"), "--micro-batch-size", "2",
            "--global-batch-size", "4", "--seq-length", "64", "--lr", "1e-3", "--train-iters",
            str(ITERS), "--eval-iters", "0", "--log-interval", "1", "--metrics-file",
            str(metrics), *extra]
    run_torchrun(args, nproc=nproc) if nproc > 1 else run_python(args)
    return {r["iteration"]: (r["lm_loss"], r["grad_norm"]) for r in map(json.loads, open(metrics))}


def test_layouts_agree_and_resume_is_exact(shared, trained_case, tmp_path):
    assert_layouts_agree_and_resume_is_exact(shared, trained_case, tmp_path)


def assert_layouts_agree_and_resume_is_exact(shared, case, tmp_path):
    """Losses and grad norms at case.tp x case.pp = TP1's; stopped at 2 and resumed = straight."""
    reference = pretrain(shared, case, tmp_path / "tp1.jsonl")
    wide = pretrain(shared, case, tmp_path / "wide.jsonl", "--tensor-model-parallel-size",
                    str(case.tp), "--pipeline-model-parallel-size", str(case.pp),
                    nproc=case.tp * case.pp)
    assert sorted(wide) == sorted(reference) == list(range(1, ITERS + 1))
    # Losses and grad norms (the clipping at --clip-grad 1.0 sees the norm)
    for iteration, loss_and_norm in reference.items():
        assert wide[iteration] == pytest.approx(loss_and_norm, rel=1e-5), iteration
    ckpt = tmp_path / "ckpt"
    pretrain(shared, case, tmp_path / "part.jsonl", "--save", str(ckpt), "--exit-interval", "2")
    resumed = pretrain(shared, case, tmp_path / "part.jsonl", "--load", str(ckpt), "--save",
                       str(ckpt))
    assert resumed == reference  # bit for bit, grad norms too


def test_seed_launchers_pretrain_and_refuse_a_wrong_size(shared, case, tmp_path):
    from test_launchers import launch

    # The seed's 23 arguments, in order: 8 iterations of 4 x 32 tokens on the CPU.
    args = dict(ENV="dsw", MEGATRON_PATH="none", MEGATRON_PATCH_PATH=REPO, MODEL_SIZE=case.size,
                BATCH_SIZE="2", GLOBAL_BATCH_SIZE="4", LR="1e-3", MIN_LR="1e-4", SEQ_LEN="32",
                EXTRA_VOCAB_SIZE="0", PR="fp32", TP="1", PP="1", AC="none", DO="false",
                FL="true", SP="false", SAVE_INTERVAL="8", DATASET_PATH=shared.data,
                PRETRAIN_CHECKPOINT_PATH=case.tp1, TRAIN_TOKENS=str(8 * 4 * 32),
                WARMUP_TOKENS="128", OUTPUT_BASEPATH=str(tmp_path / "out"))
    script = os.path.join(REPO, "examples", case.name, f"run_pretrain_megatron_{case.name}.sh")
    proc = launch(script, list(args.values()))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (metrics,) = (tmp_path / "out" / "metrics").iterdir()
    assert len([line for line in metrics.read_text().splitlines() if "lm_loss" in line]) == 8
    bad = launch(script, list({**args, "MODEL_SIZE": "13B-nope"}.values()))
    assert bad.returncode == 2
    assert f"MODEL_SIZE '13B-nope' is not a {case.name} size; choose one of" in bad.stderr


def test_seed_finetune_launcher_loss_equals_hf(trained_case, tmp_path):
    """SFT through the family's seed launcher: its first loss (before any update) is the
    token-weighted response loss of transformers' model on each record alone."""
    from test_launchers import launch
    from test_training import SFT_RECORDS, hf_response_loss

    case = trained_case
    (tmp_path / "sft.json").write_text(json.dumps(SFT_RECORDS))
    args = dict(ENV="dsw", MEGATRON_PATH="none", MEGATRON_PATCH_PATH=REPO, MODEL_SIZE=case.size,
                BATCH_SIZE="4", LR="1e-3", MIN_LR="0", SEQ_LEN="256", PAD_LEN="256",
                EXTRA_VOCAB_SIZE="0", PR="fp32", TP="1", PP="1", AC="none", DO="false",
                FL="true", SP="false", TRAIN_DATASET_PATH=str(tmp_path / "sft.json"),
                VALID_DATASET_PATH="none", PRETRAIN_CHECKPOINT_PATH=case.tp1, EPOCH="1",
                OUTPUT_BASEPATH=str(tmp_path / "out"))
    script = os.path.join(REPO, "examples", case.name, f"run_finetune_megatron_{case.name}.sh")
    proc = launch(script, list(args.values()))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (metrics,) = (tmp_path / "out" / "metrics").iterdir()
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if "lm_loss" in line]
    assert rows[0]["iteration"] == 1
    assert rows[0]["lm_loss"] == pytest.approx(hf_response_loss(case.hf, SFT_RECORDS), abs=1e-5)


def test_copied_key_value_heads_refuse_the_distributed_optimizer(tmp_path):
    """One key/value head over TP2: its copies' gradients are summed on the whole gradient,
    which the distributed optimizer shards; the run says so instead of drifting apart."""
    hf = save_tiny_hf("falcon", str(tmp_path / "hf"), size="tiny", vocab_size=VOCAB)
    engine.convert_hf_to_megatron(hf, str(tmp_path / "mg"), progress=False)
    proc = run_torchrun(["-m", "megatron_patch.pretrain", "--load", str(tmp_path / "mg"),
                         "--mock-data", "--micro-batch-size", "1", "--global-batch-size", "1",
                         "--seq-length", "32", "--lr", "1e-3", "--train-iters", "1",
                         "--tensor-model-parallel-size", "2", "--use-distributed-optimizer"],
                        nproc=2, check=False)
    assert proc.returncode != 0
    assert "--use-distributed-optimizer with --tensor-model-parallel-size 2 and 1 key/value " \
           "head(s): each is copied to 2 ranks" in proc.stderr
    assert proc.stderr.count("--use-distributed-optimizer with") == 1  # rank 0 only


def test_seed_converter_wrapper_round_trip_and_family_check(trained_case, tmp_path):
    """toolkits/model_checkpoints_convertor/<family>/: HF -> Megatron TP2 x PP2 -> HF with the
    seed's positional arguments is bit-identical; another family's HF checkpoint is refused."""
    import subprocess

    from test_convert import assert_bit_identical

    case = trained_case
    wrapper = os.path.join(REPO, "toolkits", "model_checkpoints_convertor", case.name,
                           "model_convertor_huggingface_megatron.sh")
    mg, back = str(tmp_path / "mg"), str(tmp_path / "back")
    for args in ([case.hf, mg, "2", "2", "false"], [mg, back, "1", "1", "true"]):
        proc = subprocess.run(["bash", wrapper, "none", *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert "(TP=2, PP=2, torch)" in proc.stdout
    assert_bit_identical(case.hf, back)
    other = save_tiny_hf("llama", str(tmp_path / "llama"), vocab_size=VOCAB)
    proc = subprocess.run(["bash", wrapper, "none", other, str(tmp_path / "x"), "1", "1",
                           "false"], capture_output=True, text=True)
    assert proc.returncode != 0 and f"--model-family {case.name} does not match" in proc.stderr
