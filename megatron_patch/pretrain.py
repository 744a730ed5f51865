"""``torchrun ... -m megatron_patch.pretrain``: (continued) pretraining on mmap datasets.

    torchrun --nproc-per-node 8 -m megatron_patch.pretrain \\
        --load converted_ckpt --save out/ckpt --data-path data/wudao_llamabpe_text_document \\
        --tensor-model-parallel-size 2 --micro-batch-size 4 --global-batch-size 64 \\
        --seq-length 2048 --lr 1e-5 --min-lr 1e-6 --train-iters 1000 --bf16
"""
from __future__ import annotations

import sys


class PretrainData:
    """megatron-core GPTDatasets (weighted blends of mmap prefixes, or --mock-data)."""

    collate = None  # how samples become a micro-batch (GLM's: glm_pretrain_collate); set per run

    @staticmethod
    def add_arguments(parser):
        from megatron_patch.training.arguments import pretrain_data_arguments

        pretrain_data_arguments(parser)

    @staticmethod
    def build_datasets(args, plan):
        from megatron_patch.training.data import build_pretrain_datasets, glm_pretrain_collate

        model_args = plan.model_args
        PretrainData.collate = None
        if model_args.prefix_lm_ids:  # GLM: each sample starts [gMASK] <sop> (2 tokens)
            if args.reset_attention_mask or args.reset_position_ids:
                raise ValueError("--reset-attention-mask / --reset-position-ids: GLM's "
                                 "prefix-LM samples have their own mask and positions")
            PretrainData.collate = glm_pretrain_collate(model_args.prefix_lm_ids,
                                                model_args.position_embedding_type == "rope_2d")
            print(f"[data] GLM prefix-LM: each sample is [gMASK] <sop> + {args.seq_length - 2} "
                  f"text tokens (loss on the text)", flush=True)
            return build_pretrain_datasets(args, plan.tokenizer, model_args.vocab_size, 2)
        return build_pretrain_datasets(args, plan.tokenizer, model_args.vocab_size)

    @staticmethod
    def make_iterators(args, datasets, consumed: int):
        """Training from ``consumed`` samples on; validation from 0 at every evaluation."""
        from megatron.core import parallel_state as ps

        from megatron_patch.training.data import MicroBatchSampler, micro_batches

        train_ds, valid_ds, _ = datasets
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

        def batches(dataset, start):
            return micro_batches(dataset, MicroBatchSampler(
                len(dataset), start, args.micro_batch_size, dp_rank, dp), args,
                PretrainData.collate)

        make_valid = None
        if valid_ds is not None and len(valid_ds) >= args.global_batch_size:
            make_valid = lambda: batches(valid_ds, 0)  # noqa: E731
        return batches(train_ds, consumed), make_valid


def main(argv=None) -> int:
    from megatron_patch.training.run import main as run_main

    return run_main("python -m megatron_patch.pretrain",
                    "Continued pretraining of a megatron_patch family on megatron-core "
                    "(start it with torchrun).", PretrainData, argv)


if __name__ == "__main__":
    sys.exit(main())
