"""The seed's training launchers (examples/llama/run_{pretrain,finetune}_megatron_llama.sh):
argument checks (in process, through megatron_patch.training.launcher_check, and through bash for
the usage message and the PAI-DLC variables), and end-to-end CPU runs: pretraining from a
converted checkpoint (TP 1), from random weights (TP 2, two processes), on two "nodes" of this
machine (ENV=dlc) against one node, and fine-tuning."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import (REPO, child_env, free_port, run_python, run_torchrun, save_tiny_llama,
                     train_tiny_tokenizer)
from megatron_patch.training import launcher_check
from megatron_patch.training.launcher_check import LauncherError

PRETRAIN = os.path.join(REPO, "examples", "llama", "run_pretrain_megatron_llama.sh")
FINETUNE = os.path.join(REPO, "examples", "llama", "run_finetune_megatron_llama.sh")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A converted tiny llama with its tokenizer, an mmap dataset and an Alpaca SFT file."""
    from megatron_patch.convert import engine
    from megatron_patch.data.corpus import iter_stdlib_docstrings

    root = tmp_path_factory.mktemp("launchers")
    tokenizer = train_tiny_tokenizer(str(root / "tokenizer"), vocab_size=500, docs=200)
    hf = save_tiny_llama(str(root / "hf"), vocab_size=500)
    for name in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, name), hf)
    engine.convert_hf_to_megatron(hf, str(root / "mg"), progress=False)
    docs = [json.dumps({"text": text}) for _, text in zip(range(150), iter_stdlib_docstrings())]
    (root / "docs.jsonl").write_text("\n".join(docs) + "\n")
    run_python(["-m", "megatron_patch.data.preprocess", "--input", str(root / "docs.jsonl"),
                "--output-prefix", str(root / "docs"), "--tokenizer-type", "llamabpe",
                "--tokenizer-model", tokenizer, "--append-eod", "--workers", "1"])
    records = [{"instruction": f"Name the number {i}.", "input": "", "output": f"It is {i}."}
               for i in range(16)]
    (root / "sft.json").write_text(json.dumps(records))
    return root


def pretrain_args(tiny, **changes):
    """The 23 positional arguments of a small CPU run (8 iterations of 2 x 4 x 32 tokens)."""
    args = dict(ENV="dsw", MEGATRON_PATH="none", MEGATRON_PATCH_PATH=REPO, MODEL_SIZE="tiny",
                BATCH_SIZE="2", GLOBAL_BATCH_SIZE="4", LR="1e-3", MIN_LR="1e-4", SEQ_LEN="32",
                EXTRA_VOCAB_SIZE="0", PR="fp32", TP="1", PP="1", AC="none", DO="false",
                FL="false", SP="false", SAVE_INTERVAL="4",
                DATASET_PATH=str(tiny / "docs_text_document"),
                PRETRAIN_CHECKPOINT_PATH=str(tiny / "mg"), TRAIN_TOKENS=str(8 * 4 * 32),
                WARMUP_TOKENS="128", OUTPUT_BASEPATH=str(tiny / "out"))
    args.update(changes)
    return [args[name] for name in launcher_check.PRETRAIN_ARGS]


def finetune_args(tiny, **changes):
    """The 22 positional arguments of a small CPU SFT run (2 epochs of 16 samples, batch 4)."""
    args = dict(ENV="dsw", MEGATRON_PATH="none", MEGATRON_PATCH_PATH=REPO, MODEL_SIZE="tiny",
                BATCH_SIZE="4", LR="1e-3", MIN_LR="0", SEQ_LEN="128", PAD_LEN="128",
                EXTRA_VOCAB_SIZE="0", PR="fp32", TP="1", PP="1", AC="sel", DO="false",
                FL="false", SP="false", TRAIN_DATASET_PATH=str(tiny / "sft.json"),
                VALID_DATASET_PATH="none", PRETRAIN_CHECKPOINT_PATH=str(tiny / "mg"), EPOCH="2",
                OUTPUT_BASEPATH=str(tiny / "out"))
    args.update(changes)
    return [args[name] for name in launcher_check.FINETUNE_ARGS]


