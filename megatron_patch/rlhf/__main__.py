"""``torchrun --nproc-per-node N -m megatron_patch.rlhf --config rlhf.yaml``: PPO or GRPO with
the seed's six roles colocated on the N ranks (rlhf/config.py: the YAML; rlhf/roles.py: the
models; rlhf/trainer.py: the loop, its metrics and checkpoints)."""
from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from megatron_patch import compat

EPILOG = """\
rlhf.yaml (the seed's layout; rlhf: keys and defaults in megatron_patch/rlhf/config.py):
  runtime_env: {working_dir: ./}
  models: {ppo_policy: {model_config_file: configs/ppo_policy.yaml, num_device: 8,
           trainable: True}, policy: ..., reference: ..., reward_train: ..., reward_forward: ...,
           reward_ref: ...}
  rlhf: {algorithm: ppo, prompt_data: prompts.jsonl, num_ppo_episode: 5,
         sample_per_episode: 10, generation_batch_size: 2, train_micro_batch_size: 2, ...}
Each model file holds Megatron-LM arguments (load, save, tensor_model_parallel_size, lr, bf16,
...). Examples: examples/rlhf/configs/.
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="torchrun ... -m megatron_patch.rlhf",
        description="PPO / GRPO on megatron-core: every role on every rank (colocated), one "
                    "tensor-parallel layout, data parallelism over the rest.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the rlhf.yaml of the run")
    return parser.parse_args(argv)


def setup(config):
    """Parallel state, the models of the roles, the prompts, the reward function."""
    from megatron_patch.generation.prompt_format import resolve_prompt_format
    from megatron_patch.rlhf import experience as xp
    from megatron_patch.rlhf.roles import build_roles
    from megatron_patch.rlhf.trainer import Schedule
    from megatron_patch.training.model_setup import _source_metadata

    actor = config.roles["ppo_policy"].megatron
    tp = actor.get("tensor_model_parallel_size", 1)
    pp = actor.get("pipeline_model_parallel_size", 1)
    if pp != 1:
        raise ValueError(f"{config.roles['ppo_policy'].config_file}: "
                         f"pipeline_model_parallel_size {pp}: the RLHF loop generates with the "
                         f"whole model on each rank; use tensor parallelism (and data "
                         f"parallelism) instead")
    compat.initialize_parallel(tp, 1, config.rlhf["seed"])
    world = dist.get_world_size()
    devices = config.roles["ppo_policy"].num_device
    if devices != world:
        raise ValueError(f"{config.path}: models.*.num_device is {devices} but the run has "
                         f"{world} processes (colocated: every role on every process); start "
                         f"{devices} (run_rlhf.sh GPU_LIST), or set num_device: {world}")
    schedule = Schedule(config.rlhf, world // tp, config.path)
    models = build_roles(config, schedule.steps, schedule.step_samples)
    actor_model = models["ppo_policy"]
    if actor_model.plan.model_args.prefix_lm_ids:
        raise ValueError(f"models.ppo_policy: a prefix-LM model ({actor_model.plan.family.name}"
                         f"): the RLHF loop trains causal models only")
    tokenizer = actor_model.plan.tokenizer
    if tokenizer is None:
        raise ValueError(f"models.ppo_policy: load {actor_model.args.load} carries no "
                         f"tokenizer; give tokenizer_model in its YAML")
    meta = _source_metadata(actor_model.args.load)[0] or {}
    prompt_format, _ = resolve_prompt_format(config.rlhf["prompt_format"], meta,
                                             actor_model.args.load)
    # a prompt, its response and the eod the reward model reads after it fit seq_length
    limit = actor_model.args.seq_length - config.rlhf["max_new_tokens"] - 1
    if limit < 1:
        raise ValueError(f"rlhf.max_new_tokens {config.rlhf['max_new_tokens']} leaves no room "
                         f"for a prompt in seq_length {actor_model.args.seq_length}")
    prompts = xp.read_prompt_data(config.rlhf["prompt_data"], tokenizer, prompt_format, limit)
    reward_fn = xp.load_reward_fn(config.rlhf["reward_fn"], config.working_dir) \
        if config.rlhf["reward_fn"] else None
    return models, prompts, tokenizer, reward_fn, schedule, prompt_format


def _banner(config, models, prompts, schedule, prompt_format) -> None:
    from megatron.core import parallel_state as ps

    rlhf, actor = config.rlhf, models["ppo_policy"]
    m = actor.plan.model_args
    print(f"[megatron_patch] RLHF {rlhf['algorithm']}: {actor.plan.family.name} actor, "
          f"{m.num_layers} layers, hidden {m.hidden_size} | world {dist.get_world_size()} = TP "
          f"{ps.get_tensor_model_parallel_world_size()} x DP "
          f"{ps.get_data_parallel_world_size()} | {actor.args.precision} | "
          f"{'GPU' if compat.on_gpu() else 'CPU (gloo)'}", flush=True)
    for name, model in models.items():
        shared = " (ppo_policy's module)" if name == "policy" else \
            " (reward_train's module)" if name == "reward_forward" else ""
        kind = "trained" if model.trained and not shared else "frozen" if not shared else \
            "inference"
        print(f"[megatron_patch]   {name:15s} {kind:9s} {model.args.load}{shared}", flush=True)
    unused = sorted({key for role in config.roles.values() for key in role.unused})
    if unused:
        print(f"[megatron_patch] accepted but unused by the RLHF loop: {', '.join(unused)} "
              f"(pretraining data)", flush=True)
    print(f"[megatron_patch] {len(prompts.ids)} prompts from {rlhf['prompt_data']} "
          f"(format {prompt_format}; {prompts.truncated} cut on the left to fit) | "
          f"{rlhf['num_ppo_episode']} episodes of {schedule.samples} samples "
          f"({schedule.prompts} prompts x {schedule.group}), {rlhf['num_training_epoch']} "
          f"epoch(s) of {schedule.steps_per_epoch} step(s) of {schedule.step_samples} samples "
          f"| reward: {rlhf['reward_fn'] or 'reward_ref'}", flush=True)
    start = actor.resumed_episode
    if start:
        left = rlhf["num_ppo_episode"] - start
        print(f"[megatron_patch] resuming at episode {start} of {actor.args.save}"
              + (f": that is num_ppo_episode {rlhf['num_ppo_episode']}, nothing is left to "
                 f"train" if left <= 0 else ""), flush=True)
    if not actor.args.save:
        print("[megatron_patch] no save (rlhf.save or the actor's save): no checkpoints are "
              "written", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    compat.exit_unless_supported()
    from megatron_patch.rlhf.config import load_config
    from megatron_patch.rlhf.trainer import RLHFTrainer

    try:
        config = load_config(args.config)
        models, prompts, tokenizer, reward_fn, schedule, prompt_format = setup(config)
    except (ValueError, FileNotFoundError) as err:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {err}", file=sys.stderr)
        if dist.is_initialized():
            compat.destroy_parallel()
        return 2
    if dist.get_rank() == 0:
        _banner(config, models, prompts, schedule, prompt_format)
    RLHFTrainer(config, models, prompts, tokenizer, reward_fn, schedule).run()
    compat.destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
