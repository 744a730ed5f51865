"""Text generation: greedy parity with HF transformers (TP1 in process, TP2 under torchrun), every
KV-cache backend against the uncached reference, batches against single prompts, the sampling
processors against transformers', seeded sampling, prompt formats against SFT's encoding and HF
generate on the wrapped prompt, bad input, and the seed launcher."""
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import REPO, run_torchrun, save_tiny_llama, train_tiny_tokenizer
from megatron_patch import compat
from megatron_patch.convert import engine as convert_engine
from megatron_patch.data.sft import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT
from megatron_patch.generation import sampling
from megatron_patch.generation.backends import McoreBackend, UncachedBackend
from megatron_patch.generation.batching import left_pad
from megatron_patch.generation.engine import BACKENDS, Limits, build_backend, generate_batch
from megatron_patch.generation.loading import load_model, load_tokenizer, open_checkpoint
from megatron_patch.generation.prompts import read_prompts
from megatron_patch.generation.schedule import generate_all
from megatron_patch.generation.static_cache import StaticBackend

PROMPTS = ["Return the number of", "import", "The module provides a way to read and write",
           "Raise ValueError if"]
NEW_TOKENS = 12
LAUNCHER = os.path.join(REPO, "examples", "llama", "run_text_generation_llama.sh")
DISTRIBUTED_SH = os.path.join(REPO, "examples", "common", "distributed.sh")
GREEDY = sampling.SamplingParams(top_k=1)


def convert(hf_dir, out, tp):
    convert_engine.convert_hf_to_megatron(str(hf_dir), str(out),
                                          target=convert_engine.Target(tp, 1), progress=False)
    return str(out)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random Llama with a trained tokenizer, converted at TP1 and TP2, and one converted
    without tokenizer files."""
    root = tmp_path_factory.mktemp("generation")
    # 300 tokens: 384 embedding rows at TP1, 512 at TP2; sharp attention so positions matter.
    tokenizer_dir = train_tiny_tokenizer(str(root / "tokenizer"), vocab_size=300)
    bare = save_tiny_llama(str(root / "hf_bare"), vocab_size=300, max_position_embeddings=128,
                           qk_scale=10.0)
    hf = str(root / "hf")
    shutil.copytree(bare, hf)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), hf)
    return SimpleNamespace(root=root, hf=hf, tp1=convert(hf, root / "tp1", 1),
                           tp2=convert(hf, root / "tp2", 2),
                           no_tokenizer=convert(bare, root / "no_tokenizer", 1))


@pytest.fixture(autouse=True)
def parallel_state():
    """megatron-core's groups for one process (the benchmark test tears them down; a TP1
    model keeps working once they are back)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        compat.initialize_parallel(1, 1)


@pytest.fixture(scope="module")
def loaded(assets):
    """The TP1 checkpoint as a live megatron-core model in this process."""
    compat.initialize_parallel(1, 1)
    checkpoint = open_checkpoint(assets.tp1)
    tokenizer = load_tokenizer(checkpoint, None, None)
    model = load_model(checkpoint, 1)
    limits = Limits(NEW_TOKENS, tokenizer.eod, tokenizer.pad, checkpoint.args.vocab_size)
    yield SimpleNamespace(model=model, tokenizer=tokenizer, limits=limits,
                          ids=[tokenizer.tokenize(p) for p in PROMPTS])
    compat.destroy_parallel()


