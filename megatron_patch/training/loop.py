"""The training loop, made of megatron-core's parts: DDP, its optimizer, the pipeline schedules
(``get_forward_backward_func``: plain gradient accumulation, or 1F1B under pipeline
parallelism) and finalize_model_grads."""
from __future__ import annotations

import contextlib
import functools
import time

import torch
import torch.distributed as dist

from megatron_patch import compat
from megatron_patch.kernels import fp8
from megatron_patch.training.profiling import StepProfiler


def loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Sum of token losses, the number of learned tokens, and both for reporting. The schedule
    turns this into a per-micro-batch mean, or a global per-token mean with
    --calculate-per-token-loss."""
    losses = output.float().view(-1)
    mask = loss_mask.float().view(-1)
    total = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    return total, tokens, {"lm loss": torch.stack([total.detach(), mask.sum().detach()])}


def forward_step(data_iterator, model):
    """One micro-batch through this pipeline stage (megatron-core's forward_step_func)."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"])
    return output, functools.partial(loss_func, batch["loss_mask"])


class LanguageModelObjective:
    """What a training step computes: the language-model loss (pretrain, SFT). Other
    objectives (rlhf/reward.py) give their own ``forward_step`` whose loss function reports
    ``{name: [sum, count]}`` pairs, the first being the loss; ``rows_per_sample`` sequences make
    one sample (a preference pair is two) and set the micro-batch's tensor shape."""

    loss_name = "lm loss"
    rows_per_sample = 1
    forward_step = staticmethod(forward_step)


def configure_model(chunks, optimizer, args):
    """Hook megatron-core's gradient machinery into the model config, as Megatron-LM does
    (``train()`` in megatron/training/training.py): with --overlap-grad-reduce the schedule
    holds gradient reduction back until the last micro-batch and starts it per bucket; with
    --overlap-param-gather the next forward pass gathers the updated parameters."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(chunks[0])
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    config.timers = None
    if args.overlap_grad_reduce:
        config.no_sync_func = chunks[0].no_sync
        config.grad_sync_func = chunks[0].start_grad_sync
    if args.overlap_param_gather:
        config.param_sync_func = chunks[0].start_param_sync
    return config


class ParamGatherHooks:
    """--overlap-param-gather: the forward pre-hooks that gather updated parameters stay off
    until one step has succeeded, and every full view of the weights (evaluation, a save)
    first finishes the gather. Megatron-LM's enable/disable_forward_pre_hook dance."""

    def __init__(self, args, chunks):
        self.active = args.overlap_param_gather and args.use_distributed_optimizer
        self.chunks = chunks
        self.enabled = False
        self.config = chunks[0].config if self.active else None
        self.sync_func = self.config.param_sync_func if self.active else None
        if self.active:
            self._disable(param_sync=False)

    def _disable(self, param_sync=True):
        for chunk in self.chunks:
            chunk.disable_forward_pre_hook(param_sync=param_sync)
        self.config.param_sync_func = None
        self.enabled = False

    def _enable(self):
        for chunk in self.chunks:
            chunk.enable_forward_pre_hook()
        self.config.param_sync_func = self.sync_func
        self.enabled = True

    def after_step(self, skipped: bool) -> None:
        if self.active and not self.enabled and not skipped:
            self._enable()

    @contextlib.contextmanager
    def synced(self):
        """Parameters fully gathered inside (evaluation, checkpoint save)."""
        was_enabled = self.enabled
        if was_enabled:
            self._disable()
        try:
            yield
        finally:
            if was_enabled:
                self._enable()

    def close(self) -> None:
        if self.enabled:
            self._disable()


def reduce_stats(outputs: list[dict]) -> dict:
    """``{name: sum / count}`` of the micro-batches' ``{name: [sum, count]}`` across
    data-parallel ranks (the loss weighted by its tokens or pairs, never by micro-batch)."""
    from megatron.core import parallel_state as ps

    if not outputs:
        return {}
    names = list(outputs[0])
    total = torch.stack([torch.stack([out[name] for name in names]) for out in outputs]).sum(0)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return {name: (total[i, 0] / total[i, 1].clamp(min=1)).item()
            for i, name in enumerate(names)}


def _forward_backward(args, chunks, data_iterator, objective, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=objective.forward_step, data_iterator=data_iterator, model=chunks,
        num_microbatches=args.num_microbatches, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size * objective.rows_per_sample,
        forward_only=forward_only)


def train_step(args, chunks, optimizer, scheduler, data_iterator,
               objective=LanguageModelObjective):
    """Forward/backward over all micro-batches, one optimizer step. -> (stats or None off the
    last stage, grad norm, skipped)."""
    from megatron.core import parallel_state as ps

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = _forward_backward(args, chunks, data_iterator, objective, forward_only=False)
    updated, grad_norm, _ = optimizer.step()
    fp8.end_iteration(chunks)  # --fp8-recipe delayed: the amax histories move on
    if updated:
        scheduler.step(increment=args.global_batch_size)
    stats = reduce_stats(outputs) if ps.is_pipeline_last_stage() else None
    return stats, grad_norm, not updated


@torch.no_grad()
def evaluate(args, chunks, make_iterator, objective=LanguageModelObjective) -> dict | None:
    """Validation stats over --eval-iters global batches (None off the last stage)."""
    from megatron.core import parallel_state as ps

    for chunk in chunks:
        chunk.eval()
    iterator, outputs = make_iterator(), []
    for _ in range(args.eval_iters):
        outputs += _forward_backward(args, chunks, iterator, objective, forward_only=True)
    for chunk in chunks:
        chunk.train()
    return reduce_stats(outputs) if ps.is_pipeline_last_stage() else None


def _synchronize():
    if compat.on_gpu():
        torch.cuda.synchronize()


def run_training(args, state, chunks, optimizer, scheduler, train_iter, make_valid_iter,
                 logger, save, objective=LanguageModelObjective):
    """Iterate until --train-iters (or --exit-interval); ``save(iteration, consumed)`` writes a
    checkpoint. ``state`` holds iteration and consumed_train_samples and is updated."""
    for chunk in chunks:
        chunk.train()
    hooks = ParamGatherHooks(args, chunks)
    profiler = StepProfiler(args)
    last_saved = state["iteration"]  # a resumed run's start is saved already
    started = time.time()
    while state["iteration"] < args.train_iters:
        start = time.time()
        iteration = state["iteration"] + 1
        profiler.before(iteration)
        stats, grad_norm, skipped = train_step(args, chunks, optimizer, scheduler, train_iter,
                                               objective)
        hooks.after_step(skipped)
        _synchronize()
        profiler.after(iteration)
        state["iteration"] = iteration
        state["consumed_train_samples"] += args.global_batch_size
        logger.record(iteration, time.time() - start, stats, reported_lr(optimizer), grad_norm,
                      optimizer.get_loss_scale().item(), skipped, state["consumed_train_samples"])
        if args.eval_iters and args.eval_interval and iteration % args.eval_interval == 0 \
                and make_valid_iter is not None:
            with hooks.synced():
                logger.record_validation(iteration, evaluate(args, chunks, make_valid_iter,
                                                             objective))
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            with hooks.synced():
                save(iteration)
            last_saved = iteration
        if args.exit_interval and iteration >= args.exit_interval or _out_of_time(args, started):
            break
    hooks.close()
    profiler.close()
    if args.save and last_saved != state["iteration"]:
        save(state["iteration"])


def reported_lr(optimizer) -> float:
    """The learning rate of the main parameter groups, as Megatron-LM logs it: not a
    --decoupled-lr group (the embedding and output layer), whose place in the list of groups
    is not fixed."""
    groups = [g for g in optimizer.param_groups if g["params"]]
    main = [g for g in groups if g.get("default_config", True)]  # megatron-core's marker
    return (main or groups)[0]["lr"]


def _out_of_time(args, started: float) -> bool:
    """--exit-duration-in-mins reached on any rank (all ranks agree, as in Megatron-LM)."""
    if not args.exit_duration_in_mins:
        return False
    elapsed = torch.tensor([(time.time() - started) / 60.0], device=compat.device())
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item() > args.exit_duration_in_mins
