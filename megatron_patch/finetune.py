"""``torchrun ... -m megatron_patch.finetune``: supervised fine-tuning (SFT).

Training data is instruction JSON (``instruction``/``input``/``output``, Alpaca prompts) or chat
JSONL (``messages``), or the mmap prefix written by ``python -m megatron_patch.data.sft_preprocess``.
The loss covers response tokens only and is averaged over all of them in the global batch.

    torchrun --nproc-per-node 8 -m megatron_patch.finetune --load ckpt --save out \\
        --train-data train.json --valid-data valid.json --epochs 2 \\
        --micro-batch-size 4 --global-batch-size 32 --seq-length 2048 --lr 1e-5 --bf16
"""
from __future__ import annotations

import math
import os
import sys


def sft_arguments(parser) -> None:
    g = parser.add_argument_group("SFT data")
    g.add_argument("--train-data", required=True,
                   help="instruction JSON / chat JSONL file, or an sft_preprocess mmap prefix")
    g.add_argument("--valid-data", help="same formats; validation loss every --eval-interval")
    g.add_argument("--epochs", type=float, help="sets --train-iters from the dataset size")
    g.add_argument("--max-padding-length", type=int,
                   help="the seed's PAD_LEN: samples are truncated/padded to this many tokens "
                        "(default --seq-length)")
    g.add_argument("--packing", action="store_true",
                   help="pack several samples per sequence (no attention across samples)")


def load_sft_dataset(path: str, tokenizer, length: int, packing: bool, glm: dict | None = None):
    """JSON / JSONL file, or an mmap prefix from sft_preprocess. ``glm``: a prefix-LM model's
    special ids (its samples get ``[gMASK] <sop>`` before the response)."""
    from megatron_patch.data.sft import SFTDataset

    if os.path.isfile(path):
        return SFTDataset(path, tokenizer, length, packing=packing, glm=glm)
    if glm and os.path.isfile(f"{path}_tokens_document.idx"):
        raise ValueError(f"--train-data {path}: sft_preprocess's mmap samples have no [gMASK] "
                         f"<sop>; GLM prefix-LM models (ChatGLM-6B v1, GLM-130B) fine-tune from "
                         f"the JSON / JSONL records")
    if os.path.isfile(f"{path}_tokens_document.idx"):
        return SFTDataset.from_mmap(path, tokenizer, length, packing=packing or None)
    raise FileNotFoundError(f"SFT data '{path}' is neither a JSON/JSONL file nor an "
                            f"sft_preprocess prefix ({path}_tokens_document.idx)")


def recorded_prompt_format(path: str) -> str | None:
    """generate's default --prompt-format for a model trained on ``path``: alpaca or chat when
    all its records are of that kind; None for a mixed file or an mmap prefix (no records)."""
    from megatron_patch.data.sft import iter_json_records

    if not os.path.isfile(path):
        return None
    kinds = {"chat" if "messages" in record else "alpaca" for _, record in iter_json_records(path)}
    return kinds.pop() if len(kinds) == 1 else None


class SFTData:
    """SFTDataset epochs, reshuffled per epoch, resumable at any sample. A run resumes only
    from its own --save directory; another run's checkpoint gives it weights (run.py)."""

    RESUMES_OWN_SAVE_ONLY = True
    add_arguments = staticmethod(sft_arguments)
    glm = None  # GLM prefix-LM: (special ids, 2-D positions) of this run's model

    @staticmethod
    def build_datasets(args, plan):
        model_args = plan.model_args
        special = model_args.prefix_lm_ids
        SFTData.glm = (special, model_args.position_embedding_type == "rope_2d") \
            if special else None
        if plan.tokenizer is None:
            raise ValueError("finetune needs a tokenizer: give --tokenizer-type/--tokenizer-model "
                             "or --load a checkpoint that carries one")
        args.calculate_per_token_loss = True
        args.seq_length = args.max_padding_length or args.seq_length
        train = load_sft_dataset(args.train_data, plan.tokenizer, args.seq_length, args.packing,
                                 special)
        plan.meta["prompt_format"] = recorded_prompt_format(args.train_data)  # generate's default
        valid = load_sft_dataset(args.valid_data, plan.tokenizer, args.seq_length,
                                 args.packing, special) if args.valid_data else None
        if len(train) == 0:
            raise ValueError(f"--train-data {args.train_data}: no sample keeps a response token "
                             f"within {args.seq_length} tokens; raise --seq-length / "
                             f"--max-padding-length")
        if args.epochs and (args.train_iters or args.train_samples):
            given = "--train-iters" if args.train_iters and not args.train_samples else \
                "--train-samples"
            raise ValueError(f"give --epochs or {given}, not both (both set the length of the "
                             f"run)")
        if args.train_iters is None and args.epochs:
            args.train_iters = max(1, math.floor(args.epochs * len(train) / args.global_batch_size))
        return train, valid

    @staticmethod
    def make_iterators(args, datasets, consumed: int):
        from megatron.core import parallel_state as ps

        from megatron_patch.data.sft_packing import collate, glm_collate
        from megatron_patch.training.data import EpochOrder, MicroBatchSampler, micro_batches

        train, valid = datasets
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

        def collate_batch(items):
            batch = collate(items)
            if not args.packing:  # causal attention never reaches the trailing padding
                batch.pop("attention_mask", None)
            return batch

        if SFTData.glm:  # the prompt attends both ways: the mask is always needed
            collate_batch = glm_collate(*SFTData.glm)

        def batches(dataset, start, total):
            sampler = MicroBatchSampler(total, start, args.micro_batch_size, dp_rank, dp,
                                        EpochOrder(len(dataset), args.seed))
            return micro_batches(dataset, sampler, args, collate_batch)

        total = args.train_iters * args.global_batch_size
        make_valid = None
        if valid is not None and len(valid) > 0:
            evals = args.eval_iters * args.global_batch_size
            make_valid = lambda: batches(valid, 0, evals)  # noqa: E731
        return batches(train, consumed, total), make_valid


def main(argv=None) -> int:
    from megatron_patch.training.run import main as run_main

    return run_main("python -m megatron_patch.finetune",
                    "Supervised fine-tuning of a megatron_patch family on megatron-core "
                    "(start it with torchrun).", SFTData, argv)


if __name__ == "__main__":
    sys.exit(main())
