"""Megatron-LM command lines: a llama script from Megatron-LM's own examples
(examples/llama/train_llama3_8b_h100_fp8.sh at core_v0.16.1, shrunk to a tiny model) runs as it
is, and trains exactly what the same model and schedule written with megatron_patch's own flags
trains; architecture flags are checked against the family; README's flag table is the code's."""
import json
import os
import re

import pytest

from helpers import REPO, run_python, run_torchrun, train_tiny_tokenizer
from megatron_patch.training import arguments, megatron_lm, model_setup


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megatron_patch.data.corpus import iter_stdlib_docstrings

    root = tmp_path_factory.mktemp("megatron_lm")
    train_tiny_tokenizer(str(root / "tok"), vocab_size=300)
    with open(root / "docs.jsonl", "w") as handle:
        for _, text in zip(range(300), iter_stdlib_docstrings()):
            handle.write(json.dumps({"text": text}) + "\n")
    run_python(["-m", "megatron_patch.data.preprocess", "--input", str(root / "docs.jsonl"),
                "--output-prefix", str(root / "data"), "--tokenizer-type",
                "HuggingFaceTokenizer", "--tokenizer-model", str(root / "tok"), "--append-eod",
                "--workers", "1"])
    return root


def llama3_script(data, out, *extra):
    """Megatron-LM's llama3 8B FP8 script, flag for flag, with the sizes shrunk (32 layers ->
    2, hidden 4096 -> 64, ..., 1.95B samples -> 16) and the paths pointed at test data."""
    model = ["--use-mcore-models", "--num-layers", "2", "--hidden-size", "64",
             "--ffn-hidden-size", "160", "--num-attention-heads", "4", "--group-query-attention",
             "--num-query-groups", "2", "--kv-channels", "16", "--seq-length", "64",
             "--max-position-embeddings", "64", "--position-embedding-type", "rope",
             "--rotary-base", "1000000", "--rotary-percent", "1.0", "--attention-dropout", "0.0",
             "--hidden-dropout", "0.0", "--swiglu", "--init-method-std", "0.0134",
             "--attention-backend", "fused", "--normalization", "RMSNorm", "--norm-epsilon",
             "1e-5", "--untie-embeddings-and-output-weights", "--disable-bias-linear"]
    training = ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-samples", "16",
                "--lr-decay-samples", "16", "--lr-warmup-samples", "4", "--lr", "0.00015",
                "--min-lr", "0.00001", "--decoupled-lr", "5.0e-4", "--decoupled-min-lr",
                "4.5e-5", "--lr-decay-style", "cosine", "--clip-grad", "1.0", "--weight-decay",
                "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--grad-reduce-in-bf16",
                "--cross-entropy-loss-fusion", "--calculate-per-token-loss", "--manual-gc",
                "--empty-unused-memory-level", "1", "--exit-duration-in-mins", "235",
                "--fp8-format", "hybrid", "--fp8-amax-history-len", "1024",
                "--fp8-amax-compute-algo", "max", "--fp8-param-gather",
                "--tensor-model-parallel-size", "1", "--context-parallel-size", "1",
                "--sequence-parallel", "--use-distributed-optimizer", "--overlap-grad-reduce",
                "--overlap-param-gather"]
    data_args = ["--data-path", str(data / "data_text_document"), "--tokenizer-type",
                 "HuggingFaceTokenizer", "--tokenizer-model", str(data / "tok"),
                 "--data-cache-path", str(out / "cache"), "--split", "99,1,0",
                 "--no-create-attention-mask-in-dataloader", "--no-mmap-bin-files",
                 "--num-workers", "1", "--vocab-size", "300"]
    logging = ["--log-interval", "1", "--eval-iters", "2", "--eval-interval", "100",
               "--save-interval", "1000", "--log-throughput", "--profile",
               "--profile-step-start", "4", "--profile-step-end", "6", "--ckpt-format",
               "torch_dist", "--distributed-timeout-minutes", "60", "--save", str(out / "ckpt"),
               "--load", str(out / "ckpt"), "--tensorboard-dir", str(out / "tb")]
    return ["-m", "megatron_patch.pretrain", *model, *training, *data_args, *logging,
            "--metrics-file", str(out / "metrics.jsonl"), *extra]


