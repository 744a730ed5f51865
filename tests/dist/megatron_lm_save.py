"""Run under torchrun (4 processes: TP2 x PP2) with a Megatron-LM checkout: Megatron-LM's own
``megatron.training.checkpointing.save_checkpoint`` writes a tiny llama, bf16, with a
megatron-core optimizer and schedule, on the CPU. ``megatron_lm_save.py MEGATRON_LM_DIR OUT
torch|torch_dist``.

The Namespace comes from Megatron-LM's own parser and validate_args. CPU mode is compat's,
plus what Megatron-LM's training code asks of CUDA beyond megatron-core (here only:
torch.cuda.get_rng_state, and the device architecture validate_args reads)."""
import os
import sys


def main():
    mlm, out, fmt = sys.argv[1:4]
    sys.path.insert(0, mlm)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    import torch
    import torch.distributed as dist

    from megatron_patch import compat

    compat.initialize_parallel(2, 2)
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    import megatron.training.arguments as arguments

    arguments.get_device_arch_version = lambda: 9
    sys.argv = ["pretrain_gpt.py", "--use-mcore-models", "--num-layers", "2", "--hidden-size",
                "64", "--ffn-hidden-size", "160", "--num-attention-heads", "4",
                "--group-query-attention", "--num-query-groups", "2", "--seq-length", "64",
                "--max-position-embeddings", "128", "--micro-batch-size", "1",
                "--global-batch-size", "1", "--normalization", "RMSNorm", "--swiglu",
                "--disable-bias-linear", "--position-embedding-type", "rope",
                "--untie-embeddings-and-output-weights", "--norm-epsilon", "1e-5",
                "--tokenizer-type", "NullTokenizer", "--vocab-size", "299", "--mock-data",
                "--train-iters", "3", "--lr", "1e-4", "--save", out, "--ckpt-format", fmt,
                "--transformer-impl", "local", "--no-gradient-accumulation-fusion",
                "--no-persist-layer-norm", "--no-masked-softmax-fusion",
                "--no-bias-swiglu-fusion", "--no-rope-fusion", "--eval-interval", "10",
                "--save-interval", "3", "--tensor-model-parallel-size", "2",
                "--pipeline-model-parallel-size", "2", "--bf16"]
    args = arguments.parse_args(ignore_unknown_args=True)
    args.rank, args.world_size = dist.get_rank(), dist.get_world_size()
    arguments.validate_args(args, {})
    from megatron.training import global_vars
    from megatron.training.tokenizer.tokenizer import _vocab_size_with_padding

    global_vars.set_args(args)
    args.padded_vocab_size = _vocab_size_with_padding(300, args, logging_enabled=False)
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.rerun_state_machine import initialize_rerun_state_machine
    from megatron.training.checkpointing import save_checkpoint

    config = arguments.core_transformer_config_from_args(args)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=args.padded_vocab_size, max_sequence_length=128,
                     pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=False,
                     position_embedding_type="rope", rotary_base=10000).bfloat16()
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=1e-4, min_lr=0.0, bf16=True), [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0, max_lr=1e-4, min_lr=0, lr_warmup_steps=0, lr_decay_steps=3,
        lr_decay_style="linear", start_wd=0.01, end_wd=0.01, wd_incr_steps=3,
        wd_incr_style="constant")
    initialize_rerun_state_machine()
    save_checkpoint(3, [ddp], optimizer, scheduler, 0)
    compat.destroy_parallel()


if __name__ == "__main__":  # dist_checkpointing's writer re-imports this file in a child
    main()
