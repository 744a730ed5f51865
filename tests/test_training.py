"""Training: exact resume (also after kill -9 and a crash mid-save), layout invariance across
TP/PP/DP, SFT loss masking against HF transformers, and trained checkpoints converting back.

One tiny llama (converted from a random HF checkpoint) and one mmap dataset built from the
standard library's docstrings serve every test; runs are subprocesses (torchrun for 2 ranks).
"""
import json
import math
import os
import shutil

import pytest
import torch

from helpers import REPO, run_python, run_torchrun, save_tiny_llama, train_tiny_tokenizer
from megatron_patch.convert import engine

ITERS = 6
VOCAB = 300


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    # 300 tokens: the embedding pads to 384 rows at TP1 and 512 at TP2, so every comparison
    # across layouts (and with HF) also proves that padded rows take no probability.
    tok = train_tiny_tokenizer(str(root / "tok"), vocab_size=VOCAB)
    hf = save_tiny_llama(str(root / "hf"), vocab_size=VOCAB, max_position_embeddings=512)
    for name in os.listdir(tok):
        shutil.copy(os.path.join(tok, name), hf)
    engine.convert_hf_to_megatron(hf, str(root / "mg"), progress=False)
    from megatron_patch.data.corpus import iter_stdlib_docstrings

    with open(root / "docs.jsonl", "w") as handle:
        for _, text in zip(range(500), iter_stdlib_docstrings()):
            handle.write(json.dumps({"text": text}) + "\n")
    run_python(["-m", "megatron_patch.data.preprocess", "--input", str(root / "docs.jsonl"),
                "--output-prefix", str(root / "data"), "--tokenizer-type",
                "HuggingFaceTokenizer", "--tokenizer-model", tok, "--append-eod",
                "--workers", "1"])
    return root


def pretrain_args(work, metrics, *extra, iters=ITERS):
    return ["--load", str(work / "mg"), "--data-path", str(work / "data_text_document"),
            "--data-cache-path", str(work / "cache"), "--micro-batch-size", "2",
            "--global-batch-size", "4", "--seq-length", "64", "--lr", "1e-3",
            *(["--train-iters", str(iters)] if iters else []), "--eval-iters", "0",
            "--log-interval", "1", "--metrics-file", str(metrics), *extra]


def losses(metrics):
    rows = [json.loads(line) for line in open(metrics)]
    return {r["iteration"]: r["lm_loss"] for r in rows if "lm_loss" in r}


def pretrain(work, metrics, *extra, nproc=1, iters=ITERS):
    args = ["-m", "megatron_patch.pretrain", *pretrain_args(work, metrics, *extra, iters=iters)]
    return run_torchrun(args, nproc=nproc) if nproc > 1 else run_python(args)


@pytest.fixture(scope="module")
def reference(work):
    """An uninterrupted single-process run: iteration -> loss."""
    pretrain(work, work / "reference.jsonl")
    return losses(work / "reference.jsonl")


def iterations(metrics):
    """The training rows' iterations, in file order."""
    return [r["iteration"] for r in map(json.loads, open(metrics)) if "lm_loss" in r]


def latest(path):
    return open(os.path.join(path, "latest_checkpointed_iteration.txt")).read().strip()


def test_stop_and_resume_is_bit_identical(work, reference, tmp_path):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    out = pretrain(work, metrics, "--save", str(ckpt), "--exit-interval", "3").stdout
    assert latest(ckpt) == "3" and "saved checkpoint at iteration 3" in out
    run_python(["-m", "megatron_patch.pretrain", *pretrain_args(work, metrics),
                "--load", str(ckpt), "--save", str(ckpt)])
    resumed = losses(metrics)
    assert sorted(resumed) == list(range(1, ITERS + 1))
    assert resumed == reference  # every iteration, bit for bit
    again = run_python(["-m", "megatron_patch.pretrain", *pretrain_args(work, metrics),
                        "--load", str(ckpt), "--save", str(ckpt)]).stdout
    assert f"at iteration {ITERS} (" in again and "nothing is left to train" in again
    assert iterations(metrics) == list(range(1, ITERS + 1))


