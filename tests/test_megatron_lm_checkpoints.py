"""Checkpoints that Megatron-LM core_v0.16.1 saved (no megatron_patch metadata) convert to HF and
reshard, in both formats, both naming schemes (local / Transformer Engine spec) and any TP/PP;
megatron_patch writes either scheme, and its trainer loads both.

CI has no Megatron-LM, so the checkpoints are built the way Megatron-LM builds them, with
megatron-core's own model, local spec and save paths (tests/megatron_lm_layout.py records what
Megatron-LM's own save_checkpoint writes); the converted HF model is checked against
megatron-core's own logits for them and, tensor by tensor, against a reading of the files that
does not use the converter (tests/gpu/megatron_lm_interop.py, which the GPU script uses on
checkpoints Megatron-LM's pretrain_gpt.py trained). With a Megatron-LM checkout, run by hand:
``bash tests/interop/megatron_lm_save_cpu.sh DIR`` (its own save_checkpoint on the CPU) and, on
a GPU, ``bash tests/gpu/megatron_lm_interop.sh DIR`` (its own pretrain_gpt.py).
"""
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, run_python, run_torchrun, save_tiny_llama, train_tiny_tokenizer
from megatron_lm_layout import (NULL_TOKENIZER_VOCAB_SIZE, TE_LAYER_NAMES, TOKENS, VOCAB,
                                megatron_lm_args)
from megatron_patch.convert import engine
from megatron_patch.convert.__main__ import main as convert_main

sys.path.insert(0, os.path.join(REPO, "tests", "gpu"))
import megatron_lm_interop  # noqa: E402

