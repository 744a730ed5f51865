"""The colocated PPO / GRPO loop: ``torchrun ... -m megatron_patch.rlhf --config rlhf.yaml``.

One episode, on every rank (each data-parallel rank takes its share of the prompts)::

    generation  policy samples responses (the generation engine over ppo_policy's module;
                optimizer state and gradient buffers are off the GPU meanwhile, and the KV
                cache is freed after)
    reference   log-probabilities of the responses under the frozen SFT model
    value       ppo_policy's own log-probabilities (the "old" ones of the ratio) and
                reward_forward's values (PPO)
    reward      reward_ref's score at the last token, or rlhf.reward_fn's
    training    advantages (PPO: k1 penalty + score, GAE, whitening over the global batch;
                GRPO: group-normalised scores), then num_training_epoch passes of clipped
                policy (and value) steps of train_global_batch_size samples

Losses are token means over the response tokens of the whole optimizer step, on every rank
(megatron-core's per-token loss: the micro-batch and data-parallel split change nothing).

Each episode logs one line and one JSON object (``rlhf.metrics_file``; TensorBoard under the
actor's ``tensorboard_dir``): the reward's mean and std, the k1 KL to the reference per token,
response length, the losses, clip fraction, entropy (estimated as the mean negative
log-probability of the sampled tokens), the train/generation agreement
mean(exp|logp_train - logp_gen|), seconds per phase and generation tokens/s.

Checkpoints: ppo_policy and reward_train save in the Megatron layout (iteration = episode) to
their YAML's ``save`` (or ``rlhf.save``/<role>) every ``save_episode_interval`` episodes and at
the end; a relaunch resumes from them exactly (the prompts and sampling of an episode depend on
the seed and the episode only).
"""
from __future__ import annotations

import json
import math
import os
import time

import torch
import torch.distributed as dist

from megatron_patch import compat
from megatron_patch.rlhf import experience as xp
from megatron_patch.rlhf import ppo_losses, ppo_math
from megatron_patch.training.metrics import _memory_gib

EXPERIENCE_KEYS = ("tokens", "position_ids", "labels", "mask", "old_logps", "advantages")
CRITIC_KEYS = ("tokens", "position_ids", "mask", "old_values", "returns")


class Schedule:
    """The sample counts of a run, checked against the data-parallel size."""

    def __init__(self, rlhf: dict, data_parallel: int, path: str):
        grpo = rlhf["algorithm"] == "grpo"
        self.group = rlhf["group_size"] if grpo else 1
        self.prompts = rlhf["sample_per_episode"]
        self.samples = self.prompts * self.group            # per episode, all ranks
        if self.prompts % data_parallel:
            raise ValueError(f"{path}: rlhf.sample_per_episode {self.prompts} is not divisible "
                             f"by the data-parallel size {data_parallel} (each rank samples "
                             f"its share of the prompts)")
        self.rank_prompts = self.prompts // data_parallel
        self.step_samples = rlhf["train_global_batch_size"] or self.samples
        micro = rlhf["train_micro_batch_size"]
        if self.samples % self.step_samples or self.step_samples % (micro * data_parallel):
            raise ValueError(f"{path}: rlhf.train_global_batch_size {self.step_samples} must "
                             f"divide the episode's {self.samples} samples and be a multiple "
                             f"of train_micro_batch_size {micro} x data-parallel size "
                             f"{data_parallel}")
        self.steps_per_epoch = self.samples // self.step_samples
        self.steps = rlhf["num_ppo_episode"] * rlhf["num_training_epoch"] * self.steps_per_epoch


def _sync_time() -> float:
    if compat.on_gpu():
        torch.cuda.synchronize()
    return time.perf_counter()


def global_means(sums: dict) -> dict:
    """``{name: (sum, count)}`` -> ``{name: sum / count}`` over the data-parallel ranks (the
    training loop's reduce_stats, in fp64)."""
    from megatron_patch.training.loop import reduce_stats

    return reduce_stats([{name: torch.tensor([float(total), float(count)], dtype=torch.float64,
                                             device=compat.device())
                          for name, (total, count) in sums.items()}])