def crash_and_resume(work, tmp_path, mode: str, when: int, between=lambda ckpt: None):
    """Train with a save every 2 iterations, SIGKILL the run (``train_and_die.py`` ``mode``),
    check the last good checkpoint is iteration 2, call ``between``, resume. -> (ckpt, losses)"""
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    args = pretrain_args(work, metrics, "--save", str(ckpt), "--save-interval", "2")
    crashed = run_python(["tests/dist/train_and_die.py", mode, str(when), *args], check=False)
    assert crashed.returncode == -9
    assert latest(ckpt) == "2"
    between(ckpt)
    run_python(["-m", "megatron_patch.pretrain", *args, "--load", str(ckpt)])
    return ckpt, losses(metrics)


def test_resume_after_kill_9_between_saves(work, reference, tmp_path):
    _, resumed = crash_and_resume(work, tmp_path, "--die-after-iteration", 3)
    # iterations 1..2 from the crashed run, 3..6 from the resumed one; the crashed run's
    # iteration 3 (after its last save) is gone from the metrics file
    assert {i: resumed[i] for i in range(3, ITERS + 1)} == \
        {i: reference[i] for i in range(3, ITERS + 1)}
    assert iterations(tmp_path / "m.jsonl") == list(range(1, ITERS + 1))


def test_crash_while_saving_keeps_the_last_good_checkpoint(work, reference, tmp_path):
    def partial_save_left_aside(ckpt):
        assert os.path.isdir(ckpt / "iter_0000004.tmp")
        assert not os.path.exists(ckpt / "iter_0000004")

    ckpt, resumed = crash_and_resume(work, tmp_path, "--die-in-save", 4, partial_save_left_aside)
    assert latest(ckpt) == str(ITERS) and not os.path.exists(ckpt / "iter_0000004.tmp")
    assert {i: resumed[i] for i in range(3, ITERS + 1)} == \
        {i: reference[i] for i in range(3, ITERS + 1)}


DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]  # RNG state matters


@pytest.mark.parametrize("flags,files", [
    (["--use-distributed-optimizer"], {"mp_rank_00": ["distrib_optim.pt", "model_optim_rng.pt"]}),
    (["--tensor-model-parallel-size", "2", "--bf16", *DROPOUT],
     {"mp_rank_00": ["model_optim_rng.pt"], "mp_rank_01": ["model_optim_rng.pt"]}),
    # fp16: the dynamic loss scaler grows every 2 clean steps, so its state is mid-window at
    # the save and must come back with the optimizer.
    (["--pipeline-model-parallel-size", "2", "--fp16", "--initial-loss-scale", "1024",
      "--loss-scale-window", "2", *DROPOUT],
     {"mp_rank_00_000": ["model_optim_rng.pt"], "mp_rank_00_001": ["model_optim_rng.pt"]}),
], ids=["dp2-distributed-optimizer", "tp2-bf16-dropout", "pp2-fp16-dropout"])
def test_resume_is_exact_across_layouts_and_precisions(work, tmp_path, flags, files):
    ckpt = tmp_path / "ckpt"
    pretrain(work, tmp_path / "full.jsonl", *flags, nproc=2)
    pretrain(work, tmp_path / "part.jsonl", *flags, "--save", str(ckpt), "--exit-interval", "3",
             nproc=2)
    assert {d: sorted(os.listdir(ckpt / "iter_0000003" / d))
            for d in os.listdir(ckpt / "iter_0000003")} == files
    run_torchrun(["-m", "megatron_patch.pretrain",
                  *pretrain_args(work, tmp_path / "part.jsonl", *flags), "--load", str(ckpt)])
    full = losses(tmp_path / "full.jsonl")
    assert losses(tmp_path / "part.jsonl") == full
    assert len(set(full.values())) == ITERS  # it trained: no iteration skipped or repeated


# Fp32 on CPU: TP splits matmuls and reductions, PP only moves activations, DP averages
# gradients of half batches, so the losses may differ by float rounding only.
LAYOUT_RTOL = 1e-5
LAYOUTS = pytest.mark.parametrize(
    "layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"],
               [],  # DP2
               ["--tensor-model-parallel-size", "2", "--sequence-parallel"]],
    ids=["tp2", "pp2", "dp2", "tp2-sp"])


