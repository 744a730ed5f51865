"""The suite catches what it claims to: each mutation below plants one bug in a copy of the
project (the source as git tracks it) and runs the tests that should notice it; those tests
must fail (pytest exit status 1: a failed assertion against an independent reference, not a
crash at import or collection).

The first five are bugs an earlier suite let through; the others are bugs it already caught,
kept so that it keeps catching them. Each mutation names its code exactly: when the code moves,
the mutation's own assertion fails and says which one to update. Families added to the registry
run through the same parametrized tests, so these checks cover them too.

    python -m pytest tests/test_mutations.py -q            # all of them (about 10 minutes)
    python -m pytest tests/test_mutations.py -q -k rng     # one
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from helpers import REPO, child_env


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str            # file, relative to the repository
    old: str             # exact code, present once
    new: str             # the bug
    tests: tuple         # pytest node ids (or -k expressions after "-k") that must fail


MUTATIONS = (
    Mutation("rope-scaling-dropped", "megatron_patch/families/model.py",
             "rope_scaling=factor is not None,", "rope_scaling=False,",
             ("tests/test_convert.py::test_llama3_rope_scaling_logits_match_hf",)),
    Mutation("rng-not-restored-on-resume", "megatron_patch/training/checkpointing.py",
             "        set_rng_state(rngs[ps.get_data_parallel_rank()])", "        pass",
             ("tests/test_training.py::test_resume_is_exact_across_layouts_and_precisions"
              "[tp2-bf16-dropout]",)),
    Mutation("loss-is-mean-of-micro-batch-means", "megatron_patch/training/loop.py",
             "    total = torch.stack([torch.stack([out[name] for name in names]) "
             "for out in outputs]).sum(0)",
             "    total = torch.stack([torch.stack([torch.stack([out[name][0] / out[name][1], "
             "torch.ones_like(out[name][1])]) for name in names]) for out in outputs]).sum(0)",
             ("tests/test_training.py::test_sft_loss_is_the_token_weighted_response_loss_of_hf"
              "[alpaca]",)),
    Mutation("static-cache-rotary-position-plus-one", "megatron_patch/generation/static_cache.py",
             "state.positions.copy_(positions[..., -1:] + self.position_step)",
             "state.positions.copy_(positions[..., -1:] + self.position_step + 1)",
             ("tests/test_generation.py::test_greedy_batch_matches_hf_generate_tp1[static]",)),
    Mutation("qkv-k-and-v-swapped", "megatron_patch/convert/ops.py",
             "fused = torch.cat([q.reshape(ng, r * d, *rest), k.reshape(ng, d, *rest),\n"
             "                           v.reshape(ng, d, *rest)], dim=1)",
             "fused = torch.cat([q.reshape(ng, r * d, *rest), v.reshape(ng, d, *rest),\n"
             "                           k.reshape(ng, d, *rest)], dim=1)",
             ("tests/test_convert.py::test_logits_match_hf[gqa-1-1]",)),
    Mutation("query-heads-reversed-in-groups", "megatron_patch/convert/ops.py",
             "fused = torch.cat([q.reshape(ng, r * d, *rest), k",
             "fused = torch.cat([q.reshape(ng, r, d, *rest).flip(1).reshape(ng, r * d, *rest), k",
             ("tests/test_convert.py::test_logits_match_hf[gqa-1-1]",)),
    Mutation("padded-vocabulary-in-the-softmax", "megatron_patch/layers/padded_vocab.py",
             "    if vocab_size >= padded_vocab_size:\n        return None",
             "    return None",
             ("tests/test_training.py::test_converted_model_loss_equals_hf_loss[2]",)),
    Mutation("init-from-one-rng-stream", "megatron_patch/training/initialization.py",
             "        torch.manual_seed(seed)\n", "",
             ("tests/test_training.py::test_random_init_is_the_same_model_at_every_layout[pp2]",)),
    Mutation("dp-ranks-read-the-same-samples", "megatron_patch/training/data.py",
             "first = start + self.dp_rank * self.mbs", "first = start",
             ("tests/test_training.py::test_first_losses_agree_across_layouts[dp2]",)),
    Mutation("optimizer-not-restored", "megatron_patch/training/checkpointing.py",
             "        _load_optimizer(args, payload, optimizer)\n", "",
             ("tests/test_training.py::test_stop_and_resume_is_bit_identical",)),
    Mutation("sft-loss-mask-shifted", "megatron_patch/data/sft_packing.py",
             "loss_mask[start:end - 1] = response_mask[1:]",
             "loss_mask[start:end - 1] = response_mask[:-1]",
             ("tests/test_sft.py::test_loss_mask_covers_exactly_the_responses",)),
    Mutation("decode-attention-reads-one-key-short", "megatron_patch/kernels/decode_attention.py",
             "        in_range = s < end\n", "        in_range = s < end - 1\n",
             ("tests/test_kernels.py::test_decode_attention_equals_sdpa",)),
    Mutation("reward-score-read-one-token-early", "megatron_patch/rlhf/reward.py",
             "index[key].append(row * length + end - 1)",
             "index[key].append(row * length + end - 2)",
             ("tests/test_reward_model.py::test_packed_pairs_give_each_pair_its_own_loss",)),
    Mutation("dpo-log-probs-include-the-prompt", "megatron_patch/rlhf/dpo.py",
             "loss_mask[row, :n - 1] = torch.as_tensor(mask[1:], dtype=torch.float32)",
             "loss_mask[row, :n - 1] = 1.0",
             ("tests/test_dpo.py::test_loss_with_another_reference_equals_transformers",)),
    Mutation("rlhf-values-one-position-late", "megatron_patch/rlhf/experience.py",
             "        parts.append(scores.float()[..., 0] * part[\"mask\"])",
             "        parts.append(torch.roll(scores.float()[..., 0], 1, 1) * part[\"mask\"])",
             ("tests/test_rlhf.py::test_experience_equals_transformers",)),
    Mutation("clipping-scale-skipped-in-place", "megatron_patch/kernels/multi_tensor.py",
             "        torch._foreach_mul_(targets, scale)", "        pass",
             ("tests/test_fused_optimizer.py::test_scale_and_copy_are_bitwise_megatron_cores_"
              "fallback",)),
    Mutation("fp8-hybrid-gradients-in-e4m3", "megatron_patch/kernels/fp8.py",
             'torch.float8_e4m3fn if self.format == "e4m3" else torch.float8_e5m2',
             "torch.float8_e4m3fn",
             ("tests/test_fp8.py::test_linear_forward_and_backward_are_the_fp8_operands_"
              "multiplied",)),
    Mutation("clip-scale-not-inverted-for-fused-adam", "megatron_patch/kernels/multi_tensor.py",
             "torch.full((), 1.0 / clip_coeff", "torch.full((), clip_coeff",
             ("tests/test_fused_optimizer.py::test_clipping_inside_fused_adam_is_clipping_the_"
              "gradients",)),
)


def copy_project(target: str) -> None:
    """The files git tracks (and untracked ones it does not ignore), as they are now."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in listed.splitlines():
        source = os.path.join(REPO, name)
        if os.path.isfile(source):
            os.makedirs(os.path.join(target, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(source, os.path.join(target, name))


def plant(root: str, mutation: Mutation) -> None:
    path = os.path.join(root, mutation.path)
    text = open(path, encoding="utf-8").read()
    assert text.count(mutation.old) == 1, (
        f"mutation {mutation.name}: its code is no longer in {mutation.path} exactly once; "
        f"update MUTATIONS in tests/test_mutations.py")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text.replace(mutation.old, mutation.new))


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_the_suite_catches_the_planted_bug(mutation, tmp_path):
    root = str(tmp_path / "project")
    copy_project(root)
    plant(root, mutation)
    env = child_env({"PYTHONPATH": root})  # the copy's package, not the installed one
    where = subprocess.run([sys.executable, "-c", "import megatron_patch; "
                            "print(megatron_patch.__file__)"], cwd=root, env=env,
                           capture_output=True, text=True)
    assert where.stdout.startswith(root), where.stdout + where.stderr
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           *mutation.tests], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 1, (
        f"{mutation.name}: expected the tests to fail (exit 1), got exit {proc.returncode}:\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