class RLHFTrainer:
    def __init__(self, config, models: dict, prompts, tokenizer, reward_fn, schedule):
        from megatron.core import parallel_state as ps

        self.config, self.rlhf = config, config.rlhf
        self.models, self.prompts, self.tokenizer = models, prompts, tokenizer
        self.reward_fn, self.schedule = reward_fn, schedule
        self.actor = models["ppo_policy"]
        self.critic = models.get("reward_train")
        self.grpo = self.rlhf["algorithm"] == "grpo"
        self.dp_group = ps.get_data_parallel_group()
        self.dp_rank = ps.get_data_parallel_rank()
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.eod = tokenizer.eod
        self.pad = tokenizer.pad if tokenizer.pad is not None else tokenizer.eod
        self.vocab = self.actor.plan.model_args.vocab_size
        self.kl_coef = self.actor.progress.get("kl_coef", self.rlhf["kl_coef"])
        self.start = self.actor.resumed_episode
        self.reporting = dist.get_rank() == 0
        self.metrics = self.tensorboard = None

    # ------------------------------------------------------------------ experience
    def rollouts(self, episode: int) -> tuple[dict, list]:
        from megatron_patch.generation.engine import Limits, build_backend
        from megatron_patch.generation.sampling import SamplingParams
        from megatron_patch.generation.static_cache import release_static_cache
        from megatron_patch.rlhf.rollout import sample

        rlhf, s = self.rlhf, self.schedule
        chosen = xp.episode_prompts(s.prompts, episode, rlhf["seed"], len(self.prompts.ids))
        mine = chosen[self.dp_rank * s.rank_prompts:(self.dp_rank + 1) * s.rank_prompts]
        mine = [i for i in mine for _ in range(s.group)]   # GRPO: a group per prompt
        ids = [self.prompts.ids[i] for i in mine]
        module = self.actor.module.eval()
        device = next(module.parameters()).device
        longest = max(map(len, ids)) + rlhf["max_new_tokens"]
        backend = build_backend(rlhf["inference_backend"], module, longest)
        params = SamplingParams(top_k=rlhf["top_k"], top_p=rlhf["top_p"],
                                temperature=rlhf["temperature"])
        limits = Limits(rlhf["max_new_tokens"], self.eod, self.pad, self.vocab)
        size = rlhf["generation_batch_size"]
        first = self.dp_rank * len(ids)  # this rank's first row of the episode's samples
        batches = []
        for i in range(0, len(ids), size):
            # seeded by the episode and the batch's place among all ranks' rows: the samples
            # do not depend on the data-parallel size (when batches do not straddle ranks)
            generator = torch.Generator(device=device).manual_seed(
                rlhf["seed"] + 100_003 * episode + (first + i) // size)
            batches.append(sample(backend, ids[i:i + size], params, limits, generator))
        del backend
        release_static_cache(module)
        return xp.merge_rollouts(batches, self.pad, self.tp), mine

    def make_experience(self, episode: int, seconds: dict) -> dict:
        from megatron_patch.rlhf.roles import offload_training_state, restore_training_state

        rows = self.rlhf["train_micro_batch_size"]
        trained = [m for m in (self.actor, self.critic) if m is not None]
        if not self.rlhf["offload_training_state"]:
            trained = []
        for model in trained:
            offload_training_state(model)
        if compat.on_gpu():  # the episode's peaks: generation's, then the whole episode's
            torch.cuda.reset_peak_memory_stats()
        began = _sync_time()
        exp, prompt_index = self.rollouts(episode)
        seconds["generation"] = (mark := _sync_time()) - began
        if compat.on_gpu():
            seconds["generation_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        exp["ref_logps"] = xp.policy_logps(self.models["reference"].module, exp, rows)
        seconds["reference"] = (now := _sync_time()) - mark
        exp["old_logps"] = xp.policy_logps(self.actor.chunks[0], exp, rows)
        if self.critic is not None:
            self.critic.module.eval()
            exp["old_values"] = xp.critic_values(self.critic.chunks[0], exp, rows)
        seconds["value"] = (mark := _sync_time()) - now
        if self.reward_fn is not None:
            responses = [self.tokenizer.detokenize([t for t, m in zip(row, keep) if m])
                         for row, keep in zip(exp["labels"].tolist(), exp["mask"].tolist())]
            exp["scores"] = xp.rule_scores(self.reward_fn,
                                           [self.prompts.texts[i] for i in prompt_index],
                                           responses, exp["tokens"].device)
        else:
            exp["scores"] = xp.reward_model_scores(self.models["reward_ref"].module, exp, rows,
                                                   self.eod, self.pad)
        seconds["reward"] = _sync_time() - mark
        for model in trained:
            restore_training_state(model)
        if self.grpo:
            xp.grpo_advantages(exp, self.rlhf)
        else:
            xp.ppo_advantages(exp, self.rlhf, self.kl_coef, self.dp_group)
        return exp

    # ------------------------------------------------------------------ training
    def _step(self, model, parts: list, forward_step) -> tuple[dict, float | None]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_patch.training.loop import reduce_stats

        for chunk in model.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        model.optimizer.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(parts), model=model.chunks,
            num_microbatches=len(parts), seq_length=parts[0]["tokens"].shape[1],
            micro_batch_size=parts[0]["tokens"].shape[0], forward_only=False)
        updated, grad_norm, _ = model.optimizer.step()
        if updated:
            model.scheduler.step(increment=model.args.global_batch_size)
        stats = reduce_stats(outputs)
        if grad_norm is not None:
            stats["grad norm" if model is self.actor else "critic grad norm"] = float(grad_norm)
        return stats, updated

    def train(self, exp: dict, episode: int) -> dict:
        rlhf, s = self.rlhf, self.schedule
        rows = exp["tokens"].shape[0]
        steps = s.steps_per_epoch
        micro = rlhf["train_micro_batch_size"]
        actor_step = ppo_losses.actor_forward_step(rlhf["clip_eps"],
                                                   self.kl_coef if self.grpo else 0.0)
        critic_step = ppo_losses.critic_forward_step(rlhf["value_clip"])
        keys = EXPERIENCE_KEYS + (("ref_logps",) if self.grpo else ())
        totals: dict = {}
        device = exp["tokens"].device
        for epoch in range(rlhf["num_training_epoch"]):
            for step in range(steps):
                # every steps-th sample (the prompts are shuffled already): the samples of a
                # step are the same at any data-parallel size; epochs take them in turn
                index = torch.arange((step + epoch) % steps, rows, steps, device=device)
                batch = {k: v[index] for k, v in exp.items() if isinstance(v, torch.Tensor)}
                stats, _ = self._step(self.actor, xp.micro_batches(batch, micro, keys),
                                      actor_step)
                if self.critic is not None:
                    critic_stats, _ = self._step(self.critic, xp.micro_batches(
                        batch, micro, CRITIC_KEYS), critic_step)
                    stats.update(critic_stats)
                for name, value in stats.items():
                    totals.setdefault(name, []).append(value)
        return {name: sum(v) / len(v) for name, v in totals.items()}

    # ------------------------------------------------------------------ the run
    def episode_figures(self, exp: dict, train_stats: dict, seconds: dict) -> dict:
        mask = exp["mask"]
        tokens = mask.sum()
        scores = exp["scores"].double()
        k1 = ppo_math.kl(exp["old_logps"], exp["ref_logps"], "k1") * mask
        sums = {
            "reward_mean": (scores.sum(), scores.numel()),
            "reward_square": ((scores ** 2).sum(), scores.numel()),
            "kl": (k1.sum(), tokens),
            "kl_per_sequence": (k1.sum(), mask.shape[0]),
            "response_length": (tokens, mask.shape[0]),
            "entropy": (-(exp["old_logps"] * mask).sum(), tokens),
            "agreement": ((torch.exp((exp["old_logps"] - exp["gen_logps"]).abs()) * mask).sum(),
                          tokens),
            "generated_tokens": (tokens, 1),
        }
        figures = global_means(sums)
        mean = figures["reward_mean"]
        figures["reward_std"] = math.sqrt(max(figures.pop("reward_square") - mean ** 2, 0.0))
        generated = figures.pop("generated_tokens") * dist.get_world_size(self.dp_group)
        figures.update({name.replace(" ", "_"): value for name, value in train_stats.items()})
        figures["kl_coef"] = self.kl_coef
        memory = seconds.pop("generation_memory_gib", None)
        if memory is not None:
            figures["generation_memory_gib"] = memory
        figures.update({f"{name}_seconds": value for name, value in seconds.items()})
        figures["generation_tokens_per_sec"] = generated / max(seconds["generation"], 1e-9)
        figures["memory_gib"] = _memory_gib()  # the episode's peak (the CPU: the run's RSS)
        return figures

    def adapt_kl(self, figures: dict) -> None:
        """Ziegler et al.'s proportional controller on the per-sequence KL (PPO)."""
        target = self.rlhf["adaptive_kl_target"]
        if target is None or self.grpo:
            return
        self.kl_coef = ppo_math.adaptive_kl_coef(self.kl_coef, figures["kl_per_sequence"],
                                                 target, self.schedule.samples,
                                                 self.rlhf["adaptive_kl_horizon"])

    def save(self, episode: int) -> None:
        from megatron_patch.training import checkpointing

        for model in (self.actor, self.critic):
            if model is None or not model.args.save:
                continue
            checkpointing.save_checkpoint(model.args, episode, model.module, model.optimizer,
                                          model.scheduler, model.plan,
                                          {"rlhf": {"kl_coef": self.kl_coef}})
            if self.reporting:
                print(f"[megatron_patch] saved {model.name} at episode {episode} to "
                      f"{model.args.save}", flush=True)

    def log(self, episode: int, figures: dict, elapsed: float) -> None:
        if not self.reporting:
            return
        total = self.rlhf["num_ppo_episode"]
        row = {"iteration": episode, "episode": episode, **figures}
        if self.metrics:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
        if self.tensorboard:
            for key, value in figures.items():
                self.tensorboard.add_scalar(f"rlhf/{key}", value, episode)
        done = episode - self.start
        eta = elapsed / max(done, 1) * (total - episode)
        parts = [f"reward {figures['reward_mean']:.4f} (std {figures['reward_std']:.4f})",
                 f"kl {figures['kl']:.5f}", f"response length {figures['response_length']:.1f}",
                 f"policy loss {figures['policy_loss']:.4f}"]
        if "value_loss" in figures:
            parts.append(f"value loss {figures['value_loss']:.4f}")
        if "kl_loss" in figures:
            parts.append(f"kl loss {figures['kl_loss']:.5f}")
        parts += [f"clip fraction {figures['clip_fraction']:.3f}",
                  f"entropy {figures['entropy']:.3f}", f"agreement {figures['agreement']:.5f}",
                  "seconds " + ", ".join(f"{name} {figures[f'{name}_seconds']:.2f}" for name in
                                         ("generation", "reference", "value", "reward",
                                          "training")),
                  f"generation tokens/s {figures['generation_tokens_per_sec']:.1f}",
                  f"ETA {int(eta) // 60}:{int(eta) % 60:02d}"]
        print(f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] episode {episode:4d}/{total:4d} | "
              + " | ".join(parts), flush=True)

    def open_logs(self) -> None:
        from megatron_patch.training.metrics import prepare_metrics_file

        path = self.rlhf["metrics_file"]
        if not self.reporting:
            return
        if path:
            if not os.path.isabs(path):
                path = os.path.join(self.config.working_dir, path)
            note = prepare_metrics_file(path, self.start)
            if note:
                print(f"[megatron_patch] {note}", flush=True)
            self.metrics = open(path, "a", encoding="utf-8")
        board = self.actor.args.tensorboard_dir
        if board:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("[megatron_patch] tensorboard_dir given but tensorboard is not installed "
                      "(pip install tensorboard); skipping TensorBoard", flush=True)
            else:
                self.tensorboard = SummaryWriter(log_dir=board)

    def run(self) -> None:
        self.open_logs()
        interval = self.rlhf["save_episode_interval"]
        began, last_saved = time.time(), self.start
        for episode in range(self.start + 1, self.rlhf["num_ppo_episode"] + 1):
            seconds: dict = {}
            exp = self.make_experience(episode, seconds)
            mark = _sync_time()
            stats = self.train(exp, episode)
            seconds["training"] = _sync_time() - mark
            figures = self.episode_figures(exp, stats, seconds)
            self.log(episode, figures, time.time() - began)
            self.adapt_kl(figures)
            if interval and episode % interval == 0:
                self.save(episode)
                last_saved = episode
        if last_saved != self.rlhf["num_ppo_episode"] and self.start < self.rlhf["num_ppo_episode"]:
            self.save(self.rlhf["num_ppo_episode"])
        for handle in (self.metrics, self.tensorboard):
            if handle:
                handle.close()