@LAYOUTS
def test_first_losses_agree_across_layouts(work, reference, tmp_path, layout):
    pretrain(work, tmp_path / "m.jsonl", *layout, nproc=2)
    got = losses(tmp_path / "m.jsonl")
    assert sorted(got) == sorted(reference)
    for iteration, loss in reference.items():
        assert got[iteration] == pytest.approx(loss, rel=LAYOUT_RTOL), iteration


def test_compiled_layers_and_output_layer_train_the_same_losses(work, reference, tmp_path):
    """--compile-layers and --compile-output-layer (torch.compile of each layer, and of the
    output layer with its cross-entropy) change no loss beyond float rounding (fp32, CPU)."""
    out = pretrain(work, tmp_path / "m.jsonl", "--compile-layers", "--compile-output-layer").stdout
    # Its linears accumulate weight gradients in main_grad (kernels/grad_accumulation.py).
    assert "main_grad inside the GEMM (8 linears of the compiled layers)" in out, out
    got = losses(tmp_path / "m.jsonl")
    assert sorted(got) == sorted(reference)
    for iteration, loss in reference.items():
        assert got[iteration] == pytest.approx(loss, rel=1e-4), iteration


@pytest.fixture(scope="module")
def clipped_reference(work):
    """The default fast paths with --clip-grad 0.05 (every step clips): (loss, grad norm)s."""
    metrics = work / "clipped.jsonl"
    out = pretrain(work, metrics, "--clip-grad", "0.05").stdout
    assert "optimizer step: foreach gradient norm, clipping and parameter copies, fused Adam" \
        in out, out
    rows = [(r["lm_loss"], r["grad_norm"]) for r in map(json.loads, open(metrics))
            if "lm_loss" in r]
    assert len(rows) == ITERS and all(norm > 0.05 for _, norm in rows)
    return rows


@pytest.mark.parametrize("flag,note", [
    ("--no-fused-optimizer", "optimizer step: megatron-core fallbacks"),
    ("--no-gradient-accumulation-fusion", None)])
def test_fast_paths_are_megatron_cores_math(work, clipped_reference, tmp_path, flag, note):
    """Torch's fused AdamW with foreach norm / clipping / copies, and weight gradients
    accumulated into main_grad inside the GEMM, train the same losses and gradient norms as
    megatron-core's own paths (the flag turns each off) up to float rounding (fp32, CPU)."""
    metrics = tmp_path / "m.jsonl"
    out = pretrain(work, metrics, "--clip-grad", "0.05", flag).stdout
    assert note is None or note in out, out
    rows = [(r["lm_loss"], r["grad_norm"]) for r in map(json.loads, open(metrics))
            if "lm_loss" in r]
    assert len(rows) == ITERS
    for (loss, norm), (loss_ref, norm_ref) in zip(rows, clipped_reference):
        assert loss == pytest.approx(loss_ref, rel=1e-5)
        assert norm == pytest.approx(norm_ref, rel=1e-4)


FP8_RECIPES = {
    "tensorwise": ([], "tensorwise scaling"),
    "delayed": (["--fp8-recipe", "delayed", "--fp8-amax-history-len", "4",
                 "--fp8-amax-compute-algo", "max"],
                "delayed scaling, max amax of the last 4 iterations"),
}