def start(script, args, **env):
    """Start a launcher on the CPU (no GPU visible), one thread per process, in its own process
    group (so that a timeout ends torchrun and its workers too); no rendezvous variable of this
    process leaks into it, only those in ``env``."""
    full_env = child_env(dict(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="",
                              OMP_NUM_THREADS="1", **env))
    return subprocess.Popen(["bash", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env, cwd=REPO,
                            start_new_session=True)


def finish(proc, timeout=300):
    """Wait for a started launcher -> CompletedProcess; on a timeout its whole group is killed."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def finish_all(procs, timeout=240):
    """Wait for started launchers, together at most ``timeout`` seconds; none outlives this."""
    deadline = time.monotonic() + timeout
    try:
        return [finish(proc, max(deadline - time.monotonic(), 1)) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def launch(script, args, **env):
    """Run a launcher on the CPU (no GPU visible), one thread per process."""
    return finish(start(script, args, **env))


def metrics_rows(tiny, kind):
    (path,) = [p for p in (tiny / "out" / "metrics").iterdir() if f"-{kind}-" in p.name]
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("kind, changes, message", [
    ("pretrain", dict(ENV="local"), "ENV must be dsw or dlc, got 'local'"),
    ("pretrain", dict(PR="fp8"), "PR must be fp16 or bf16 or fp32, got 'fp8'"),
    ("pretrain", dict(AC="partial"), "AC must be full or sel or none"),
    ("pretrain", dict(DO="yes"), "DO must be true or false, got 'yes'"),
    ("pretrain", dict(BATCH_SIZE="0"), "BATCH_SIZE must be a positive integer, got '0'"),
    ("pretrain", dict(TP="two"), "TP must be a positive integer, got 'two'"),
    ("pretrain", dict(LR="fast"), "LR must be a positive number, got 'fast'"),
    ("pretrain", dict(MIN_LR="0.1"), r"MIN_LR \(0.1\) must not exceed LR"),
    ("pretrain", dict(MODEL_SIZE="9B"), "MODEL_SIZE '9B' is not a llama size; choose one of: "
                                        ".*tiny, small"),
    ("pretrain", dict(GLOBAL_BATCH_SIZE="5"), r"GLOBAL_BATCH_SIZE \(5\) must be a multiple"),
    ("pretrain", dict(WARMUP_TOKENS="1e3"), "WARMUP_TOKENS must be a non-negative integer"),
    ("pretrain", dict(DATASET_PATH="/nonexistent/data"), "DATASET_PATH: /nonexistent/data.bin"),
    ("pretrain", dict(PRETRAIN_CHECKPOINT_PATH="/nonexistent"), "PRETRAIN_CHECKPOINT_PATH "
                                                                "'/nonexistent' is not a dir"),
    ("finetune", dict(PAD_LEN="256"), r"PAD_LEN \(256\) must not exceed SEQ_LEN \(128\)"),
    ("finetune", dict(EPOCH="-1"), "EPOCH must be a positive number, got '-1'"),
    ("finetune", dict(TRAIN_DATASET_PATH="/nonexistent.json"), "TRAIN_DATASET_PATH "
                                                               "'/nonexistent.json' is neither"),
    ("finetune", dict(PRETRAIN_CHECKPOINT_PATH="none"), "fine-tuning needs a checkpoint"),
])
def test_wrong_values_name_the_argument(tiny, tmp_path, kind, changes, message):
    make_args = pretrain_args if kind == "pretrain" else finetune_args
    args = make_args(tiny, **{"OUTPUT_BASEPATH": str(tmp_path), **changes})
    with pytest.raises(LauncherError, match=message):
        launcher_check.plan(kind, "llama", args)


def test_launcher_refuses_an_unsupported_megatron_core_once(tiny, tmp_path):
    checkout = tmp_path / "Megatron-LM"
    (checkout / "megatron" / "core").mkdir(parents=True)
    (checkout / "megatron" / "__init__.py").write_text("")
    (checkout / "megatron" / "core" / "__init__.py").write_text("__version__ = '0.12.0'\n")
    proc = launch(PRETRAIN, pretrain_args(tiny, MEGATRON_PATH=str(checkout), TP="2",
                                          OUTPUT_BASEPATH=str(tmp_path / "out")))
    assert proc.returncode == 2 and "usage: run_" in proc.stderr
    assert proc.stderr.count("error: megatron-core 0.12.0 from") == 1
    assert "Traceback" not in proc.stderr and "torch.distributed.run" not in proc.stdout


@pytest.mark.parametrize("script, args, env, message", [
    (PRETRAIN, ["dsw", "none"], {}, "error: expected 23 arguments, got 2"),
    (FINETUNE, ["dsw"] * 23, {}, "error: expected 22 arguments, got 23"),
    (PRETRAIN, "pretrain PR=bf17", {}, "error: PR must be fp16 or bf16 or fp32, got 'bf17'"),
    (PRETRAIN, "pretrain MEGATRON_PATCH_PATH=/tmp", {}, "MEGATRON_PATCH_PATH '/tmp' has no"),
    (FINETUNE, "finetune ENV=dlc", {"MASTER_ADDR": ""}, "ENV=dlc needs the PAI-DLC variables"),
])
def test_launcher_prints_usage_and_exits_2(tiny, script, args, env, message):
    if isinstance(args, str):  # "kind NAME=VALUE": the defaults with one argument changed
        kind, change = args.split()
        name, value = change.split("=")
        args = (pretrain_args if kind == "pretrain" else finetune_args)(tiny, **{name: value})
    proc = launch(script, args, **env)
    assert proc.returncode == 2, proc.stderr
    assert "usage: run_" in proc.stderr and message in proc.stderr


def test_pretrain_from_converted_checkpoint_then_resume(tiny):
    proc = launch(PRETRAIN, pretrain_args(tiny))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [row["lm_loss"] for row in metrics_rows(tiny, "pretrain") if "lm_loss" in row]
    assert len(losses) == 8 and losses[-1] < losses[0]
    nproc, log, flags = launcher_check.plan("pretrain", "llama", pretrain_args(tiny))
    save = flags[flags.index("--save") + 1]
    assert nproc == 1 and os.path.basename(save).startswith("dsw-pretrain-megatron-llama-tiny-")
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as handle:
        assert handle.read().strip() == "8"
    with open(log) as handle:
        text = handle.read()
    assert "[launcher]" in text and "iteration        8/       8" in text
    assert os.path.isdir(flags[flags.index("--tensorboard-dir") + 1])
    # A relaunch with the same settings resumes from the run's own checkpoint.
    assert flags[flags.index("--load") + 1] == save and "--finetune" not in flags


def test_pretrain_tp2_from_random_weights(tiny):
    args = pretrain_args(tiny, TP="2", SP="true", DO="true", AC="full",
                         PRETRAIN_CHECKPOINT_PATH="none", OUTPUT_BASEPATH=str(tiny / "tp2"))
    proc = launch(PRETRAIN, args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TP 2 x PP 1 x DP 1" in proc.stdout
    (save,) = (tiny / "tp2" / "checkpoint").iterdir()
    assert sorted(os.listdir(save / "iter_0000008")) == ["mp_rank_00", "mp_rank_01"]


def test_finetune_epochs_set_the_iterations(tiny):
    proc = launch(FINETUNE, finetune_args(tiny))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [row for row in metrics_rows(tiny, "finetune") if "lm_loss" in row]
    assert [row["iteration"] for row in rows] == list(range(1, 9))  # 2 epochs x 16 / 4
    assert rows[0]["consumed_samples"] == 4  # global batch = BATCH_SIZE x data-parallel size 1


def dlc_env(port, rank, **changes):
    """The PAI-DLC variables of node ``rank`` of a two-node run on this machine, one CPU process
    per node."""
    return dict(dict(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port), GPUS_PER_NODE="1"), **changes)


@pytest.mark.parametrize("changes, message", [
    (dict(WORLD_SIZE=None, MASTER_PORT=None), "not set: WORLD_SIZE MASTER_PORT"),
    (dict(RANK=None), "not set: RANK"),
    (dict(MASTER_ADDR=""), "not set: MASTER_ADDR"),
    (dict(WORLD_SIZE="two"), "WORLD_SIZE must be an integer from 1 to 100000, got 'two'"),
    (dict(WORLD_SIZE="0"), "WORLD_SIZE must be an integer from 1 to 100000, got '0'"),
    (dict(RANK="-1"), "RANK must be an integer from 0 to 100000, got '-1'"),
    (dict(RANK="1.0"), "RANK must be an integer from 0 to 100000, got '1.0'"),
    (dict(RANK="2"), "RANK (2, this node's rank) must be below WORLD_SIZE (2, the number of"),
    (dict(MASTER_PORT="0"), "MASTER_PORT must be an integer from 1 to 65535, got '0'"),
    (dict(MASTER_PORT="65536"), "MASTER_PORT must be an integer from 1 to 65535, got '65536'"),
    (dict(GPUS_PER_NODE="0"), "GPUS_PER_NODE must be an integer from 1 to 1024, got '0'"),
    (dict(GPUS_PER_NODE="eight"), "GPUS_PER_NODE must be an integer from 1 to 1024"),
    (dict(GPUS_PER_NODE=None, KUBERNETES_CONTAINER_RESOURCE_GPU="x"),
     "KUBERNETES_CONTAINER_RESOURCE_GPU must be an integer from 1 to 1024, got 'x'"),
    (dict(RDZV_TIMEOUT="soon"), "RDZV_TIMEOUT must be an integer from 1 to 86400"),
])
def test_dlc_variables_are_checked_before_any_work(tiny, tmp_path, changes, message):
    env = {name: value for name, value in dlc_env(free_port(), 1, **changes).items()
           if value is not None}
    out = tmp_path / "out"
    proc = launch(PRETRAIN, pretrain_args(tiny, ENV="dlc", OUTPUT_BASEPATH=str(out)), **env)
    assert proc.returncode == 2, proc.stderr
    assert "usage: run_pretrain_megatron_llama.sh" in proc.stderr and message in proc.stderr
    assert not out.exists()  # refused before launcher_check made the output directories


def short_run_args(tiny, env, out):
    """4 iterations of 4 x 32 tokens, micro-batch 1 (2 micro-batches per rank at DP 2)."""
    return pretrain_args(tiny, ENV=env, BATCH_SIZE="1", GLOBAL_BATCH_SIZE="4",
                         TRAIN_TOKENS=str(4 * 4 * 32), WARMUP_TOKENS="64", SAVE_INTERVAL="4",
                         OUTPUT_BASEPATH=str(out))


def losses(metrics_file):
    with open(metrics_file) as handle:
        rows = [json.loads(line) for line in handle]
    return [(row["iteration"], row["lm_loss"]) for row in rows if "lm_loss" in row]


def test_dlc_two_nodes_train_as_one_node_dp2(tiny):
    # Two nodes of one process each, sharing OUTPUT_BASEPATH as nodes share NFS, and beside them
    # one node of two processes (DP 2): the same trainer flags under a plain torchrun.
    args, port = short_run_args(tiny, "dlc", tiny / "dlc"), free_port()
    _, _, dp2_flags = launcher_check.plan("pretrain", "llama",
                                          short_run_args(tiny, "dsw", tiny / "dp2"))
    runs = [start(PRETRAIN, args, **dlc_env(port, rank)) for rank in (0, 1)]
    runs.append(subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(free_port()), "-m", "megatron_patch.pretrain", *dp2_flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=child_env(dict(CUDA_VISIBLE_DEVICES="")), start_new_session=True))
    done = finish_all(runs)
    for proc in done:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    paths = launcher_check.output_paths("pretrain", "llama",
                                        launcher_check.parse_values("pretrain", args))
    expected = losses(dp2_flags[dp2_flags.index("--metrics-file") + 1])
    got = losses(paths["metrics"])  # written by the reporting (last) rank only, on node 1
    print("one node DP2:", expected, "\ntwo nodes:   ", got)
    assert [it for it, _ in got] == [1, 2, 3, 4] and got == expected
    assert "TP 1 x PP 1 x DP 2" in done[0].stdout
    # Each node tees its own log: node 0 log/NAME.log, node 1 log/NAME.node1.log.
    logs = [pathlib.Path(path).read_text()
            for path in (paths["log"], paths["log"][:-len(".log")] + ".node1.log")]
    for rank, text in enumerate(logs):
        assert text.count("[launcher]") == 1 and f"--node-rank {rank} " in text
    assert "iteration        4/       4" in logs[1]  # the reporting rank is the last one
    with open(os.path.join(paths["save"], "latest_checkpointed_iteration.txt")) as handle:
        assert handle.read().strip() == "4"


def test_dlc_node_that_never_comes_fails_the_rendezvous(tiny, tmp_path):
    args = short_run_args(tiny, "dlc", tmp_path / "out")
    proc = finish(start(PRETRAIN, args, **dlc_env(free_port(), 0, RDZV_TIMEOUT="1")),
                  timeout=120)
    assert proc.returncode != 0
    assert "timed out" in (proc.stdout + proc.stderr).lower()