def hf_greedy(hf_dir, prompts_ids, tokenizer, new_tokens=NEW_TOKENS):
    """HF ``generate(do_sample=False)`` of each prompt alone: the new token ids, and each new
    token's log-probability from the logits HF returns for that step (``output_logits``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    completions, logprobs = [], []
    for ids in prompts_ids:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                 max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eod, pad_token_id=tokenizer.pad,
                                 output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, len(ids):]
        completions.append(new.tolist())
        logprobs.append([torch.log_softmax(step[0].float(), -1)[token].item()
                         for step, token in zip(out.logits, new)])
    return SimpleNamespace(ids=completions, logprobs=logprobs)


# Per-step log-probabilities, ours against HF's, fp32: cached decoding differs by rounding only.
LOGPROB_ATOL = 1e-5


def assert_logprobs_match(got, expected):
    assert [len(row) for row in got] == [len(row) for row in expected]
    for row, reference in zip(got, expected):
        torch.testing.assert_close(torch.tensor(row), torch.tensor(reference), rtol=0,
                                   atol=LOGPROB_ATOL)


@pytest.fixture(scope="module")
def hf_reference(assets, loaded):
    return hf_greedy(assets.hf, loaded.ids, loaded.tokenizer)


def run_backend(loaded, name, prompts_ids, params=GREEDY, generator=None, kernels="auto",
                logprobs=False):
    """Completion ids (and with ``logprobs`` their log-probabilities) of one batch."""
    backend = build_backend(name, loaded.model, 64, kernels)
    limits = replace(loaded.limits, logprobs=logprobs)
    completions, _ = generate_batch(backend, prompts_ids, params, limits, generator)
    if logprobs:
        return [c.ids for c in completions], [c.logprobs for c in completions]
    return [c.ids for c in completions]


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("backend", ["mcore", "static", "uncached"])
def test_greedy_batch_matches_hf_generate_tp1(loaded, hf_reference, backend):
    assert len({len(ids) for ids in loaded.ids}) == len(PROMPTS)  # really different lengths
    assert run_backend(loaded, backend, loaded.ids) == hf_reference.ids
    ids, logprobs = run_backend(loaded, backend, loaded.ids, logprobs=True)
    assert ids == hf_reference.ids  # the logits path (no argmax in the backend) agrees too
    assert_logprobs_match(logprobs, hf_reference.logprobs)


@pytest.mark.parametrize("backend", ["mcore", "static"])
def test_batch_of_different_lengths_equals_each_prompt_alone(loaded, backend):
    alone = [run_backend(loaded, backend, [ids])[0] for ids in loaded.ids]
    assert run_backend(loaded, backend, loaded.ids) == alone


@pytest.mark.parametrize("backend", ["mcore", "static"])
def test_each_row_stops_at_its_own_eos(loaded, backend):
    never = Limits(NEW_TOKENS, None, loaded.limits.pad_id, loaded.limits.vocab_size)
    free = [c.ids for c in generate_batch(build_backend(backend, loaded.model, 64), loaded.ids,
                                          GREEDY, never)[0]]
    eos = free[0][2]  # row 0 stops after 3 tokens; the others where (if) they meet it
    completions, _ = generate_batch(build_backend(backend, loaded.model, 64), loaded.ids,
                                    GREEDY, replace(never, eos_id=eos))
    for row, completion in zip(free, completions):
        stop = row.index(eos) + 1 if eos in row else len(row)
        assert completion.ids == row[:stop]
        assert completion.finish_reason == ("eos" if eos in row else "length")
    assert completions[0].finish_reason == "eos" and len(completions[0].ids) <= 3


KV_BACKENDS = {"mcore": lambda model: McoreBackend(model, 64),
               "static": lambda model: StaticBackend(model, 64),
               # the CUDA-graph backend's masked, bucketed windows (here 16 slots), eagerly
               "static-bucketed": lambda model: StaticBackend(model, 64, window_bucket=16)}


@pytest.mark.parametrize("backend", sorted(KV_BACKENDS))
def test_kv_cached_logits_equal_uncached_logits_at_every_step(loaded, backend):
    """Teacher-forced: the same tokens go into both; the logits agree at each step."""
    tokens, valid = left_pad(loaded.ids, loaded.limits.pad_id, torch.device("cpu"))
    forced = torch.randint(0, loaded.limits.vocab_size, (len(PROMPTS), 6))
    runs = {}
    with torch.no_grad():
        for name, runner in (("uncached", UncachedBackend(loaded.model, 64)),
                             (backend, KV_BACKENDS[backend](loaded.model))):
            steps = [runner.start(tokens, valid)]
            steps += [runner.step(forced[:, i]) for i in range(forced.size(1))]
            runs[name] = torch.stack(steps)
    torch.testing.assert_close(runs[backend], runs["uncached"], atol=2e-5, rtol=1e-5)


def test_every_backend_is_registered_and_graph_needs_a_gpu(loaded):
    assert set(BACKENDS) == {"mcore", "static", "graph", "graph-compiled", "uncached"}
    assert type(build_backend("auto", loaded.model, 64)).__name__ == "McoreBackend"
    with pytest.raises(ValueError, match="needs a GPU"):
        build_backend("graph", loaded.model, 64)


# --------------------------------------------------------------------------- sampling


def hf_processor(name):
    from transformers.generation import logits_process as lp

    return {"repetition_penalty": lp.RepetitionPenaltyLogitsProcessor(1.7),
            "temperature": lp.TemperatureLogitsWarper(0.6),
            "top_k": lp.TopKLogitsWarper(7),
            "top_p": lp.TopPLogitsWarper(0.8)}[name]


OURS = {"repetition_penalty": lambda logits, seen: sampling.apply_repetition_penalty(
            logits, seen, 1.7),
        "temperature": lambda logits, seen: sampling.apply_temperature(logits, 0.6),
        "top_k": lambda logits, seen: sampling.top_k_filter(logits, 7),
        "top_p": lambda logits, seen: sampling.top_p_filter(logits, 0.8)}


@pytest.mark.parametrize("name", sorted(OURS))
def test_logits_processor_matches_transformers(name):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 300, generator=generator) * 3
    input_ids = torch.randint(0, 300, (6, 20), generator=generator)
    seen = torch.zeros(6, 300, dtype=torch.bool).scatter_(1, input_ids, True)
    expected = hf_processor(name)(input_ids, logits.clone())
    assert torch.equal(OURS[name](logits.clone(), seen), expected)


def test_processor_chain_matches_transformers_order():
    from transformers.generation import logits_process as lp

    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(5))
    input_ids = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(6))
    seen = torch.zeros(4, 100, dtype=torch.bool).scatter_(1, input_ids, True)
    chain = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.3),
                                    lp.TemperatureLogitsWarper(0.7), lp.TopPLogitsWarper(0.9)])
    params = sampling.SamplingParams(top_p=0.9, temperature=0.7, repetition_penalty=1.3)
    assert torch.equal(sampling.process_logits(logits, seen, params),
                       chain(input_ids, logits.clone()))


def test_repetition_penalty_lowers_negative_logits_too():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert sampling.apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


@pytest.mark.parametrize("fields, message", [
    (dict(top_k=5, top_p=0.9), "one of them must be 0"),
    (dict(temperature=0.0), "--temperature must be > 0"),
    (dict(top_p=1.5), r"--top-p must be in \[0, 1\]"),
    (dict(repetition_penalty=0.0), "--repetition-penalty must be > 0"),
])
def test_sampling_params_refuse_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        sampling.SamplingParams(**fields)


def test_seeded_sampling_is_reproducible(loaded):
    params = sampling.SamplingParams(top_p=0.95, temperature=1.3, repetition_penalty=1.2)
    backend = build_backend("mcore", loaded.model, 64)

    def sample(seed):
        outputs = generate_all(backend, loaded.ids, params, loaded.limits, 2, seed,
                               log=lambda line: None)
        return [c.ids for c in outputs]

    first = sample(11)
    assert sample(11) == first
    assert sample(12) != first


# --------------------------------------------------------------------------- command line


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tp2_run(assets, loaded):
    """The CLI under torchrun at TP2 on prompts with empty lines and one too long."""
    long_prompt = " ".join(["the value of the argument"] * 20)
    lines = [PROMPTS[0], "", PROMPTS[1], "   ", PROMPTS[2], long_prompt, PROMPTS[3]]
    source = write_lines(assets.root / "tp2_prompts.txt", lines)
    output = str(assets.root / "tp2_out.jsonl")
    proc = run_torchrun(["-m", "megatron_patch.generate", "--load", assets.tp2, "--input-file",
                         source, "--output-file", output, "--tensor-model-parallel-size", "2",
                         "--top-k", "1", "--max-new-tokens", str(NEW_TOKENS), "--seq-length",
                         "48", "--micro-batch-size", "2", "--output-logprobs"])
    records = [json.loads(line) for line in open(output, encoding="utf-8")]
    ids = [loaded.tokenizer.tokenize(record["prompt"])[-(48 - NEW_TOKENS):] for record in records]
    return SimpleNamespace(proc=proc, records=records, ids=ids)


def test_tp2_greedy_cli_matches_hf_generate(assets, loaded, tp2_run):
    reference = hf_greedy(assets.hf, tp2_run.ids, loaded.tokenizer)
    assert [r["completion_ids"] for r in tp2_run.records] == reference.ids
    assert_logprobs_match([r["completion_logprobs"] for r in tp2_run.records],
                          reference.logprobs)
    for record in tp2_run.records:
        ids = record["completion_ids"][:-1 if record["finish_reason"] == "eos" else None]
        assert record["completion"] == loaded.tokenizer.detokenize(ids)


def test_cli_skips_and_counts_empty_lines(tp2_run):
    assert len(tp2_run.records) == 5
    assert "skipped 2 empty lines" in tp2_run.proc.stderr


def test_cli_truncates_long_prompts_from_the_left_with_a_count(tp2_run):
    stderr = tp2_run.proc.stderr
    assert "tp2_prompts.txt:6: prompt longer than 36 tokens, truncated from the left" in stderr
    assert "1 of 5 prompts were truncated from the left" in stderr
    assert len(tp2_run.ids[3]) == 36


def test_data_parallel_replicas_share_batches_with_the_static_cache(assets, loaded,
                                                                    hf_reference):
    source = write_lines(assets.root / "dp_prompts.jsonl",
                         [json.dumps({"query": p, "id": i}) for i, p in enumerate(PROMPTS)])
    output = str(assets.root / "dp_out.jsonl")
    run_torchrun(["-m", "megatron_patch.generate", "--load", assets.tp1, "--input-file", source,
                  "--output-file", output, "--top-k", "1", "--max-new-tokens", str(NEW_TOKENS),
                  "--inference-backend", "static"])
    records = [json.loads(line) for line in open(output, encoding="utf-8")]
    assert [r["prompt"] for r in records] == PROMPTS
    assert [r["completion_ids"] for r in records] == hf_reference.ids


def run_main(capsys, *argv):
    from megatron_patch.generate import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def test_missing_input_file_is_a_clear_error(assets, tmp_path, capsys):
    code, err = run_main(capsys, "--load", assets.tp1, "--input-file", str(tmp_path / "nope"),
                         "--output-file", str(tmp_path / "out.jsonl"))
    assert code == 1 and "--input-file" in err and "no such file" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_checkpoint_without_tokenizer_needs_tokenizer_path(assets, tmp_path, capsys):
    source = write_lines(tmp_path / "in.txt", PROMPTS)
    code, err = run_main(capsys, "--load", assets.no_tokenizer, "--input-file", source,
                         "--output-file", str(tmp_path / "out.jsonl"))
    assert code == 1 and "carries no tokenizer" in err and "--tokenizer-path" in err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    source = write_lines(tmp_path / "in.txt", PROMPTS)
    code, err = run_main(capsys, "--load", str(tmp_path / "ckpt"), "--input-file", source,
                         "--output-file", str(tmp_path / "out.jsonl"))
    assert code == 1 and "--load" in err and "does not exist" in err


def test_seq_length_past_the_models_positions_is_refused(assets, tmp_path, capsys):
    source = write_lines(tmp_path / "in.txt", PROMPTS)
    code, err = run_main(capsys, "--load", assets.tp1, "--input-file", source, "--output-file",
                         str(tmp_path / "out.jsonl"), "--seq-length", "1024")
    assert code == 1
    assert "--seq-length 1024 is longer than the model's max_position_embeddings 128" in err


def test_top_k_with_top_p_is_a_usage_error(assets, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(capsys, "--load", assets.tp1, "--input-file", "in", "--output-file", "out",
                 "--top-k", "4", "--top-p", "0.9")
    assert exit_info.value.code == 2
    assert "--top-k 4 and --top-p 0.9" in capsys.readouterr().err


def test_jsonl_input_errors_name_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"query": "ok"}), "",
                                                json.dumps({"text": "no query"})])
    with pytest.raises(ValueError, match=r"bad.jsonl:3: expected a JSON object with a string "
                                         r"'query'"):
        read_prompts(path)
    prompts = read_prompts(write_lines(tmp_path / "ok.jsonl", [json.dumps({"query": "a b"}), ""]))
    assert (prompts.texts, prompts.lines, prompts.skipped_empty) == (["a b"], [1], 1)


# --------------------------------------------------------------------------- launcher


def launcher_args(assets, source, output, **changes):
    values = dict(ENV="dsw", MEGATRON_PATH="none", MEGATRON_PATCH_PATH=REPO, TOKENIZER="llamabpe",
                  CHECKPOINT_PATH=assets.tp1, MODEL_SIZE="tiny", TP="1", BS="3", SEQ_LEN="64",
                  TOP_K="1", INPUT_SEQ_LEN="40", OUTPUT_SEQ_LEN=str(NEW_TOKENS),
                  INPUT_FILE=source, OUTPUT_FILE=output, TOP_P="0", TEMPERATURE="1.0",
                  REPETITION_PENALTY="1.0")
    values.update(changes)
    return list(values.values())


def run_launcher(args, env=None):
    return subprocess.run(["bash", LAUNCHER, *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO,
                          env=dict(os.environ, PYTHON=sys.executable, **(env or {})))


def test_seed_launcher_end_to_end_on_cpu(assets, hf_reference, tmp_path):
    source = write_lines(tmp_path / "in.txt", PROMPTS)
    output = str(tmp_path / "out.jsonl")
    proc = run_launcher(launcher_args(assets, source, output))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(output, encoding="utf-8")]
    assert [r["completion_ids"] for r in records] == hf_reference.ids


@pytest.mark.parametrize("changes, message", [
    (dict(TP="two"), "TP must be a positive integer, got 'two'"),
    (dict(TOP_K="2", TOP_P="0.5"), "TOP_K=2 and TOP_P=0.5: one of them must be 0"),
    (dict(ENV="local"), "ENV must be dsw (this machine) or dlc"),
    (dict(TEMPERATURE="0"), "TEMPERATURE must be > 0"),
    (dict(INPUT_FILE="/no/such/prompts.txt"), "INPUT_FILE '/no/such/prompts.txt' does not exist"),
    (dict(MODEL_SIZE="5B"), "MODEL_SIZE '5B' is not a llama size"),
    (dict(TOKENIZER="nobpe"), "TOKENIZER 'nobpe' is not a tokenizer directory"),
])
def test_seed_launcher_usage_errors_name_the_argument(assets, tmp_path, changes, message):
    source = write_lines(tmp_path / "in.txt", PROMPTS)
    proc = run_launcher(launcher_args(assets, source, str(tmp_path / "o.jsonl"), **changes))
    assert proc.returncode == 2
    assert "usage: run_text_generation_llama.sh" in proc.stderr and message in proc.stderr


def test_seed_launcher_refuses_a_wrong_argument_count():
    proc = run_launcher(["dsw", "none"])
    assert proc.returncode == 2 and "expected 17 arguments, got 2" in proc.stderr


def torchrun_args(tmp_path, call, env):
    """Source distributed.sh with a fake nvidia-smi listing 4 GPUs; print TORCHRUN_ARGS."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: H200 (UUID: x)\"; done\n")
    smi.chmod(0o755)
    script = f'source "{DISTRIBUTED_SH}"; {call}; echo "${{TORCHRUN_ARGS[*]}}"'
    clean = {k: v for k, v in os.environ.items()
             if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT",
                          "CUDA_VISIBLE_DEVICES", "GPUS_PER_NODE")}
    clean["PATH"] = f"{fake}:{clean['PATH']}"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env={**clean, **env})


