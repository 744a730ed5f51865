"""The RLHF roles as megatron-core models, colocated: every role on every rank, one TP layout.

=============== ============================================= ==============================
role            what it is                                    built as
=============== ============================================= ==============================
ppo_policy      the actor being trained                       DDP chunk + optimizer
policy          the actor that generates and gives old        the very module of ppo_policy
                log-probabilities                             (no copy)
reference       the frozen SFT model of the KL term           frozen GPTModel, no buffers
reward_train    the critic being trained (from the RM)        DDP chunk + optimizer
reward_forward  the critic's inference copy: old values       the very module of reward_train
reward_ref      the frozen reward model                       frozen GPTModel (scalar head)
=============== ============================================= ==============================

Each role's YAML is its trainer command line (rlhf/config.py); the RLHF section decides what the
trainer flags of a PPO step cannot know: ``train_micro_batch_size`` is every trained role's
--micro-batch-size, the samples of one optimizer step its --global-batch-size, and the steps of
the whole run its --train-iters (the learning-rate schedule's length). Relative paths in a
YAML (load, save) are relative to ``runtime_env.working_dir``.

A trained role resumes from its own ``save`` when that holds a checkpoint (weights, optimizer,
schedule, RNG); otherwise it starts from the weights of its ``load`` with a new optimizer
(the seed's ``finetune: True``).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from megatron_patch.rlhf.config import CRITIC, TRAINED

SHARED = {"policy": "ppo_policy", "reward_forward": "reward_train"}  # inference copy -> module
PATH_ARGS = ("load", "save", "tensorboard_dir", "tokenizer_model")


@dataclasses.dataclass
class RoleModel:
    name: str
    args: object
    plan: object
    module: torch.nn.Module           # the bare GPTModel (this rank's stage)
    chunks: list | None = None        # trained roles: the DDP-wrapped chunk
    optimizer: object = None
    scheduler: object = None
    resumed_episode: int = 0          # the episode its --save checkpoint finished
    progress: dict = dataclasses.field(default_factory=dict)  # the RLHF loop's saved state

    @property
    def trained(self) -> bool:
        return self.chunks is not None


def role_args(role, rlhf: dict, working_dir: str, world_size: int, steps: int,
              step_samples: int):
    """The role's Megatron-LM flags parsed by the trainer's parser, with the RLHF section's
    batch sizes and schedule length."""
    from megatron_patch.training import arguments

    parser = arguments.build_parser(role.config_file, f"the {role.name} role of an RLHF run")
    # the RLHF section sets the batch sizes; the trainer's parser requires one
    args = parser.parse_args(["--micro-batch-size", str(rlhf["train_micro_batch_size"]),
                              *role.argv])
    for name in PATH_ARGS:
        value = getattr(args, name, None)
        if value and not os.path.isabs(value):
            setattr(args, name, os.path.normpath(os.path.join(working_dir, value)))
    args.micro_batch_size = rlhf["train_micro_batch_size"]
    args.global_batch_size = step_samples
    args.train_iters, args.train_samples, args.train_tokens = steps, None, None
    args.calculate_per_token_loss = True  # token means over the global batch (ppo_losses.py)
    if rlhf["save"] and role.name in TRAINED:
        args.save = os.path.join(rlhf["save"], role.name)
    arguments.finalize(args, world_size)
    if not args.load:
        raise ValueError(f"{role.config_file}: no 'load': the {role.name} role starts from a "
                         f"checkpoint ({_expected(role.name)})")
    return args


def _expected(name: str) -> str:
    return "a reward model: trained with run_train_reward_model.sh, or an HF " \
        "*ForSequenceClassification converted with --model-type reward" \
        if name in CRITIC + ("reward_ref",) else "the SFT model"


def _check_kind(name: str, args, plan) -> None:
    reward = bool(plan.model_args.reward_head)
    wants = name in CRITIC + ("reward_ref",)
    if reward != wants:
        held = "a reward model" if reward else "a language model"
        raise ValueError(f"models.{name}: load {args.load} holds {held}; {name} needs "
                         f"{_expected(name)}")


def _resume_point(args) -> bool:
    """Point --load at the role's own --save when that holds a checkpoint (a relaunch)."""
    from megatron_patch.convert.megatron_io import TRACKER

    if args.save and os.path.isfile(os.path.join(args.save, TRACKER)):
        args.load, args.finetune, args.no_load_optim, args.no_load_rng = \
            args.save, False, False, False
        return True
    args.finetune = True  # weights only: a new optimizer and schedule
    return False


