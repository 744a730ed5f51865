"""megatron_patch/kernels/linear_cross_entropy.py against plain PyTorch: the per-token losses (and
the weighted sum whose gradients are made in the forward pass) and
the gradients of the hidden states and the weight equal ``cross_entropy(hidden @ weight.T)``
with padded vocabulary rows at -inf, for any chunk size, and with the vocabulary split over two
gloo ranks (each holding half the rows) the losses and the summed hidden gradient are the same
and each rank's weight gradient is its rows of the full one."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from megatron_patch.kernels.linear_cross_entropy import (linear_cross_entropy,
                                                         weighted_linear_cross_entropy)

VOCAB, PADDED, HIDDEN = 37, 40, 16


def reference(hidden, weight, labels, vocab_size):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logits = (hidden @ weight.t()).float()
    logits = torch.cat([logits[..., :vocab_size],
                        torch.full_like(logits[..., vocab_size:], float("-inf"))], -1)
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               labels.reshape(-1), reduction="none")
    return losses, hidden, weight


def inputs(seed=0, shape=(5, 3)):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, HIDDEN, generator=generator)
    weight = torch.randn(PADDED, HIDDEN, generator=generator) * 0.5
    labels = torch.randint(0, VOCAB, shape, generator=generator)
    scale = torch.rand(shape, generator=generator).reshape(-1)  # a loss mask's weights
    return hidden, weight, labels, scale


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_losses_and_gradients_equal_plain_cross_entropy(chunk):
    hidden, weight, labels, scale = inputs()
    expected, ref_hidden, ref_weight = reference(hidden, weight, labels, VOCAB)
    (expected * scale).sum().backward()
    ours_hidden = hidden.clone().requires_grad_()
    ours_weight = weight.clone().requires_grad_()
    losses = linear_cross_entropy(ours_hidden, ours_weight, labels, 0, VOCAB, chunk=chunk)
    assert losses.shape == labels.shape and losses.dtype == torch.float32
    (losses.reshape(-1) * scale).sum().backward()
    assert torch.allclose(losses.reshape(-1), expected, atol=1e-5)
    assert torch.allclose(ours_hidden.grad, ref_hidden.grad, atol=1e-5)
    assert torch.allclose(ours_weight.grad, ref_weight.grad, atol=1e-5)
    assert (ours_weight.grad[VOCAB:] == 0).all()  # padded rows get nothing


@pytest.mark.parametrize("chunk", [3, 1000])
def test_the_weighted_sum_with_gradients_made_in_the_forward(chunk):
    hidden, weight, labels, scale = inputs(seed=2)
    expected, ref_hidden, ref_weight = reference(hidden, weight, labels, VOCAB)
    (0.5 * (expected * scale).sum()).backward()
    ours_hidden = hidden.clone().requires_grad_()
    ours_weight = weight.clone().requires_grad_()
    total, losses = weighted_linear_cross_entropy(ours_hidden, ours_weight, labels, scale, 0,
                                                  VOCAB, chunk=chunk)
    (0.5 * total).backward()  # a scale after the loss (the schedule's 1 / tokens) reaches both
    assert torch.allclose(losses.reshape(-1), expected.detach(), atol=1e-5)
    assert total.item() == pytest.approx((expected * scale).sum().item(), rel=1e-6)
    assert torch.allclose(ours_hidden.grad, ref_hidden.grad, atol=1e-5)
    assert torch.allclose(ours_weight.grad, ref_weight.grad, atol=1e-5)


def _two_ranks(rank, port, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        hidden, weight, labels, scale = inputs(seed=1)
        rows = PADDED // 2
        shard = weight[rank * rows:(rank + 1) * rows].clone().requires_grad_()
        hidden = hidden.clone().requires_grad_()
        losses = linear_cross_entropy(hidden, shard, labels, rank * rows, VOCAB, chunk=4,
                                      group=dist.group.WORLD)
        (losses.reshape(-1) * scale).sum().backward()
        results[rank] = (losses.detach(), hidden.grad, shard.grad)
        hidden.grad = shard.grad = None
        total, _ = weighted_linear_cross_entropy(hidden, shard, labels, scale, rank * rows,
                                                 VOCAB, chunk=4, group=dist.group.WORLD)
        total.backward()
        results[rank + 2] = (total.detach(), hidden.grad, shard.grad)
    finally:
        dist.destroy_process_group()


def test_vocabulary_split_over_two_ranks_gives_the_same_losses_and_gradients():
    from helpers import free_port

    hidden, weight, labels, scale = inputs(seed=1)
    expected, ref_hidden, ref_weight = reference(hidden, weight, labels, VOCAB)
    (expected * scale).sum().backward()
    results = mp.Manager().dict()
    mp.spawn(_two_ranks, args=(free_port(), results), nprocs=2)
    rows = PADDED // 2
    for rank in (0, 1):
        losses, grad_hidden, grad_shard = results[rank]
        assert torch.allclose(losses.reshape(-1), expected, atol=1e-5)
        assert torch.allclose(grad_hidden, ref_hidden.grad, atol=1e-5)
        assert torch.allclose(grad_shard, ref_weight.grad[rank * rows:(rank + 1) * rows],
                              atol=1e-5)
        total, grad_hidden, grad_shard = results[rank + 2]  # the weighted sum's
        assert total.item() == pytest.approx((expected * scale).sum().item(), rel=1e-6)
        assert torch.allclose(grad_hidden, ref_hidden.grad, atol=1e-5)
        assert torch.allclose(grad_shard, ref_weight.grad[rank * rows:(rank + 1) * rows],
                              atol=1e-5)
