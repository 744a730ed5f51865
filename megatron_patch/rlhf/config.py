"""The RLHF run's configuration: the seed's ``rlhf.yaml`` and one Megatron-LM-argument YAML per
model, read as the seed writes them (../shared/seed/, "PPO训练").

``rlhf.yaml``::

    runtime_env: {working_dir: ./}          # the model files are relative to it (default: the
                                            # directory of rlhf.yaml)
    models:                                 # the six roles; GRPO needs no critic (reward_train,
      ppo_policy: {model_config_file: configs/ppo_policy.yaml, num_device: 8,
                   gpu_per_process: 1, trainable: True}
      policy:     {model_config_file: ..., trainable: False, return_rlhf_data: True}
      reference, reward_train, reward_forward, reward_ref: the same keys
    rlhf:
      colocation: [policy,ppo_policy,reward_forward,reference,reward_ref,reward_train]
      generation_batch_size: 2              # prompts per generation micro-batch
      train_micro_batch_size: 2             # samples per training micro-batch
      num_ppo_episode: 5                    # episodes (generate, score, train)
      sample_per_episode: 10                # prompts (x group_size for GRPO) per episode
      num_training_epoch: 1                 # passes over an episode's samples

plus this project's keys (defaults and meanings in ``RLHF_DEFAULTS``; a value of the wrong type
is an error naming the key). ``model_config_file``, ``prompt_data``, ``save`` and
``metrics_file`` are relative to ``runtime_env.working_dir`` (itself relative to the directory
of rlhf.yaml), as are ``load`` and ``save`` in the model files. Any string may use ChatLearn's
``${NAME}`` / ``${NAME:default}``: the environment variable, else the default (a value that is
one variable becomes a YAML scalar: ``num_device: ${NUM_DEVICE:8}`` is the number 8).

A per-model YAML holds Megatron-LM
argument names (``tensor_model_parallel_size: 8``, ``data_path: [...]``); it becomes that
model's trainer command line and is checked by the trainer's own parser, so an unknown name is
an error naming the file and the key. Arguments the RLHF loop does not use (the pretraining data:
``data_path``, ``data_impl``, ``split``, ``vocab_file``, ``merge_file``) are accepted as the seed
writes them and reported as unused.
"""
from __future__ import annotations

import dataclasses
import os
import re

ROLES = ("ppo_policy", "policy", "reference", "reward_train", "reward_forward", "reward_ref")
TRAINED = {"ppo_policy": "policy", "reward_train": "reward_forward"}  # trained -> its inference copy
CRITIC = ("reward_train", "reward_forward")
MODEL_KEYS = {"model_config_file": str, "num_device": int, "gpu_per_process": int,
              "trainable": bool, "return_rlhf_data": bool}
RLHF_DEFAULTS = {
    "colocation": None, "generation_batch_size": 2, "train_micro_batch_size": 2,
    "num_ppo_episode": 5, "sample_per_episode": 10, "num_training_epoch": 1,
    "train_global_batch_size": None,  # samples per optimizer step (default: the episode's)
    "algorithm": "ppo",          # ppo | grpo
    "prompt_data": None,         # JSONL {prompt} or the SFT formats
    "prompt_format": None,       # raw | alpaca | chat (default: the actor checkpoint's)
    "max_new_tokens": 64, "temperature": 1.0, "top_k": 0, "top_p": 0.0,
    "inference_backend": "auto",  # the generation engine's backend (generate --help)
    "offload_training_state": True,  # optimizer state and gradient buffers off the GPU while
                                     # generating (GPU only)
    "kl_coef": 0.02,             # beta of the k1 penalty in PPO's reward; GRPO's k3 loss weight
    "adaptive_kl_target": None,  # a KL target turns on the adaptive controller (PPO)
    "adaptive_kl_horizon": 10000,
    "clip_eps": 0.2, "value_clip": 0.2, "gamma": 1.0, "lam": 0.95, "reward_clip": None,
    "whiten_advantages": True,
    "group_size": 4,             # GRPO: samples per prompt
    "reward_fn": None,           # "module:function" (text -> float) instead of reward_ref
    "save": None, "save_episode_interval": 1, "seed": 1234, "metrics_file": None,
}
# The types the rlhf: keys take (None: any); a float key takes an int too.
RLHF_TYPES = {key: (float if isinstance(value, float) else type(value))
              for key, value in RLHF_DEFAULTS.items() if value is not None}
RLHF_TYPES.update(train_global_batch_size=int, prompt_data=str, prompt_format=str,
                  adaptive_kl_target=float, reward_clip=float, reward_fn=str, save=str,
                  metrics_file=str, colocation=list)