LOGITS_TOLERANCE = 1e-5  # fp32 on the CPU, logits up to about 3: measured 2.1e-6
LAYOUTS = {  # name -> (format, naming, TP, PP, extra flags)
    "torch-local-tp1": ("torch", "local", 1, 1, []),
    "torch-te-tp2pp2-tied": ("torch", "transformer_engine", 2, 2, ["--tied"]),
    "dist-te-tp2pp2": ("torch_dist", "transformer_engine", 2, 2, []),
    "dist-local-tp1-bf16": ("torch_dist", "local", 1, 1, ["--bf16"]),
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """name -> a checkpoint laid out as Megatron-LM saves it (built once, on first use)."""
    root, built = tmp_path_factory.mktemp("megatron_lm"), {}

    def get(name):
        if name not in built:
            fmt, impl, tp, pp, extra = LAYOUTS[name]
            args = ["tests/megatron_lm_layout.py", str(root / name), "--tp", str(tp), "--pp",
                    str(pp), "--ckpt-format", fmt, "--transformer-impl", impl, *extra]
            run_torchrun(args, nproc=tp * pp) if tp * pp > 1 else run_python(args)
            built[name] = root / name
        return built[name]
    return get


def convert(argv, capsys=None):
    """The converter's CLI in a child process (torch_dist brings up torch.distributed)."""
    return run_python(["-m", "megatron_patch.convert", "--no-progress", *map(str, argv)])


def error_of(argv, capsys) -> str:
    assert convert_main([*map(str, argv), "--no-progress"]) == 2
    return capsys.readouterr().err


def rank_file(root, name="mp_rank_00"):
    return os.path.join(root, "iter_0000003", name, "model_optim_rng.pt")


def test_the_layouts_are_what_megatron_lm_saves(layouts):
    """The structure recorded from Megatron-LM's own save_checkpoint (megatron_lm_layout.py)."""
    torch_ckpt = torch.load(rank_file(layouts("torch-local-tp1")), weights_only=False)
    assert sorted(torch_ckpt) == ["args", "checkpoint_version", "iteration", "model",
                                  "num_floating_point_operations_so_far",
                                  "opt_param_scheduler", "optimizer", "rng_state"]
    assert sorted(torch_ckpt["rng_state"][0]) == ["cuda_rng_state", "np_rng_state",
                                                  "random_rng_state", "rng_tracker_states",
                                                  "torch_rng_state"]
    assert torch_ckpt["model"]["decoder.layers.0.self_attention.linear_qkv._extra_state"] is None
    assert "decoder.layers.1.input_layernorm.weight" in torch_ckpt["model"]
    te = torch.load(rank_file(layouts("torch-te-tp2pp2-tied"), "mp_rank_01_001"),
                    weights_only=False)["model"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te
    assert not any("input_layernorm" in key for key in te)
    dist = layouts("dist-te-tp2pp2") / "iter_0000003"
    assert sorted(torch.load(dist / "common.pt", weights_only=False)) == [
        "args", "checkpoint_version", "content_metadata", "iteration",
        "num_floating_point_operations_so_far", "opt_param_scheduler", "optimizer"]
    assert {".metadata", "common.pt", "metadata.json"} <= set(os.listdir(dist))
    for root in map(layouts, LAYOUTS):
        assert open(root / "latest_checkpointed_iteration.txt").read() == "3"
        assert not os.path.exists(root / "megatron_patch.json")


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_a_megatron_lm_checkpoint_converts_to_hf(layouts, tmp_path, name):
    fmt, impl, tp, pp, extra = LAYOUTS[name]
    source, hf = layouts(name), tmp_path / "hf"
    out = convert(["--megatron-to-hf", "--load", source, "--save", hf, "--model-family",
                   "llama"]).stdout
    names = ", transformer_engine" if impl != "local" and fmt == "torch" else ""
    assert f"converted megatron (TP={tp}, PP={pp}, {fmt}{names}) -> hf" in out
    assert "model shape from Megatron-LM's args in" in out
    assert f"vocabulary {VOCAB} from Megatron-LM's args (NullTokenizer" in out
    # Tensor by tensor, against a reading of the files that does not use the converter.
    assert megatron_lm_interop.compare(str(hf), str(source)) == 0
    config = json.load(open(hf / "config.json"))
    assert (config["vocab_size"], config["num_key_value_heads"], config["rms_norm_eps"]) == \
        (VOCAB, 2, 1e-5)
    assert config["tie_word_embeddings"] == ("--tied" in extra)
    if "--bf16" in extra:  # the weights keep Megatron-LM's dtype; logits need fp32
        assert {t.dtype for t in load_file(hf / "model.safetensors").values()} == {torch.bfloat16}
        return
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(TOKENS).logits
    reference = torch.load(str(source) + ".logits.pt")  # megatron-core's own, at TP x PP
    assert (logits - reference).abs().max().item() <= LOGITS_TOLERANCE


def test_a_megatron_lm_checkpoint_reshards_keeping_its_layout_and_names(layouts, tmp_path):
    source = layouts("torch-te-tp2pp2-tied")
    convert(["--megatron-to-hf", "--load", source, "--save", tmp_path / "direct",
             "--model-family", "llama"])
    convert(["--load", source, "--save", tmp_path / "same", "--model-family", "llama"])
    meta = json.load(open(tmp_path / "same" / "megatron_patch.json"))
    assert (meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"],
            meta["transformer_impl"], meta["padded_vocab_size"]) == (2, 2, "transformer_engine",
                                                                     512)
    keys = torch.load(tmp_path / "same" / "release" / "mp_rank_00_000" / "model_optim_rng.pt",
                      weights_only=False)["model"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in keys
    out = convert(["--load", tmp_path / "same", "--save", tmp_path / "tp1",
                   "--target-tensor-model-parallel-size", "1",
                   "--target-pipeline-model-parallel-size", "1", "--transformer-impl",
                   "local", "--ckpt-format", "torch_dist"]).stdout
    assert "megatron (TP=2, PP=2, torch, transformer_engine) -> megatron (TP=1, PP=1, " \
           "torch_dist)" in out
    convert(["--megatron-to-hf", "--load", tmp_path / "tp1", "--save", tmp_path / "back"])
    assert_same_hf(tmp_path / "direct", tmp_path / "back")


def assert_same_hf(a, b):
    left, right = megatron_lm_interop.load_hf(str(a)), megatron_lm_interop.load_hf(str(b))
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name].dtype == right[name].dtype and torch.equal(left[name], right[name])
    assert json.load(open(os.path.join(a, "config.json"))) == \
        json.load(open(os.path.join(b, "config.json")))


def local_to_te(name):
    """schema_core.py's CoreTESchema name of a local-spec one (written out independently)."""
    head, sep, rest = name.partition("decoder.layers.")
    number, _, layer_name = rest.partition(".")
    renamed = TE_LAYER_NAMES.get(layer_name, layer_name)
    return name if not sep else f"{head}decoder.layers.{number}.{renamed}"


def test_transformer_engine_names_are_written_as_megatron_lm_lists_them(tmp_path, capsys):
    hf = save_tiny_llama(str(tmp_path / "hf"))
    layout = ["--target-tensor-model-parallel-size", "2", "--target-pipeline-model-parallel-size",
              "2", "--no-progress"]
    assert convert_main(["--load", hf, "--save", str(tmp_path / "local"), *layout]) == 0
    assert convert_main(["--load", hf, "--save", str(tmp_path / "te"), "--transformer-impl",
                         "transformer_engine", *layout]) == 0
    assert "-> megatron (TP=2, PP=2, torch, transformer_engine)" in capsys.readouterr().out
    for rank in ("mp_rank_00_000", "mp_rank_01_001"):
        local = torch.load(tmp_path / "local" / "release" / rank / "model_optim_rng.pt",
                           weights_only=False)
        te = torch.load(tmp_path / "te" / "release" / rank / "model_optim_rng.pt",
                        weights_only=False)
        extra = {f"decoder.layers.{n}.{m}._extra_state" for n in (0,)
                 for m in ("self_attention.linear_qkv", "self_attention.core_attention",
                           "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")}
        assert set(te["model"]) == {local_to_te(k) for k in local["model"]} | extra
        for key, tensor in local["model"].items():
            assert torch.equal(te["model"][local_to_te(key)], tensor)
        assert all(te["model"][k] is None for k in extra)
        assert te["args"].transformer_impl == "transformer_engine"
        assert te["megatron_patch"]["transformer_impl"] == "transformer_engine"
    assert convert_main(["--megatron-to-hf", "--load", str(tmp_path / "te"), "--save",
                         str(tmp_path / "back"), "--no-progress"]) == 0
    assert "converted megatron (TP=2, PP=2, torch, transformer_engine) -> hf" in \
        capsys.readouterr().out
    assert_same_hf(hf, tmp_path / "back")


def test_torch_dist_has_the_same_keys_for_both_schemes(tmp_path):
    import torch.distributed.checkpoint as dcp

    hf = save_tiny_llama(str(tmp_path / "hf"))
    keys = {}
    for impl in ("local", "transformer_engine"):
        convert(["--load", hf, "--save", tmp_path / impl, "--ckpt-format", "torch_dist",
                 "--transformer-impl", impl])
        reader = dcp.FileSystemReader(str(tmp_path / impl / "release"))
        keys[impl] = set(reader.read_metadata().state_dict_metadata)
        common = torch.load(tmp_path / impl / "release" / "common.pt", weights_only=False)
        assert common["args"].layernorm_epsilon == 1e-5  # Megatron-LM's name for it
        assert common["megatron_patch"]["transformer_impl"] == impl
    assert keys["local"] == keys["transformer_engine"]
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys["local"]


def strip_metadata(root):
    """What Megatron-LM would have saved from our checkpoint: no megatron_patch entries."""
    os.remove(os.path.join(root, "megatron_patch.json"))
    shutil.rmtree(os.path.join(root, "tokenizer"), ignore_errors=True)
    for folder, _, names in os.walk(root):
        for name in names:
            if name in ("model_optim_rng.pt", "common.pt"):
                payload = torch.load(os.path.join(folder, name), weights_only=False)
                del payload["megatron_patch"]
                torch.save(payload, os.path.join(folder, name))


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_the_args_we_write_are_enough_to_convert_back(tmp_path, fmt):
    """Our checkpoints carry Megatron-LM's args: without the metadata they convert back from
    the args alone, bit-identical, config.json included."""
    hf = save_tiny_llama(str(tmp_path / "hf"), vocab_size=300, tie_word_embeddings=True,
                         rope_theta=500000.0)
    convert(["--load", hf, "--save", tmp_path / "mg", "--ckpt-format", fmt,
             "--target-pipeline-model-parallel-size", "1" if fmt == "torch_dist" else "2"])
    strip_metadata(tmp_path / "mg")
    convert(["--megatron-to-hf", "--load", tmp_path / "mg", "--save", tmp_path / "back",
             "--model-family", "llama", "--vocab-size", "300"])
    from megatron_patch.families.llama import LLAMA

    back = json.load(open(tmp_path / "back" / "config.json"))
    original = json.load(open(os.path.join(hf, "config.json")))
    assert LLAMA.args_from_hf(back) == LLAMA.args_from_hf(original)
    assert LLAMA.args_from_hf(back).rotary_base == 500000.0
    tensors = megatron_lm_interop.load_hf(str(tmp_path / "back"))
    expected = megatron_lm_interop.load_hf(hf)
    assert sorted(tensors) == sorted(expected)
    assert all(torch.equal(tensors[n], expected[n]) for n in tensors)


def with_args(layouts, tmp_path, name="torch-local-tp1", model=None, **changes):
    """A copy of a layout whose rank file's args (or model entry) are changed."""
    root = tmp_path / "changed"
    shutil.copytree(layouts(name), root)
    path = rank_file(root)
    payload = torch.load(path, weights_only=False)
    for key, value in changes.items():
        if value is None and hasattr(payload["args"], key):
            delattr(payload["args"], key)
        else:
            setattr(payload["args"], key, value)
    if model is not None:
        payload.update(model(payload.pop("model")))
    torch.save(payload, path)
    return root


@pytest.mark.parametrize("changes,flags,message", [
    ({}, [], "give --model-family, the family it trained"),
    ({"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "/data/tok"},
     ["--model-family", "llama"], "the true vocabulary is unknown (Megatron-LM's args give only "
                                  "padded_vocab_size 384; its tokenizer: args.tokenizer_type "
                                  "HuggingFaceTokenizer, args.tokenizer_model /data/tok): give "
                                  "--tokenizer-path"),
    ({}, ["--model-family", "llama", "--vocab-size", str(NULL_TOKENIZER_VOCAB_SIZE)],
     "--vocab-size 299 contradicts Megatron-LM's args (NullTokenizer with vocab_size 299: 300 "
     "tokens)"),
    ({"tokenizer_type": "HuggingFaceTokenizer"}, ["--model-family", "llama", "--vocab-size",
                                                  "400"],
     "--vocab-size 400 is more than the embedding's args.padded_vocab_size 384 rows"),
    ({"normalization": "LayerNorm"}, ["--model-family", "llama"],
     "Megatron-LM's args.normalization 'LayerNorm' contradicts the llama family (normalization "
     "'RMSNorm')"),
    ({"swiglu": False}, ["--model-family", "llama"],
     "args.swiglu False contradicts the llama family (gated_linear_unit True)"),
    ({"add_bias_linear": True}, ["--model-family", "llama"],
     "args.add_bias_linear True contradicts the llama family (add_bias_linear False)"),
    ({"position_embedding_type": "learned_absolute"}, ["--model-family", "llama"],
     "args.position_embedding_type 'learned_absolute' contradicts the llama family"),
    ({"num_layers": None}, ["--model-family", "llama"], "Megatron-LM's args have no 'num_layers'"),
    ({"decoder_first_pipeline_num_layers": 1}, ["--model-family", "llama"],
     "args.decoder_first_pipeline_num_layers 1: not supported (an uneven first pipeline "
     "stage)"),
    ({"tensor_model_parallel_size": 2}, ["--model-family", "llama"],
     "Megatron-LM's args say TP=2 PP=1 but it holds mp_rank directories for TP=1 PP=1"),
    ({"num_experts": 8}, ["--model-family", "llama"],
     "args.num_experts 8: not supported (mixture-of-experts layers)"),
    ({"qk_layernorm": True}, ["--model-family", "llama"],
     "args.qk_layernorm True: not supported (query/key layer norms)"),
])
def test_missing_or_contradicting_args_are_errors_that_name_them(layouts, tmp_path, capsys,
                                                                 changes, flags, message):
    root = with_args(layouts, tmp_path, **changes)
    err = error_of(["--megatron-to-hf", "--load", root, "--save", tmp_path / "hf", *flags],
                   capsys)
    assert message in err, err
    assert rank_file(root) in err or "--model-family" in message or "TP=2" in message
    assert not os.path.exists(tmp_path / "hf")


def test_virtual_pipeline_chunks_are_refused(layouts, tmp_path, capsys):
    root = with_args(layouts, tmp_path, model=lambda m: {"model0": m, "model1": {}})
    err = error_of(["--megatron-to-hf", "--load", root, "--save", tmp_path / "hf",
                    "--model-family", "llama"], capsys)
    assert "no 'model' entry but model0, model1: virtual pipeline stages are not supported" in err


def test_flags_that_do_not_apply_are_errors(tmp_path, capsys):
    hf = save_tiny_llama(str(tmp_path / "hf"))
    assert "--vocab-size is for Megatron checkpoints without metadata" in error_of(
        ["--load", hf, "--save", tmp_path / "mg", "--vocab-size", "250"], capsys)
    assert "--transformer-impl names the scheme written" in error_of(
        ["--megatron-to-hf", "--load", hf, "--save", tmp_path / "x", "--transformer-impl",
         "local"], capsys)
    convert_main(["--load", hf, "--save", str(tmp_path / "mg"), "--no-progress"])
    assert "--vocab-size 300 contradicts" in error_of(
        ["--megatron-to-hf", "--load", tmp_path / "mg", "--save", tmp_path / "y",
         "--vocab-size", "300"], capsys)


def test_tokenizer_path_gives_the_vocabulary_and_the_tokenizer_files(layouts, tmp_path,
                                                                     capsys):
    tok = train_tiny_tokenizer(str(tmp_path / "tok"), vocab_size=VOCAB)
    from transformers import AutoTokenizer

    tokens = len(AutoTokenizer.from_pretrained(tok))
    root = with_args(layouts, tmp_path, tokenizer_type="HuggingFaceTokenizer",
                     tokenizer_model="/elsewhere/tok")
    assert convert_main(["--megatron-to-hf", "--load", str(root), "--save",
                         str(tmp_path / "hf"), "--model-family", "llama", "--tokenizer-path",
                         tok, "--no-progress"]) == 0
    assert f"vocabulary {tokens} from --tokenizer-path {tok} ({tokens} tokens)" in \
        capsys.readouterr().out
    assert json.load(open(tmp_path / "hf" / "config.json"))["vocab_size"] == tokens
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "hf"))) == tokens
    assert megatron_lm_interop.compare(str(tmp_path / "hf"), str(root)) == 0


