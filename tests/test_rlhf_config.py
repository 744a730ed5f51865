"""The RLHF configuration (megatron_patch/rlhf/config.py): the seed's rlhf.yaml and its
ppo_policy.yaml, written here as the seed document prints them, parse and map to the six roles;
unknown and contradictory keys are errors naming the file and the key."""
import pytest

from megatron_patch.rlhf.config import ROLES, load_config

SEED_RLHF_VERBATIM = """\
runtime_env:
    working_dir: ./

models:
    ppo_policy:
        model_config_file: configs/ppo_policy.yaml
        num_device: 8
        gpu_per_process: 1
        trainable: True
    policy:
        model_config_file: configs/policy.yaml
        num_device: 8
        gpu_per_process: 1
        trainable: False
        return_rlhf_data: True
    reference:
        model_config_file: configs/reference.yaml
        num_device: 8
        gpu_per_process: 1
        trainable: False
        return_rlhf_data: True
    reward_train:
        model_config_file: configs/reward_train.yaml
        num_device: 1
        gpu_per_process: 1
        trainable: True
    reward_forward:
        model_config_file: configs/reward_forward.yaml
        num_device: 1
        gpu_per_process: 1
        trainable: False
        return_rlhf_data: True
    reward_ref:
        model_config_file: configs/reward_ref.yaml
        num_device: 1
        gpu_per_process: 1
        trainable: False
        return_rlhf_data: True

rlhf:
    colocation:
        - policy,ppo_policy,reward_forward,reference,reward_ref,reward_train
    generation_batch_size: 2
    train_micro_batch_size: 2
    num_ppo_episode: 5
    sample_per_episode: 10
    num_training_epoch: 1
"""
SEED_PPO_POLICY = """\
tensor_model_parallel_size: 8
pipeline_model_parallel_size: 1
num_layers: 30
hidden_size: 4096
num_attention_heads: 32
micro_batch_size: 2
seq_length: 1024
max_position_embeddings: 2048
train_iters: 5
lr_decay_iters: 320000
save: /workspace/exp/bloom_7b1/sft_out
load: /workspace/exp/bloom_7b1/sft_train
data_path:
    - my-gpt2_text_document
vocab_file: gpt2-vocab.json
merge_file: gpt2-merges.txt
data_impl: mmap
split: "949,50,1"
distributed_backend: nccl
lr: 0.00015
min_lr: 0.00001
lr_decay_style: cosine
weight_decay: 0.02
clip_grad: 1.0
lr_warmup_fraction: 0.01
log_interval: 1
"""
# The seed document puts the reward roles on one device; colocated here, every role runs on all
# the devices, so the examples below give them 8 (the document's 1 is refused with a message).
SEED_RLHF = "\n".join(
    line.replace("num_device: 1", "num_device: 8") for line in SEED_RLHF_VERBATIM.split("\n"))


def write_seed(root, rlhf=SEED_RLHF, model=SEED_PPO_POLICY):
    (root / "configs").mkdir(exist_ok=True)
    for role in ROLES:
        (root / "configs" / f"{role}.yaml").write_text(model)
    (root / "rlhf.yaml").write_text(rlhf)
    return str(root / "rlhf.yaml")


def test_the_seed_configuration_parses_and_maps_to_the_roles(tmp_path):
    config = load_config(write_seed(tmp_path))
    assert list(config.roles) == list(ROLES) and config.algorithm == "ppo"
    assert [n for n, r in config.roles.items() if r.trainable] == ["ppo_policy", "reward_train"]
    policy = config.roles["ppo_policy"]
    assert policy.config_file == str(tmp_path / "configs" / "ppo_policy.yaml")
    assert policy.argv[:4] == ["--tensor-model-parallel-size", "8",
                               "--pipeline-model-parallel-size", "1"]
    assert ["--data-path", "my-gpt2_text_document"] == \
        policy.argv[policy.argv.index("--data-path"):][:2]
    assert policy.unused == ["data_impl", "data_path", "distributed_backend", "merge_file",
                             "split", "vocab_file"]
    assert config.rlhf["sample_per_episode"] == 10 and config.rlhf["kl_coef"] == 0.02


