"""Rollouts (megatron_patch/rlhf/rollout.py): the generation engine samples from the very module
a trainer updates, and the trainer's log-probabilities of the sampled tokens agree with the
generator's: mean exp|logp_train - logp_gen| <= 1.001 in fp32 (DESIGN's obligation), after an
optimizer step on the same module too."""
import pytest
import torch

from helpers import live_tiny_llama
from megatron_patch.rlhf import ppo_math

VOCAB = 300


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    yield from live_tiny_llama(tmp_path_factory.mktemp("rollout"), VOCAB)


def test_generator_and_trainer_log_probs_agree_on_the_same_module(model):
    from megatron_patch.generation.engine import Limits, build_backend
    from megatron_patch.generation.sampling import SamplingParams
    from megatron_patch.rlhf.rollout import sample, token_logps

    prompts = [[5, 9, 13], [7, 8, 9, 10, 11, 12], [40]]
    params, limits = SamplingParams(temperature=1.0), Limits(12, 2, 0, VOCAB)
    for step in range(2):
        backend = build_backend("static", model, 32)
        batch = sample(backend, prompts, params, limits,
                       torch.Generator().manual_seed(step))
        assert batch["mask"].sum().item() == sum(batch["response_lengths"])
        for row, prompt in enumerate(prompts):  # the response follows its prompt
            assert batch["tokens"][row, :len(prompt)].tolist() == prompt
        trained = token_logps(model, batch)
        assert ppo_math.agreement(trained, batch["gen_logps"], batch["mask"]) <= 1.001
        assert (trained - batch["gen_logps"]).abs().max().item() < 1e-4
        # a training step on the module the backend reads: the next rollout sees it
        model.train()
        losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        (losses * batch["mask"]).sum().backward()
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:
                    param -= 0.05 * param.grad
                    param.grad = None
        model.eval()
        # the step moved the log-probs, so the next rollout's agreement means "no stale copy"
        assert (token_logps(model, batch) - trained).abs().max().item() > 1e-2