def test_torchrun_args_for_dsw_and_dlc(tmp_path):
    dsw = torchrun_args(tmp_path, "torchrun_args dsw 1", {"CUDA_VISIBLE_DEVICES": "1,3"})
    assert dsw.stdout.startswith("--nproc-per-node 2 --nnodes 1 --node-rank 0 --master-addr "
                                 "localhost --master-port ")
    assert "--nproc-per-node 4 " in torchrun_args(tmp_path, "torchrun_args dsw 1", {}).stdout
    hidden = torchrun_args(tmp_path, "torchrun_args dsw 2", {"CUDA_VISIBLE_DEVICES": ""})
    assert "--nproc-per-node 2 " in hidden.stdout  # no visible GPU: NPROC_MIN CPU processes
    dlc = torchrun_args(tmp_path, "torchrun_args dlc 1", dict(
        WORLD_SIZE="2", RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500",
        KUBERNETES_CONTAINER_RESOURCE_GPU="4"))
    assert dlc.stdout.strip() == ("--nnodes 2 --node-rank 1 --master-addr 10.0.0.1 "
                                  "--master-port 29500 --nproc-per-node 4 --rdzv-conf "
                                  "timeout=600")
    missing = torchrun_args(tmp_path, "torchrun_args dlc 1", {"WORLD_SIZE": "2"})
    assert missing.returncode == 2
    assert "not set: RANK MASTER_ADDR MASTER_PORT" in missing.stderr


