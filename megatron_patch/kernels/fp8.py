"""FP8 training of the linear layers without Transformer Engine: ``torch._scaled_mm`` (cuBLASLt's
FP8 GEMM on Hopper; a reference implementation on CPU) with per-tensor current scaling, Megatron-LM's
``--fp8-recipe tensorwise``.

Every GEMM of a linear layer takes FP8 operands and accumulates in fp32:

* forward ``y = x W^T``: x and W in E4M3;
* backward ``dx = dy W`` and ``dW = dy^T x``: dy in E4M3 (``--fp8-format e4m3``) or E5M2
  (``hybrid``: the wider range for gradients), x and W as saved from the forward (E4M3).

Each tensor is cast with its own scale, computed from its absolute maximum at that moment
(``scale = fp8_max / amax / 2**margin``, values saturated to the format's largest finite
value): no amax history, so no state to checkpoint and resume is exact. The saved activation is
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


@dataclass(frozen=True)
class Fp8Recipe:
    """Megatron-LM's --fp8-format and --fp8-margin, for the tensorwise recipe."""

    format: str = "hybrid"
    margin: int = 0

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"--fp8-format {self.format}: expected one of {', '.join(FORMATS)}")

    @property
    def forward_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn

    @property
    def backward_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.format == "e4m3" else torch.float8_e5m2


def quantize(tensor: torch.Tensor, dtype: torch.dtype, margin: int = 0):
    """(FP8 tensor, inverse scale): ``tensor * scale`` saturated to ``dtype``, where
    ``scale = fp8_max / amax(tensor) / 2**margin`` (1 for an all-zero tensor), in fp32."""
    fp8_max = FP8_MAX[dtype]
    amax = tensor.detach().abs().amax().float()
    scale = torch.where(amax > 0, fp8_max / (amax * 2.0 ** margin), torch.ones_like(amax))
    scaled = (tensor.float() * scale).clamp(-fp8_max, fp8_max)
    return scaled.to(dtype), scale.reciprocal()


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
    def forward(ctx, input, weight, bias, recipe, accumulate_into_main_grad, allreduce_dgrad,
                sequence_parallel, tp_group):
        total = tp_linear.gather_input(input, sequence_parallel, tp_group)
        rows = total.shape[:-1]
        flat = total.reshape(-1, total.shape[-1])
        _check_aligned(flat.shape[0], "the input of a linear layer")
        x_fp8, x_inv = quantize(flat, recipe.forward_dtype, recipe.margin)
        w_fp8, w_inv = quantize(weight, recipe.forward_dtype, recipe.margin)
        out = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_inv, scale_b=w_inv,
                               out_dtype=input.dtype)
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(x_fp8, x_inv, w_fp8, w_inv)
        ctx.weight = weight if accumulate_into_main_grad else None
        ctx.recipe, ctx.has_bias = recipe, bias is not None
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
        g_fp8, g_inv = quantize(grad, recipe.backward_dtype, recipe.margin)
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
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def fp8_linear(recipe: Fp8Recipe, input, weight, bias, gradient_accumulation_fusion,
               allreduce_dgrad, sequence_parallel, grad_output_buffer=None,
               wgrad_deferral_limit=None, async_grad_allreduce=None, tp_group=None):
    """megatron-core's ``linear_with_grad_accumulation_and_async_allreduce`` with FP8 GEMMs
    (the same arguments; deferred embedding wgrad does not apply to these layers)."""
    if grad_output_buffer is not None:
        raise ValueError("FP8 linear layers do not defer their weight gradient")
    tp_group = tp_linear.tp_group_for(tp_group, allreduce_dgrad, sequence_parallel)
    accumulate = bool(gradient_accumulation_fusion and weight.requires_grad
                      and hasattr(weight, "main_grad"))
    return _Fp8Linear.apply(input, weight, bias, recipe, accumulate, allreduce_dgrad,
                            sequence_parallel, tp_group)


def use_fp8_linears(model, recipe: Fp8Recipe) -> int:
    """Route every column/row-parallel linear layer of ``model.decoder`` through
    :func:`fp8_linear`; returns how many. The weights' dimensions must be multiples of 16."""
    linears = tp_linear.decoder_linears(model)
    for name, module in linears:
        rows, columns = module.weight.shape
        if rows % ALIGNMENT or columns % ALIGNMENT:
            raise ValueError(
                f"--fp8-format: decoder.{name} has a {rows} x {columns} weight on this "
                f"rank; FP8 GEMMs need both dimensions to be multiples of {ALIGNMENT}")
        module._forward_impl = functools.partial(fp8_linear, recipe)
    return len(linears)
