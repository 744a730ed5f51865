"""FP8 training of the linear layers without Transformer Engine: ``torch._scaled_mm`` (cuBLASLt's
FP8 GEMM on Hopper; a reference implementation on CPU) with per-tensor scaling, Megatron-LM's
``--fp8-recipe tensorwise`` (current scaling) or ``delayed`` (scales from an amax history).

Every GEMM of a linear layer takes FP8 operands and accumulates in fp32:

* forward ``y = x W^T``: x and W in E4M3;
* backward ``dx = dy W`` and ``dW = dy^T x``: dy in E4M3 (``--fp8-format e4m3``) or E5M2
  (``hybrid``: the wider range for gradients), x and W as saved from the forward (E4M3).

Each tensor is cast with its own scale, ``scale = fp8_max / amax / 2**margin``, values saturated
to the format's largest finite value. ``tensorwise`` takes amax from the tensor itself at that
moment: no state. ``delayed`` (:class:`DelayedScaling`, Transformer Engine's recipe) takes it from
a history of ``--fp8-amax-history-len`` iterations per linear layer and tensor (input, weight,
output gradient), ``most_recent`` or ``max`` of it (``--fp8-amax-compute-algo``): during an
iteration every micro-batch records its amax; at the iteration's end the amaxes are reduced
(max) over the tensor- and data-parallel ranks, pushed into the history and the scales
recomputed, so the scales are the same on every rank of a stage and at every TP/DP layout. A
tensor with no history yet (the first iteration) is scaled by its current amax, where
Transformer Engine would use 1. The history and scales go into the checkpoint, so resume is
exact. The saved activation is
the FP8 copy (1 byte per element instead of 2). Tensor-parallel layers keep megatron-core's
communication: the dgrad all-reduce of a column-parallel layer, and sequence parallelism's input
all-gather and dgrad reduce-scatter.

:func:`use_fp8_linears` installs it in the transformer layers of a megatron-core model (the
embedding and output layer stay in bf16, as Megatron-LM with Transformer Engine keeps them).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from megatron_patch.kernels import tp_linear

FP8_MAX = {torch.float8_e4m3fn: torch.finfo(torch.float8_e4m3fn).max,  # 448
           torch.float8_e5m2: torch.finfo(torch.float8_e5m2).max}  # 57344
FORMATS = ("e4m3", "hybrid")
ALIGNMENT = 16  # cuBLASLt's FP8 GEMM: every dimension a multiple of 16


RECIPES = ("tensorwise", "delayed")
AMAX_ALGOS = ("most_recent", "max")
X, W, DY = 0, 1, 2  # a linear layer's three cast tensors, in DelayedScaling's last dimension


@dataclass(frozen=True)
class Fp8Recipe:
    """Megatron-LM's --fp8-format, --fp8-recipe, --fp8-margin, --fp8-amax-history-len and
    --fp8-amax-compute-algo (the last two for the delayed recipe)."""

    format: str = "hybrid"
    margin: int = 0
    recipe: str = "tensorwise"
    amax_history_len: int = 1
    amax_compute_algo: str = "most_recent"

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"--fp8-format {self.format}: expected one of {', '.join(FORMATS)}")
        if self.recipe not in RECIPES:
            raise ValueError(f"--fp8-recipe {self.recipe}: expected one of {', '.join(RECIPES)}")
        if self.amax_compute_algo not in AMAX_ALGOS:
            raise ValueError(f"--fp8-amax-compute-algo {self.amax_compute_algo}: expected one "
                             f"of {', '.join(AMAX_ALGOS)}")
        if self.amax_history_len < 1:
            raise ValueError(f"--fp8-amax-history-len {self.amax_history_len}: must be >= 1")

    @property
    def forward_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn

    @property
    def backward_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.format == "e4m3" else torch.float8_e5m2


def quantize(tensor: torch.Tensor, dtype: torch.dtype, margin: int = 0):
    """(FP8 tensor, inverse scale): ``tensor * scale`` saturated to ``dtype``, where
    ``scale = fp8_max / amax(tensor) / 2**margin`` (1 for an all-zero tensor), in fp32."""
    amax = tensor.detach().abs().amax().float()
    return _cast_at(tensor, dtype, _current_scale(amax, dtype, margin))


def _current_scale(amax, dtype: torch.dtype, margin: int):
    """``fp8_max / amax / 2**margin``; 1 for an all-zero tensor."""
    return torch.where(amax > 0, FP8_MAX[dtype] / (amax * 2.0 ** margin), torch.ones_like(amax))


def _cast_at(tensor, dtype: torch.dtype, scale):
    """(FP8 tensor, inverse scale): ``tensor * scale`` saturated to ``dtype``."""
    fp8_max = FP8_MAX[dtype]
    scaled = (tensor.float() * scale).clamp(-fp8_max, fp8_max)
    return scaled.to(dtype), scale.reciprocal()


class DelayedScaling:
    """The delayed recipe's state for ``count`` linear layers: per layer and tensor (X, W, DY)
    an amax history (newest first), the scale the casts use (0: no history yet, scale by the
    current amax) and the running amax of the iteration under way."""

    def __init__(self, recipe: Fp8Recipe, count: int, device=None):
        self.recipe = recipe
        self.history = torch.zeros(count, recipe.amax_history_len, 3, device=device)
        self.scale = torch.zeros(count, 3, device=device)
        self.amax = torch.zeros(count, 3, device=device)
        self.fp8_max = torch.tensor([FP8_MAX[recipe.forward_dtype]] * 2
                                    + [FP8_MAX[recipe.backward_dtype]], device=device)

    def slot(self, index: int) -> "_Slot":
        return _Slot(self, index)

    @torch.no_grad()
    def update(self, group=None) -> None:
        """End of an iteration: reduce the amaxes (max) over ``group``, push them into the
        history, recompute the scales, start the next iteration's amaxes at 0."""
        import torch.distributed as dist

        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(self.amax, op=dist.ReduceOp.MAX, group=group)
        self.history.copy_(self.history.roll(1, dims=1))
        # an overflowed fp16 step's inf/nan gradients: no information, like an unused tensor
        self.history[:, 0] = torch.where(torch.isfinite(self.amax), self.amax, 0.0)
        reference = (self.history.amax(dim=1) if self.recipe.amax_compute_algo == "max"
                     else self.history[:, 0])
        scale = self.fp8_max / (reference * 2.0 ** self.recipe.margin)
        self.scale.copy_(torch.where((reference > 0) & torch.isfinite(scale), scale, self.scale))
        self.amax.zero_()

    def state_dict(self) -> dict:
        return {"amax_history": self.history.cpu(), "scale": self.scale.cpu()}

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        history = state["amax_history"]
        if history.shape != self.history.shape:
            raise ValueError(
                f"{source} holds FP8 amax histories of shape {tuple(history.shape)} (linear "
                f"layers, --fp8-amax-history-len, tensors); this run has "
                f"{tuple(self.history.shape)}: resume with the --fp8-amax-history-len it was "
                f"trained with, or pass --no-load-optim to start new histories")
        self.history.copy_(history)
        self.scale.copy_(state["scale"])


