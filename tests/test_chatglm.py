"""The remote-code ChatGLM2/3 / GLM-4 checkpoint layout (``model_type: chatglm``), which has
no transformers class: a tiny ``GlmForCausalLM`` is renamed into it here, by hand, as
chatglm.cpp's converter maps the two (../shared/notes/glm_references.md §3.3: contiguous
``[Q | K | V]``, ``dense_h_to_4h`` = ``[gate | up]``, base 10000 x ``rope_ratio``), with the
stored ``inv_freq`` buffer; converted to Megatron it must give the glm model's logits, and
converted back the same tensors under the same names and the same config fields. The glm
and glm4 layouts go through tests/test_families.py with the other families."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_torchrun, save_tiny_hf
from megatron_patch.convert import engine

ROPE_RATIO = 2.0


def chatglm2_from_glm(glm_dir: str, out: str) -> str:
    """The glm checkpoint's tensors under the remote-code names, and its config.json."""
    glm = load_file(os.path.join(glm_dir, "model.safetensors"))
    config = json.load(open(os.path.join(glm_dir, "config.json")))
    tensors = {}
    for name, tensor in glm.items():
        name = name.replace("model.layers.", "transformer.encoder.layers.")
        if ".self_attn.q_proj." in name:  # q, k, v -> one [Q | K | V]
            parts = [glm[name.replace("transformer.encoder.layers.", "model.layers.")
                         .replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            tensors[name.replace("self_attn.q_proj", "self_attention.query_key_value")] = \
                torch.cat(parts)
            continue
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        name = (name.replace("self_attn.o_proj", "self_attention.dense")
                .replace("mlp.gate_up_proj", "mlp.dense_h_to_4h")
                .replace("mlp.down_proj", "mlp.dense_4h_to_h")
                .replace("model.embed_tokens", "transformer.embedding.word_embeddings")
                .replace("model.norm", "transformer.encoder.final_layernorm")
                .replace("lm_head", "transformer.output_layer"))
        tensors[name] = tensor.clone()
    rotary = config["head_dim"] // 2  # the first half of each head rotates
    tensors["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (
        10000 ** (torch.arange(0, rotary, 2, dtype=torch.float) / rotary))
    os.makedirs(out)
    save_file(tensors, os.path.join(out, "model.safetensors"))
    remote = dict(
        architectures=["ChatGLMModel"], model_type="chatglm", num_layers=config["num_hidden_layers"],
        padded_vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"], kv_channels=config["head_dim"],
        num_attention_heads=config["num_attention_heads"], seq_length=256,
        layernorm_epsilon=config["rms_norm_eps"], rmsnorm=True, add_bias_linear=False,
        add_qkv_bias=True, multi_query_attention=True,
        multi_query_group_num=config["num_key_value_heads"], rope_ratio=ROPE_RATIO,
        apply_residual_connection_post_layernorm=False, post_layer_norm=True,
        original_rope=True, tie_word_embeddings=False, torch_dtype="float32")
    json.dump(remote, open(os.path.join(out, "config.json"), "w"), indent=2)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatglm2")
    glm = save_tiny_hf("chatglm", str(root / "glm"), size="tiny", qk_scale=10.0,
                       rotary_base=10000.0 * ROPE_RATIO)
    remote = chatglm2_from_glm(glm, str(root / "remote"))
    wide = str(root / "wide")
    engine.convert_hf_to_megatron(remote, wide, target=engine.Target(2, 2), progress=False)
    return root, glm, remote, wide


def test_chatglm2_layout_gives_the_glm_models_logits_at_tp2_pp2(models):
    _, glm, _, wide = models
    meta = json.load(open(os.path.join(wide, "megatron_patch.json")))
    assert meta["model_args"]["checkpoint_layout"] == "chatglm2"
    assert meta["model_args"]["rotary_base"] == 10000.0 * ROPE_RATIO
    args = ["tests/dist/check_logits.py", "--hf", glm, "--mg", wide, "--tp", "2", "--pp", "2",
            "--tolerance", "1e-6"]
    proc = run_torchrun(args, nproc=4)  # exits 1 past the tolerance
    assert proc.stdout.count("max_abs_diff=") == 2


def test_chatglm2_layout_goes_back_as_chatglm2_bit_identical(models, tmp_path):
    _, _, remote, wide = models
    engine.convert_megatron_to_hf(wide, str(tmp_path / "back"), progress=False)
    original = load_file(os.path.join(remote, "model.safetensors"))
    back = load_file(os.path.join(tmp_path / "back", "model.safetensors"))
    # inv_freq is a function of the config: checked on the way in, not written back
    assert sorted(back) == sorted(k for k in original if not k.endswith("inv_freq"))
    assert all(torch.equal(back[k], original[k]) for k in back)
    source, written = (json.load(open(os.path.join(d, "config.json")))
                       for d in (remote, tmp_path / "back"))
    assert written == source


def test_fresh_chatglm2_config_reads_back_as_the_same_model(models):
    from megatron_patch.registry import get_family

    family = get_family("chatglm")
    args = family.args_for_size("tiny-chatglm2", rotary_base=30000.0)
    config = family.hf_config_from_args(args)
    assert config["model_type"] == "chatglm" and config["rope_ratio"] == 3.0
    assert family.args_from_hf(config) == args


def test_wrong_inv_freq_and_qkv_rows_are_errors_naming_the_tensor(models, tmp_path):
    _, _, remote, _ = models
    tensors = load_file(os.path.join(remote, "model.safetensors"))
    bad = dict(tensors, **{"transformer.rotary_pos_emb.inv_freq":
                           tensors["transformer.rotary_pos_emb.inv_freq"] * 2})
    for case, changed in (("inv_freq", bad), ("qkv", dict(tensors, **{
            "transformer.encoder.layers.0.self_attention.query_key_value.weight":
            tensors["transformer.encoder.layers.0.self_attention.query_key_value.weight"][:-16]}))):
        source = tmp_path / case
        os.makedirs(source)
        save_file(changed, str(source / "model.safetensors"))
        json.dump(json.load(open(os.path.join(remote, "config.json"))),
                  open(source / "config.json", "w"))
        with pytest.raises(ValueError) as error:
            engine.convert_hf_to_megatron(str(source), str(tmp_path / f"{case}-out"),
                                          progress=False)
        if case == "inv_freq":
            assert "transformer.rotary_pos_emb.inv_freq" in str(error.value)
        else:
            assert "query_key_value" in str(error.value) and "64 + 32 + 32" in str(error.value)
        assert not os.path.exists(tmp_path / f"{case}-out" / "megatron_patch.json")