def test_megatron_lm_training_in_place_keeps_the_converted_metadata(layouts, tmp_path, capsys):
    """``--load X --save X`` in Megatron-LM: its iteration lands beside our megatron_patch.json,
    which then gives the family, vocabulary, HF config and tokenizer (no flags needed); a
    shape that contradicts it is an error."""
    hf = save_tiny_llama(str(tmp_path / "hf"), vocab_size=VOCAB)
    train_tiny_tokenizer(str(tmp_path / "tok"), vocab_size=VOCAB)
    for name in os.listdir(tmp_path / "tok"):
        shutil.copy(tmp_path / "tok" / name, hf)
    root = tmp_path / "ckpt"
    convert_main(["--load", hf, "--save", str(root), "--no-progress"])
    shutil.copytree(layouts("torch-local-tp1") / "iter_0000003", root / "iter_0000003")
    (root / "latest_checkpointed_iteration.txt").write_text("3")
    capsys.readouterr()
    assert convert_main(["--megatron-to-hf", "--load", str(root), "--save",
                         str(tmp_path / "back"), "--no-progress"]) == 0
    assert f"vocabulary {VOCAB} from megatron_patch.json" in capsys.readouterr().out
    assert json.load(open(tmp_path / "back" / "config.json")) == \
        json.load(open(os.path.join(hf, "config.json")))
    assert os.path.isfile(tmp_path / "back" / "tokenizer.json")
    assert megatron_lm_interop.compare(str(tmp_path / "back"), str(root)) == 0
    payload = torch.load(rank_file(root), weights_only=False)
    payload["args"].rotary_base = 500000
    torch.save(payload, rank_file(root))
    err = error_of(["--megatron-to-hf", "--load", root, "--save", tmp_path / "x"], capsys)
    assert "Megatron-LM's args.rotary_base gives rotary_base 500000.0, megatron_patch.json " \
           "10000.0" in err