@pytest.mark.parametrize("change, message", [
    (lambda t: t + "extra: 1\n", r"rlhf.yaml: unknown key 'extra'"),
    (lambda t: t.replace("        num_device: 8\n        gpu_per_process: 1\n        trainable: True\n    policy",
                         "        num_device: 8\n        gpus: 1\n        trainable: True\n    policy"),
     r"unknown key 'models.ppo_policy.gpus'"),
    (lambda t: t.replace("    num_training_epoch: 1", "    num_training_epochs: 1"),
     r"unknown key 'rlhf.num_training_epochs'"),
    (lambda t: t.replace("        trainable: True\n    policy", "        trainable: False\n    policy"),
     r"models.ppo_policy.trainable is False, but ppo_policy is trained"),
    (lambda t: t.replace("policy,ppo_policy,reward_forward,", "policy,ppo_policy,"),
     r"rlhf.colocation must list every role in one group"),
    (lambda t: SEED_RLHF_VERBATIM, r"models.\*.num_device differ \(\[1, 8\]\): colocated "
                                   r"roles run on the same devices: give every role 8"),
    (lambda t: t.replace("configs/reference.yaml", "configs/missing.yaml"),
     r"models.reference.model_config_file .*missing.yaml': no such file"),
    (lambda t: t.replace("    num_training_epoch: 1", "    algorithm: a2c"),
     r"rlhf.algorithm must be ppo or grpo"),
    (lambda t: t.replace("    sample_per_episode: 10", "    sample_per_episode: ten"),
     r"rlhf.sample_per_episode must be an integer, got 'ten'"),
    (lambda t: t.replace("    num_ppo_episode: 5", "    num_ppo_episode: 0"),
     r"rlhf.num_ppo_episode must be at least 1, got 0"),
    (lambda t: t.replace("    num_training_epoch: 1", "    kl_coef: high"),
     r"rlhf.kl_coef must be a number, got 'high'"),
    (lambda t: t.replace("    num_training_epoch: 1", "    reward_fn: rules:score"),
     r"rlhf.reward_fn and models.reward_ref both give the reward; keep one"),
])
def test_wrong_rlhf_yaml_names_the_key(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_config(write_seed(tmp_path, rlhf=change(SEED_RLHF)))


def test_wrong_model_yaml_names_the_file_and_key(tmp_path):
    with pytest.raises(ValueError, match=r"ppo_policy.yaml: unknown key 'hidden_sise'"):
        load_config(write_seed(tmp_path, model=SEED_PPO_POLICY.replace("hidden_size",
                                                                        "hidden_sise")))
    with pytest.raises(ValueError, match=r"ppo_policy.yaml: fp8_format is for pretraining"):
        load_config(write_seed(tmp_path, model=SEED_PPO_POLICY.replace(
            "hidden_size", "fp8_format: hybrid\nhidden_size", 1)))
    path = write_seed(tmp_path)
    (tmp_path / "configs" / "reference.yaml").write_text(
        SEED_PPO_POLICY.replace("tensor_model_parallel_size: 8", "tensor_model_parallel_size: 4"))
    with pytest.raises(ValueError, match="tensor_model_parallel_size differs between the roles"):
        load_config(path)


def test_grpo_needs_no_critic_and_a_rule_replaces_the_reward_model(tmp_path):
    text = SEED_RLHF.split("    reward_train:")[0] + "rlhf:\n    algorithm: grpo\n" \
        "    reward_fn: mymodule:reward\n    group_size: 8\n"
    config = load_config(write_seed(tmp_path, rlhf=text))
    assert set(config.roles) == {"ppo_policy", "policy", "reference"}
    assert config.algorithm == "grpo" and config.rlhf["group_size"] == 8
    with pytest.raises(ValueError, match="models.reward_train is missing"):
        load_config(write_seed(tmp_path, rlhf=text.replace("algorithm: grpo", "algorithm: ppo")))
