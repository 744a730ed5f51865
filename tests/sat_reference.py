"""SwissArmyTransformer (SAT) 0.4.12 as the independent reference for ChatGLM-6B (v1) and
GLM-130B, which transformers does not have (../shared/notes/glm_references.md §1a). Run as a
script in its own process (SAT opens its own one-process gloo group):

    python tests/sat_reference.py chatglm|glm130b DIR IDS.pt OUT.pt

``chatglm``: loads DIR (config.json + model.safetensors, the HF chatglm-6b names), moves the
weights into SAT's ChatGLMModel (``lm_head`` renamed; per-head ``[q k v]`` rows regrouped into
SAT 0.4.12's contiguous ``[Q | K | V]``, the notes' adapter, written here and not in the code
under test), and saves fp32 logits for the token ids, with SAT's own prefix-LM mask and 2-D
positions (``get_inputs``), plus those mask and positions.

``tokenize``: ``python tests/sat_reference.py tokenize DIR TEXTS.json OUT.json [--save-v1 FILE]``:
SAT's ``GLM130BTokenizer`` (over icetk 0.0.7's TextTokenizer, both installed without their
dependencies) on DIR/ice_text.model: the ids and decoded text of each text, the special tokens'
ids and the id count; ``--save-v1`` writes the model SAT configures with ChatGLM-6B's special
list (``<unused_0>`` for ``<eod>``), the structure of ChatGLM-6B's own ice_text.model.

``glm130b``: DIR holds SAT's own tensor names; SAT's GLM130B runs on the CPU in fp32 with the
notes' three shims (its CUDA device, a float mask where it wants a bool one, a hard-coded
``.half()``), on the mask GLM-130B's generate.py builds (bidirectional before ``sop``) and
positions 0, 1, 2, ... ([gMASK] prompts).
"""
import argparse
import importlib.metadata
import importlib.util
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


def load(mode: str, directory: str):
    """(SAT model in fp32 eval mode with the checkpoint's weights, config)."""
    from safetensors.torch import load_file

    config = json.load(open(os.path.join(directory, "config.json")))
    state = load_file(os.path.join(directory, "model.safetensors"))
    if mode == "glm130b":
        model = glm130b_model(config)
    else:
        model = chatglm_model(config)
        state = hf_v1_to_sat(state, config["num_attention_heads"])
    model = model.float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    unexpected = [k for k in unexpected if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"SAT state dict: missing {missing}, unexpected {unexpected}")
    return model, config


def inputs(mode: str, model, config, ids: torch.Tensor):
    """(attention mask as the model takes it, allowed [b, 1, s, s], position ids, valid [b, s]):
    ChatGLMModel's own get_inputs; for GLM130B, GLM-130B generate.py's mask (bidirectional
    before sop, True = masked) and positions 0, 1, 2, ..."""
    if mode == "chatglm":
        mask, positions = model.get_inputs(ids)
        # left padding's logits are anyone's (SAT's fully masked rows average every value)
        valid = torch.tensor([[i >= model.get_pad_length(row.tolist()) for i in range(len(row))]
                              for row in ids])
        return mask, mask.bool(), positions, valid
    seq = ids.shape[1]
    attend = torch.ones(ids.shape[0], 1, seq, seq).tril()
    for row, tokens in enumerate(ids.tolist()):
        attend[row, :, :, :tokens.index(config["sop_token_id"])] = 1
    masked = attend < 0.5
    return masked, ~masked, torch.arange(seq).expand(ids.shape[0], seq), torch.ones(
        ids.shape, dtype=torch.bool)


def forward(mode, model, config, ids):
    mask, allowed, positions, valid = inputs(mode, model, config, ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions)[0]
    return logits, allowed, positions, valid


def sat_tokenizer(directory: str):
    """SAT's GLM130BTokenizer over DIR/ice_text.model. Shims: icetk's package __init__ (it
    imports the image tokenizer, torchvision) is skipped, and its protobuf-3.18 generated
    sentencepiece_model_pb2 is replaced by sentencepiece's own module of the same proto."""
    import types

    from sentencepiece import sentencepiece_model_pb2

    home = os.path.dirname(importlib.util.find_spec("icetk").origin)
    package = types.ModuleType("icetk")
    package.__path__ = [home]
    sys.modules["icetk"] = package
    sys.modules["icetk.sentencepiece_model_pb2"] = sentencepiece_model_pb2
    from sat.tokenization.icetk_glm_130B.ice_tokenizer import GLM130BTokenizer

    return GLM130BTokenizer(path=directory)


def tokenize(directory: str, texts_file: str, out: str, save_v1: str | None) -> None:
    tokenizer = sat_tokenizer(directory)
    texts = json.load(open(texts_file))
    ids = [tokenizer.encode(text) for text in texts]
    names = ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "</s>", "<pad>", "<unk>"]
    result = {"ids": ids, "decoded": [tokenizer.decode(row) for row in ids],
              "special": {name: tokenizer[name] for name in names},
              "num_tokens": tokenizer.num_image_tokens + tokenizer.text_tokenizer.num_tokens}
    json.dump(result, open(out, "w"))
    if save_v1:
        v1 = type(tokenizer)(path=directory)
        v1.special_tokens = [name if name != "<eod>" else "<unused_0>"
                             for name in v1.special_tokens]
        with open(save_v1, "wb") as handle:
            handle.write(v1.text_tokenizer.proto.SerializeToString())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["chatglm", "glm130b", "tokenize"])
    parser.add_argument("hf_dir")
    parser.add_argument("ids", help="a saved [b, s] id tensor; with --greedy, a saved list of "
                                    "prompts (id lists)")
    parser.add_argument("out")
    parser.add_argument("--loss", action="store_true",
                        help="ids: a saved list of (prompt ids, response ids): save the summed "
                             "cross-entropy of the response tokens and their count, each sample "
                             "alone")
    parser.add_argument("--greedy", type=int, metavar="N", default=0,
                        help="save each prompt's N greedy tokens (SAT's full forward every "
                             "step, one prompt at a time, no cache)")
    parser.add_argument("--save-v1", metavar="FILE", help="tokenize: write a ChatGLM-6B-style "
                        "ice_text.model (SAT's configured model, ChatGLM-6B's special list)")
    opts = parser.parse_args(argv)
    require_sat()
    if opts.mode == "tokenize":
        tokenize(opts.hf_dir, opts.ids, opts.out, opts.save_v1)
        return 0
    model, config = load(opts.mode, opts.hf_dir)
    if opts.loss:
        total, count = 0.0, 0
        for prompt, response in torch.load(opts.ids):
            ids = torch.tensor([prompt + response])
            logits = forward(opts.mode, model, config, ids)[0][0, :-1]
            losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            total += losses[len(prompt) - 1:].sum().item()
            count += len(response)
        torch.save({"total": total, "count": count}, opts.out)
        return 0
    if opts.greedy:
        completions = []
        for prompt in torch.load(opts.ids):
            ids = torch.tensor([prompt])
            for _ in range(opts.greedy):
                logits = forward(opts.mode, model, config, ids)[0]
                ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
            completions.append(ids[0, len(prompt):].tolist())
        torch.save(completions, opts.out)
        return 0
    ids = torch.load(opts.ids)
    logits, allowed, positions, valid = forward(opts.mode, model, config, ids)
    torch.save({"ids": ids, "logits": logits, "valid": valid, "allowed": allowed,
                "position_ids": positions}, opts.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
