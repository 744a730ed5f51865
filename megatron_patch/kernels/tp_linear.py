"""What the project's own linear-layer functions (kernels/fp8.py, kernels/grad_accumulation.py)
share with megatron-core's ``linear_with_grad_accumulation_and_async_allreduce``, whose place
they take as a column/row-parallel layer's ``_forward_impl``: its tensor-parallel communication
(sequence parallelism's input all-gather and dgrad reduce-scatter, a column-parallel layer's
dgrad all-reduce) and the installation into a model's transformer layers."""
from __future__ import annotations


def tp_group_for(tp_group, allreduce_dgrad: bool, sequence_parallel: bool):
    """The group a collective will use: megatron-core's row-parallel layers pass None (and no
    collective); looked up only when one is needed (nothing to trace under torch.compile)."""
    if tp_group is None and (allreduce_dgrad or sequence_parallel):
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_group()
    return tp_group


def gather_input(input, sequence_parallel: bool, tp_group):
    """The layer's whole input: all-gathered over the sequence under sequence parallelism."""
    if not sequence_parallel:
        return input
    from megatron.core.tensor_parallel.mappings import _gather_along_first_dim

    return _gather_along_first_dim(input, group=tp_group)


def reduce_input_grad(grad_input, allreduce_dgrad: bool, sequence_parallel: bool, tp_group):
    """The input gradient as megatron-core's backward leaves it: reduce-scattered under sequence
    parallelism, all-reduced for a column-parallel layer's replicated input."""
    if sequence_parallel:
        from megatron.core.tensor_parallel.mappings import _reduce_scatter_along_first_dim

        return _reduce_scatter_along_first_dim(grad_input, group=tp_group)
    if allreduce_dgrad:
        import torch.distributed as dist

        dist.all_reduce(grad_input, group=tp_group)
    return grad_input


def decoder_linears(model):
    """(name, module) of every column/row-parallel linear in ``model.decoder``."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return [(name, module) for name, module in model.decoder.named_modules()
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear))]
