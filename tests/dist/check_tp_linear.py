"""Two ranks (TP2, gloo): the project's linear-layer functions' tensor-parallel communication
(kernels/tp_linear.py, shared by kernels/fp8.py and kernels/grad_accumulation.py) against the
same product on one process. A column-parallel layer with sequence parallelism (input
all-gather, dgrad reduce-scatter) and without it (dgrad all-reduce), through
wgrad_fused_linear (fp32, so the comparison is exact up to rounding); prints one OK per case."""
import torch
import torch.distributed as dist

from megatron_patch import compat
from megatron_patch.kernels.grad_accumulation import wgrad_fused_linear


def main():
    compat.enable_cpu_mode()
    compat.initialize_parallel(tensor_parallel=2)
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(0)
    seq, batch, hidden, out = 8, 2, 16, 12
    x = torch.randn(seq, batch, hidden, generator=generator)
    w = torch.randn(out, hidden, generator=generator)
    dy = torch.randn(seq, batch, out, generator=generator)
    full_x = x.clone().requires_grad_()
    full_x.matmul(w.t()).backward(dy)
    rows = slice(rank * out // 2, (rank + 1) * out // 2)  # this rank's output columns
    for sp in (True, False):
        mine = (x.chunk(2)[rank] if sp else x).clone().requires_grad_()
        weight = torch.nn.Parameter(w[rows].clone())
        weight.main_grad = torch.zeros_like(weight)
        y = wgrad_fused_linear(mine, weight, None, gradient_accumulation_fusion=True,
                               allreduce_dgrad=not sp, sequence_parallel=sp, tp_group=None)
        y.backward(dy[:, :, rows])
        want_dx = full_x.grad.chunk(2)[rank] if sp else full_x.grad
        torch.testing.assert_close(y, x.matmul(w[rows].t()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.grad, want_dx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(weight.main_grad,
                                   dy[:, :, rows].reshape(-1, out // 2).t()
                                   @ x.reshape(-1, hidden), rtol=1e-5, atol=1e-5)
        print(f"rank {rank} sequence_parallel={sp} OK", flush=True)


if __name__ == "__main__":
    main()
