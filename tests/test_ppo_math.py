"""PPO / GRPO arithmetic (megatron_patch/rlhf/ppo_math.py) against plain Python loops and the
formulas written out per token."""
import math
import random

import pytest
import torch

from megatron_patch.rlhf import ppo_math


def batch(seed=0, rows=3, length=6):
    """Random values with right-padded response masks of different lengths."""
    torch.manual_seed(seed)
    lengths = [length, 4, 1][:rows]
    mask = torch.tensor([[1.0] * n + [0.0] * (length - n) for n in lengths])
    return (torch.randn(rows, length, dtype=torch.float64), torch.randn(rows, length,
                                                                          dtype=torch.float64),
            mask.double(), lengths)


def test_gae_equals_the_textbook_loop():
    rewards, values, mask, lengths = batch()
    gamma, lam = 0.9, 0.8
    advantages, returns = ppo_math.gae(rewards, values, mask, gamma, lam)
    for row, n in enumerate(lengths):
        expected, running = [0.0] * rewards.shape[1], 0.0
        for t in reversed(range(n)):
            next_value = values[row, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[row, t].item() + gamma * next_value - values[row, t].item()
            running = delta + gamma * lam * running
            expected[t] = running
        assert advantages[row].tolist() == pytest.approx(expected)
        assert returns[row, :n].tolist() == pytest.approx(
            [a + v for a, v in zip(expected[:n], values[row, :n].tolist())])
        assert returns[row, n:].abs().sum() == 0


def test_whitening_over_the_masked_tokens_and_split_across_ranks():
    x, _, mask, _ = batch(1)
    picked = [v for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]
    mean = sum(picked) / len(picked)
    std = math.sqrt(sum((v - mean) ** 2 for v in picked) / len(picked) + 1e-8)
    out = ppo_math.whiten(x, mask)
    assert [v for v, m in zip(out.flatten().tolist(), mask.flatten().tolist()) if m] == \
        pytest.approx([(v - mean) / std for v in picked])
    # two "ranks" holding rows 0 and 1-2: summed stats give the same whitening
    stats = ppo_math.whiten_stats(x[:1], mask[:1]) + ppo_math.whiten_stats(x[1:], mask[1:])
    assert torch.allclose(torch.cat([ppo_math.whiten(x[:1], mask[:1], stats),
                                     ppo_math.whiten(x[1:], mask[1:], stats)]), out)
    assert ppo_math.whiten(x, mask, shift_mean=False)[0, 0].item() == pytest.approx(
        (x[0, 0].item() - mean) / std + mean)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    for kind, formula in (("k1", lambda a, b: a - b), ("k2", lambda a, b: 0.5 * (a - b) ** 2),
                          ("k3", lambda a, b: math.exp(b - a) - (b - a) - 1)):
        assert ppo_math.kl(logp, ref, kind).tolist() == pytest.approx(
            [formula(a, b) for a, b in zip(logp.tolist(), ref.tolist())])
    assert (ppo_math.kl(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        ppo_math.kl(logp, ref, "k4")


def test_token_rewards_put_the_clipped_score_on_the_last_response_token():
    logp, ref, mask, lengths = batch(2)
    scores = torch.tensor([3.0, -0.5, 10.0], dtype=torch.float64)
    rewards = ppo_math.token_rewards(scores, logp, ref, mask, beta=0.05, clip=5.0)
    for row, n in enumerate(lengths):
        expected = [-0.05 * (logp[row, t] - ref[row, t]).item() if t < n else 0.0
                    for t in range(mask.shape[1])]
        expected[n - 1] += min(max(scores[row].item(), -5.0), 5.0)
        assert rewards[row].tolist() == pytest.approx(expected)


def test_policy_and_value_losses_equal_their_formulas():
    random.seed(3)
    logp, old, adv, values, old_values, returns = (
        torch.tensor([random.uniform(-2, 0) for _ in range(8)], dtype=torch.float64)
        for _ in range(6))
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float64)
    loss, clipped = ppo_math.policy_loss_sum(logp, old, adv, mask, 0.2)
    expected, count = 0.0, 0
    for i in range(6):
        ratio = math.exp(logp[i] - old[i])
        a, b = -adv[i].item() * ratio, -adv[i].item() * min(max(ratio, 0.8), 1.2)
        expected += max(a, b)
        count += b > a
    assert loss.item() == pytest.approx(expected) and clipped.item() == count
    value = ppo_math.value_loss_sum(values, old_values, returns, mask, 0.2)
    expected = sum(0.5 * max((values[i] - returns[i]).item() ** 2,
                             (old_values[i] + max(min((values[i] - old_values[i]).item(), 0.2),
                                                  -0.2) - returns[i]).item() ** 2)
                   for i in range(6))
    assert value.item() == pytest.approx(expected)


def test_token_sum_losses_do_not_depend_on_the_micro_batch_split():
    """Summed per micro-batch and divided by the global token count: one batch or three
    micro-batches give the same loss and the same gradient."""
    torch.manual_seed(4)
    logp = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    old, adv = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    mask = (torch.rand(6, 5) > 0.3).double()
    tokens = mask.sum()
    whole = ppo_math.policy_loss_sum(logp, old, adv, mask)[0] / tokens
    (grad_whole,) = torch.autograd.grad(whole, logp)
    parts = sum(ppo_math.policy_loss_sum(logp[i:i + 2], old[i:i + 2], adv[i:i + 2],
                                         mask[i:i + 2])[0] for i in (0, 2, 4)) / tokens
    (grad_parts,) = torch.autograd.grad(parts, logp)
    assert parts.item() == pytest.approx(whole.item())
    assert torch.allclose(grad_parts, grad_whole)


def test_group_advantages_and_agreement():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = ppo_math.group_advantages(rewards, 4)
    first = [1.0, 0.0, 0.0, 1.0]
    mean, std = sum(first) / 4, math.sqrt(sum((r - 0.5) ** 2 for r in first) / 3)
    assert adv[:4].tolist() == pytest.approx([(r - mean) / (std + 1e-6) for r in first])
    assert adv[4:].abs().max() == 0  # a group of equal rewards teaches nothing
    with pytest.raises(ValueError, match="not groups of 3"):
        ppo_math.group_advantages(rewards, 3)
    logp = torch.tensor([[-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert ppo_math.agreement(logp, logp, mask) == 1.0
    assert ppo_math.agreement(logp, logp + 0.1, mask) == pytest.approx(math.exp(0.1))


def test_adaptive_kl_controller_moves_towards_the_target_within_its_clip():
    # KL above the target raises the coefficient, below lowers it, at most by 20% x n / horizon
    assert ppo_math.adaptive_kl_coef(0.1, 6.0, 3.0, 100, 1000) == pytest.approx(0.1 * 1.02)
    assert ppo_math.adaptive_kl_coef(0.1, 3.3, 3.0, 100, 1000) == pytest.approx(0.1 * 1.01)
    assert ppo_math.adaptive_kl_coef(0.1, 0.0, 3.0, 100, 1000) == pytest.approx(0.1 * 0.98)
    assert ppo_math.adaptive_kl_coef(0.1, 3.0, 3.0, 100, 1000) == pytest.approx(0.1)
