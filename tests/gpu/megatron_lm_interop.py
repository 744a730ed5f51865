"""The steps of ``tests/gpu/megatron_lm_interop.sh`` that need no Megatron-LM run (the CPU tests
run them on checkpoints laid out as Megatron-LM saves them, tests/megatron_lm_layout.py):

    python tests/gpu/megatron_lm_interop.py make-hf OUT
    python tests/gpu/megatron_lm_interop.py compare --hf HF --megatron CKPT [--original HF0]

``compare`` reads the Megatron-LM checkpoint on its own, without megatron_patch's converter:
raw ``torch.load`` of every ``mp_rank_*`` file (tensor-parallel pieces joined by the rules of
megatron-core's layers) or torch.distributed.checkpoint for ``torch_dist``, and the llama
weight layout written out here (grouped QKV, SwiGLU's ``[gate; up]``). It prints one PASS or
FAIL line per check and exits 1 on any FAIL:

* transformers loads ``--hf`` and runs it;
* every tensor of ``--hf`` equals its counterpart in the Megatron-LM checkpoint bit for bit
  (dtypes included), and no tensor is missing or left over;
* with ``--original``: the tensors have the original's names and shapes, and training changed
  at least one of them (so the checkpoint compared is the trained one).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)

from megatron_lm_layout import TE_LAYER_NAMES  # noqa: E402  (schema_core.py's names)

_RANK = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_LOCAL_NAMES = {te: local for local, te in TE_LAYER_NAMES.items()}


def iteration_dir(root: str) -> str:
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as handle:
        iteration = handle.read().strip()
    return os.path.join(root, "release" if iteration == "release" else
                        f"iter_{int(iteration):07d}")


def _local(name: str) -> str:
    """A layer tensor's name in the local spec (``name`` is relative to its layer)."""
    return _LOCAL_NAMES.get(name, name)