@pytest.mark.parametrize("recipe", sorted(FP8_RECIPES))
def test_fp8_trains_as_bf16_does_resumes_exactly_and_splits_under_tp(work, tmp_path, recipe):
    """--fp8-format hybrid (torch._scaled_mm on CPU): the losses follow bf16's within FP8's
    rounding; a resume is exact (tensorwise keeps no state; delayed's amax histories are in
    the checkpoint); TP2 with sequence parallelism (its all-gather / reduce-scatter around the
    FP8 GEMMs; delayed's amax reduction over the ranks) agrees with TP1 up to the scales."""
    flags, line = FP8_RECIPES[recipe]
    fp8 = ["--bf16", "--fp8-format", "hybrid", *flags]
    pretrain(work, tmp_path / "bf16.jsonl", "--bf16")
    out = pretrain(work, tmp_path / "fp8.jsonl", *fp8).stdout
    assert f"FP8 (hybrid, {line}): 8 linear layers" in out, out
    bf16, got = losses(tmp_path / "bf16.jsonl"), losses(tmp_path / "fp8.jsonl")
    assert sorted(got) == sorted(bf16) and got != bf16  # FP8 did change the GEMMs
    for iteration, loss in bf16.items():
        assert got[iteration] == pytest.approx(loss, rel=0.01), iteration

    ckpt = tmp_path / "ckpt"
    pretrain(work, tmp_path / "part.jsonl", *fp8, "--save", str(ckpt), "--exit-interval", "3")
    saved = torch.load(ckpt / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt",
                       map_location="cpu", weights_only=False).get("fp8_scaling")
    if recipe == "delayed":  # 8 linears x 4 iterations x (input, weight, output gradient)
        assert saved["amax_history"].shape == (8, 4, 3) and saved["amax_history"][:, 2].all()
        assert not saved["amax_history"][:, 3].any() and saved["scale"].all()
    else:
        assert saved is None
    pretrain(work, tmp_path / "part.jsonl", *fp8, "--load", str(ckpt))
    assert losses(tmp_path / "part.jsonl") == got

    pretrain(work, tmp_path / "tp2.jsonl", *fp8, "--tensor-model-parallel-size", "2",
             "--sequence-parallel", "--save", str(tmp_path / "tp2"), nproc=2)
    tp2 = losses(tmp_path / "tp2.jsonl")
    assert sorted(tp2) == sorted(got)
    for iteration, loss in got.items():
        assert tp2[iteration] == pytest.approx(loss, rel=0.01), iteration
    if recipe == "delayed":  # amaxes reduced over the TP ranks: one history, not one per shard
        ranks = [torch.load(tmp_path / "tp2" / f"iter_{ITERS:07d}" / f"mp_rank_0{r}" /
                            "model_optim_rng.pt", map_location="cpu",
                            weights_only=False)["fp8_scaling"] for r in (0, 1)]
        assert torch.equal(ranks[0]["amax_history"], ranks[1]["amax_history"])
        assert torch.equal(ranks[0]["scale"], ranks[1]["scale"])


def test_pytorch_profiler_writes_a_trace_and_a_table(work, reference, tmp_path):
    out = pretrain(work, tmp_path / "m.jsonl", "--profile", "--use-pytorch-profiler",
                   "--profile-step-start", "2", "--profile-step-end", "4",
                   "--tensorboard-dir", str(tmp_path / "tb")).stdout
    trace = tmp_path / "tb" / "profile_rank0_iters2-3.pt.trace.json"
    assert f"profile of iterations 2-3 on rank 0 (trace: {trace})" in out
    assert "Self CPU time total" in out
    assert json.load(open(trace))["traceEvents"]
    assert losses(tmp_path / "m.jsonl") == reference  # profiling changes nothing


RANDOM_INIT = ["--load", "", "--model-family", "llama", "--model-size", "tiny",
               "--tokenizer-type", "HuggingFaceTokenizer"]


@pytest.fixture(scope="module")
def random_reference(work):
    """TP1 from random weights (no --load): iteration -> loss."""
    pretrain(work, work / "random.jsonl", *RANDOM_INIT, "--tokenizer-model", str(work / "tok"))
    return losses(work / "random.jsonl")


@LAYOUTS
def test_random_init_is_the_same_model_at_every_layout(work, random_reference, tmp_path, layout):
    # Same --seed, no checkpoint: TP2 pads the vocabulary to 512 rows where TP1 has 384, PP2
    # builds half the layers per rank; the first losses still agree.
    assert random_reference[1] == pytest.approx(math.log(VOCAB), abs=0.05)  # near uniform
    pretrain(work, tmp_path / "m.jsonl", *RANDOM_INIT, "--tokenizer-model", str(work / "tok"),
             *layout, nproc=2)
    got = losses(tmp_path / "m.jsonl")
    assert sorted(got) == sorted(random_reference)
    for iteration, loss in random_reference.items():
        assert got[iteration] == pytest.approx(loss, rel=LAYOUT_RTOL), iteration


