"""One training run, shared by ``python -m megatron_patch.pretrain`` and ``finetune``: set up
parallelism, plan and build the model, load, train, save. The two entry points differ only in
their data (``data_provider``)."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from megatron_patch import compat
from megatron_patch.training import arguments, checkpointing, model_setup, replicated_kv
from megatron_patch.training.loop import LanguageModelObjective, configure_model, run_training
from megatron_patch.training.metrics import TrainingLogger, prepare_metrics_file


def _banner(args, plan, rank: int) -> None:
    if rank != 0:
        return
    m = plan.model_args
    params = 12 * m.num_layers * m.hidden_size ** 2  # rough, for the banner only
    print(f"[megatron_patch] {plan.family.name}: {m.num_layers} layers, hidden {m.hidden_size}, "
          f"heads {m.num_attention_heads}/{m.num_query_groups}, vocab {m.vocab_size} (padded "
          f"{plan.padded_vocab_size}), ~{params / 1e6:.1f}M block params | world "
          f"{dist.get_world_size()} = TP {args.tensor_model_parallel_size} x PP "
          f"{args.pipeline_model_parallel_size} x DP {args.data_parallel_size} | "
          f"{args.precision} | micro-batch {args.micro_batch_size}, global batch "
          f"{args.global_batch_size} ({args.num_microbatches} micro-batches), seq "
          f"{args.seq_length} | {'GPU' if compat.on_gpu() else 'CPU (gloo)'}", flush=True)
    for note in args.compat_notes:
        print(f"[megatron_patch] {note}", flush=True)
    found = [name for name, ok in compat.optional_accelerators().items() if ok]
    print(f"[megatron_patch] optional accelerators found: {', '.join(found) or 'none'} "
          f"(none is required)", flush=True)


def _check_save_dir(save: str | None) -> None:
    """Before any work: a --save that cannot be written would fail at the first checkpoint."""
    if not save:
        return
    try:
        os.makedirs(save, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--save {save}: cannot create it ({err.strerror or err})") from err
    if not os.access(save, os.W_OK):
        raise ValueError(f"--save {save}: not writable")


def _fresh_start(args, rank: int) -> None:
    """Megatron-LM's resume idiom, ``--save X --load X``: while X holds no checkpoint yet the
    run starts from scratch (--exit-on-missing-checkpoint makes that an error). A --load
    elsewhere that does not exist stays an error: it is more likely a typo."""
    from megatron_patch.convert.megatron_io import TRACKER

    if not args.load or os.path.isfile(os.path.join(args.load, TRACKER)):
        return
    same = args.save and os.path.abspath(args.load) == os.path.abspath(args.save)
    if same:  # no tracker: nothing was ever saved there (an interrupted first save included)
        if args.exit_on_missing_checkpoint:
            raise ValueError(f"--load {args.load}: no checkpoint there "
                             f"(--exit-on-missing-checkpoint)")
        if rank == 0:
            print(f"[megatron_patch] --load {args.load} holds no checkpoint yet: starting from "
                  f"scratch (a relaunch resumes from it)", flush=True)
        args.load = None


def _starting_point(args, data) -> str:
    """How this run starts, said in its first line. An SFT run (``data.RESUMES_OWN_SAVE_ONLY``)
    from another run's trained checkpoint takes only its weights: a new schedule from iteration
    0, as the seed's launcher asks with --finetune; it resumes only from its own --save."""
    from megatron_patch.convert import megatron_io as mio
    from megatron_patch.convert.io_utils import CheckpointError

    if not args.load:
        return f"starting from random weights (--seed {args.seed})"
    try:
        _, iter_dir = mio.resolve_checkpoint(args.load)
    except CheckpointError as err:
        raise CheckpointError(f"--load: {err}") from err
    name = os.path.basename(iter_dir)
    if name == "release":
        return f"starting from the weights of {args.load} (a converted checkpoint)"
    iteration = int(name.rpartition("_")[2])
    own = args.save and os.path.abspath(args.load) == os.path.abspath(args.save)
    if getattr(data, "RESUMES_OWN_SAVE_ONLY", False) and not own and not args.finetune:
        args.finetune = True
        run = getattr(data, "RUN_NAME", "SFT")
        return (f"starting {run} from the weights of {args.load} (iteration {iteration} of "
                f"another run): a new schedule and optimizer from iteration 0 (an {run} run "
                f"resumes only from its own --save directory)")
    if args.finetune:
        return (f"starting from the weights of {args.load} (iteration {iteration}; --finetune: "
                f"a new schedule and optimizer from iteration 0)")
    return f"resuming {args.load} at iteration {iteration}"


