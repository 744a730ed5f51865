"""The output layer and the cross-entropy in one autograd function, without materialising the
``[tokens, vocab]`` fp32 logits (training-speed issue: the first lever to measure).

``linear_cross_entropy(hidden [N, h], weight [V_local, h], labels [N], vocab_start,
vocab_size)`` -> per-token losses ``[N]`` (fp32), equal to
``cross_entropy(hidden @ weight_full.T with padded rows at -inf, labels)``. The tokens go in
chunks of ``chunk`` rows: a chunk's logits are made in the weight's dtype, turned into fp32
statistics (row max, sum of exponentials, the label's logit), reduced over the tensor-parallel
``group`` (each rank holds rows ``vocab_start ... vocab_start + V_local`` of the vocabulary, as
megatron-core's vocab-parallel output layer does), and dropped. The backward recomputes each
chunk's logits from the saved log-sum-exp: ``softmax - onehot`` scaled by the incoming
gradient, then the two matmuls (the hidden state's gradient summed over the group). Vocabulary
rows at or past ``vocab_size`` (padding) take no probability and get no gradient.

Memory: ``chunk x V_local`` fp32 at a time instead of ``N x V_local`` (plus megatron-core's
fp32 copy for its cross-entropy); the cost is one more logits matmul in the backward.
``weighted_linear_cross_entropy`` returns the weighted sum instead (a scalar loss) and makes both
gradients in the forward pass, so nothing is recomputed: three matmuls, as the unfused path.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

DEFAULT_CHUNK = 4096


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _chunk_logits(hidden, weight, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """fp32 logits of one chunk over this rank's rows, padded rows at -inf."""
    logits = (hidden @ weight.t()).float()
    padded = vocab_size - vocab_start
    if padded < weight.shape[0]:
        logits[:, max(padded, 0):] = float("-inf")
    return logits


def _target_logit(logits, labels, vocab_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the label's logit where this rank holds it, else 0; the local index; in range)."""
    local = labels - vocab_start
    inside = (local >= 0) & (local < logits.shape[1])
    index = local.clamp(0, logits.shape[1] - 1)
    picked = logits.gather(1, index[:, None])[:, 0] * inside
    return picked, index, inside


def _sum_exp(logits, top):
    return torch.exp(logits - top[:, None]).sum(dim=1)


def _softmax_grad(logits, lse, index, inside, grad_losses, dtype):
    """(softmax - onehot) x the losses' gradient, in ``dtype`` for the matmuls."""
    probs = torch.exp(logits - lse[:, None])
    onehot = torch.nn.functional.one_hot(index, logits.shape[1]) * inside[:, None]
    return ((probs - onehot) * grad_losses[:, None].float()).to(dtype)


_FUSED = {}


def _fused(function):
    """``function`` under torch.compile on a GPU (the elementwise work of a chunk in one or two
    kernels), as it is elsewhere."""
    if not torch.cuda.is_available():
        return function
    if function not in _FUSED:
        _FUSED[function] = torch.compile(function, dynamic=True)
    return _FUSED[function]


def _chunk_statistics(hidden, weight, labels, vocab_start: int, vocab_size: int, group):
    """One chunk's (fp32 logits of this rank's rows, log-sum-exp over the whole vocabulary,
    the label's logit, the label's local index, whether this rank holds it)."""
    logits = _chunk_logits(hidden, weight, vocab_start, vocab_size)
    top = _all_reduce(logits.max(dim=1).values, dist.ReduceOp.MAX, group)
    sums = _all_reduce(_fused(_sum_exp)(logits, top), dist.ReduceOp.SUM, group)
    target, index, inside = _target_logit(logits, labels, vocab_start)
    target = _all_reduce(target, dist.ReduceOp.SUM, group)
    return logits, torch.log(sums) + top, target, index, inside


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, vocab_size, chunk, group):
        tokens = hidden.shape[0]
        losses = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(losses)
        for begin in range(0, tokens, chunk):
            end = min(begin + chunk, tokens)
            _, lse[begin:end], target, _, _ = _chunk_statistics(
                hidden[begin:end], weight, labels[begin:end], vocab_start, vocab_size, group)
            losses[begin:end] = lse[begin:end] - target
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.settings = (vocab_start, vocab_size, chunk, group)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, labels, lse = ctx.saved_tensors
        vocab_start, vocab_size, chunk, group = ctx.settings
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for begin in range(0, hidden.shape[0], chunk):
            end = min(begin + chunk, hidden.shape[0])
            part = hidden[begin:end]
            logits = _chunk_logits(part, weight, vocab_start, vocab_size)
            _, index, inside = _target_logit(logits, labels[begin:end], vocab_start)
            grad = _fused(_softmax_grad)(logits, lse[begin:end], index, inside,
                                         grad_losses[begin:end], weight.dtype)
            grad_hidden[begin:end] = grad @ weight
            grad_weight += (grad.t() @ part).float()
        _all_reduce(grad_hidden, dist.ReduceOp.SUM, group)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


class WeightedLinearCrossEntropy(torch.autograd.Function):
    """``sum_i w_i loss_i`` with the gradients made in the forward pass: the loss is a scalar,
    so its incoming gradient is one number and each chunk's ``(softmax - onehot) x w`` can be
    turned into both gradients at once (no logits recomputed in the backward, which only
    scales them)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, vocab_start, vocab_size, chunk,
                group):
        tokens = hidden.shape[0]
        losses = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for begin in range(0, tokens, chunk):
            end = min(begin + chunk, tokens)
            part = hidden[begin:end]
            logits, lse, target, index, inside = _chunk_statistics(
                part, weight, labels[begin:end], vocab_start, vocab_size, group)
            losses[begin:end] = lse - target
            grad = _fused(_softmax_grad)(logits, lse, index, inside,
                                         token_weights[begin:end], weight.dtype)
            grad_hidden[begin:end] = grad @ weight
            grad_weight += (grad.t() @ part).float()
        _all_reduce(grad_hidden, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        total = (losses * token_weights.float()).sum()
        ctx.mark_non_differentiable(losses)
        return total, losses

    @staticmethod
    def backward(ctx, grad_total, _grad_losses):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_total.to(grad_hidden.dtype),
                (grad_weight * grad_total).to(ctx.weight_dtype), None, None, None, None, None,
                None)


def weighted_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                  labels: torch.Tensor, token_weights: torch.Tensor,
                                  vocab_start: int = 0, vocab_size: int | None = None,
                                  chunk: int = DEFAULT_CHUNK, group=None):
    """(``sum(token_weights x losses)`` with its gradients made in the forward pass, the
    per-token losses without gradient); ``token_weights``: a loss mask, say."""
    vocab_size = vocab_start + weight.shape[0] if vocab_size is None else vocab_size
    total, losses = WeightedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
        token_weights.reshape(-1), vocab_start, vocab_size, chunk, group)
    return total, losses.view(hidden.shape[:-1])


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         vocab_start: int = 0, vocab_size: int | None = None,
                         chunk: int = DEFAULT_CHUNK, group=None) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden @ weight.T`` (module docstring). ``hidden`` may have
    leading dimensions (``[s, b, h]``); the losses take its shape without the last one."""
    shape = hidden.shape[:-1]
    vocab_size = vocab_start + weight.shape[0] if vocab_size is None else vocab_size
    losses = LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                      labels.reshape(-1), vocab_start, vocab_size, chunk, group)
    return losses.view(shape)