def native(data, out):
    """The same model and schedule in megatron_patch's vocabulary: iterations, not samples;
    no overlap; a --model-family; nothing that has no effect."""
    return ["-m", "megatron_patch.pretrain", "--model-family", "llama", "--fp8-format", "hybrid",
            "--num-layers", "2",
            "--hidden-size", "64", "--ffn-hidden-size", "160", "--num-attention-heads", "4",
            "--num-query-groups", "2", "--seq-length", "64", "--rotary-base", "1000000",
            "--init-method-std", "0.0134", "--untie-embeddings-and-output-weights",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
            "--lr-warmup-iters", "1", "--lr", "0.00015", "--min-lr", "0.00001",
            "--decoupled-lr", "5.0e-4", "--decoupled-min-lr", "4.5e-5", "--weight-decay", "0.1",
            "--adam-beta2", "0.95", "--calculate-per-token-loss", "--use-distributed-optimizer",
            "--data-path", str(data / "data_text_document"), "--tokenizer-type",
            "HuggingFaceTokenizer", "--tokenizer-model", str(data / "tok"), "--data-cache-path",
            str(out / "cache"), "--split", "99,1,0", "--eval-iters", "2", "--eval-interval",
            "100", "--log-interval", "1", "--metrics-file", str(out / "metrics.jsonl")]


def curve(out):
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return {r["iteration"]: (r["lm_loss"], r["lr"]) for r in rows if "lm_loss" in r}


def test_megatron_lm_llama_script_runs_resumes_and_matches_native_flags(data, tmp_path):
    mlm, ours = tmp_path / "mlm", tmp_path / "ours"
    # First launch stops at iteration 2 (--save X --load X with nothing in X: from scratch);
    # the relaunch of the same command resumes. Small buckets make the overlap real.
    first = run_torchrun(llama3_script(data, mlm, "--exit-interval", "2", "--ddp-bucket-size",
                                       "2000"))
    assert "holds no checkpoint yet: starting from scratch" in first.stdout
    assert "--profile: cudaProfilerStart/Stop need a GPU; iterations 4-5 are not profiled" \
        not in first.stdout  # the run stops at iteration 2, before the profiled range
    for flag in ("--manual-gc", "--fp8-amax-history-len", "--cross-entropy-loss-fusion",
                 "--empty-unused-memory-level", "--ckpt-format torch_dist"):
        assert f"{flag} has no effect here" in first.stdout, flag
    # Megatron-LM's default recipe is delayed scaling; the one here is tensorwise, and says so.
    assert "FP8 (hybrid, tensorwise scaling)" in first.stdout
    assert "llama: 2 layers, hidden 64, heads 4/2, vocab 300 (padded 384)" in first.stdout
    second = run_torchrun(llama3_script(data, mlm, "--ddp-bucket-size", "2000"))
    assert "resumed from" in second.stdout and "at iteration 2" in second.stdout
    assert "--profile: cudaProfilerStart/Stop need a GPU; iterations 4-5 are not profiled" \
        in second.stdout
    run_torchrun(native(data, ours))
    got, want = curve(mlm), curve(ours)
    assert sorted(got) == [1, 2, 3, 4] and sorted(want) == [1, 2, 3, 4]
    for iteration in want:  # same weights, data, schedule (samples = iterations x 4)
        assert got[iteration][0] == pytest.approx(want[iteration][0], rel=1e-6), iteration
        assert got[iteration][1] == pytest.approx(want[iteration][1], rel=1e-9), iteration


def parse(*flags):
    parser = arguments.build_parser("test", "test", arguments.pretrain_data_arguments)
    return parser.parse_args(["--micro-batch-size", "1", "--seq-length", "8", "--lr", "1e-3",
                              *flags])


LLAMA_FLAGS = ("--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
               "--disable-bias-linear")


def test_architecture_flags_pick_the_family_and_shape_flags_define_the_model():
    args = parse("--num-layers", "3", "--hidden-size", "96", "--num-attention-heads", "6",
                 "--group-query-attention", *LLAMA_FLAGS, "--vocab-size", "100")
    family, model_args = model_setup._model_args(args, None)
    assert family.name == "llama"
    # Megatron-LM's defaults: SwiGLU's 2/3 x 4h rounded down to 64, one query group with
    # --group-query-attention alone, tied embeddings, max positions = --seq-length.
    assert (model_args.ffn_hidden_size, model_args.num_query_groups, model_args.kv_channels,
            model_args.tie_embeddings, model_args.max_position_embeddings) == (256, 1, 16, True, 8)