def setup(args, data):
    """Parallel state, datasets, model, optimizer, and the loaded state. -> dict of pieces."""
    compat.initialize_parallel(args.tensor_model_parallel_size,
                               args.pipeline_model_parallel_size, args.seed,
                               timeout_minutes=args.distributed_timeout_minutes)
    arguments.finalize(args, dist.get_world_size())
    _fresh_start(args, dist.get_rank())
    start = _starting_point(args, data)
    if dist.get_rank() == 0:
        print(f"[megatron_patch] {start}", flush=True)
    _check_save_dir(args.save)
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

    init_num_microbatches_calculator(dist.get_rank(), None, args.global_batch_size,
                                     args.micro_batch_size, args.data_parallel_size)
    plan = model_setup.plan_model(args, getattr(data, "adjust_model", None))
    datasets = data.build_datasets(args, plan)  # may set --train-iters (epochs), seq length
    model_setup.check_sequence_length(args, plan.model_args)
    replicated_kv.check(args, plan.model_args)
    if args.train_iters is None:
        raise ValueError("give --train-iters or --train-tokens (or --epochs for finetune)")
    _banner(args, plan, dist.get_rank())
    chunks, model = model_setup.build_model(args, plan)
    # Resuming reads this rank's own file once, weights included; a converted checkpoint or
    # --finetune goes through the layout-independent loader.
    payload = checkpointing.resume_state(args) if args.load else None
    if payload is not None:
        checkpointing.load_resume_weights(args, model, payload)
    elif args.load:
        checkpointing.load_weights(args, model, keep=plan.fresh_params)
        if plan.fresh_params and dist.get_rank() == 0:
            print(f"[megatron_patch] --load {args.load} gives no {', '.join(plan.fresh_params)} "
                  f"(a language model's checkpoint: its output layer is not read); "
                  f"{'it starts' if len(plan.fresh_params) == 1 else 'they start'} from the "
                  f"init (normal, std --init-method-std)", flush=True)
    optimizer, scheduler = model_setup.build_optimizer(args, chunks)
    if dist.get_rank() == 0 and args.fp8_format:
        scaling = ("tensorwise scaling" if args.fp8_recipe == "tensorwise" else
                   f"delayed scaling, {args.fp8_amax_compute_algo} amax of the last "
                   f"{args.fp8_amax_history_len} iteration"
                   f"{'s' if args.fp8_amax_history_len > 1 else ''}")
        print(f"[megatron_patch] FP8 ({args.fp8_format}, {scaling}): "
              f"{args.fp8_linears} linear layers of the transformer layers on this rank's stage "
              f"run torch._scaled_mm; the embedding and output layer stay in {args.precision}",
              flush=True)
    if dist.get_rank() == 0 and args.compiled_wgrad_fusion:
        print(f"[megatron_patch] weight gradients accumulate into main_grad inside the GEMM "
              f"({args.compiled_wgrad_fusion} linears of the compiled layers)", flush=True)
    if dist.get_rank() == 0:
        print(f"[megatron_patch] optimizer step: "
              f"{', '.join(args.optimizer_kernels) or 'megatron-core fallbacks'}", flush=True)
    state = {"iteration": 0, "consumed_train_samples": 0}
    if payload is not None:
        state.update(checkpointing.restore_training_state(args, payload, optimizer, scheduler))
    config = configure_model(chunks, optimizer, args)
    replicated_kv.install(chunks, optimizer, plan.model_args.num_query_groups, config)
    parts = dict(plan=plan, chunks=chunks, model=model, optimizer=optimizer,
                 scheduler=scheduler, state=state, datasets=datasets)
    if hasattr(data, "before_training"):  # DPO: the reference's log-probabilities
        data.before_training(args, parts, resumed=payload is not None)
    return parts


def train(args, data) -> int:
    """Run training. ``data`` has ``build_datasets(args, plan)`` and
    ``make_iterators(args, datasets, consumed) -> (train_iter, make_valid_iter or None)``;
    optionally ``objective`` (loop.LanguageModelObjective's interface),
    ``adjust_model(model_args, meta) -> parameters to leave as initialised`` (a reward model's
    head on an SFT checkpoint) and ``before_training(args, parts, resumed)`` (DPO's reference
    pass)."""
    try:
        parts = setup(args, data)
    except (ValueError, FileNotFoundError) as err:
        if not dist.is_initialized() or dist.get_rank() == 0:  # every rank has the same error
            print(f"error: {err}", file=sys.stderr)
        return 2
    plan, state = parts["plan"], parts["state"]
    if state["iteration"] and dist.get_rank() == 0:
        done = state["iteration"] >= args.train_iters
        print(f"[megatron_patch] resumed from {args.load} at iteration {state['iteration']} "
              f"({state['consumed_train_samples']} samples consumed)"
              + (f": that is --train-iters {args.train_iters}, nothing is left to train"
                 if done else ""), flush=True)
    train_iter, make_valid_iter = data.make_iterators(args, parts["datasets"],
                                                      state["consumed_train_samples"])
    reporting = dist.get_rank() == dist.get_world_size() - 1
    if reporting and args.metrics_file:
        note = prepare_metrics_file(args.metrics_file, state["iteration"])
        if note:
            print(f"[megatron_patch] {note}", flush=True)
    objective = getattr(data, "objective", LanguageModelObjective)
    logger = TrainingLogger(args, plan.model_args, plan.padded_vocab_size,
                            dist.get_world_size(), reporting, objective)

    def save(iteration):
        checkpointing.save_checkpoint(args, iteration, parts["model"], parts["optimizer"],
                                      parts["scheduler"], plan,
                                      {"consumed_train_samples": state["consumed_train_samples"]})
        if dist.get_rank() == 0:
            print(f"[megatron_patch] saved checkpoint at iteration {iteration} to {args.save}",
                  flush=True)

    run_training(args, state, parts["chunks"], parts["optimizer"], parts["scheduler"],
                 train_iter, make_valid_iter, logger, save, objective)
    logger.close()
    compat.destroy_parallel()
    return 0


def main(prog: str, description: str, data, argv=None) -> int:
    """``data`` also adds its own flags (``data.add_arguments(parser)``)."""
    parser = arguments.build_parser(prog, description, data.add_arguments)
    args = parser.parse_args(argv)
    compat.exit_unless_supported()
    torch.backends.cuda.matmul.allow_tf32 = True
    return train(args, data)