# Megatron-LM pretraining-data arguments the seed's per-model files carry: accepted, unused.
UNUSED_MEGATRON = {"data_path", "data_impl", "split", "vocab_file", "merge_file",
                   "distributed_backend"}
PATH_KEYS = ("prompt_data", "save", "metrics_file")  # relative to runtime_env.working_dir
SHARED_LAYOUT = ("tensor_model_parallel_size", "pipeline_model_parallel_size")


@dataclasses.dataclass
class Role:
    name: str
    config_file: str
    num_device: int
    gpu_per_process: int
    trainable: bool
    return_rlhf_data: bool
    megatron: dict               # the model file's Megatron-LM arguments, as written
    argv: list                   # the same as trainer flags
    unused: list                 # keys accepted but not used by the RLHF loop


@dataclasses.dataclass
class RLHFConfig:
    path: str
    working_dir: str
    roles: dict
    rlhf: dict

    @property
    def algorithm(self) -> str:
        return self.rlhf["algorithm"]


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")


def expand_variables(value, path: str):
    """ChatLearn's ``${NAME}`` / ``${NAME:default}`` in YAML strings: the environment variable,
    else the default (a value that is one variable becomes a YAML scalar: ``${TP:1}`` -> 1);
    an unset variable without a default is an error naming the file."""
    import yaml

    if isinstance(value, dict):
        return {key: expand_variables(item, path) for key, item in value.items()}
    if isinstance(value, list):
        return [expand_variables(item, path) for item in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match):
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ValueError(f"{path}: ${{{name}}} is not set in the environment (give it, or "
                             f"a default: ${{{name}:value}})")
        return default

    whole = _VARIABLE.fullmatch(value)
    text = _VARIABLE.sub(substitute, value)
    return yaml.safe_load(text) if whole and text.strip() else text


def _load_yaml(path: str, what: str):
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r}: no such file")
    with open(path, encoding="utf-8") as handle:
        try:
            return expand_variables(yaml.safe_load(handle), path)
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from None


def _unknown(path: str, where: str, keys, known) -> None:
    extra = sorted(set(keys) - set(known))
    if extra:
        prefix = f"{where}." if where else ""
        raise ValueError(f"{path}: unknown key '{prefix}{extra[0]}' (expected one of "
                         f"{', '.join(sorted(known))})")


def megatron_argv(values: dict, path: str) -> list[str]:
    """A per-model YAML as trainer flags: ``key: value`` -> ``--key value``, a list -> several
    values, ``True`` -> the switch, ``False`` / null -> nothing."""
    argv = []
    for key, value in values.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: key {key!r} is not a Megatron-LM argument name")
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            raise ValueError(f"{path}: '{key}' is a mapping; Megatron-LM arguments are values "
                             f"or lists")
        else:
            argv += [flag, str(value)]
    return argv


def check_megatron_args(role: Role) -> None:
    """The trainer's parser on the model's flags: an unknown name is an error naming the file
    and the key (argparse's own message names the flag)."""
    from megatron_patch.training import arguments

    parser = arguments.build_parser(f"{role.config_file}", "")
    parser.exit_on_error = False
    known = {action.dest for action in parser._actions}
    for key in role.megatron:
        if key not in known and key not in UNUSED_MEGATRON:
            raise ValueError(f"{role.config_file}: unknown key '{key}' (no Megatron-LM "
                             f"argument --{key.replace('_', '-')} in this trainer)")
    if role.megatron.get("fp8_format"):  # rollouts run the model on any number of tokens
        raise ValueError(f"{role.config_file}: fp8_format is for pretraining and SFT; the RLHF "
                         f"roles generate rollouts of any length, which FP8 GEMMs (multiples "
                         f"of 16 tokens) do not take: remove it")