def _join(name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
    """Tensor-parallel pieces -> the full tensor, as megatron-core's layers cut them:
    column-parallel (QKV, embedding, output layer) on dim 0, SwiGLU's fc1 per rank
    ``[gate_r; up_r]``, row-parallel (proj, fc2) on dim 1, norms replicated."""
    if name.endswith("mlp.linear_fc1.weight"):
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return torch.cat(pieces, dim=1)
    if name.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
        return torch.cat(pieces, dim=0)
    for piece in pieces[1:]:
        assert torch.equal(piece, pieces[0]), f"{name} differs between TP ranks"
    return pieces[0]


def read_torch(iter_dir: str) -> tuple[dict, object]:
    """{global local-spec name: full tensor}, args of a torch-format checkpoint."""
    ranks = {}
    for name in os.listdir(iter_dir):
        match = _RANK.match(name)
        if match:
            path = os.path.join(iter_dir, name, "model_optim_rng.pt")
            ranks[int(match.group(1)), int(match.group(2) or 0)] = torch.load(
                path, map_location="cpu", weights_only=False)
    tp = 1 + max(t for t, _ in ranks)
    pp = 1 + max(p for _, p in ranks)
    args = ranks[0, 0]["args"]
    per_stage = args.num_layers // pp
    full = {}
    for stage in range(pp):
        for key in ranks[0, stage]["model"]:
            if key.endswith("_extra_state"):
                continue
            pieces = [ranks[t, stage]["model"][key] for t in range(tp)]
            match = re.match(r"decoder\.layers\.(\d+)\.(.+)$", key)
            name = key if not match else \
                f"decoder.layers.{stage * per_stage + int(match.group(1))}.{_local(match.group(2))}"
            if name == "output_layer.weight" and name in full:
                continue
            full[name] = _join(name, pieces)
    return full, args


def read_torch_dist(iter_dir: str) -> tuple[dict, object]:
    """The same for torch_dist: global tensors straight from torch.distributed.checkpoint
    (megatron-core stacks a layer's tensors on a leading layer axis)."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(iter_dir)
    wanted = {}
    for key, entry in reader.read_metadata().state_dict_metadata.items():
        if key.startswith(("embedding.", "decoder.", "output_layer.")) and \
                hasattr(entry, "size") and not key.endswith("_extra_state"):
            wanted[key] = torch.empty(entry.size, dtype=entry.properties.dtype)
    dcp.load(wanted, storage_reader=reader, no_dist=True)
    args = torch.load(os.path.join(iter_dir, "common.pt"), map_location="cpu",
                      weights_only=False)["args"]
    full = {}
    for key, tensor in wanted.items():
        if key.startswith("decoder.layers."):
            rest = _local(key[len("decoder.layers."):])
            for layer in range(tensor.shape[0]):
                full[f"decoder.layers.{layer}.{rest}"] = tensor[layer]
        else:
            full[key] = tensor
    return full, args


def hf_tensors_of(full: dict, args, vocab: int) -> dict:
    """A llama's HF tensors from megatron-core's (local-spec names, full tensors)."""
    heads, d = args.num_attention_heads, args.kv_channels
    groups = args.num_query_groups if args.group_query_attention else heads
    r = heads // groups
    out = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"][:vocab],
           "model.norm.weight": full["decoder.final_layernorm.weight"]}
    if args.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = full["output_layer.weight"][:vocab]
    for i in range(args.num_layers):
        mg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = full[mg + "self_attention.linear_qkv.weight"]
        grouped = qkv.reshape(groups, (r + 2) * d, qkv.shape[-1])
        gate, up = full[mg + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({
            hf + "input_layernorm.weight": full[mg + "input_layernorm.weight"],
            hf + "self_attn.q_proj.weight": grouped[:, : r * d].reshape(-1, qkv.shape[-1]),
            hf + "self_attn.k_proj.weight": grouped[:, r * d: (r + 1) * d].reshape(
                -1, qkv.shape[-1]),
            hf + "self_attn.v_proj.weight": grouped[:, (r + 1) * d:].reshape(-1, qkv.shape[-1]),
            hf + "self_attn.o_proj.weight": full[mg + "self_attention.linear_proj.weight"],
            hf + "post_attention_layernorm.weight": full[mg + "pre_mlp_layernorm.weight"],
            hf + "mlp.gate_proj.weight": gate, hf + "mlp.up_proj.weight": up,
            hf + "mlp.down_proj.weight": full[mg + "mlp.linear_fc2.weight"]})
    return out


def megatron_lm_hf_tensors(root: str, vocab: int) -> dict:
    """What the HF checkpoint converted from Megatron-LM checkpoint ``root`` must hold."""
    iter_dir = iteration_dir(root)
    dist = os.path.isfile(os.path.join(iter_dir, ".metadata"))
    full, args = (read_torch_dist if dist else read_torch)(iter_dir)
    return hf_tensors_of(full, args, vocab)


def load_hf(path: str) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


def _check(results: list, ok: bool, text: str) -> None:
    results.append(ok)
    print(f"{'PASS' if ok else 'FAIL'} {text}", flush=True)


def _loads_in_transformers(results: list, hf_dir: str) -> None:
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(torch.arange(8).unsqueeze(0)).logits
        _check(results, bool(torch.isfinite(logits).all()),
               f"transformers loads {hf_dir} ({type(model).__name__}) and its logits are finite")
    except Exception as err:  # any failure to load is the finding
        _check(results, False, f"transformers loads {hf_dir}: {type(err).__name__}: {err}")


def compare(hf_dir: str, megatron: str, original: str | None = None) -> int:
    results = []
    _loads_in_transformers(results, hf_dir)
    hf = load_hf(hf_dir)
    import json

    vocab = json.load(open(os.path.join(hf_dir, "config.json")))["vocab_size"]
    expected = megatron_lm_hf_tensors(megatron, vocab)
    _check(results, sorted(hf) == sorted(expected),
           f"{len(hf)} HF tensors are the {len(expected)} of the Megatron-LM checkpoint"
           + ("" if sorted(hf) == sorted(expected) else
              f" (extra {sorted(set(hf) - set(expected))[:3]}, missing "
              f"{sorted(set(expected) - set(hf))[:3]})"))
    unequal = [n for n in hf if n in expected and not (
        hf[n].dtype == expected[n].dtype and torch.equal(hf[n], expected[n]))]
    _check(results, not unequal, f"HF tensors equal {megatron}'s bit for bit"
           + (f" (not: {unequal[:3]})" if unequal else
              f" (dtype {next(iter(hf.values())).dtype})"))
    if original:
        before = load_hf(original)
        same_shape = sorted(before) == sorted(hf) and all(
            before[n].shape == hf[n].shape for n in hf)
        _check(results, same_shape, f"HF tensors have {original}'s names and shapes")
        changed = [n for n in hf if n in before and not torch.equal(
            before[n].to(hf[n].dtype), hf[n])]
        _check(results, bool(changed), f"training changed {len(changed)} of {len(hf)} tensors"
               + (f", e.g. {changed[0]} (max |delta| "
                  f"{(before[changed[0]].float() - hf[changed[0]].float()).abs().max():.3g})"
                  if changed else ""))
    return 0 if all(results) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-hf", help="a tiny random HF llama (the shape the .sh trains)")
    make.add_argument("out")
    make.add_argument("--vocab-size", type=int, default=300)
    check = sub.add_parser("compare", help="check an HF checkpoint against Megatron-LM's")
    check.add_argument("--hf", required=True)
    check.add_argument("--megatron", required=True)
    check.add_argument("--original", help="the HF checkpoint before training")
    opts = parser.parse_args(argv)
    if opts.command == "make-hf":
        from helpers import save_tiny_llama

        save_tiny_llama(opts.out, vocab_size=opts.vocab_size, qk_scale=10.0)
        print(f"wrote {opts.out}")
        return 0
    return compare(opts.hf, opts.megatron, opts.original)


if __name__ == "__main__":
    sys.exit(main())