@pytest.mark.parametrize("tp", [1, 2])
def test_converted_model_loss_equals_hf_loss(work, tmp_path, tp):
    """megatron-core's vocab-parallel cross-entropy on a model whose vocabulary is padded
    (384 rows at TP1, 512 at TP2) against HF's own loss on the same batch."""
    engine.convert_hf_to_megatron(str(work / "hf"), str(tmp_path / "mg"), progress=False,
                                  target=engine.Target(tensor_parallel=tp))
    args = ["tests/dist/check_logits.py", "--hf", str(work / "hf"), "--mg", str(tmp_path / "mg"),
            "--tp", str(tp), "--loss", "--tolerance", "1e-5"]
    proc = run_torchrun(args, nproc=tp) if tp > 1 else run_python(args)
    diffs = [float(line.split("loss_abs_diff=")[1]) for line in proc.stdout.splitlines()
             if "loss_abs_diff" in line]
    assert len(diffs) == tp and max(diffs) <= 1e-5


def test_trained_checkpoint_converts_to_hf_with_matching_logits(work, tmp_path):
    ckpt = tmp_path / "ckpt"
    pretrain(work, tmp_path / "m.jsonl", "--save", str(ckpt), "--pipeline-model-parallel-size",
             "2", nproc=2, iters=2)
    engine.convert_megatron_to_hf(str(ckpt), str(tmp_path / "hf"), progress=False)
    proc = run_python(["tests/dist/check_logits.py", "--hf", str(tmp_path / "hf"), "--mg",
                       str(ckpt)])
    assert "max_abs_diff" in proc.stdout
    trained = engine.HFReader(str(tmp_path / "hf")).get("model.norm.weight")
    original = engine.HFReader(str(work / "hf")).get("model.norm.weight")
    assert not torch.equal(trained, original)  # it is the trained model that came back


# ----------------------------------------------------------------------------- SFT

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{}\n\n### Response:")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hf_prompt_and_response(tok, record) -> tuple[list[int], list[int]]:
    """A record's prompt and learned ids, built with HF's tokenizer and chat template directly
    (independently of megatron_patch's SFT code): Alpaca, or one chat turn."""
    if "messages" in record:
        prompt_text = tok.apply_chat_template(record["messages"][:-1], tokenize=False,
                                              add_generation_prompt=True)
        full = tok.apply_chat_template(record["messages"], tokenize=False)
        prompt, answer = tok(prompt_text).input_ids, full[len(prompt_text):]
    else:
        prompt, answer = tok(ALPACA.format(record["instruction"])).input_ids, record["output"]
    return prompt, tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]


