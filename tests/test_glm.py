"""ChatGLM-6B (v1) and GLM-130B against SwissArmyTransformer 0.4.12's ChatGLMModel and GLM130B
(transformers has neither; tests/sat_reference.py runs SAT in its own process): the prefix-LM
mask and 2-D positions equal SAT's own builders, logits equal SAT's at TP1 and TP2 x PP2, and
HF -> Megatron (TP2 x PP2) -> HF is bit-identical with the same config.json. The tiny
checkpoints are written here under the HF chatglm-6b names and SAT's GLM-130B names
(../shared/notes/glm_references.md §3.1, §3.2), random weights."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import REPO, run_python, run_torchrun, train_tiny_tokenizer
from megatron_patch.convert import engine
from megatron_patch.layers.glm_positions import prefix_lm_inputs, rotary_2d
from test_families import shared  # noqa: F401  (the tokenizer and mmap dataset fixture)

LAYERS, HIDDEN, HEADS, INNER, VOCAB = 2, 64, 4, 256, 300
SOP, EOP, MASK, GMASK, PAD = 295, 296, 297, 298, 299  # as a v1 config.json names them
BATCHES = {
    # [gMASK] prompts, the second left-padded; tokens after <sop> are the "generated" part
    "gmask": [[5, 7, 9, 11, 13, GMASK, SOP, 21, 22, 23], [PAD, PAD, PAD, 4, 8, GMASK, SOP, 3, 2, 1]],
    # [MASK] in the middle of the prompt (blank infilling)
    "mask": [[5, 6, MASK, 8, 9, 10, SOP, 30, 31, 32], [3, MASK, 4, 5, 6, 7, SOP, 40, 41, 42]],
}


def glm_state(inner_rows: int, inner: int, lm_head: bool, seed: int = 0) -> dict:
    """Random weights under the names ChatGLM-6B and GLM-130B share (``transformer.*``)."""
    torch.manual_seed(seed)

    def normal(*shape, std=0.1):
        return torch.randn(*shape) * std

    state = {"transformer.word_embeddings.weight": normal(VOCAB, HIDDEN, std=0.5),
             "transformer.final_layernorm.weight": 1 + normal(HIDDEN),
             "transformer.final_layernorm.bias": normal(HIDDEN)}
    if lm_head:
        state["lm_head.weight"] = normal(VOCAB, HIDDEN)
    for layer in range(LAYERS):
        prefix = f"transformer.layers.{layer}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[prefix + norm + ".weight"] = 1 + normal(HIDDEN)
            state[prefix + norm + ".bias"] = normal(HIDDEN)
        for name, rows, cols, std in (("attention.query_key_value", 3 * HIDDEN, HIDDEN, 0.4),
                                      ("attention.dense", HIDDEN, HIDDEN, 0.1),
                                      ("mlp.dense_h_to_4h", inner_rows, HIDDEN, 0.1),
                                      ("mlp.dense_4h_to_h", HIDDEN, inner, 0.1)):
            state[prefix + name + ".weight"] = normal(rows, cols, std=std)
            state[prefix + name + ".bias"] = normal(rows)
    return state


def write_v1(out: str) -> str:
    os.makedirs(out)
    save_file(glm_state(INNER, INNER, lm_head=True), os.path.join(out, "model.safetensors"))
    config = dict(architectures=["ChatGLMModel"], model_type="chatglm", num_layers=LAYERS,
                  vocab_size=VOCAB, hidden_size=HIDDEN, inner_hidden_size=INNER,
                  num_attention_heads=HEADS, max_sequence_length=256, layernorm_epsilon=1e-5,
                  position_encoding_2d=True, bos_token_id=SOP, eos_token_id=EOP,
                  mask_token_id=MASK, gmask_token_id=GMASK, pad_token_id=PAD)
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    return out


def add_tokenizer(hf: str, root) -> None:
    """A tiny HF tokenizer (ids below the special tokens') beside the weights, so the
    converted checkpoints carry it and generation reads text prompts."""
    import shutil

    tokenizer = train_tiny_tokenizer(str(root / "tokenizer"), vocab_size=280)
    for name in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, name), hf)


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatglm-v1")
    hf = write_v1(str(root / "hf"))
    add_tokenizer(hf, root)
    engine.convert_hf_to_megatron(hf, str(root / "tp1"), progress=False)
    engine.convert_hf_to_megatron(hf, str(root / "wide"), target=engine.Target(2, 2),
                                  progress=False)
    references = {}
    for name, ids in BATCHES.items():
        torch.save(torch.tensor(ids), root / f"{name}-ids.pt")
        run_python([os.path.join(REPO, "tests", "sat_reference.py"), "chatglm", hf,
                    str(root / f"{name}-ids.pt"), str(root / f"{name}-sat.pt")])
        references[name] = str(root / f"{name}-sat.pt")
    return root, hf, references


@pytest.mark.parametrize("batch", list(BATCHES))
def test_mask_and_2d_positions_equal_sats_builders(v1, batch):
    saved = torch.load(v1[2][batch])
    mask, positions = prefix_lm_inputs(saved["ids"], SOP, (GMASK, MASK), PAD, two_d=True)
    assert torch.equal(positions, saved["position_ids"])
    assert torch.equal(~mask, saved["allowed"])


def test_rotary_2d_on_swapped_quarters_is_glms_two_rotations():
    """megatron-core's rotate-half rotary with :func:`rotary_2d`'s angles, on a head whose
    middle quarters are swapped, = GLM's two rotate-half rotations of the halves (written out
    here as SAT's apply_rotary_pos_emb_index computes them), unswapped after."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    torch.manual_seed(0)
    seq, batch, heads, dim = 7, 2, 3, 16
    x = torch.randn(seq, batch, heads, dim, dtype=torch.float64)
    positions = torch.stack([torch.randint(0, 9, (batch, seq)), torch.randint(0, 9, (batch, seq))],
                            dim=1)

    def rotate(half, ids):  # rotate-half over one half (dim / 2), base 10000
        inv = 1.0 / (10000 ** (torch.arange(0, dim // 2, 2, dtype=torch.float64) / (dim // 2)))
        angles = ids.T.double()[..., None] * inv  # [s, b, dim / 4]
        emb = torch.cat([angles, angles], -1)[:, :, None]
        a, b = half.chunk(2, -1)
        return half * emb.cos() + torch.cat([-b, a], -1) * emb.sin()

    first, second = x.chunk(2, -1)
    expected = torch.cat([rotate(first, positions[:, 0]), rotate(second, positions[:, 1])], -1)
    quarters = list(x.chunk(4, -1))
    swapped = torch.cat([quarters[0], quarters[2], quarters[1], quarters[3]], -1)
    got = _apply_rotary_pos_emb_bshd(swapped, rotary_2d(positions, dim).double())
    q = list(got.chunk(4, -1))
    # the angles are float32, as the model's are
    torch.testing.assert_close(torch.cat([q[0], q[2], q[1], q[3]], -1), expected, rtol=0,
                               atol=1e-5)
    assert (got - swapped).abs().max() > 0.1  # it rotates


@pytest.mark.parametrize("batch", list(BATCHES))
def test_logits_equal_sat_at_tp1(v1, batch):
    from dist import check_logits
    from megatron_patch import compat

    compat.initialize_parallel(1, 1)
    try:
        _, diff = check_logits.compare(None, str(v1[0] / "tp1"), 1, 1,
                                       reference=v1[2][batch])
    finally:
        compat.destroy_parallel()
    assert diff <= 1e-5


def test_logits_equal_sat_at_tp2_pp2(v1):
    args = ["tests/dist/check_logits.py", "--mg", str(v1[0] / "wide"), "--reference",
            v1[2]["gmask"], "--tp", "2", "--pp", "2", "--tolerance", "1e-5"]
    proc = run_torchrun(args, nproc=4)  # exits 1 past the tolerance
    assert proc.stdout.count("max_abs_diff=") == 2


GLU_INNER = 96  # GLM-130B's dense_h_to_4h has 2 x inner rows: [x1; x2], x1 * gelu(x2)


def write_glm130b(out: str) -> str:
    """SAT's GLM130B names (tied output, no lm_head) and the release's per-layer inv_freq."""
    state = glm_state(2 * GLU_INNER, GLU_INNER, lm_head=False, seed=1)
    dim = HIDDEN // HEADS
    for layer in range(LAYERS):
        state[f"transformer.layers.{layer}.attention.rotary_emb.inv_freq"] = 1.0 / (
            10000 ** (torch.arange(0, dim, 2).float() / dim))
    os.makedirs(out)
    save_file(state, os.path.join(out, "model.safetensors"))
    config = dict(model_type="glm130b", num_layers=LAYERS, hidden_size=HIDDEN,
                  inner_hidden_size=GLU_INNER, num_attention_heads=HEADS, vocab_size=VOCAB,
                  max_sequence_length=256, layernorm_epsilon=1e-5, sop_token_id=SOP,
                  eop_token_id=EOP, mask_token_id=MASK, gmask_token_id=GMASK)
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    return out


@pytest.fixture(scope="module")
def glm130b(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm130b")
    hf = write_glm130b(str(root / "hf"))
    add_tokenizer(hf, root)
    engine.convert_hf_to_megatron(hf, str(root / "tp1"), progress=False)
    engine.convert_hf_to_megatron(hf, str(root / "wide"), target=engine.Target(2, 2),
                                  progress=False)
    ids = [[5, 7, 9, 11, 13, GMASK, SOP, 21, 22, 23], [3, 4, 8, 2, GMASK, SOP, 3, 2, 1, 9]]
    torch.save(torch.tensor(ids), root / "ids.pt")
    run_python([os.path.join(REPO, "tests", "sat_reference.py"), "glm130b", hf,
                str(root / "ids.pt"), str(root / "sat.pt")])
    return root, hf, str(root / "sat.pt")


def test_glm130b_mask_equals_generate_pys(glm130b):
    saved = torch.load(glm130b[2])
    mask, positions = prefix_lm_inputs(saved["ids"], SOP, (GMASK, MASK), None, two_d=False)
    assert torch.equal(~mask, saved["allowed"]) and torch.equal(positions, saved["position_ids"])


def test_glm130b_logits_equal_sat_at_tp1_and_tp2_pp2(glm130b):
    from dist import check_logits
    from megatron_patch import compat

    root, _, reference = glm130b
    compat.initialize_parallel(1, 1)
    try:
        _, diff = check_logits.compare(None, str(root / "tp1"), 1, 1, reference=reference)
    finally:
        compat.destroy_parallel()
    # fp32; the tied output's logits reach ~20, so 1e-6 relative is ~2e-5
    assert diff <= 3e-5
    proc = run_torchrun(["tests/dist/check_logits.py", "--mg", str(root / "wide"),
                         "--reference", reference, "--tp", "2", "--pp", "2",
                         "--tolerance", "3e-5"], nproc=4)
    assert proc.stdout.count("max_abs_diff=") == 2


@pytest.mark.parametrize("model", ["v1", "glm130b"])
def test_round_trip_is_bit_identical(model, request, tmp_path):
    root, hf, _ = request.getfixturevalue(model)
    engine.convert_megatron_to_hf(str(root / "wide"), str(tmp_path / "back"), progress=False)
    original = {k: v for k, v in load_file(os.path.join(hf, "model.safetensors")).items()
                if not k.endswith("inv_freq")}  # checked against the config, not carried
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
    assert json.load(open(tmp_path / "back" / "config.json")) == json.load(
        open(os.path.join(hf, "config.json")))


@pytest.mark.parametrize("model", ["v1", "glm130b"])
def test_seed_finetune_launcher_loss_equals_sats(model, request, tmp_path):
    """SFT through the seed launcher: samples ``prompt [gMASK] <sop> response <eop>``, the
    prompt bidirectional; the first loss (before any update) is the token-weighted response
    loss of SAT's model on each record alone, built here from HF's tokenizer directly."""
    from test_launchers import launch
    from test_training import SFT_RECORDS, hf_prompt_and_response
    from transformers import AutoTokenizer

    root, hf, _ = request.getfixturevalue(model)
    tok = AutoTokenizer.from_pretrained(hf)
    samples = []
    for record in SFT_RECORDS:
        prompt, response = hf_prompt_and_response(tok, record)
        samples.append((prompt + [GMASK, SOP], response[:-1] + [EOP]))  # eos -> <eop>
    torch.save(samples, tmp_path / "samples.pt")
    run_python([os.path.join(REPO, "tests", "sat_reference.py"),
                "chatglm" if model == "v1" else "glm130b", hf, str(tmp_path / "samples.pt"),
                str(tmp_path / "loss.pt"), "--loss"])
    reference = torch.load(tmp_path / "loss.pt")
    (tmp_path / "sft.json").write_text(json.dumps(SFT_RECORDS))
    family = "chatglm" if model == "v1" else "glm130b"
    args = ["dsw", "none", REPO, "tiny-v1" if model == "v1" else "tiny", "4", "1e-3", "0",
            "256", "256", "0", "fp32", "1", "1", "none", "false", "true", "false",
            str(tmp_path / "sft.json"), "none", str(root / "tp1"), "1", str(tmp_path / "out")]
    script = os.path.join(REPO, "examples", family, f"run_finetune_megatron_{family}.sh")
    proc = launch(script, args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (metrics,) = (tmp_path / "out" / "metrics").iterdir()
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if "lm_loss" in line]
    assert rows[0]["iteration"] == 1
    assert rows[0]["lm_loss"] == pytest.approx(reference["total"] / reference["count"], abs=1e-5)


def test_packed_glm_samples_see_what_they_see_alone():
    """glm_collate: two samples packed in one sequence get, each, the prefix-LM mask and 2-D
    positions they get alone (and see nothing of each other)."""
    from megatron_patch.data.sft_packing import assemble_sequence, glm_collate

    special = dict(sop=SOP, gmask=GMASK, mask=MASK, pad=PAD, eop=EOP)
    first = (np.array([5, 6, 7, GMASK, SOP, 8, 9, EOP]), np.array([0, 0, 0, 0, 0, 1, 1, 1]))
    second = (np.array([3, GMASK, SOP, 4, EOP]), np.array([0, 0, 0, 1, 1]))
    collate = glm_collate(special, two_d=True)
    packed = collate([assemble_sequence([first, second], 16, PAD)])
    for (ids, _), start in ((first, 0), (second, 8)):
        alone_mask, alone_positions = prefix_lm_inputs(torch.tensor([ids]), SOP, (GMASK, MASK),
                                                       None, two_d=True)
        end = start + len(ids)
        assert torch.equal(packed["attention_mask"][0, 0, start:end, start:end],
                           alone_mask[0, 0])
        assert torch.equal(packed["position_ids"][0, :, start:end], alone_positions[0])
    assert packed["attention_mask"][0, 0, 8:13, :8].all()  # the second sees none of the first
    assert not packed["attention_mask"][0, 0, 1, 2]  # a prompt token sees a later one


PROMPTS = ["Return the number of", "import", "The module provides a way to read and write"]
NEW_TOKENS = 6


@pytest.mark.parametrize("model", ["v1", "glm130b"])
def test_greedy_generation_equals_sats_greedy_loop(model, request, tmp_path):
    """Text prompts (left-padded together: different lengths) end with [gMASK] <sop>; the
    prompt attends both ways in the prefill, v1's generated tokens keep the mask position and
    count up the block position. Ours: the static KV cache at TP1 and TP2, and the uncached
    backend; SAT's: its full forward every step, each prompt alone."""
    from megatron_patch.generation.loading import load_tokenizer, open_checkpoint
    from megatron_patch.layers.glm_positions import prompt_ids

    root, hf, _ = request.getfixturevalue(model)
    checkpoint = open_checkpoint(str(root / "tp1"))
    tokenizer = load_tokenizer(checkpoint, None, None)
    prompts = [prompt_ids(tokenizer.tokenize(p), checkpoint.args.prefix_lm_ids) for p in PROMPTS]
    assert all(p[-2:] == [GMASK, SOP] for p in prompts)
    torch.save(prompts, tmp_path / "prompts.pt")
    run_python([os.path.join(REPO, "tests", "sat_reference.py"),
                "chatglm" if model == "v1" else "glm130b", hf, str(tmp_path / "prompts.pt"),
                str(tmp_path / "sat.pt"), "--greedy", str(NEW_TOKENS)])
    expected = [row[:row.index(EOP) + 1] if EOP in row else row
                for row in torch.load(tmp_path / "sat.pt")]
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(PROMPTS) + "\n")
    for mg, tp, backend in ((root / "tp1", 1, "static"), (root / "tp1", 1, "uncached"),
                            (root / "wide", 2, "static")):
        out = tmp_path / f"tp{tp}-{backend}.jsonl"
        args = ["-m", "megatron_patch.generate", "--load", str(mg), "--input-file", str(source),
                "--output-file", str(out), "--top-k", "1", "--max-new-tokens", str(NEW_TOKENS),
                "--tensor-model-parallel-size", str(tp), "--inference-backend", backend]
        run_torchrun(args, nproc=tp) if tp > 1 else run_python(args)
        assert [json.loads(line)["completion_ids"] for line in open(out)] == expected, (
            tp, backend)


def test_mcore_backend_refuses_prefix_lm(v1, tmp_path):
    (tmp_path / "prompts.txt").write_text("hello\n")
    proc = run_python(["-m", "megatron_patch.generate", "--load", str(v1[0] / "tp1"),
                       "--input-file", str(tmp_path / "prompts.txt"), "--output-file",
                       str(tmp_path / "out.jsonl"), "--inference-backend", "mcore"], check=False)
    assert proc.returncode == 1 and "megatron-core's KV cache masks causally" in proc.stderr


def sat_shards(state: dict, parts: int) -> list[dict]:
    """GLM-130B's tools/convert_tp.py rules, written out here: norms and the row-parallel
    biases whole on every rank, attention.dense / dense_4h_to_h weights cut along dim 1, GLU
    dense_h_to_4h as [x1_r; x2_r] per rank, the rest along dim 0."""
    whole = ("layernorm.weight", "layernorm.bias", "attention.dense.bias",
             "dense_4h_to_h.bias", "inv_freq")
    shards = [{} for _ in range(parts)]
    for name, tensor in state.items():
        for rank in range(parts):
            if name.endswith(whole):
                piece = tensor
            elif name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
                piece = tensor.chunk(parts, 1)[rank]
            elif "dense_h_to_4h" in name:
                x1, x2 = tensor.chunk(2, 0)
                piece = torch.cat([x1.chunk(parts, 0)[rank], x2.chunk(parts, 0)[rank]])
            else:
                piece = tensor.chunk(parts, 0)[rank]
            shards[rank][name] = piece.clone()
    return shards


def test_sat_checkpoint_mp2_to_megatron_and_back_is_bit_identical(glm130b, tmp_path):
    """A SAT checkpoint at MP2 (latest + 1/mp_rank_0X_model_states.pt + config.json) ->
    Megatron TP2 x PP2 -> TP1: SAT's logits; -> SAT MP2 again: the same rank files, tensor for
    tensor."""
    import shutil

    from dist import check_logits
    from megatron_patch import compat

    root, hf, reference = glm130b
    sat = tmp_path / "sat"
    os.makedirs(sat / "1")
    (sat / "latest").write_text("1\n")
    shutil.copy(os.path.join(hf, "config.json"), sat / "config.json")
    shards = sat_shards(load_file(os.path.join(hf, "model.safetensors")), 2)
    for rank, shard in enumerate(shards):
        torch.save({"module": shard}, sat / "1" / f"mp_rank_{rank:02d}_model_states.pt")
    engine.convert_hf_to_megatron(str(sat), str(tmp_path / "wide"), target=engine.Target(2, 2),
                                  progress=False)
    engine.reshard_megatron(str(tmp_path / "wide"), str(tmp_path / "mg"), engine.Target(1, 1),
                            progress=False)
    compat.initialize_parallel(1, 1)
    try:
        _, diff = check_logits.compare(None, str(tmp_path / "mg"), 1, 1, reference=reference)
    finally:
        compat.destroy_parallel()
    assert diff <= 3e-5
    proc = run_python(["-m", "megatron_patch.convert", "--megatron-to-hf", "--load",
                       str(tmp_path / "mg"), "--save", str(tmp_path / "back"),
                       "--sat-model-parallel-size", "2", "--no-progress"])
    assert "-> sat (mp 2)" in proc.stdout
    assert (tmp_path / "back" / "latest").read_text().strip() == "1"
    for rank, shard in enumerate(shards):
        back = torch.load(tmp_path / "back" / "1" / f"mp_rank_{rank:02d}_model_states.pt")
        expected = {k: v for k, v in shard.items() if not k.endswith("inv_freq")}
        assert sorted(back["module"]) == sorted(expected)
        assert all(torch.equal(back["module"][k], expected[k]) for k in expected)
    assert json.load(open(tmp_path / "back" / "config.json")) == json.load(
        open(sat / "config.json"))


def test_sat_checkpoint_errors_name_the_file(glm130b, tmp_path):
    root, hf, _ = glm130b
    sat = tmp_path / "sat"
    os.makedirs(sat / "1")
    (sat / "latest").write_text("1\n")
    with pytest.raises(ValueError, match="without config.json: write one beside 'latest'"):
        engine.convert_hf_to_megatron(str(sat), str(tmp_path / "a"), progress=False)
    shutil_config = json.load(open(os.path.join(hf, "config.json")))
    json.dump(shutil_config, open(sat / "config.json", "w"))
    with pytest.raises(ValueError, match="expected mp_rank_00_model_states.pt"):
        engine.convert_hf_to_megatron(str(sat), str(tmp_path / "b"), progress=False)
    shards = sat_shards(load_file(os.path.join(hf, "model.safetensors")), 2)
    shards[1]["transformer.final_layernorm.weight"] += 1  # replicated, yet different
    for rank, shard in enumerate(shards):
        torch.save({"module": shard}, sat / "1" / f"mp_rank_{rank:02d}_model_states.pt")
    with pytest.raises(ValueError, match="final_layernorm.weight' differs between mp_rank_00"):
        engine.convert_hf_to_megatron(str(sat), str(tmp_path / "c"), progress=False)
    assert not any((tmp_path / d / "megatron_patch.json").exists() for d in "abc")


def test_pretrain_samples_start_with_gmask_sop():
    """glm_pretrain_collate: [gMASK] <sop> before the text, the loss from <sop> on (it
    predicts the first text token), ChatGLM-6B's 2-D positions (mask position 0, blocks)."""
    from megatron_patch.training.data import glm_pretrain_collate

    ids = dict(sop=SOP, gmask=GMASK, mask=MASK, pad=PAD, eop=EOP)
    sample = {"tokens": torch.tensor([10, 11, 12, 13]), "labels": torch.tensor([11, 12, 13, 14]),
              "loss_mask": torch.tensor([1.0, 1.0, 0.0, 1.0]),
              "position_ids": torch.arange(4)}
    batch = glm_pretrain_collate(ids, two_d=True)([sample, sample])
    assert batch["tokens"][0].tolist() == [GMASK, SOP, 10, 11, 12, 13]
    assert batch["labels"][0].tolist() == [SOP, 10, 11, 12, 13, 14]
    assert batch["loss_mask"][0].tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert batch["position_ids"][0].tolist() == [[0] * 6, [0, 1, 2, 3, 4, 5]]
    flat = glm_pretrain_collate(ids, two_d=False)([sample])
    assert flat["position_ids"][0].tolist() == list(range(6))


@pytest.mark.parametrize("model", ["v1", "glm130b"])
def test_pretraining_layouts_agree_and_resume_is_exact(model, request, shared, tmp_path):
    """First losses and grad norms at TP2 x PP2 equal TP1's (ChatGLM-6B: the 2-D positions
    reach every pipeline stage; GLM-130B: the GeGLU halves split per rank, DeepNorm, the tied
    output across stages); a run stopped and resumed equals the straight one bit for bit."""
    from types import SimpleNamespace

    from test_families import assert_layouts_agree_and_resume_is_exact

    root = request.getfixturevalue(model)[0]
    case = SimpleNamespace(tp1=str(root / "tp1"), tp=2, pp=2)
    assert_layouts_agree_and_resume_is_exact(shared, case, tmp_path)


@pytest.mark.parametrize("model", ["v1", "glm130b"])
def test_seed_pretrain_launcher_trains(model, request, shared, tmp_path):
    """The family's seed launcher (chatglm's trains a v1 checkpoint) with the seed's 23
    arguments: 8 iterations of 4 x 32 tokens."""
    from test_launchers import launch

    root = request.getfixturevalue(model)[0]
    family = "chatglm" if model == "v1" else "glm130b"
    args = ["dsw", "none", REPO, "tiny-v1" if model == "v1" else "tiny", "2", "4", "1e-3",
            "1e-4", "32", "0", "fp32", "1", "1", "none", "false", "true", "false", "8",
            shared.data, str(root / "tp1"), str(8 * 4 * 32), "128", str(tmp_path / "out")]
    proc = launch(os.path.join(REPO, "examples", family, f"run_pretrain_megatron_{family}.sh"),
                  args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (metrics,) = (tmp_path / "out" / "metrics").iterdir()
    losses = [json.loads(line)["lm_loss"] for line in metrics.read_text().splitlines()
              if "lm_loss" in line]
    assert len(losses) == 8 and losses[-1] < losses[0]
