"""PPO's actor and critic losses as megatron-core loss functions (megatron_patch/rlhf/ppo_losses.py):
their values are the per-token formulas', and through megatron-core's own schedule the summed
loss and every gradient are the same for 1, 2 or 4 micro-batches."""
import pytest
import torch

from helpers import live_tiny_llama
from megatron_patch.rlhf import ppo_losses, ppo_math

VOCAB = 300


def experience(rows=4, length=10, seed=0):
    torch.manual_seed(seed)
    mask = torch.zeros(rows, length)
    for row in range(rows):
        start = 2 + row % 3
        mask[row, start:start + 3 + row] = 1
    tokens = torch.randint(3, VOCAB, (rows, length))
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
            "position_ids": torch.arange(length).repeat(rows, 1), "mask": mask,
            "old_logps": -torch.rand(rows, length) * 5, "advantages": torch.randn(rows, length),
            "old_values": torch.randn(rows, length), "returns": torch.randn(rows, length)}


def test_the_loss_functions_are_the_formulas():
    batch = experience()
    output = torch.rand(4, 10) * 5  # per-token cross-entropy
    total, tokens, report = ppo_losses.actor_loss(batch, 0.2, output)
    expected, clipped = ppo_math.policy_loss_sum(-output, batch["old_logps"],
                                                 batch["advantages"], batch["mask"], 0.2)
    assert total.item() == pytest.approx(expected.item())
    assert tokens.item() == batch["mask"].sum().item()
    assert report["clip fraction"].tolist() == [clipped.item(), tokens.item()]
    batch["ref_logps"] = -torch.rand(4, 10) * 5
    grpo, _, report = ppo_losses.actor_loss(batch, 0.2, output, kl_coef=0.05)
    ref_ratio = batch["ref_logps"] + output  # log(ref / pi), GRPO's k3 term per token
    k3 = ((torch.exp(ref_ratio) - ref_ratio - 1) * batch["mask"]).sum()
    assert grpo.item() == pytest.approx(expected.item() + 0.05 * k3.item(), rel=1e-6)
    assert report["kl loss"][0].item() == pytest.approx(k3.item(), rel=1e-6)
    values = torch.randn(4, 10, 1)
    total, _, _ = ppo_losses.critic_loss(batch, 0.2, values)
    assert total.item() == pytest.approx(ppo_math.value_loss_sum(
        values[..., 0], batch["old_values"], batch["returns"], batch["mask"], 0.2).item())


@pytest.fixture(scope="module")
def actor(tmp_path_factory):
    for model in live_tiny_llama(tmp_path_factory.mktemp("ppo"), VOCAB):
        model.train().config.calculate_per_token_loss = True
        yield model


def test_actor_loss_and_gradients_do_not_depend_on_the_micro_batch_split(actor):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_patch.training.loop import reduce_stats

    batch = experience()
    results = []
    for micro in (1, 2, 4):
        rows = 4 // micro
        parts = [{k: v[i * rows:(i + 1) * rows] for k, v in batch.items()} for i in range(micro)]
        actor.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=ppo_losses.actor_forward_step(0.2), data_iterator=iter(parts),
            model=[actor], num_microbatches=micro, seq_length=10, micro_batch_size=rows,
            forward_only=False)
        grads = [p.grad.clone() for p in actor.parameters() if p.grad is not None]
        results.append((reduce_stats(outputs)["policy loss"], grads))
    (loss, grads), others = results[0], results[1:]
    assert grads and all(g.abs().sum() > 0 for g in grads[:3])
    for other_loss, other_grads in others:
        assert other_loss == pytest.approx(loss, rel=1e-6)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, other_grads))