def hf_response_loss(hf_dir, records, tokenizer_dir=None) -> float:
    """Token-weighted mean cross-entropy over every record's response tokens (and the closing
    EOS), from HF transformers' model on each record alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir or hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for record in records:
        prompt, response = hf_prompt_and_response(tok, record)
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        token_losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        total += token_losses[len(prompt) - 1:].sum().item()
        count += len(response)
    return total / count


# Responses of 12, 20, 44 and 84 tokens, two per micro-batch: however they pair up, the two
# micro-batches hold different numbers of response tokens, so the mean over all response tokens
# of the global batch (the loss) differs from the mean of per-micro-batch means.
SFT_RECORDS = [{"instruction": f"Write the number {i} in words.", "input": "",
                "output": "The number is " + "very " * (2 * i * i) + f"{i}."} for i in range(4)]


def chat_tokenizer(work, tmp_path) -> str:
    """The test tokenizer with a ChatML template."""
    target = tmp_path / "chat_tok"
    shutil.copytree(work / "tok", target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    return str(target)


@pytest.mark.parametrize("kind", ["alpaca", "packed", "chat"])
def test_sft_loss_is_the_token_weighted_response_loss_of_hf(work, tmp_path, kind):
    records, extra, tokenizer_dir = SFT_RECORDS, [], None
    if kind == "packed":
        extra = ["--packing"]
    if kind == "chat":
        tokenizer_dir = chat_tokenizer(work, tmp_path)
        records = [{"messages": [{"role": "user", "content": r["instruction"]},
                                 {"role": "assistant", "content": r["output"]}]}
                   for r in SFT_RECORDS]
        extra = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir]
    (tmp_path / "sft.json").write_text(json.dumps(records))
    run_python(["-m", "megatron_patch.finetune", "--load", str(work / "mg"), "--train-data",
                str(tmp_path / "sft.json"), "--micro-batch-size", "2", "--global-batch-size",
                "4", "--seq-length", "256", "--lr", "1e-3", "--train-iters", "1",
                "--metrics-file", str(tmp_path / "m.jsonl"), "--eval-iters", "0", *extra])
    first = losses(tmp_path / "m.jsonl")[1]  # measured before the first update
    expected = hf_response_loss(str(work / "hf"), records, tokenizer_dir)
    assert first == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------- tied embeddings


@pytest.fixture(scope="module")
def tied(work, tmp_path_factory):
    """A converted tiny llama with tied embeddings and its TP1 losses."""
    root = tmp_path_factory.mktemp("tied")
    save_tiny_llama(str(root / "hf"), vocab_size=VOCAB, tie_word_embeddings=True)
    engine.convert_hf_to_megatron(str(root / "hf"), str(root / "mg"), progress=False)
    pretrain(work, root / "tp1.jsonl", "--load", str(root / "mg"))
    return root, losses(root / "tp1.jsonl")


@pytest.mark.parametrize("layout", [["--pipeline-model-parallel-size", "2"],
                                    ["--tensor-model-parallel-size", "2"]], ids=["pp2", "tp2"])
def test_tied_embeddings_train_the_same_under_pp2_and_tp2(work, tied, tmp_path, layout):
    # Under PP2 the first stage's embedding and the last stage's output copy must get the sum
    # of both gradients every step, or the curves part after iteration 1.
    root, reference = tied
    pretrain(work, tmp_path / "m.jsonl", "--load", str(root / "mg"), *layout, nproc=2)
    got = losses(tmp_path / "m.jsonl")
    assert sorted(got) == sorted(reference)
    for iteration, loss in reference.items():
        assert got[iteration] == pytest.approx(loss, rel=LAYOUT_RTOL), iteration


def test_sft_from_a_pretraining_run_starts_a_new_schedule_and_resumes_its_own(work, tmp_path):
    pre = tmp_path / "pre"
    pretrain(work, tmp_path / "pre.jsonl", "--save", str(pre), "--lr", "1e-2", "--min-lr",
             "1e-4", iters=2)
    (tmp_path / "sft.json").write_text(json.dumps(SFT_RECORDS))
    sft = ["-m", "megatron_patch.finetune", "--train-data", str(tmp_path / "sft.json"),
           "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "256",
           "--lr", "1e-3", "--lr-decay-style", "constant", "--eval-iters", "0",
           "--metrics-file", str(tmp_path / "sft.jsonl"), "--save", str(tmp_path / "sft")]
    first = run_python([*sft, "--load", str(pre), "--train-iters", "2"]).stdout
    assert first.splitlines()[0] == (
        f"[megatron_patch] starting SFT from the weights of {pre} (iteration 2 of another run): "
        f"a new schedule and optimizer from iteration 0 (an SFT run resumes only from its own "
        f"--save directory)")
    rows = [json.loads(line) for line in open(tmp_path / "sft.jsonl")]
    assert [(r["iteration"], r["lr"]) for r in rows] == [(1, 1e-3), (2, 1e-3)]
    meta = json.loads((tmp_path / "sft" / "megatron_patch.json").read_text())
    assert meta["prompt_format"] == "alpaca"  # generate's default for this model
    second = run_python([*sft, "--load", str(tmp_path / "sft"), "--train-iters", "3"]).stdout
    assert second.splitlines()[0] == f"[megatron_patch] resuming {tmp_path / 'sft'} at iteration 2"
    assert iterations(tmp_path / "sft.jsonl") == [1, 2, 3]


def test_metrics_file_describes_the_run_that_exists(tmp_path):
    from megatron_patch.training.metrics import prepare_metrics_file

    path = tmp_path / "m.jsonl"
    rows = [json.dumps({"iteration": i, "lm_loss": 1.0}) + "\n" for i in range(1, 6)]
    path.write_text("".join(rows) + '{"iteration": 6, "lm_l')  # cut short by a crash
    assert prepare_metrics_file(str(path), 3) == (
        f"--metrics-file {path}: dropped 3 rows after iteration 3 (from the run before this "
        f"resume)")
    assert path.read_text() == "".join(rows[:3])
    assert prepare_metrics_file(str(path), 3) is None  # nothing to drop
    assert "started anew (it held 3 rows" in prepare_metrics_file(str(path), 0)
    assert path.read_text() == ""


def test_a_window_of_skipped_iterations_says_so_instead_of_a_nan_loss(capsys):
    from types import SimpleNamespace

    from megatron_patch.families.base import ModelArgs
    from megatron_patch.training.metrics import TrainingLogger

    args = SimpleNamespace(global_batch_size=4, seq_length=8, metrics_file=None,
                           tensorboard_dir=None, log_interval=2, train_iters=10)
    logger = TrainingLogger(args, ModelArgs("llama", 2, 64, 160, 4), 384, 1, True)
    for iteration in (1, 2):  # fp16 backing off from its initial loss scale
        logger.record(iteration, 0.1, {"lm loss": 5.7}, 1e-3, None, 2.0 ** (33 - iteration),
                      True, 4)
    line = capsys.readouterr().out
    assert "lm loss: - (every iteration skipped: the gradients overflowed" in line
    assert "NAN" not in line.upper() and "number of skipped iterations:   2" in line


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra,message", [
    (["--data-path", "/nonexistent/prefix"], "/nonexistent/prefix.bin not found"),
    (["--global-batch-size", "3"], "--global-batch-size 3 is not a multiple"),
    (["--tensor-model-parallel-size", "3"], "not divisible by --tensor-model-parallel-size 3"),
    (["--lr-warmup-iters", "6"], "warm-up (6 iterations, from --lr-warmup-iters/--warmup-tokens)"),
    (["--log-interval", "0"], "argument --log-interval: must be a positive integer, got 0"),
    (["--micro-batch-size", "0"], "argument --micro-batch-size: must be a positive integer"),
    (["--save", "/proc/ckpt"], "--save /proc/ckpt: cannot create it"),
    (["--load", os.path.join(REPO, "examples")], "--load: " + os.path.join(REPO, "examples")
     + ": not a Megatron checkpoint"),
    (["--extra-vocab-size", "128"], "--extra-vocab-size 128 differs from the --load "
                                    "checkpoint's 0 (its embedding has 384 rows)"),
    (["--make-vocab-size-divisible-by", "64"], "--make-vocab-size-divisible-by 64 differs "
                                               "from the --load checkpoint's 128"),
    (["--seq-length", "1024"], "--seq-length 1024 is longer than the model's "
                               "max_position_embeddings 512"),
    (["--train-tokens", "100"],  # instead of --train-iters
     "--train-tokens 100 is less than one global batch (4 x 64 = 256 tokens)"),
])
def test_bad_flags_fail_with_a_clear_message(work, tmp_path, extra, message):
    iters = None if "--train-tokens" in extra else ITERS
    proc = run_python(["-m", "megatron_patch.pretrain",
                       *pretrain_args(work, tmp_path / "m", iters=iters), *extra], check=False)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_under_torchrun_an_error_is_printed_once(work, tmp_path):
    proc = run_torchrun(["-m", "megatron_patch.pretrain", *pretrain_args(work, tmp_path / "m"),
                         "--global-batch-size", "3"], check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("error: --global-batch-size 3 is not a multiple") == 1


@pytest.mark.parametrize("extra,message", [
    (["--epochs", "1", "--train-iters", "2"], "give --epochs or --train-iters, not both"),
    (["--epochs", "1", "--data-path", "x"], "unrecognized arguments: --data-path x"),
])
def test_finetune_refuses_what_it_would_ignore(work, tmp_path, extra, message):
    (tmp_path / "sft.json").write_text(json.dumps(SFT_RECORDS))
    proc = run_python(["-m", "megatron_patch.finetune", "--load", str(work / "mg"),
                       "--train-data", str(tmp_path / "sft.json"), "--micro-batch-size", "2",
                       "--seq-length", "256", "--lr", "1e-3", *extra], check=False)
    assert proc.returncode == 2 and message in proc.stderr
