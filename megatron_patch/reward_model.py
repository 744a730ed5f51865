"""``torchrun ... -m megatron_patch.reward_model``: reward-model training on preference pairs
(rlhf/reward.py: the data, the Bradley-Terry loss, what is logged), with every trainer flag
(TP/PP/DP/SP, distributed optimizer, precision, recompute, resume). ``--load`` an SFT or
converted language model (its trunk; the scalar head starts from the init) or a reward model
(converted from HF ``*ForSequenceClassification``, or this run's own --save to resume).

    torchrun --nproc-per-node 8 -m megatron_patch.reward_model --load sft_ckpt --save rm \\
        --train-data pairs.jsonl --valid-data valid.jsonl --epochs 1 --micro-batch-size 4 \\
        --global-batch-size 64 --seq-length 2048 --lr 9e-6 --bf16

``python -m megatron_patch.reward_model --score --load RM --input-file pairs.jsonl
--output-file scores.jsonl`` scores texts or pairs instead (rlhf/score.py).
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--score" in argv:
        from megatron_patch.rlhf.score import main as score_main

        return score_main(argv)
    from megatron_patch.rlhf.reward import RewardData
    from megatron_patch.training.run import main as run_main

    return run_main("python -m megatron_patch.reward_model",
                    "Reward-model training of a megatron_patch family on megatron-core "
                    "(start it with torchrun; --score to score texts).", RewardData, argv)


if __name__ == "__main__":
    sys.exit(main())