class _Slot:
    """One linear layer's row of a DelayedScaling."""

    def __init__(self, scaling: DelayedScaling, index: int):
        self.scaling, self.index = scaling, index

    def cast(self, tensor: torch.Tensor, which: int, dtype: torch.dtype, record: bool):
        """(FP8 tensor, inverse scale) with the delayed scale; records the amax if ``record``."""
        amax = tensor.detach().abs().amax().float()
        if record:
            running = self.scaling.amax[self.index, which]
            running.copy_(torch.maximum(running, amax))
        delayed = self.scaling.scale[self.index, which]
        current = _current_scale(amax, dtype, self.scaling.recipe.margin)
        return _cast_at(tensor, dtype, torch.where(delayed > 0, delayed, current))


def _cast(slot, tensor, which, dtype, margin, record):
    if slot is None:
        return quantize(tensor, dtype, margin)
    return slot.cast(tensor, which, dtype, record)


def _column_major(fp8: torch.Tensor) -> torch.Tensor:
    return fp8.t().contiguous().t()


def _check_aligned(rows: int, name: str) -> None:
    if rows % ALIGNMENT:
        raise ValueError(
            f"FP8 GEMMs need every dimension to be a multiple of {ALIGNMENT}; {name} has "
            f"{rows} rows (tokens per micro-batch = --micro-batch-size x --seq-length): "
            f"choose sizes whose product is a multiple of {ALIGNMENT}, or train without "
            f"--fp8-format")


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, recipe, slot, accumulate_into_main_grad,
                allreduce_dgrad, sequence_parallel, tp_group):
        total = tp_linear.gather_input(input, sequence_parallel, tp_group)
        rows = total.shape[:-1]
        flat = total.reshape(-1, total.shape[-1])
        _check_aligned(flat.shape[0], "the input of a linear layer")
        training = any(ctx.needs_input_grad)  # evaluation does not move the amax history
        x_fp8, x_inv = _cast(slot, flat, X, recipe.forward_dtype, recipe.margin, training)
        w_fp8, w_inv = _cast(slot, weight, W, recipe.forward_dtype, recipe.margin, training)
        out = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_inv, scale_b=w_inv,
                               out_dtype=input.dtype)
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(x_fp8, x_inv, w_fp8, w_inv)
        ctx.weight = weight if accumulate_into_main_grad else None
        ctx.recipe, ctx.slot, ctx.has_bias = recipe, slot, bias is not None
        ctx.dtype, ctx.weight_dtype = input.dtype, weight.dtype
        ctx.accumulate, ctx.allreduce_dgrad = accumulate_into_main_grad, allreduce_dgrad
        ctx.sequence_parallel, ctx.tp_group = sequence_parallel, tp_group
        return out.reshape(*rows, out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        x_fp8, x_inv, w_fp8, w_inv = ctx.saved_tensors
        recipe = ctx.recipe
        rows = grad_output.shape[:-1]
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        g_fp8, g_inv = _cast(ctx.slot, grad, DY, recipe.backward_dtype, recipe.margin, True)
        grad_input = torch._scaled_mm(g_fp8, _column_major(w_fp8), scale_a=g_inv,
                                      scale_b=w_inv, out_dtype=ctx.dtype)
        grad_input = tp_linear.reduce_input_grad(grad_input.reshape(*rows, grad_input.shape[-1]),
                                                 ctx.allreduce_dgrad, ctx.sequence_parallel,
                                                 ctx.tp_group)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch._scaled_mm(
                g_fp8.t().contiguous(), _column_major(x_fp8), scale_a=g_inv, scale_b=x_inv,
                out_dtype=torch.float32 if ctx.accumulate else ctx.weight_dtype)
        if ctx.accumulate:  # megatron-core's gradient-accumulation fusion contract
            weight = ctx.weight
            weight.main_grad.add_(grad_weight)
            weight.grad_added_to_main_grad = True
            grad_weight = torch.empty(weight.main_grad.shape, dtype=weight.dtype,
                                      device=grad_output.device, requires_grad=False)
        grad_bias = grad.sum(dim=0) if ctx.has_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def fp8_linear(recipe: Fp8Recipe, input, weight, bias, gradient_accumulation_fusion,
               allreduce_dgrad, sequence_parallel, grad_output_buffer=None,
               wgrad_deferral_limit=None, async_grad_allreduce=None, tp_group=None, slot=None):
    """megatron-core's ``linear_with_grad_accumulation_and_async_allreduce`` with FP8 GEMMs
    (the same arguments; deferred embedding wgrad does not apply to these layers); ``slot``:
    the layer's row of a :class:`DelayedScaling`, None for the tensorwise recipe."""
    if grad_output_buffer is not None:
        raise ValueError("FP8 linear layers do not defer their weight gradient")
    tp_group = tp_linear.tp_group_for(tp_group, allreduce_dgrad, sequence_parallel)
    accumulate = bool(gradient_accumulation_fusion and weight.requires_grad
                      and hasattr(weight, "main_grad"))
    return _Fp8Linear.apply(input, weight, bias, recipe, slot, accumulate, allreduce_dgrad,
                            sequence_parallel, tp_group)


def use_fp8_linears(model, recipe: Fp8Recipe) -> int:
    """Route every column/row-parallel linear layer of ``model.decoder`` through
    :func:`fp8_linear`; returns how many. The weights' dimensions must be multiples of 16.
    The delayed recipe's state is ``model.fp8_scaling`` (a :class:`DelayedScaling`)."""
    linears = tp_linear.decoder_linears(model)
    scaling = None
    if recipe.recipe == "delayed":
        device = linears[0][1].weight.device if linears else None
        scaling = model.fp8_scaling = DelayedScaling(recipe, len(linears), device)
    for index, (name, module) in enumerate(linears):
        rows, columns = module.weight.shape
        if rows % ALIGNMENT or columns % ALIGNMENT:
            raise ValueError(
                f"--fp8-format: decoder.{name} has a {rows} x {columns} weight on this "
                f"rank; FP8 GEMMs need both dimensions to be multiples of {ALIGNMENT}")
        module._forward_impl = functools.partial(
            fp8_linear, recipe, slot=None if scaling is None else scaling.slot(index))
    return len(linears)


def model_scalings(chunks) -> list:
    """The DelayedScaling of each model chunk (DDP-wrapped or not) that has one."""
    found = []
    for chunk in chunks:
        while not hasattr(chunk, "fp8_scaling") and hasattr(chunk, "module"):
            chunk = chunk.module  # DDP, Float16Module
        if getattr(chunk, "fp8_scaling", None) is not None:
            found.append(chunk.fp8_scaling)
    return found


def end_iteration(chunks) -> None:
    """After an iteration's optimizer step: update every chunk's delayed scaling, its amaxes
    reduced over the tensor- and data-parallel (and context-parallel) ranks."""
    scalings = model_scalings(chunks)
    if scalings:
        from megatron.core import parallel_state as ps

        group = ps.get_amax_reduction_group(with_context_parallel=True)
        for scaling in scalings:
            scaling.update(group)
