"""HF <-> Megatron conversion: lossless round trips, resharding, logits against HF transformers,
and clear errors. Tiny random Llamas are built here; nothing is downloaded."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import REPO, run_python, run_torchrun, save_tiny_llama, train_tiny_tokenizer
from megatron_patch.convert import engine
from megatron_patch.convert.__main__ import main as convert_main
from megatron_patch.convert.hf_io import HFReader

# 300 tokens: 384 embedding rows at TP1, 512 at TP2, so the logits tests cross padding that
# differs between layouts.
# qk_scale: attention sharp enough that positions matter (helpers.save_tiny_llama).
CONFIGS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=300, qk_scale=10.0),
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                vocab_size=300, qk_scale=10.0),
}
# fp32 on the CPU: measured 0.0 at TP1 and below 3e-7 at TP2/PP2.
LOGITS_TOLERANCE = 1e-6
LLAMA3_ROPE = dict(rope_theta=500000.0, max_position_embeddings=8192,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})


def hf_tensors(path):
    """All tensors of an HF directory (single or sharded safetensors)."""
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


def assert_bit_identical(a_dir, b_dir):
    a, b = hf_tensors(a_dir), hf_tensors(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "hf"
    return request.param, str(save_tiny_llama(str(path), **CONFIGS[request.param]))


def to_megatron(hf_dir, out, tp=1, pp=1, **target):
    return engine.convert_hf_to_megatron(
        hf_dir, str(out), target=engine.Target(tp, pp, **target), progress=False)


def test_round_trip_tp2_pp2_is_bit_identical_and_reads_each_tensor_once(hf_model, tmp_path,
                                                                        monkeypatch):
    name, hf_dir = hf_model
    readers = []
    monkeypatch.setattr(engine, "HFReader", lambda p: readers.append(HFReader(p)) or readers[-1])
    to_megatron(hf_dir, tmp_path / "mg", tp=2, pp=2)
    reads = readers[0].reads
    assert set(reads) == set(hf_tensors(hf_dir))
    # With tied embeddings and PP > 1 the last stage gets its own copy of the embedding.
    twice = {"model.embed_tokens.weight"} if CONFIGS[name].get("tie_word_embeddings") else set()
    assert {k for k, n in reads.items() if n != 1} == twice
    assert sorted(os.listdir(tmp_path / "mg" / "release")) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    engine.convert_megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"), progress=False)
    assert_bit_identical(hf_dir, tmp_path / "back")
    original = json.load(open(os.path.join(hf_dir, "config.json")))
    assert json.load(open(tmp_path / "back" / "config.json")) == original


def test_reshard_tp2_to_tp1_then_hf_is_bit_identical(hf_model, tmp_path):
    _, hf_dir = hf_model
    to_megatron(hf_dir, tmp_path / "tp2", tp=2)
    engine.reshard_megatron(str(tmp_path / "tp2"), str(tmp_path / "tp1"), engine.Target(1, 1),
                            progress=False)
    assert os.listdir(tmp_path / "tp1" / "release") == ["mp_rank_00"]
    engine.convert_megatron_to_hf(str(tmp_path / "tp1" / "release"), str(tmp_path / "back"),
                                  progress=False)
    assert_bit_identical(hf_dir, tmp_path / "back")


def test_reshard_keeps_the_source_layout_where_no_target_flag_is_given(tmp_path, capsys):
    hf_dir = save_tiny_llama(str(tmp_path / "hf"), vocab_size=250)
    to_megatron(hf_dir, tmp_path / "pp2", pp=2, extra_vocab_size=20,
                make_vocab_size_divisible_by=16)
    assert convert_main(["--load", str(tmp_path / "pp2"), "--save", str(tmp_path / "tp2"),
                         "--target-tensor-model-parallel-size", "2", "--no-progress"]) == 0
    assert "(TP=2, PP=2, torch)" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "tp2" / "release")) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    meta = json.load(open(tmp_path / "tp2" / "megatron_patch.json"))
    assert (meta["extra_vocab_size"], meta["make_vocab_size_divisible_by"]) == (20, 16)
    assert meta["padded_vocab_size"] == 288  # 250 + 20 rounded up to 16 x 2
    engine.convert_megatron_to_hf(str(tmp_path / "tp2"), str(tmp_path / "back"), progress=False)
    assert_bit_identical(hf_dir, tmp_path / "back")


def test_each_conversion_prints_one_line_saying_what_it_did(tmp_path, capsys):
    hf_dir = save_tiny_llama(str(tmp_path / "hf"))  # 21 HF tensors, 15 Megatron ones
    runs = [
        (["--load", hf_dir, "--save", str(tmp_path / "mg"),
          "--target-pipeline-model-parallel-size", "2"],
         "converted hf -> megatron (TP=1, PP=2, torch): ", "21 hf tensors read, 15 megatron"),
        (["--load", str(tmp_path / "mg"), "--save", str(tmp_path / "tp2"),
          "--target-tensor-model-parallel-size", "2"],
         "converted megatron (TP=1, PP=2, torch) -> megatron (TP=2, PP=2, torch): ",
         "15 megatron tensors read, 15 megatron"),
        (["--load", str(tmp_path / "tp2"), "--save", str(tmp_path / "back"), "--megatron-to-hf"],
         "converted megatron (TP=2, PP=2, torch) -> hf: ", "15 megatron tensors read, 21 hf"),
    ]
    for argv, start, tensors in runs:
        assert convert_main(argv + ["--no-progress"]) == 0
        (line,) = capsys.readouterr().out.splitlines()
        save = argv[3]
        files = [os.path.join(d, n) for d, _, names in os.walk(save) for n in names]
        size = sum(os.path.getsize(f) for f in files) / 1e3
        assert line.startswith(start) and tensors in line, line
        assert f"{size:.1f} kB in {len(files)} files" in line and line.endswith(save), line


def test_help_shows_every_default():
    from megatron_patch.convert.__main__ import build_parser

    text = build_parser().format_help()
    options = {block.split()[0]: " ".join(block.split())
               for block in text.split("\n  -")[1:]}  # one block per option
    for flag in ("-target-tensor-model-parallel-size", "-target-pipeline-model-parallel-size",
                 "-extra-vocab-size", "-make-vocab-size-divisible-by"):
        assert "the source's when resharding a Megatron --load" in options[flag], flag
    assert "(default: torch)" in options["-ckpt-format"]
    assert "(default: None)" not in text


# TP4 over gqa's 2 key/value heads copies each to two ranks (sharding.GroupedQKV).
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2), (4, 1)])
def test_logits_match_hf(hf_model, tmp_path, tp, pp):
    _, hf_dir = hf_model
    to_megatron(hf_dir, tmp_path / "mg", tp=tp, pp=pp)
    args = ["tests/dist/check_logits.py", "--hf", hf_dir, "--mg", str(tmp_path / "mg"),
            "--tp", str(tp), "--pp", str(pp), "--tolerance", str(LOGITS_TOLERANCE)]
    proc = run_torchrun(args, nproc=tp * pp) if tp * pp > 1 else run_python(args)
    # the ranks share one stdout and their lines may interleave: match the figures, not lines
    diffs = [float(d) for d in re.findall(r"max_abs_diff=([-+.\de]+)", proc.stdout)]
    assert len(diffs) == tp  # every TP rank of the last stage compared its logits
    assert max(diffs) <= LOGITS_TOLERANCE


def test_llama3_rope_scaling_logits_match_hf(tmp_path):
    # With sharp attention, dropping the scaling moves these logits by 3.3e-3 (measured),
    # 3,000 times the tolerance; uniform attention (qk_scale 1) moved them by only 2.6e-5.
    hf_dir = save_tiny_llama(str(tmp_path / "hf"), qk_scale=10.0, **LLAMA3_ROPE)
    meta = to_megatron(hf_dir, tmp_path / "mg")
    assert meta["model_args"]["rope_scaling_factor"] == 8.0
    proc = run_python(["tests/dist/check_logits.py", "--hf", hf_dir, "--mg",
                       str(tmp_path / "mg"), "--tolerance", str(LOGITS_TOLERANCE)])
    assert float(proc.stdout.split("max_abs_diff=")[1].split()[0]) <= LOGITS_TOLERANCE


def test_unsupported_rope_scaling_is_refused(tmp_path):
    hf_dir = save_tiny_llama(str(tmp_path / "hf"), rope_scaling={"rope_type": "linear",
                                                                 "factor": 2.0})
    with pytest.raises(ValueError, match="rope scaling type 'linear' is not supported"):
        to_megatron(hf_dir, tmp_path / "mg")
    assert not (tmp_path / "mg").exists()


def test_extra_vocab_rows_are_zero_and_dropped_on_the_way_back(tmp_path, capsys):
    hf_dir = save_tiny_llama(str(tmp_path / "hf"), vocab_size=250)
    meta = to_megatron(hf_dir, tmp_path / "mg", tp=2, extra_vocab_size=20,
                       make_vocab_size_divisible_by=16)
    assert meta["padded_vocab_size"] == 288  # 250 + 20 rounded up to a multiple of 16 x 2
    shard = torch.load(tmp_path / "mg" / "release" / "mp_rank_01" / "model_optim_rng.pt",
                       weights_only=False)["model"]["embedding.word_embeddings.weight"]
    assert shard.shape[0] == 144 and torch.count_nonzero(shard[250 - 144:]) == 0
    assert convert_main(["--load", str(tmp_path / "mg"), "--save", str(tmp_path / "back"),
                         "--megatron-to-hf", "--no-progress"]) == 0
    assert ("; dropped 20 --extra-vocab-size rows and 18 padding rows: the checkpoint carries no "
            "tokenizer to name more tokens (config.json vocab_size 250)") in capsys.readouterr().out
    assert_bit_identical(hf_dir, tmp_path / "back")


def megatron_with_trained_extra_rows(tmp_path, added: int):
    """HF vocab 300 -> Megatron PP2 with 30 extra rows (336 in all), then what training new
    tokens leaves: ``added`` tokens in the checkpoint's tokenizer and every row past the
    vocabulary trained (random). Returns (HF dir, Megatron dir, {megatron name: rows})."""
    from transformers import AutoTokenizer

    hf_dir = save_tiny_llama(str(tmp_path / "hf"), vocab_size=300)
    train_tiny_tokenizer(hf_dir, 300)
    to_megatron(hf_dir, tmp_path / "mg", pp=2, extra_vocab_size=30,
                make_vocab_size_divisible_by=16)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "mg" / "tokenizer"))
    assert len(tokenizer) == 300
    tokenizer.add_tokens([f"<new_{i}>" for i in range(added)])
    tokenizer.save_pretrained(str(tmp_path / "mg" / "tokenizer"))
    trained = {}
    for stage, name in ((0, "embedding.word_embeddings.weight"), (1, "output_layer.weight")):
        path = tmp_path / "mg" / "release" / f"mp_rank_00_{stage:03d}" / "model_optim_rng.pt"
        payload = torch.load(path, weights_only=False)
        payload["model"][name][300:] = torch.randn(36, 64)
        trained[name] = payload["model"][name].clone()
        torch.save(payload, path)
    return hf_dir, str(tmp_path / "mg"), trained


@pytest.mark.parametrize("added,note", [
    (20, "kept 20 --extra-vocab-size rows as added tokens (the tokenizer has 320 tokens: "
         "config.json vocab_size 320), dropped 16 rows past them"),
    (33, "kept 30 --extra-vocab-size rows and 3 padding rows as added tokens (the tokenizer has "
         "333 tokens: config.json vocab_size 333), dropped 3 rows past them"),
    (0, "dropped 30 --extra-vocab-size rows and 6 padding rows: the tokenizer has 300 tokens "
        "(config.json vocab_size 300)"),
])
def test_megatron_to_hf_keeps_the_extra_rows_its_tokenizer_has_tokens_for(tmp_path, capsys,
                                                                          added, note):
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf_dir, mg, trained = megatron_with_trained_extra_rows(tmp_path, added)
    back = str(tmp_path / "back")
    assert convert_main(["--load", mg, "--save", back, "--megatron-to-hf", "--no-progress"]) == 0
    assert "; " + note in capsys.readouterr().out
    rows, original, tensors = 300 + added, hf_tensors(hf_dir), hf_tensors(back)
    assert torch.equal(tensors["model.embed_tokens.weight"],
                       trained["embedding.word_embeddings.weight"][:rows])
    assert torch.equal(tensors["lm_head.weight"], trained["output_layer.weight"][:rows])
    assert all(torch.equal(tensors[name], original[name]) for name in original
               if name not in ("model.embed_tokens.weight", "lm_head.weight"))
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    assert json.load(open(os.path.join(back, "config.json"))) == {**config, "vocab_size": rows}
    model = LlamaForCausalLM.from_pretrained(back)
    ids = AutoTokenizer.from_pretrained(back)(f"<new_{added - 1}>" if added else "x").input_ids
    assert len(AutoTokenizer.from_pretrained(back)) == rows and max(ids) < rows
    assert model(torch.tensor([ids])).logits.shape[-1] == rows


def test_resharding_to_another_padding_keeps_trained_extra_rows(tmp_path, capsys):
    _, mg, trained = megatron_with_trained_extra_rows(tmp_path, 20)
    tp2, tp1 = str(tmp_path / "tp2"), str(tmp_path / "tp1")
    engine.reshard_megatron(mg, tp2, engine.Target(tensor_parallel=2), progress=False)
    assert json.load(open(os.path.join(tp2, "megatron_patch.json")))["padded_vocab_size"] == 352
    report = engine.Report()
    engine.reshard_megatron(tp2, tp1, engine.Target(tensor_parallel=1), progress=False,
                            report=report)
    assert report.notes == ["cut the vocabulary rows from 352 to 336 (vocab 300 + "
                            "--extra-vocab-size 30, padded)"]
    for stage, name in ((0, "embedding.word_embeddings.weight"), (1, "output_layer.weight")):
        path = os.path.join(tp1, "release", f"mp_rank_00_{stage:03d}", "model_optim_rng.pt")
        assert torch.equal(torch.load(path, weights_only=False)["model"][name], trained[name])
    assert convert_main(["--load", tp2, "--save", str(tmp_path / "back"), "--megatron-to-hf",
                         "--no-progress"]) == 0
    assert "kept 20 --extra-vocab-size rows as added tokens" in capsys.readouterr().out
    back = hf_tensors(tmp_path / "back")
    assert torch.equal(back["lm_head.weight"], trained["output_layer.weight"][:320])


def test_a_tokenizer_with_more_tokens_than_embedding_rows_is_refused(tmp_path, capsys):
    _, mg, _ = megatron_with_trained_extra_rows(tmp_path, 37)
    err = _error(capsys, ["--load", mg, "--save", str(tmp_path / "back"), "--megatron-to-hf"])
    assert "tokenizer has 337 tokens but the checkpoint's embedding has 336 rows" in err
    assert not (tmp_path / "back").exists()


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    hf_dir = tmp_path / "hf"
    save_tiny_llama(str(hf_dir))
    tensors = {k: v.to(torch.bfloat16) for k, v in hf_tensors(hf_dir).items()}
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    to_megatron(str(hf_dir), tmp_path / "mg", pp=2)
    engine.convert_megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"), progress=False)
    assert_bit_identical(hf_dir, tmp_path / "back")


def test_torch_dist_round_trip_and_reshard(tmp_path):
    hf_dir = save_tiny_llama(str(tmp_path / "hf"), num_key_value_heads=2)
    cli = ["-m", "megatron_patch.convert", "--no-progress"]
    run_python(cli + ["--load", hf_dir, "--save", str(tmp_path / "dist"), "--ckpt-format",
                      "torch_dist"])
    assert os.path.isfile(tmp_path / "dist" / "release" / ".metadata")
    run_python(cli + ["--load", str(tmp_path / "dist"), "--save", str(tmp_path / "back"),
                      "--megatron-to-hf"])
    assert_bit_identical(hf_dir, tmp_path / "back")
    run_python(cli + ["--load", str(tmp_path / "dist"), "--save", str(tmp_path / "tp2"),
                      "--target-tensor-model-parallel-size", "2"])
    engine.convert_megatron_to_hf(str(tmp_path / "tp2"), str(tmp_path / "back2"), progress=False)
    assert_bit_identical(hf_dir, tmp_path / "back2")


INV_FREQ = "model.layers.{}.self_attn.rotary_emb.inv_freq"


def save_with_inv_freq(hf_dir, dtype=torch.float32, **config):
    """A tiny Llama whose safetensors also hold each layer's rotary inv_freq, as older
    transformers releases saved it, computed by transformers itself for this config."""
    from transformers import LlamaForCausalLM

    save_tiny_llama(str(hf_dir), **config)
    inv_freq = LlamaForCausalLM.from_pretrained(str(hf_dir)).model.rotary_emb.inv_freq
    tensors = {k: v.to(dtype) for k, v in hf_tensors(hf_dir).items()}
    buffers = {INV_FREQ.format(layer): inv_freq.to(dtype).clone() for layer in range(2)}
    save_file({**tensors, **buffers}, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    return tensors, buffers


@pytest.mark.parametrize("rope,dtype", [("default", torch.float32), ("llama3", torch.float16),
                                        ("default", torch.bfloat16)])
def test_rotary_inv_freq_buffers_are_checked_then_skipped(tmp_path, capsys, monkeypatch, rope,
                                                           dtype):
    from transformers import LlamaForCausalLM

    hf_dir = tmp_path / "hf"
    tensors, buffers = save_with_inv_freq(hf_dir, dtype, **(LLAMA3_ROPE if rope == "llama3"
                                                            else {}))
    LlamaForCausalLM.from_pretrained(str(hf_dir))  # transformers loads such a directory
    readers = []
    monkeypatch.setattr(engine, "HFReader", lambda p: readers.append(HFReader(p)) or readers[-1])
    assert convert_main(["--load", str(hf_dir), "--save", str(tmp_path / "mg"),
                         "--target-pipeline-model-parallel-size", "2", "--no-progress"]) == 0
    line = capsys.readouterr().out
    assert "skipped 2 model.layers.*.self_attn.rotary_emb.inv_freq buffer(s)" in line
    assert "not written back to HF" in line and "23 hf tensors read" in line
    assert readers[0].reads == {name: 1 for name in {**tensors, **buffers}}
    engine.convert_megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"), progress=False)
    back = hf_tensors(tmp_path / "back")  # the buffers are not written back
    assert sorted(back) == sorted(tensors)
    assert all(back[n].dtype == dtype and torch.equal(back[n], tensors[n]) for n in tensors)


@pytest.mark.parametrize("stored,config,field", [
    (dict(rope_theta=500000.0), {}, "rope_theta 10000"),
    (LLAMA3_ROPE, dict(rope_theta=500000.0, max_position_embeddings=8192), "rope_theta 500000"),
    ({}, LLAMA3_ROPE, "rope_scaling (llama3, factor 8)"),
    (dict(head_dim=8), {}, "head_dim 16"),
])
def test_an_inv_freq_that_contradicts_the_config_is_refused(tmp_path, capsys, stored, config,
                                                            field):
    save_with_inv_freq(tmp_path / "wrong", **stored)
    save_tiny_llama(str(tmp_path / "hf"), **config)
    wrong = hf_tensors(tmp_path / "wrong")
    tensors = {**hf_tensors(tmp_path / "hf"),
               **{INV_FREQ.format(layer): wrong[INV_FREQ.format(layer)].clone() for layer in range(2)}}
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    err = _error(capsys, ["--load", str(tmp_path / "hf"), "--save", str(tmp_path / "out")])
    assert INV_FREQ.format(0) in err and "contradicts config.json's" in err and field in err, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- errors


def _error(capsys, argv):
    assert convert_main(argv) == 2
    return capsys.readouterr().err


def test_missing_and_empty_directories(tmp_path, capsys):
    err = _error(capsys, ["--load", str(tmp_path / "nope"), "--save", str(tmp_path / "out")])
    assert "does not exist" in err and "nope" in err
    (tmp_path / "empty").mkdir()
    err = _error(capsys, ["--load", str(tmp_path / "empty"), "--save", str(tmp_path / "out"),
                          "--megatron-to-hf"])
    assert "is empty" in err
    assert not (tmp_path / "out").exists()


def test_unknown_family_and_mismatched_family(hf_model, tmp_path, capsys):
    _, hf_dir = hf_model
    out = str(tmp_path / "out")
    assert "unknown model family 'gpt9'" in _error(
        capsys, ["--load", hf_dir, "--save", out, "--model-family", "gpt9"])
    err = _error(capsys, ["--load", hf_dir, "--save", out, "--model-family", "bloom"])
    assert "--model-family bloom does not match" in err and "model_type 'llama'" in err
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    other = tmp_path / "other"
    other.mkdir()
    json.dump({**config, "model_type": "mistral"}, open(other / "config.json", "w"))
    err = _error(capsys, ["--load", str(other), "--save", out, "--model-family", "llama"])
    assert "does not match" in err and "mistral" in err
    assert not os.path.exists(out)


@pytest.mark.parametrize("flag,value,message", [
    ("--target-tensor-model-parallel-size", "3", "does not divide the 4 attention heads"),
    ("--target-pipeline-model-parallel-size", "3", "does not divide the 2 layers"),
    ("--target-tensor-model-parallel-size", "0", "must be at least 1, got 0"),
])
def test_layouts_that_do_not_divide_are_refused(tmp_path, capsys, flag, value, message):
    hf_dir = save_tiny_llama(str(tmp_path / "hf"), num_key_value_heads=2)
    err = _error(capsys, ["--load", hf_dir, "--save", str(tmp_path / "out"), flag, value])
    assert message in err and flag in err
    assert not (tmp_path / "out").exists()


def test_key_value_groups_neither_dividing_nor_a_multiple_of_tp_are_refused(tmp_path, capsys):
    # 6 heads in 3 groups at TP2: two ranks cannot share three key/value heads evenly.
    hf_dir = save_tiny_llama(str(tmp_path / "hf"), hidden_size=96, num_attention_heads=6,
                             num_key_value_heads=3)
    err = _error(capsys, ["--load", hf_dir, "--save", str(tmp_path / "out"),
                          "--target-tensor-model-parallel-size", "2"])
    assert "--target-tensor-model-parallel-size 2 does not divide the 3 query groups" in err
    assert "nor is it a multiple of them" in err and not os.path.exists(tmp_path / "out")


def test_a_tensor_missing_from_the_hf_checkpoint_leaves_no_output(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    save_tiny_llama(str(hf_dir))
    tensors = hf_tensors(hf_dir)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(hf_dir / "model.safetensors"))
    err = _error(capsys, ["--load", str(hf_dir), "--save", str(tmp_path / "out"),
                          "--target-pipeline-model-parallel-size", "2"])
    assert "model.layers.1.mlp.up_proj.weight" in err and "missing" in err
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == ["hf"]


def test_an_unmapped_hf_tensor_is_an_error(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    save_tiny_llama(str(hf_dir))
    tensors = hf_tensors(hf_dir)
    tensors["model.layers.0.self_attn.rotary.extra"] = torch.zeros(3)
    save_file(tensors, str(hf_dir / "model.safetensors"))
    err = _error(capsys, ["--load", str(hf_dir), "--save", str(tmp_path / "out")])
    assert "not covered by the weight mapping" in err and "rotary.extra" in err


def test_malformed_files_are_errors_that_name_them(hf_model, tmp_path, capsys):
    _, hf_dir = hf_model
    mg = str(tmp_path / "mg")
    assert convert_main(["--load", hf_dir, "--save", mg, "--no-progress"]) == 0
    (tmp_path / "file").write_text("x")
    err = _error(capsys, ["--load", hf_dir, "--save", str(tmp_path / "file")])
    assert "output '" in err and "exists and is not a directory" in err
    tracker = os.path.join(mg, "latest_checkpointed_iteration.txt")
    with open(tracker, "w") as handle:
        handle.write("garbage\n")
    err = _error(capsys, ["--load", mg, "--save", str(tmp_path / "back"), "--megatron-to-hf"])
    assert "latest_checkpointed_iteration.txt: expected an iteration number" in err
    with open(tracker, "w") as handle:
        handle.write("release\n")
    with open(os.path.join(mg, "megatron_patch.json"), "w") as handle:
        handle.write("{not json")
    err = _error(capsys, ["--load", mg, "--save", str(tmp_path / "back"), "--megatron-to-hf"])
    assert "megatron_patch.json: invalid JSON" in err
    shutil.copytree(hf_dir, tmp_path / "hf_index")
    os.rename(tmp_path / "hf_index" / "model.safetensors", tmp_path / "hf_index" / "x.bin")
    (tmp_path / "hf_index" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    err = _error(capsys, ["--load", str(tmp_path / "hf_index"), "--save", str(tmp_path / "o")])
    assert "model.safetensors.index.json: no 'weight_map' object" in err
    assert not any(os.path.exists(tmp_path / name) for name in ("back", "o"))


def test_llama3_rope_scaling_needs_a_factor(tmp_path):
    hf_dir = save_tiny_llama(str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="llama3 rope scaling without 'factor'"):
        to_megatron(hf_dir, tmp_path / "mg")


def test_existing_output_needs_overwrite(hf_model, tmp_path, capsys):
    _, hf_dir = hf_model
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert "--overwrite" in _error(capsys, ["--load", hf_dir, "--save", str(tmp_path / "out")])
    assert convert_main(["--load", hf_dir, "--save", str(tmp_path / "out"), "--overwrite",
                         "--no-progress"]) == 0


# ----------------------------------------------------------------------------- seed wrapper

WRAPPER = os.path.join(REPO, "toolkits/model_checkpoints_convertor/llama/"
                             "model_convertor_huggingface_megatron.sh")


def test_seed_wrapper_round_trip(hf_model, tmp_path):
    import subprocess

    _, hf_dir = hf_model
    mg, back = str(tmp_path / "mg"), str(tmp_path / "back")
    for args in ([hf_dir, mg, "2", "1", "false"], [mg + "/release", back, "1", "1", "true"]):
        proc = subprocess.run(["bash", WRAPPER, "none", *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert_bit_identical(hf_dir, back)


def test_seed_wrapper_overwrites_only_with_overwrite_1(hf_model, tmp_path):
    import subprocess

    _, hf_dir = hf_model
    out = tmp_path / "mg"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = ["bash", WRAPPER, "none", hf_dir, str(out), "1", "1", "false"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 2 and "OVERWRITE=1 replaces a non-empty TARGET_CKPT_PATH" in \
        proc.stderr
    assert (f"error: TARGET_CKPT_PATH '{out}' exists and is not empty; remove it, or run with "
            f"OVERWRITE=1 to replace it") in proc.stderr and "--overwrite" not in proc.stderr
    assert os.listdir(out) == ["keep.txt"]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ,
                                                                      "OVERWRITE": "yes"})
    assert proc.returncode == 2 and "OVERWRITE must be 0 or 1, got 'yes'" in proc.stderr
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ,
                                                                      "OVERWRITE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "keep.txt" not in os.listdir(out) and "converted hf -> megatron" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["a", "b", "c"], "expected 6 or 7 arguments, got 3"),
    (["m", "src", "dst", "two", "1", "false"], "TP must be a positive integer"),
    (["m", "src", "dst", "1", "1", "yes"], "MG2HF must be true or false"),
])
def test_seed_wrapper_usage(args, message):
    import subprocess

    proc = subprocess.run(["bash", WRAPPER, *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "usage: model_convertor_huggingface_megatron.sh" in proc.stderr
    assert message in proc.stderr


# ----------------------------------------------------------------------------- memory streams


def test_pytorch_bin_checkpoint_converts_and_round_trips(tmp_path):
    hf_dir = tmp_path / "hf"
    save_tiny_llama(str(hf_dir))
    tensors = hf_tensors(hf_dir)
    os.remove(hf_dir / "model.safetensors")
    torch.save(tensors, hf_dir / "pytorch_model.bin")
    to_megatron(str(hf_dir), tmp_path / "mg", tp=2)
    engine.convert_megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"), progress=False)
    back = hf_tensors(tmp_path / "back")
    assert sorted(back) == sorted(tensors)
    assert all(torch.equal(back[name], tensors[name]) for name in tensors)


def test_bench_convert_prints_its_table_and_its_outputs_round_trip(tmp_path):
    """A tiny run of the benchmark: its rows are printed and every layout it wrote converts
    back bit for bit (its figures are measurements, never asserted)."""
    from transformers import LlamaForCausalLM

    proc = run_python(["toolkits/benchmarks/bench_convert.py", "--layers", "2", "--hidden",
                       "64", "--ffn", "160", "--heads", "4", "--kv-heads", "2", "--vocab", "250",
                       "--shards", "2", "--workdir", str(tmp_path), "--keep", "--json",
                       str(tmp_path / "rows.json")], timeout=600)
    lines = proc.stdout.splitlines()
    for label in ("hf -> megatron TP1", "hf -> megatron TP2", "hf -> megatron PP2",
                  "megatron TP2 -> hf"):
        assert sum(line.startswith(f"| {label} |") for line in lines) == 1, proc.stdout
    assert "round trip hf_back: 21 tensors bit-identical" in proc.stdout
    work = json.load(open(tmp_path / "rows.json"))["workdir"]
    hf_dir = os.path.join(work, "hf")
    assert len([n for n in os.listdir(hf_dir) if n.endswith(".safetensors")]) == 2
    model = LlamaForCausalLM.from_pretrained(hf_dir)  # the hand-written shards load in HF
    assert torch.equal(model.lm_head.weight, HFReader(hf_dir).get("lm_head.weight").float())
    assert_bit_identical(hf_dir, os.path.join(work, "hf_back"))
    for layout in ("mg_tp1", "mg_pp2"):
        back = tmp_path / f"back_{layout}"
        engine.convert_megatron_to_hf(os.path.join(work, layout), str(back), progress=False)
        assert_bit_identical(hf_dir, back)


def test_truncated_and_missing_weight_files_are_errors_that_name_them(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    save_tiny_llama(str(hf_dir))
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    err = _error(capsys, ["--load", str(hf_dir), "--save", str(tmp_path / "out")])
    assert "model.safetensors: truncated" in err
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "gone.safetensors"}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    err = _error(capsys, ["--load", str(hf_dir), "--save", str(tmp_path / "out")])
    assert "gone.safetensors: missing (the weight index names it)" in err
    assert not (tmp_path / "out").exists()


def test_streaming_writer_shards_read_back_with_safetensors_own_reader(tmp_path):
    """HFWriter writes safetensors files itself (header after the streamed data): safetensors'
    and transformers' index conventions read them back, every dtype, odd sizes, empty ones."""
    from safetensors import safe_open

    from megatron_patch.convert.hf_io import HFWriter

    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 3), "b.weight": torch.randn(5).to(torch.bfloat16),
               "c.bias": torch.randn(3, 2).to(torch.float16)[:, 1],  # a strided view
               "d.ids": torch.arange(3, dtype=torch.int64), "e.mask": torch.tensor([True, False]),
               "f.empty": torch.zeros(0, 4)}
    writer = HFWriter(str(tmp_path), max_shard_bytes=100)  # a shard holds a tensor or two
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.finish({"model_type": "llama"})
    index = json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"]
    assert sorted(index) == sorted(tensors) and len(set(index.values())) == 2
    for name, file in index.items():
        with safe_open(str(tmp_path / file), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            got = handle.get_tensor(name)
        assert got.dtype == tensors[name].dtype and torch.equal(got, tensors[name]), name
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".data")]


def test_key_value_copies_that_differ_are_refused_on_the_way_back(tmp_path):
    """TP4 over 2 key/value heads: ranks 0 and 1 hold copies of group 0's heads. A checkpoint
    whose copies differ (trained without the copies' gradient sum) is an error naming the
    tensor, and no HF directory is left behind."""
    from megatron_patch.convert.io_utils import CheckpointError

    hf_dir = save_tiny_llama(str(tmp_path / "hf"), num_key_value_heads=2)
    to_megatron(hf_dir, tmp_path / "mg", tp=4)
    path = tmp_path / "mg" / "release" / "mp_rank_01" / "model_optim_rng.pt"
    payload = torch.load(path, weights_only=False)
    payload["model"]["decoder.layers.1.self_attention.linear_qkv.weight"][-1, 0] += 1.0  # a v row
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.1\.self_attention\.linear_qkv"
                                              r"\.weight: the key/value heads replicated over 2"):
        engine.convert_megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"),
                                      progress=False)
    assert not os.path.exists(tmp_path / "back")