def build_trained(name: str, args) -> RoleModel:
    from megatron_patch.training import checkpointing, model_setup, replicated_kv
    from megatron_patch.training.loop import configure_model

    resuming = _resume_point(args)
    plan = model_setup.plan_model(args)
    _check_kind(name, args, plan)
    model_setup.check_sequence_length(args, plan.model_args)
    replicated_kv.check(args, plan.model_args)
    chunks, model = model_setup.build_model(args, plan)
    payload = checkpointing.resume_state(args) if resuming else None
    if payload is not None:
        checkpointing.load_resume_weights(args, model, payload)
    else:
        checkpointing.load_weights(args, model)
    optimizer, scheduler = model_setup.build_optimizer(args, chunks)
    episode, progress = 0, {}
    if payload is not None:
        episode = checkpointing.restore_training_state(args, payload, optimizer,
                                                       scheduler)["iteration"]
        progress = payload.get("rlhf") or {}
    config = configure_model(chunks, optimizer, args)
    replicated_kv.install(chunks, optimizer, plan.model_args.num_query_groups, config)
    return RoleModel(name, args, plan, model, chunks, optimizer, scheduler, episode, progress)


def build_frozen(name: str, args) -> RoleModel:
    from megatron_patch.training import checkpointing, model_setup

    plan = model_setup.plan_model(args)
    _check_kind(name, args, plan)
    model = model_setup.build_frozen_model(args, plan)
    checkpointing.load_weights(args, model)
    return RoleModel(name, args, plan, model)


def check_shared(config, args: dict) -> None:
    """``policy`` generates from ``ppo_policy``'s weights and ``reward_forward`` scores with
    ``reward_train``'s: a different ``load`` in the copy's YAML would be silently ignored, so
    it is an error."""
    for copy, source in SHARED.items():
        if copy in args and source in args and args[copy].load != args[source].load:
            raise ValueError(f"{config.roles[copy].config_file}: load {args[copy].load} differs "
                             f"from {source}'s {args[source].load}; {copy} runs on {source}'s "
                             f"weights (colocated, no copy), so give both the same load")


def build_roles(config, steps: int, step_samples: int) -> dict:
    """{role: RoleModel}; ``policy`` / ``reward_forward`` are the trained roles' objects."""
    world = dist.get_world_size()
    args = {name: role_args(role, config.rlhf, config.working_dir, world, steps, step_samples)
            for name, role in config.roles.items()}
    check_shared(config, args)
    models = {}
    for name in config.roles:
        if name in SHARED:
            continue
        models[name] = build_trained(name, args[name]) if name in TRAINED else \
            build_frozen(name, args[name])
    for copy, source in SHARED.items():
        if source in models:
            models[copy] = models[source]
    _check_vocabularies(config, models)
    episodes = {m.resumed_episode for n, m in models.items() if m.trained and n in TRAINED}
    if len(episodes) > 1:
        raise ValueError(f"the actor and the critic checkpoints are of different episodes "
                         f"({sorted(episodes)}): resume needs both from one save")
    return models


def _check_vocabularies(config, models: dict) -> None:
    sizes = {name: m.plan.model_args.vocab_size for name, m in models.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{config.path}: the roles' vocabularies differ ({sizes}); every role "
                         f"reads the actor's token ids, so they share one tokenizer")


def offload_training_state(model: RoleModel) -> None:
    """Optimizer state (and fp32 main weights) and gradient buffers leave the GPU while the
    actor generates (megatron-core's own RL hooks); a no-op on the CPU. With fp32 weights the
    optimizer's parameters are the model's, so only its state moves."""
    from megatron_patch import compat

    if not model.trained or not compat.on_gpu():
        return
    _move_optimizer(model, "cpu")
    for chunk in model.chunks:
        chunk.offload_grad_buffers(synchronize=True, empty_cache=False)
    torch.cuda.empty_cache()


def restore_training_state(model: RoleModel) -> None:
    from megatron_patch import compat

    if not model.trained or not compat.on_gpu():
        return
    for chunk in model.chunks:
        chunk.restore_grad_buffers(synchronize=False)
    _move_optimizer(model, "cuda")


def _move_optimizer(model: RoleModel, device: str) -> None:
    optimizers = getattr(model.optimizer, "chained_optimizers", [model.optimizer])
    for optimizer in optimizers:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            continue
        if model.args.precision != "fp32":  # the fp32 main weights are the optimizer's own
            for group in inner.param_groups:
                for param in group["params"]:
                    param.data = param.data.to(device, non_blocking=True)
        for state in inner.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    state[key] = value.to(device, non_blocking=True)