def test_put_megatron_first(tmp_path):
    (tmp_path / "Megatron-LM" / "megatron" / "core").mkdir(parents=True)
    script = (f'source "{DISTRIBUTED_SH}"; PYTHONPATH=/x; put_megatron_first '
              f'"{tmp_path}/Megatron-LM"; echo "$PYTHONPATH"; put_megatron_first none')
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert proc.stdout.strip() == f"{tmp_path}/Megatron-LM:/x"
    assert "using the installed megatron-core" in proc.stderr


# --------------------------------------------------------------------------- benchmark


def load_bench_generation():
    """The benchmark script as a module, in this process (a subprocess would spend most of its
    time importing)."""
    path = os.path.join(REPO, "toolkits", "benchmarks", "bench_generation.py")
    spec = importlib.util.spec_from_file_location("bench_generation", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_refuses_an_unknown_stack_label(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_bench_generation().parse_args(["--tiny", "--stacks", "ours: graph"])
    assert exit_info.value.code == 2
    assert "--stacks ['ours: graph']: not a stack label" in capsys.readouterr().err


def test_benchmark_runs_tiny_on_cpu(tmp_path, capsys):
    bench = load_bench_generation()
    assert bench.main(["--tiny", "--output", str(tmp_path / "bench.json")]) == 0
    assert "| ours: mcore (StaticInferenceContext) | 2 |" in capsys.readouterr().out
    results = json.load(open(tmp_path / "bench.json"))
    assert all(results["parity"][name]["equal"] for name in ("mcore", "static", "uncached"))
    assert all("decode_tps" in row for row in results["rows"])


# --------------------------------------------------------------------------- decode kernels


def test_decode_kernels_match_hf_generate_and_the_eager_cache(loaded, hf_reference):
    """The Triton matrix-vector and flash-decoding kernels (Triton's interpreter on CPU) in the
    decode steps of our static cache at batch 1: every step's logits equal the eager cache's to
    fp32 rounding, and greedy tokens equal HF's for each prompt."""
    from megatron_patch.generation import decode_kernels

    assert decode_kernels.MAX_BATCH == 1  # the kernel path below is taken at batch 1
    eager, fast = StaticBackend(loaded.model, 64), StaticBackend(loaded.model, 64, kernels=True)
    assert fast.holder is eager.holder  # the same model, cache and weights: only the kernels
    tokens, valid = left_pad(loaded.ids[2:3], loaded.limits.pad_id, "cpu")
    torch.testing.assert_close(fast.start(tokens, valid), eager.start(tokens, valid))
    step = tokens[:, -1]
    for _ in range(4):
        expected = eager.step(step)
        logits = fast.step(step)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        step = expected.argmax(-1)
    for ids, reference, logprobs in zip(loaded.ids, hf_reference.ids, hf_reference.logprobs):
        got, got_logprobs = run_backend(loaded, "static", [ids], kernels="on", logprobs=True)
        assert got == [reference]
        assert_logprobs_match(got_logprobs, [logprobs])


def test_generate_cli_with_decode_kernels_writes_the_mcore_completions(assets, tmp_path, capsys):
    source = write_lines(tmp_path / "in.txt", PROMPTS)
    outputs = {}
    for name, flags in (("mcore", ["--inference-backend", "mcore"]),
                        ("kernels", ["--inference-backend", "static", "--decode-kernels", "on"])):
        out = tmp_path / f"{name}.jsonl"
        code, err = run_main(capsys, "--load", assets.tp1, "--input-file", source,
                             "--output-file", str(out), "--top-k", "1", "--max-new-tokens", "6",
                             *flags)
        assert code == 0, err
        outputs[name] = [json.loads(line)["completion_ids"] for line in out.open()]
    assert outputs["kernels"] == outputs["mcore"] and len(outputs["mcore"]) == len(PROMPTS)


@pytest.mark.parametrize("flags,interpret,message", [
    (["--inference-backend", "mcore"], "1", "--decode-kernels on needs our static cache"),
    (["--inference-backend", "static"], "0", "--decode-kernels on needs a GPU"),
])
def test_decode_kernels_on_where_they_cannot_run_is_a_usage_error(assets, capsys, monkeypatch,
                                                                  flags, interpret, message):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with pytest.raises(SystemExit) as exit_info:
        run_main(capsys, "--load", assets.tp1, "--input-file", "in", "--output-file", "out",
                 "--decode-kernels", "on", *flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_decode_kernels_under_tp2_match_hf_generate(assets, hf_reference):
    """The kernels on each rank's shard: the matrix-vector product inside megatron-core's
    tensor-parallel linears (all-reduce after the row-parallel ones), attention over the rank's
    heads."""
    source = write_lines(assets.root / "kernels_tp2.txt", PROMPTS)
    output = str(assets.root / "kernels_tp2.jsonl")
    run_torchrun(["-m", "megatron_patch.generate", "--load", assets.tp2, "--input-file", source,
                  "--output-file", output, "--tensor-model-parallel-size", "2", "--top-k", "1",
                  "--max-new-tokens", str(NEW_TOKENS), "--inference-backend", "static",
                  "--decode-kernels", "on", "--output-logprobs"])
    records = [json.loads(line) for line in open(output, encoding="utf-8")]
    assert [r["completion_ids"] for r in records] == hf_reference.ids
    assert_logprobs_match([r["completion_logprobs"] for r in records], hf_reference.logprobs)


# --------------------------------------------------------------------------- prompt formats

QUESTION = "Repeat the word apple 2 times."
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DIALOGUE = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "And 3 + 3?"}]


class BosTokenizer:
    """The tokenizer with LLaMA's habit (the tiny one has not): ``tokenize`` starts every text
    with BOS, so SFT starts each sample with one."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def tokenize(self, text):
        return [self.inner.bos] + list(self.inner.tokenize(text))


def sft_tokenizer(assets, template: str | None, bos: bool):
    """A fresh tokenizer of the checkpoints (the shared one keeps no chat template)."""
    from megatron_patch.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("llamabpe", assets.hf)
    tokenizer.hf_tokenizer.chat_template = template
    return BosTokenizer(tokenizer) if bos else tokenizer


def response_start(mask) -> int:
    """Where the sample's last response starts: after its last id that SFT does not learn."""
    return int(np.flatnonzero(np.asarray(mask) == 0)[-1]) + 1


# (format, SFT record, prompt fields (text, input, messages), the prompt's text, template)
SFT_CASES = {
    "alpaca": ("alpaca", {"instruction": QUESTION, "output": "apple apple"},
               (QUESTION, None, None), ALPACA_PROMPT_NO_INPUT.format(instruction=QUESTION), None),
    "alpaca-input": ("alpaca", {"instruction": "Translate to French.", "input": "Good morning",
                                "output": "Bonjour"},
                     ("Translate to French.", "Good morning", None),
                     ALPACA_PROMPT_WITH_INPUT.format(instruction="Translate to French.",
                                                     input="Good morning"), None),
    "chat-template": ("chat", {"messages": [{"role": "user", "content": QUESTION},
                                            {"role": "assistant", "content": "apple apple"}]},
                      (QUESTION, None, None),
                      f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n", CHATML),
    "chat-template-dialogue": ("chat", {"messages": [*DIALOGUE, {"role": "assistant",
                                                                 "content": "Six."}]},
                               ("And 3 + 3?", None, DIALOGUE), None, CHATML),
    "chat-fallback": ("chat", {"messages": [{"role": "user", "content": QUESTION},
                                            {"role": "assistant", "content": "apple apple"}]},
                      (QUESTION, None, None), f"<|user|>\n{QUESTION}\n<|assistant|>\n", None),
    "chat-fallback-dialogue": ("chat", {"messages": [*DIALOGUE, {"role": "assistant",
                                                                 "content": "Six."}]},
                               ("And 3 + 3?", None, DIALOGUE), None, None),
}


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("case", sorted(SFT_CASES))
def test_prompt_ids_are_the_sft_sample_up_to_its_response(assets, case, bos):
    """SFT's ids of a record, cut where its (last) response starts, are the generation prompt;
    and the prompt reads as the template written out (BOS aside)."""
    from megatron_patch.data.sft import encode_record
    from megatron_patch.generation.prompt_format import encode_prompt

    prompt_format, record, (text, extra, messages), expected_text, template = SFT_CASES[case]
    tokenizer = sft_tokenizer(assets, template, bos)
    sft_ids, learned = encode_record(record, tokenizer)
    ids = encode_prompt(tokenizer, prompt_format, text, extra, messages)
    assert ids == sft_ids[:response_start(learned)].tolist()
    assert learned[:len(ids)].sum() < learned.sum()  # the response is not in the prompt
    starts_with_bos = bos and template is None  # SFT's template path adds no BOS of its own
    assert (ids[0] == tokenizer.bos) == starts_with_bos
    if expected_text is not None:
        assert tokenizer.detokenize(ids[starts_with_bos:]) == expected_text


def test_raw_prompt_ids_are_the_tokenizers(assets, loaded):
    from megatron_patch.generation.prompt_format import encode_prompt

    assert encode_prompt(loaded.tokenizer, "raw", QUESTION) == loaded.tokenizer.tokenize(QUESTION)


def with_metadata(source, destination, chat_template=None, **fields):
    """A copy of checkpoint ``source`` whose megatron_patch.json has ``fields`` (as an SFT run
    records its prompt format), its tokenizer given ``chat_template``."""
    shutil.copytree(source, destination)
    meta_path = os.path.join(destination, "megatron_patch.json")
    meta = json.load(open(meta_path))
    meta.update(fields)
    json.dump(meta, open(meta_path, "w"))
    # The iteration's rank files carry the same metadata (the reader's source of truth).
    for rank_file in glob.glob(os.path.join(destination, "*", "mp_rank_*", "*.pt")):
        payload = torch.load(rank_file, map_location="cpu", weights_only=False)
        payload["megatron_patch"].update(fields)
        torch.save(payload, rank_file)
    if chat_template is not None:
        config_path = os.path.join(destination, "tokenizer", "tokenizer_config.json")
        config = json.load(open(config_path))
        config["chat_template"] = chat_template
        json.dump(config, open(config_path, "w"))
    return str(destination)


@pytest.fixture(scope="module")
def sft_assets(assets):
    """A tiny Llama with room for an Alpaca prompt (~180 tokens of the tiny tokenizer), and
    copies of its checkpoint that record prompt_format alpaca, chat (with a ChatML template in
    its tokenizer) and an unknown one."""
    root = assets.root / "sft"
    hf = save_tiny_llama(str(root / "hf"), vocab_size=300, max_position_embeddings=256,
                         qk_scale=10.0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(assets.tp1, "tokenizer", name), hf)
    plain = convert(hf, root / "plain", 1)
    return SimpleNamespace(
        hf=hf, plain=plain, alpaca=with_metadata(plain, root / "alpaca", prompt_format="alpaca"),
        chat=with_metadata(plain, root / "chat", CHATML, prompt_format="chat"),
        unknown=with_metadata(plain, root / "unknown", prompt_format="vicuna"))


def generate_records(capsys, load, source, out, *flags):
    code, err = run_main(capsys, "--load", load, "--input-file", source, "--output-file",
                         str(out), "--top-k", "1", "--max-new-tokens", "8", *flags)
    assert code == 0, err
    return [json.loads(line) for line in open(out, encoding="utf-8")], err


def hf_tokenized(hf_dir, texts):
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    return [hf_tokenizer(text).input_ids for text in texts]


def test_cli_alpaca_from_the_metadata_equals_hf_generate_on_the_wrapped_prompt(
        sft_assets, loaded, tmp_path, capsys):
    source = write_lines(tmp_path / "in.jsonl", [
        json.dumps({"query": QUESTION}),
        json.dumps({"query": "Translate to French.", "input": "Good morning"})])
    records, err = generate_records(capsys, sft_assets.alpaca, source, tmp_path / "out.jsonl")
    assert "prompt format alpaca (the checkpoint's metadata)" in err
    assert [(r["prompt"], r["prompt_format"]) for r in records] == [
        (QUESTION, "alpaca"), ("Translate to French.", "alpaca")]
    wrapped = hf_tokenized(sft_assets.hf, [
        ALPACA_PROMPT_NO_INPUT.format(instruction=QUESTION),
        ALPACA_PROMPT_WITH_INPUT.format(instruction="Translate to French.", input="Good morning")])
    reference = hf_greedy(sft_assets.hf, wrapped, loaded.tokenizer, new_tokens=8)
    assert [r["completion_ids"] for r in records] == reference.ids
    # The flag wins over the metadata; a checkpoint that records nothing is raw.
    raw = hf_greedy(sft_assets.hf, hf_tokenized(sft_assets.hf, [QUESTION]), loaded.tokenizer,
                    new_tokens=8)
    source = write_lines(tmp_path / "in.txt", [QUESTION])
    for load, flags, origin in ((sft_assets.alpaca, ["--prompt-format", "raw"], "--prompt-format"),
                                (sft_assets.plain, [], "default: the checkpoint records none")):
        records, err = generate_records(capsys, load, source, tmp_path / "raw.jsonl", *flags)
        assert f"prompt format raw ({origin})" in err
        assert [(r["prompt_format"], r["completion_ids"]) for r in records] == [("raw", raw.ids[0])]


def test_cli_chat_from_the_metadata_equals_hf_generate_on_the_rendered_template(
        sft_assets, loaded, tmp_path, capsys):
    from transformers import AutoTokenizer

    source = write_lines(tmp_path / "in.jsonl", [json.dumps({"query": QUESTION}),
                                                 json.dumps({"messages": DIALOGUE})])
    records, err = generate_records(capsys, sft_assets.chat, source, tmp_path / "out.jsonl")
    assert "prompt format chat (the checkpoint's metadata)" in err
    assert [r["prompt"] for r in records] == [QUESTION, "And 3 + 3?"]
    assert "messages" not in records[0] and records[1]["messages"] == DIALOGUE
    hf_tokenizer = AutoTokenizer.from_pretrained(os.path.join(sft_assets.chat, "tokenizer"))
    rendered = [hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
                for messages in ([{"role": "user", "content": QUESTION}], DIALOGUE)]
    reference = hf_greedy(sft_assets.hf, hf_tokenized(sft_assets.hf, rendered), loaded.tokenizer,
                          new_tokens=8)
    assert [r["completion_ids"] for r in records] == reference.ids


def test_bad_prompt_format_is_a_usage_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(capsys, "--load", "ckpt", "--input-file", "in", "--output-file", "out",
                 "--prompt-format", "vicuna")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "argument --prompt-format: invalid choice: 'vicuna'" in err
    assert all(name in err.rsplit("invalid choice", 1)[1] for name in ("raw", "alpaca", "chat"))


def test_bad_recorded_prompt_format_and_misplaced_messages_are_clear_errors(sft_assets, tmp_path,
                                                                           capsys):
    source = write_lines(tmp_path / "in.txt", [QUESTION])
    code, err = run_main(capsys, "--load", sft_assets.unknown, "--input-file", source,
                         "--output-file", str(tmp_path / "out.jsonl"))
    assert code == 1 and "megatron_patch.json has prompt_format 'vicuna'" in err
    chat = write_lines(tmp_path / "chat.jsonl", [json.dumps({"query": QUESTION}),
                                                 json.dumps({"messages": DIALOGUE})])
    code, err = run_main(capsys, "--load", sft_assets.alpaca, "--input-file", chat,
                         "--output-file", str(tmp_path / "out.jsonl"))
    assert code == 1 and "chat.jsonl:2: a 'messages' record needs --prompt-format chat" in err
    bad_turns = write_lines(tmp_path / "turns.jsonl", [json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"content": "no role"},
        {"role": "user", "content": "x"}]})])
    code, err = run_main(capsys, "--load", sft_assets.chat, "--input-file", bad_turns,
                         "--output-file", str(tmp_path / "out.jsonl"))
    assert code == 1 and "turns.jsonl:1: 'messages' must be a list of" in err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("record, message", [
    ({"query": "q", "input": 3}, "'input' must be a string"),
    ({"query": "q", "messages": DIALOGUE}, "give 'query' or 'messages', not both"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [*DIALOGUE, {"role": "assistant", "content": "6"}]},
     "'messages' ends with an assistant turn"),
])
def test_jsonl_prompt_fields_are_checked(tmp_path, record, message):
    path = write_lines(tmp_path / "in.jsonl", [json.dumps({"query": "fine"}), json.dumps(record)])
    with pytest.raises(ValueError, match=f"in.jsonl:2: {message}"):
        read_prompts(path)


