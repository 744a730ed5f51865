"""Gradient-accumulation fusion without apex: the weight gradient GEMM accumulates straight
into the fp32 ``main_grad`` buffer of megatron-core's DDP, as apex's
``fused_weight_gradient_mlp_cuda`` does for Megatron-LM (its default; off with
``--no-gradient-accumulation-fusion``).

Unfused, each linear layer's backward writes a bf16 weight gradient that the DDP hook then adds
to ``main_grad`` (one more read and write of every gradient per micro-batch). Fused, cuBLAS
adds ``grad_output^T @ input`` to ``main_grad`` in its epilogue (``torch.addmm`` with
``out_dtype`` fp32 on CUDA), so the product is also never rounded to bf16 first.

compat.enable_gradient_accumulation_fusion installs this module where megatron-core looks for
apex's. Under ``--compile-layers`` megatron-core's linear backward cannot serve: it writes
attributes (``weight.main_grad``, ``grad_added_to_main_grad``), which breaks the compiled graph
at every linear (measured slower on an H200). There :func:`use_compiled_wgrad_fusion` gives the
transformer layers' linears :func:`wgrad_fused_linear` instead: the accumulation is a
``torch.library`` custom op that declares the buffer it mutates (one opaque call in the
compiled backward), and the weight gets no ``.grad`` at all, so the DDP hook that would add it
never runs. That needs the hooks for nothing else: not with ``--overlap-grad-reduce`` (its
buckets count them).
"""
from __future__ import annotations

import torch

from megatron_patch.kernels import tp_linear


def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad) -> None:
    """apex's ``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32``: ``main_grad +=
    grad_output^T @ total_input`` (2-D [tokens, out] and [tokens, in])."""
    wgrad_accumulate(main_grad, total_input, grad_output)


@torch.library.custom_op("megatron_patch::wgrad_accumulate", mutates_args=("main_grad",))
def wgrad_accumulate(main_grad: torch.Tensor, total_input: torch.Tensor,
                     grad_output: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input``, in main_grad's precision."""
    a, b = grad_output.t(), total_input
    if a.dtype == main_grad.dtype:
        main_grad.addmm_(a, b)
    elif main_grad.is_cuda:  # bf16/fp16 operands, fp32 accumulation in the GEMM's epilogue
        torch.addmm(main_grad, a, b, out_dtype=main_grad.dtype, out=main_grad)
    else:  # the CPU has no mixed-dtype addmm: the same product in the buffer's precision
        main_grad.addmm_(a.to(main_grad.dtype), b.to(main_grad.dtype))


@wgrad_accumulate.register_fake
def _(main_grad, total_input, grad_output):
    return None


# apex's bf16/fp16-buffer variant: the same contract.
wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


class _WgradFusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, main_grad, allreduce_dgrad, sequence_parallel,
                tp_group):
        total = tp_linear.gather_input(input, sequence_parallel, tp_group)
        out = torch.matmul(total, weight.t())
        if bias is not None:
            out = out + bias
        # Not a saved tensor: main_grad is a view of DDP's one buffer, which every layer's
        # accumulation bumps the version of (saved, autograd would refuse it as modified).
        ctx.save_for_backward(total, weight)
        ctx.main_grad = main_grad
        ctx.has_bias, ctx.allreduce_dgrad = bias is not None, allreduce_dgrad
        ctx.sequence_parallel, ctx.tp_group = sequence_parallel, tp_group
        return out

    @staticmethod
    def backward(ctx, grad_output):
        total, weight = ctx.saved_tensors
        main_grad = ctx.main_grad
        grad_input = tp_linear.reduce_input_grad(grad_output.matmul(weight), ctx.allreduce_dgrad,
                                                 ctx.sequence_parallel, ctx.tp_group)
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        wgrad_accumulate(main_grad, total.reshape(-1, total.shape[-1]), grad)
        grad_bias = grad.sum(dim=0) if ctx.has_bias else None
        return grad_input, None, grad_bias, None, None, None, None


def wgrad_fused_linear(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                       sequence_parallel, grad_output_buffer=None, wgrad_deferral_limit=None,
                       async_grad_allreduce=None, tp_group=None):
    """megatron-core's ``linear_with_grad_accumulation_and_async_allreduce`` for a weight with
    a DDP ``main_grad``: the weight gradient goes into main_grad (no ``weight.grad``)."""
    tp_group = tp_linear.tp_group_for(tp_group, allreduce_dgrad, sequence_parallel)
    return _WgradFusedLinear.apply(input, weight, bias, weight.main_grad, allreduce_dgrad,
                                   sequence_parallel, tp_group)


def use_compiled_wgrad_fusion(model) -> int:
    """Give the column/row-parallel linears of ``model.decoder`` whose weight has a DDP
    ``main_grad`` :func:`wgrad_fused_linear`; returns how many."""
    count = 0
    for _, module in tp_linear.decoder_linears(model):
        if module.weight.requires_grad and hasattr(module.weight, "main_grad"):
            module._forward_impl = wgrad_fused_linear
            count += 1
    return count
