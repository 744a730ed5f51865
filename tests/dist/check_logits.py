"""Run under torchrun: load a converted Megatron checkpoint at --tp/--pp and compare its
logits with HF transformers' on the original HF checkpoint. Prints max_abs_diff per rank that
holds logits; exits 1 when it exceeds --tolerance. With --loss it compares the language-model
loss instead: megatron-core's vocab-parallel cross-entropy (labels given to the model) against
HF's own ``model(ids, labels=ids).loss``, printing loss_abs_diff. With --reference FILE (a
``torch.save``d {"ids", "logits"}: SwissArmyTransformer's, tests/sat_reference.py) the logits
are compared with those; a prefix-LM (GLM) model gets its mask and positions from
megatron_patch's own builder (layers/glm_positions.py). A reward model's scores at every
position are compared with HF's ``score`` over its ``*ForSequenceClassification`` trunk."""
import argparse
import sys

import torch
import torch.distributed as dist

from megatron_patch import compat


def megatron_logits(mg_path, tp, pp, ids, attention, labels=None):
    from megatron.core import parallel_state as ps

    from megatron_patch.convert.engine import open_megatron
    from megatron_patch.convert.model_io import load_model_weights, runtime_padded_vocab
    from megatron_patch.families.model import build_gpt_model, transformer_config

    bundle = open_megatron(mg_path)
    _, family, args, meta = bundle
    config = transformer_config(family, args, tensor_parallel=tp, pipeline_parallel=pp)
    stage, first, last = ps.get_pipeline_model_parallel_rank(), ps.is_pipeline_first_stage(), \
        ps.is_pipeline_last_stage()
    model = build_gpt_model(family, args, config, runtime_padded_vocab(meta, tp), first, last,
                            attention=attention)
    load_model_weights(model, mg_path, ps.get_tensor_model_parallel_rank(), tp, stage, pp, bundle)
    model.eval()
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    mask = None
    if args.prefix_lm_ids:
        from megatron_patch.layers.glm_positions import prefix_lm_inputs

        special = args.prefix_lm_ids
        mask, positions = prefix_lm_inputs(ids, special["sop"], (special["gmask"],
                                                                 special["mask"]),
                                           special["pad"],
                                           args.position_embedding_type == "rope_2d")
    with torch.no_grad():
        if not first:
            hidden = torch.empty(ids.shape[1], ids.shape[0], args.hidden_size)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(ids, positions, mask, labels=labels,
                    runtime_gather_output=None if labels is not None else True)
        if not last:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None, args
    if labels is not None or args.reward_head:  # a reward model's [b, s, 1] scores
        return out, args
    return out[..., : args.vocab_size], args


def compare(hf_dir, mg_path, tp, pp, attention="sdpa", loss=False, reference=None):
    """(line printed, max difference) on a rank that holds the output, else None. Needs
    compat.initialize_parallel(tp, pp) first."""
    if reference is not None:
        saved = torch.load(reference)
        out, _ = megatron_logits(mg_path, tp, pp, saved["ids"], attention)
        if out is None:
            return None
        valid = saved.get("valid", torch.ones(saved["ids"].shape, dtype=torch.bool))
        diff = (out - saved["logits"]).abs()[valid].max().item()
        return f"rank {dist.get_rank()} max_abs_diff={diff:.3e}", diff
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (2, 25 if loss else 24))
    inputs, labels = (ids[:, :-1], ids[:, 1:]) if loss else (ids, None)
    out, args = megatron_logits(mg_path, tp, pp, inputs, attention, labels)
    if out is None:
        return None
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if args.reward_head:  # every position's score: HF's score layer over its trunk's output
        hf = AutoModelForSequenceClassification.from_pretrained(hf_dir,
                                                                dtype=torch.float32).eval()
        with torch.no_grad():
            trunk = getattr(hf, hf.base_model_prefix)
            diff = (out - hf.score(trunk(ids).last_hidden_state)).abs().max().item()
        return f"rank {dist.get_rank()} max_abs_diff={diff:.3e}", diff
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        if loss:  # HF shifts the labels itself
            diff = abs(out.mean().item() - hf(ids, labels=ids).loss.item())
            return f"rank {dist.get_rank()} loss={out.mean().item():.6f} " \
                   f"loss_abs_diff={diff:.3e}", diff
        diff = (out - hf(ids).logits).abs().max().item()
        return f"rank {dist.get_rank()} max_abs_diff={diff:.3e}", diff


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf")
    parser.add_argument("--reference", help="saved {ids, logits} instead of an HF model")
    parser.add_argument("--mg", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--loss", action="store_true", help="compare the loss, not the logits")
    opts = parser.parse_args()
    compat.initialize_parallel(opts.tp, opts.pp)
    result = compare(opts.hf, opts.mg, opts.tp, opts.pp, opts.attention, opts.loss,
                     opts.reference)
    code = 0
    if result is not None:
        print(result[0], flush=True)
        code = int(result[1] > opts.tolerance)
    compat.destroy_parallel()
    sys.exit(code)


if __name__ == "__main__":
    main()