@pytest.mark.parametrize("flags,message", [
    (("--model-family", "llama", "--normalization", "LayerNorm"),
     "--normalization LayerNorm contradicts the llama family, which has --normalization RMSNorm"),
    (("--model-family", "llama", "--apply-layernorm-1p"),
     "--apply-layernorm-1p contradicts the llama family"),
    (("--model-family", "llama", "--squared-relu"), "--squared-relu contradicts the llama"),
    (("--model-family", "llama", "--rotary-percent", "0.5"),
     "--rotary-percent 0.5 contradicts the llama family, which has --rotary-percent 1.0"),
    (("--model-family", "llama", "--num-experts", "8"), "--num-experts 8 contradicts"),
    # A GPT-2 command line (Megatron-LM's defaults) describes no registered family.
    ((), "llama needs --disable-bias-linear --normalization RMSNorm --position-embedding-type "
         "rope --swiglu"),
    (("--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear"),
     "llama needs --position-embedding-type rope;"),
    (("--model-family", "llama", "--num-layers", "2"), "give --hidden-size, "
                                                       "--num-attention-heads"),
    (("--model-family", "llama", "--model-size", "tiny", "--rope-scaling-factor", "4"),
     "--rope-scaling-factor needs --use-rope-scaling"),
    (("--model-size", "tiny"), "--model-size tiny needs --model-family"),
])
def test_contradicting_or_incomplete_model_flags_are_errors_naming_them(flags, message):
    args = parse("--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                 *flags) if "--num-layers" not in flags else parse(*flags)
    with pytest.raises(ValueError, match=re.escape(message)):
        arguments.finalize(args, 1)
        model_setup._model_args(args, None)


@pytest.mark.parametrize("flags,message", [
    (("--train-samples", "16", "--train-iters", "4"),
     "--train-iters does not go with --train-samples (sample-based) training"),
    (("--train-iters", "4", "--lr-warmup-samples", "4"),
     "--lr-warmup-samples does not go with iteration-based training"),
    (("--train-samples", "16", "--lr-warmup-fraction", "0.1", "--lr-warmup-samples", "2"),
     "give one of --lr-warmup-fraction and --lr-warmup-iters/-samples"),
    (("--train-samples", "3", "--global-batch-size", "4"),
     "--train-samples 3 is less than one global batch"),
    (("--train-iters", "4", "--context-parallel-size", "2"),
     "--context-parallel-size 2: context parallelism is not supported"),
    (("--train-iters", "4", "--rampup-batch-size", "4", "4", "100"),
     "--rampup-batch-size 4 4 100: batch-size ramp-up is not supported"),
    (("--train-iters", "4", "--overlap-param-gather"),
     "--overlap-param-gather needs --use-distributed-optimizer"),
])
def test_schedule_and_refused_flags_are_errors_naming_them(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        arguments.finalize(parse(*flags), 1)


def test_sample_schedule_is_megatron_lms():
    args = arguments.finalize(parse("--train-samples", "18", "--global-batch-size", "4",
                                    "--lr-warmup-fraction", "0.25", "--lr-decay-samples", "12"), 1)
    assert args.train_iters == 4  # 18 // 4, as Megatron-LM's update_train_iters
    steps = arguments.lr_schedule_steps(args)
    assert (steps["lr_warmup_steps"], steps["lr_decay_steps"], steps["wd_incr_steps"]) == \
        (3, 12, 18)  # the fraction is of the decay, in samples


def test_readme_lists_every_megatron_lm_flag_with_its_status():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    rows = dict(re.findall(r"^\| `(--[a-z0-9-]+)` \| ([a-z ()]+) \|", readme, re.MULTILINE))
    table = {flag: status for flag, status, _ in megatron_lm.flag_table()}
    assert rows == table
    parser = arguments.build_parser("test", "test", arguments.pretrain_data_arguments)
    accepted = {s for action in parser._actions for s in action.option_strings}
    assert set(table) <= accepted  # every row is a flag the trainer parses
