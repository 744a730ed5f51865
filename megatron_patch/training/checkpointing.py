"""Training checkpoints in the converter's Megatron layout, plus what exact resume needs.

Per (TP, PP) rank, data-parallel rank 0 writes ``iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt``
with the model, optimizer, LR schedule, every data-parallel rank's RNG states, the iteration
and the samples consumed (the data position), with ``--fp8-recipe delayed`` the FP8 amax histories
and scales; the distributed optimizer's sharded state goes to ``distrib_optim.pt`` beside it.
Saves are atomic: everything is written under
``iter_XXXXXXX.tmp``, renamed when every rank is done, and only then does
``latest_checkpointed_iteration.txt`` move, so a crash mid-save never damages the last good
checkpoint. Model weights load at any TP/PP through the converter's mapping engine.
"""
from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from megatron_patch import compat
from megatron_patch.convert import megatron_io as mio
from megatron_patch.convert.checkpoint_args import Vocabulary
from megatron_patch.convert.engine import TOKENIZER_DIR, open_megatron
from megatron_patch.convert.hf_io import copy_side_files
from megatron_patch.convert.model_io import load_model_weights

OPTIM_FILE = "distrib_optim.pt"


def _ranks():
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_data_parallel_rank(), ps.get_pipeline_model_parallel_world_size())


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"random": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if compat.on_gpu():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if compat.on_gpu() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _gather_rng_over_dp() -> list:
    from megatron.core import parallel_state as ps

    states = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(states, rng_state(), group=ps.get_data_parallel_group(
        with_context_parallel=False))
    return states


def _model_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def save_checkpoint(args, iteration: int, model, optimizer, scheduler, plan, progress: dict):
    """Write checkpoint ``iteration`` under ``args.save`` (collective: every rank calls it)."""
    tp_rank, pp_rank, dp_rank, pp = _ranks()
    final = os.path.join(args.save, mio.iteration_dir_name(iteration))
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    rngs = _gather_rng_over_dp()
    optimizer_state = optimizer.state_dict()
    scaling = getattr(model, "fp8_scaling", None)  # --fp8-recipe delayed: the same on all DP
    if scaling is not None:
        progress = dict(progress, fp8_scaling=scaling.state_dict())
    if dp_rank == 0:
        mio.save_rank_file(tmp, tp_rank, pp_rank, pp, {
            "model": _model_state(model), "optimizer": optimizer_state,
            "opt_param_scheduler": scheduler.state_dict(), "rng_state": rngs,
            "iteration": iteration, "checkpoint_version": mio.CHECKPOINT_VERSION,
            "args": mio.megatron_lm_args(plan.meta), "megatron_patch": plan.meta, **progress})
    if args.use_distributed_optimizer:
        optimizer.save_parameter_state(os.path.join(
            tmp, mio.rank_dir_name(tp_rank, pp_rank, pp), OPTIM_FILE))
    dist.barrier()
    if dist.get_rank() == 0:
        _publish(args.save, tmp, final, iteration, plan)
    dist.barrier()


