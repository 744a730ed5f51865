"""Gradient-accumulation fusion without apex: the weight gradient GEMM accumulates straight
into the fp32 ``main_grad`` buffer of megatron-core's DDP, as apex's
``fused_weight_gradient_mlp_cuda`` does for Megatron-LM (its default; off with
``--no-gradient-accumulation-fusion``).

Unfused, each linear layer's backward writes a bf16 weight gradient that the DDP hook then adds
to ``main_grad`` (one more read and write of every gradient per micro-batch). Fused, cuBLAS
adds ``grad_output^T @ input`` to ``main_grad`` in its epilogue (``torch.addmm`` with
``out_dtype`` fp32 on CUDA), so the product is also never rounded to bf16 first.

compat.enable_gradient_accumulation_fusion installs this module where megatron-core looks for
apex's. It stays off with ``--compile-layers``: megatron-core's linear backward writes
attributes (``weight.main_grad``, ``grad_added_to_main_grad``), which breaks the compiled graph
at every linear (measured slower on an H200).
"""
from __future__ import annotations

import torch


def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad) -> None:
    """apex's ``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32``: ``main_grad +=
    grad_output^T @ total_input`` (2-D [tokens, out] and [tokens, in])."""
    a, b = grad_output.t(), total_input
    if a.dtype == main_grad.dtype:
        main_grad.addmm_(a, b)
    elif main_grad.is_cuda:  # bf16/fp16 operands, fp32 accumulation in the GEMM's epilogue
        torch.addmm(main_grad, a, b, out_dtype=main_grad.dtype, out=main_grad)
    else:  # the CPU has no mixed-dtype addmm: the same product in the buffer's precision
        main_grad.addmm_(a.to(main_grad.dtype), b.to(main_grad.dtype))


# apex's bf16/fp16-buffer variant: the same contract.
wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32