def load_config(path: str) -> RLHFConfig:
    """Read and check ``rlhf.yaml`` and its model files."""
    top = _load_yaml(path, "--config")
    if not isinstance(top, dict):
        raise ValueError(f"{path}: expected a mapping with models: and rlhf:")
    _unknown(path, "", top, ("runtime_env", "models", "rlhf"))
    env = top.get("runtime_env") or {}
    _unknown(path, "runtime_env", env, ("working_dir",))
    base = os.path.dirname(os.path.abspath(path))
    working_dir = os.path.normpath(os.path.join(base, env.get("working_dir") or "."))
    rlhf = dict(RLHF_DEFAULTS)
    given = top.get("rlhf") or {}
    _unknown(path, "rlhf", given, RLHF_DEFAULTS)
    rlhf.update(given)
    for key, value in given.items():
        _check_type(path, key, value)
    for key in PATH_KEYS:
        if rlhf[key] and not os.path.isabs(rlhf[key]):
            rlhf[key] = os.path.normpath(os.path.join(working_dir, rlhf[key]))
    if rlhf["algorithm"] not in ("ppo", "grpo"):
        raise ValueError(f"{path}: rlhf.algorithm must be ppo or grpo, got "
                         f"{rlhf['algorithm']!r}")
    models = top.get("models")
    if not isinstance(models, dict):
        raise ValueError(f"{path}: 'models' must map the roles ({', '.join(ROLES)}) to their "
                         f"settings")
    _unknown(path, "models", models, ROLES)
    needed = [r for r in ROLES if not (rlhf["algorithm"] == "grpo" and r in CRITIC)
              and not (r == "reward_ref" and rlhf["reward_fn"])]
    missing = [r for r in needed if r not in models]
    if missing:
        raise ValueError(f"{path}: models.{missing[0]} is missing (rlhf.algorithm "
                         f"{rlhf['algorithm']} needs {', '.join(needed)})")
    roles = {name: _role(path, working_dir, name, models[name]) for name in ROLES
             if name in models}
    _check_roles(path, roles, rlhf)
    return RLHFConfig(os.path.abspath(path), working_dir, roles, rlhf)


def _check_type(path: str, key: str, value) -> None:
    kind = RLHF_TYPES.get(key)
    if value is None or kind is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float \
        else isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ValueError(f"{path}: rlhf.{key} must be {_KIND_NAMES[kind]}, got {value!r}")
    if key in POSITIVE and value < 1:
        raise ValueError(f"{path}: rlhf.{key} must be at least 1, got {value}")


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list"}
POSITIVE = ("generation_batch_size", "train_micro_batch_size", "num_ppo_episode",
            "sample_per_episode", "num_training_epoch", "train_global_batch_size",
            "max_new_tokens", "group_size", "adaptive_kl_horizon")


def _role(path: str, working_dir: str, name: str, settings) -> Role:
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: models.{name} must be a mapping")
    _unknown(path, f"models.{name}", settings, MODEL_KEYS)
    for key, kind in MODEL_KEYS.items():
        if key in settings and not isinstance(settings[key], kind):
            raise ValueError(f"{path}: models.{name}.{key} must be a {kind.__name__}, got "
                             f"{settings[key]!r}")
    if "model_config_file" not in settings:
        raise ValueError(f"{path}: models.{name}.model_config_file is missing")
    file = os.path.join(working_dir, settings["model_config_file"])
    values = _load_yaml(file, f"models.{name}.model_config_file") or {}
    if not isinstance(values, dict):
        raise ValueError(f"{file}: expected Megatron-LM arguments as 'name: value' lines")
    trainable = settings.get("trainable", name in TRAINED)
    role = Role(name, file, settings.get("num_device", 1), settings.get("gpu_per_process", 1),
                trainable, settings.get("return_rlhf_data", not trainable), values,
                megatron_argv(values, file), sorted(set(values) & UNUSED_MEGATRON))
    check_megatron_args(role)
    return role


def _check_roles(path: str, roles: dict, rlhf: dict) -> None:
    """Contradictions between the roles: who trains, colocation, devices, layout."""
    for name, role in roles.items():
        if role.trainable != (name in TRAINED):
            raise ValueError(f"{path}: models.{name}.trainable is {role.trainable}, but "
                             f"{name} {'is' if name in TRAINED else 'is not'} trained")
    if rlhf["reward_fn"] and "reward_ref" in roles:
        raise ValueError(f"{path}: rlhf.reward_fn and models.reward_ref both give the reward; "
                         f"keep one (the reward model is not loaded for a rule)")
    colocation = rlhf["colocation"]
    if colocation is not None:
        groups = [set(part.strip() for part in group.split(",")) for group in colocation]
        if len(groups) != 1 or groups[0] != set(roles):
            raise ValueError(f"{path}: rlhf.colocation must list every role in one group "
                             f"({','.join(roles)}): the roles share the GPUs and time-share "
                             f"their memory")
    devices = {role.num_device for role in roles.values()}
    if len(devices) > 1:
        raise ValueError(f"{path}: models.*.num_device differ ({sorted(devices)}): colocated "
                         f"roles run on the same devices: give every role {max(devices)}")
    for key in SHARED_LAYOUT:
        values = {name: role.megatron.get(key, 1) for name, role in roles.items()}
        if len(set(values.values())) > 1:
            raise ValueError(f"{path}: {key} differs between the roles ({values}); colocated "
                             f"roles share one layout")