def test_jsonl_input_and_messages_are_read(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [json.dumps({"query": "a", "input": "b"}),
                                               json.dumps({"messages": DIALOGUE, "id": 7})])
    prompts = read_prompts(path)
    assert (prompts.texts, prompts.inputs, prompts.messages) == (
        ["a", "And 3 + 3?"], ["b", None], [None, DIALOGUE])


# --------------------------------------------------------------------------- CPU-only backends


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal")
@pytest.mark.parametrize("backend", ["graph", "graph-compiled"])
def test_a_gpu_backend_on_the_cpu_names_the_backend_asked_for(loaded, capsys, backend):
    from megatron_patch.generation.cuda_graphs import GraphBackend

    with pytest.raises(SystemExit) as exit_info:
        run_main(capsys, "--load", "ckpt", "--input-file", "in", "--output-file", "out",
                 "--inference-backend", backend)
    assert exit_info.value.code == 2
    assert f"--inference-backend {backend} needs a GPU" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"--inference-backend {backend} needs a GPU"):
        build_backend(backend, loaded.model, 64)
    compile_mode = "default" if backend == "graph-compiled" else None
    with pytest.raises(ValueError, match=f"the '{backend}' backend needs a GPU"):
        GraphBackend(loaded.model, 64, compile_mode=compile_mode)


# --------------------------------------------------------------------------- launcher prompt format


def test_launcher_passes_prompt_format_from_the_environment(assets, tmp_path, monkeypatch):
    from megatron_patch.generation import launcher_check

    args = launcher_args(assets, write_lines(tmp_path / "in.txt", PROMPTS),
                         str(tmp_path / "o.jsonl"))
    monkeypatch.delenv("PROMPT_FORMAT", raising=False)
    assert "--prompt-format" not in launcher_check.plan("llama", args)[1]
    monkeypatch.setenv("PROMPT_FORMAT", "alpaca")
    assert launcher_check.plan("llama", args)[1][-2:] == ["--prompt-format", "alpaca"]


def test_launcher_refuses_a_bad_prompt_format(assets, tmp_path):
    source = write_lines(tmp_path / "in.txt", PROMPTS)
    proc = run_launcher(launcher_args(assets, source, str(tmp_path / "o.jsonl")),
                        env={"PROMPT_FORMAT": "vicuna"})
    assert proc.returncode == 2
    assert "PROMPT_FORMAT (raw|alpaca|chat" in proc.stderr  # the usage documents it
    assert "PROMPT_FORMAT must be raw, alpaca or chat, got 'vicuna'" in proc.stderr