def _publish(root: str, tmp: str, final: str, iteration: int, plan) -> None:
    """Rename the finished checkpoint into place, then move the tracker."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    tokenizer_dir = os.path.join(root, TOKENIZER_DIR)
    if plan.tokenizer_dir and not os.path.isdir(tokenizer_dir):
        if os.path.isdir(plan.tokenizer_dir):
            copy_side_files(plan.tokenizer_dir, tokenizer_dir)
        else:  # a SentencePiece model file
            os.makedirs(tokenizer_dir)
            shutil.copy(plan.tokenizer_dir, tokenizer_dir)
    mio.write_metadata(root, plan.meta)
    mio.write_tracker(root, iteration)


def load_weights(args, model, keep: tuple = ()) -> dict:
    """Copy this rank's weights from ``args.load`` (any TP/PP, either format) into the bare
    GPTModel; ``keep``: parameters left as initialised (the checkpoint's are not read).
    Returns the checkpoint's metadata."""
    from megatron.core import parallel_state as ps

    root, iter_dir = mio.resolve_checkpoint(args.load)
    if mio.is_torch_dist(iter_dir):
        if keep:
            raise ValueError(f"--load {args.load}: a torch_dist checkpoint cannot start a "
                             f"model with new parameters ({', '.join(keep)}); convert it to "
                             f"the torch format first")
        return _load_torch_dist_weights(model, root, iter_dir)
    # A checkpoint Megatron-LM saved has no metadata: its args give the shape, the command
    # line the family and the vocabulary (NullTokenizer's --vocab-size N: N + 1 tokens).
    size = None if args.vocab_size is None else \
        args.vocab_size + (args.tokenizer_type == "NullTokenizer")
    bundle = open_megatron(args.load, args.model_family, Vocabulary(size, args.tokenizer_model))
    return load_model_weights(model, args.load, ps.get_tensor_model_parallel_rank(),
                              args.tensor_model_parallel_size,
                              ps.get_pipeline_model_parallel_rank(),
                              args.pipeline_model_parallel_size, bundle, keep)


def _load_torch_dist_weights(model, root: str, iter_dir: str) -> dict:
    """megatron-core reshards a torch_dist checkpoint onto this rank's layout itself."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, iter_dir)
    model.load_state_dict(loaded["model"], strict=False)
    return mio.read_metadata(root)


def resume_state(args):
    """The payload of this rank's file in the --load checkpoint, or None when it only gives
    weights (a converted "release" checkpoint, or --finetune)."""
    root, iter_dir = mio.resolve_checkpoint(args.load)
    if os.path.basename(iter_dir) == "release" or args.finetune:
        return None
    if mio.is_torch_dist(iter_dir):
        raise ValueError(f"--load {args.load}: resuming from a torch_dist checkpoint is not "
                         f"supported; use --finetune to start from its weights")
    tp_rank, pp_rank, _, pp = _ranks()
    path = os.path.join(iter_dir, mio.rank_dir_name(tp_rank, pp_rank, pp), mio.MODEL_FILE)
    if _saved_by_megatron_lm(iter_dir):
        raise ValueError(f"--load {args.load}: {os.path.basename(iter_dir)} was saved by "
                         f"Megatron-LM, whose optimizer and RNG states this trainer does not "
                         f"resume; pass --finetune to start from its weights")
    meta = mio.read_metadata(root) or {}
    layout = (meta.get("tensor_model_parallel_size"), meta.get("pipeline_model_parallel_size"))
    if layout != (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) \
            or not os.path.isfile(path):
        raise ValueError(f"--load {args.load} was saved at TP={layout[0]} PP={layout[1]}; "
                         f"resuming its optimizer needs the same layout. Pass --finetune (with "
                         f"--no-load-optim) to start from its weights at a new layout")
    return torch.load(path, map_location="cpu", weights_only=False)


def _saved_by_megatron_lm(iter_dir: str) -> bool:
    """Its rank files lack megatron_patch's entry: Megatron-LM's own save."""
    ranks = sorted(name for name in os.listdir(iter_dir) if name.startswith("mp_rank_"))
    path = os.path.join(iter_dir, ranks[0], mio.MODEL_FILE) if ranks else ""
    return os.path.isfile(path) and "megatron_patch" not in torch.load(
        path, map_location="meta", weights_only=False)


@torch.no_grad()
def load_resume_weights(args, model, payload) -> None:
    """This rank's weights from its resume payload (:func:`resume_state` checked the layout):
    the saved tensors themselves, padded vocabulary rows included."""
    try:
        missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    except RuntimeError as err:  # a shape that differs from the model built by the flags
        raise ValueError(f"--load {args.load}: {err}") from err
    missing = [key for key in missing if not key.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"--load {args.load}: this rank's file does not match the model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    scaling = getattr(model, "fp8_scaling", None)
    if scaling is not None and payload.get("fp8_scaling") and not args.no_load_optim:
        scaling.load_state_dict(payload["fp8_scaling"], f"--load {args.load}")
    elif scaling is not None and dist.get_rank() == 0:
        print(f"[megatron_patch] --fp8-recipe delayed: the amax histories start empty (--load "
              f"{args.load} has none{', --no-load-optim' if args.no_load_optim else ''}); the "
              f"first iteration scales each tensor by its current amax", flush=True)


@torch.no_grad()  # fp32 main params of the distributed optimizer are views of the weights
def _load_optimizer(args, payload, optimizer) -> None:
    optimizer.load_state_dict(payload["optimizer"])
    if args.use_distributed_optimizer:
        _, iter_dir = mio.resolve_checkpoint(args.load)
        tp_rank, pp_rank, _, pp = _ranks()
        optimizer.load_parameter_state(os.path.join(
            iter_dir, mio.rank_dir_name(tp_rank, pp_rank, pp), OPTIM_FILE))


def restore_training_state(args, payload, optimizer, scheduler) -> dict:
    """Optimizer, schedule, RNG and data position from a resume payload."""
    from megatron.core import parallel_state as ps

    if not args.no_load_optim:
        _load_optimizer(args, payload, optimizer)
        scheduler.load_state_dict(payload["opt_param_scheduler"])
    rngs = payload.get("rng_state") or []
    if not args.no_load_rng and len(rngs) == ps.get_data_parallel_world_size():
        set_rng_state(rngs[ps.get_data_parallel_rank()])
    return {"iteration": payload["iteration"],
            "consumed_train_samples": payload.get("consumed_train_samples", 0)}
