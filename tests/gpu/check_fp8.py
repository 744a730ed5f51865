"""On a GPU: kernels/fp8.py's cuBLASLt FP8 GEMMs against the dequantised operands multiplied in
float64 (the CPU test's reference), at a linear layer's shape; prints the relative errors."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from test_fp8 import E4M3, E5M2, reference_cast  # noqa: E402

from megatron_patch.kernels import fp8  # noqa: E402


def main():
    torch.manual_seed(0)
    for fmt in ("e4m3", "hybrid"):
        x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(5632, 2048, device="cuda") * 0.02).bfloat16().requires_grad_()
        dy = torch.randn(4096, 5632, device="cuda", dtype=torch.bfloat16)
        out = fp8.fp8_linear(fp8.Fp8Recipe(fmt), input=x, weight=w, bias=None,
                             gradient_accumulation_fusion=False, allreduce_dgrad=False,
                             sequence_parallel=False, tp_group=object())
        out.backward(dy)
        xq, wq = reference_cast(x.detach(), E4M3), reference_cast(w.detach(), E4M3)
        gq = reference_cast(dy, E4M3 if fmt == "e4m3" else E5M2)
        exact = x.detach().double() @ w.detach().double().t()

        def rel(a, b):
            return ((a.double() - b).norm() / b.norm()).item()

        print(f"{fmt}: forward rel err vs fp8 reference {rel(out, xq @ wq.t()):.2e}, "
              f"vs exact bf16 operands {rel(out, exact):.2e}; dgrad {rel(x.grad, gq @ wq):.2e}; "
              f"wgrad {rel(w.grad, gq.t() @ xq):.2e}")


if __name__ == "__main__":
    main()
