"""SwissArmyTransformer (SAT) 0.4.12 as the independent reference for ChatGLM-6B (v1) and
GLM-130B, which transformers does not have (../shared/notes/glm_references.md §1a). Run as a
script in its own process (SAT opens its own one-process gloo group):

    python tests/sat_reference.py chatglm|glm130b DIR IDS.pt OUT.pt

``chatglm``: loads DIR (config.json + model.safetensors, the HF chatglm-6b names), moves the
weights into SAT's ChatGLMModel (``lm_head`` renamed; per-head ``[q k v]`` rows regrouped into
SAT 0.4.12's contiguous ``[Q | K | V]``, the notes' adapter, written here and not in the code
under test), and saves fp32 logits for the token ids, with SAT's own prefix-LM mask and 2-D
positions (``get_inputs``), plus those mask and positions.

``glm130b``: DIR holds SAT's own tensor names; SAT's GLM130B runs on the CPU in fp32 with the
notes' three shims (its CUDA device, a float mask where it wants a bool one, a hard-coded
``.half()``), on the mask GLM-130B's generate.py builds (bidirectional before ``sop``) and
positions 0, 1, 2, ... ([gMASK] prompts).
"""
import argparse
import importlib.metadata
import json
import os
import sys

import torch

SAT_VERSION = "0.4.12"


def require_sat():
    version = importlib.metadata.version("swissarmytransformer")
    if version != SAT_VERSION:
        raise RuntimeError(f"the GLM references need swissarmytransformer=={SAT_VERSION} "
                           f"(installed: {version}); bash toolkits/install_requirements.sh test")


def hf_v1_to_sat(state: dict, num_heads: int) -> dict:
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            name = "mixins.chatglm-final.lm_head.weight"
        if "attention.query_key_value" in name:  # [np, 3, hn, ...] -> [3, np, hn, ...]
            hn = tensor.shape[0] // (3 * num_heads)
            tensor = tensor.view(num_heads, 3, hn, *tensor.shape[1:]).transpose(0, 1).reshape(
                tensor.shape)
        out[name] = tensor
    return out


def sat_args(config: dict, **extra) -> argparse.Namespace:
    """SAT's model-only arguments from a config.json (post-LN, no dropout, one MP rank)."""
    return argparse.Namespace(
        num_layers=config["num_layers"], vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"], num_attention_heads=config["num_attention_heads"],
        max_sequence_length=config.get("max_sequence_length", 2048),
        inner_hidden_size=config["inner_hidden_size"], layernorm_order="post",
        layernorm_epsilon=config.get("layernorm_epsilon", 1e-5), skip_init=True,
        model_parallel_size=1, hidden_dropout=0.0, attention_dropout=0.0, **extra)


def chatglm_model(config: dict):
    from sat.model.official.chatglm_model import ChatGLMModel

    return ChatGLMModel(sat_args(
        config, bos_token_id=config["bos_token_id"], mask_token_id=config["mask_token_id"],
        gmask_token_id=config["gmask_token_id"], pad_token_id=config["pad_token_id"]))


def glm130b_model(config: dict):
    """SAT's GLM130B in fp32 on the CPU; the shims go in before it is built (SAT collects
    hook methods at construction)."""
    import sat.model.official.glm130B_model as glm

    torch.cuda.current_device = lambda: "cpu"
    original = glm.SelfAttentionWithFP32SoftmaxMixin.attention_fn

    def attention_fn(self, q, k, v, mask, *args, **kwargs):
        half = torch.Tensor.half
        torch.Tensor.half = lambda tensor: tensor  # keep fp32 probabilities
        try:
            return original(self, q, k, v, mask.bool(), *args, **kwargs)
        finally:
            torch.Tensor.half = half

    glm.SelfAttentionWithFP32SoftmaxMixin.attention_fn = attention_fn
    return glm.GLM130B(sat_args(config, fp16=False, position_encoding_2d=False, no_glu=False))


def glm130b_logits(opts, config):
    from safetensors.torch import load_file

    model = glm130b_model(config).float().eval()
    state = load_file(os.path.join(opts.hf_dir, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    unexpected = [k for k in unexpected if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"SAT state dict: missing {missing}, unexpected {unexpected}")
    ids = torch.load(opts.ids)
    seq = ids.shape[1]
    masked = torch.ones(ids.shape[0], 1, seq, seq).tril()  # generate.py: 1 = attend first
    for row, tokens in enumerate(ids.tolist()):
        context = tokens.index(config["sop_token_id"])  # ends with sop
        masked[row, :, :, :context] = 1
    masked = masked < 0.5  # True = masked
    positions = torch.arange(seq).expand(ids.shape[0], seq)
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=positions, attention_mask=masked)[0]
    torch.save({"ids": ids, "logits": logits, "allowed": ~masked, "position_ids": positions},
               opts.out)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["chatglm", "glm130b"])
    parser.add_argument("hf_dir")
    parser.add_argument("ids")
    parser.add_argument("out")
    opts = parser.parse_args(argv)
    require_sat()
    from safetensors.torch import load_file

    config = json.load(open(os.path.join(opts.hf_dir, "config.json")))
    if opts.mode == "glm130b":
        return glm130b_logits(opts, config)
    model = chatglm_model(config).float().eval()
    state = hf_v1_to_sat(load_file(os.path.join(opts.hf_dir, "model.safetensors")),
                         config["num_attention_heads"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"SAT state dict: missing {missing}, unexpected {unexpected}")
    ids = torch.load(opts.ids)
    mask, positions = model.get_inputs(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions)[0]
    # left padding's logits are anyone's (SAT's fully masked rows average every value)
    valid = torch.tensor([[i >= model.get_pad_length(row.tolist()) for i in range(len(row))]
                          for row in ids])
    torch.save({"ids": ids, "logits": logits, "valid": valid, "allowed": mask.bool(),
                "position_ids": positions}, opts.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