def first_loss(tmp_path, name, *flags):
    metrics = tmp_path / f"{name}.jsonl"
    run_python(["-m", "megatron_patch.pretrain", "--mock-data", "--tokenizer-type",
                "NullTokenizer", "--vocab-size", str(NULL_TOKENIZER_VOCAB_SIZE),
                "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "64",
                "--lr", "1e-3", "--train-iters", "1", "--eval-iters", "0", "--log-interval",
                "1", "--metrics-file", str(metrics), *map(str, flags)])
    return [json.loads(line)["lm_loss"] for line in open(metrics) if "lm_loss" in line][0]


def test_training_loads_transformer_engine_names_into_the_local_spec(layouts, tmp_path):
    # A TE-named checkpoint Megatron-LM saved (TP2/PP2, tied, no metadata) trains at TP1 from
    # its args, with the same first loss as its conversion to local names; so does a torch_dist
    # one; resuming one is refused.
    source = layouts("torch-te-tp2pp2-tied")
    convert(["--load", source, "--save", tmp_path / "local", "--model-family", "llama",
             "--target-tensor-model-parallel-size", "1", "--target-pipeline-model-parallel-size",
             "1", "--transformer-impl", "local"])
    convert(["--load", tmp_path / "local", "--save", tmp_path / "te", "--transformer-impl",
             "transformer_engine"])
    shape = ["--model-family", "llama", "--num-layers", "2", "--hidden-size", "64",
             "--ffn-hidden-size", "160", "--num-attention-heads", "4", "--group-query-attention",
             "--num-query-groups", "2", "--max-position-embeddings", "128"]
    expected = first_loss(tmp_path, "local", "--load", tmp_path / "local")
    assert first_loss(tmp_path, "te", "--load", tmp_path / "te") == expected
    assert first_loss(tmp_path, "mlm", "--load", source, "--finetune", *shape) == expected
    dist = layouts("dist-te-tp2pp2")  # torch_dist (untied): megatron-core reshards it itself
    convert(["--megatron-to-hf", "--load", dist, "--save", tmp_path / "dist_hf",
             "--model-family", "llama"])
    convert(["--load", tmp_path / "dist_hf", "--save", tmp_path / "dist_local"])
    assert first_loss(tmp_path, "dist", "--load", dist, "--finetune", *shape,
                      "--untie-embeddings-and-output-weights") == \
        first_loss(tmp_path, "dist_local", "--load", tmp_path / "dist_local")
    proc = run_python(["-m", "megatron_patch.pretrain", "--load", str(source), "--mock-data",
                       "--tokenizer-type", "NullTokenizer", "--vocab-size", "299",
                       "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length",
                       "64", "--train-iters", "4", "--lr", "1e-3", *shape], check=False)
    assert proc.returncode != 0
    assert "iter_0000003 was saved by Megatron-LM, whose optimizer and RNG states this " \
           "trainer does not resume; pass --finetune" in proc.stderr


@pytest.mark.parametrize("script, needs", [
    # Megatron-LM's own pretrain_gpt.py on a GPU, and its own save_checkpoint on the CPU: both
    # need a Megatron-LM checkout, which CI lacks, so they are run by hand.
    ("tests/gpu/megatron_lm_interop.sh", "pretrain_gpt.py"),
    ("tests/interop/megatron_lm_save_cpu.sh", "megatron/training/checkpointing.py"),
])
def test_the_interop_scripts_check_their_arguments(script, needs):
    import subprocess

    path = os.path.join(REPO, script)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    proc = subprocess.run(["bash", path], capture_output=True, text=True)
    assert proc.returncode == 2 and f"usage: bash {script} MEGATRON_LM_DIR" in proc.stderr
    proc = subprocess.run(["bash", path, "/nonexistent"], capture_output=True, text=True)
    assert proc.returncode == 2 and f"/nonexistent/{needs}" in proc.stderr
