"""``torchrun ... -m megatron_patch.dpo``: direct preference optimisation of a language model
(rlhf/dpo.py: the loss, the reference and what it costs, what is logged), on preference pairs
(rlhf/reward.py's formats), with every trainer flag (TP/PP/DP/SP, distributed optimizer,
precision, recompute, resume).

    torchrun --nproc-per-node 8 -m megatron_patch.dpo --load sft_ckpt --save dpo \\
        --train-data pairs.jsonl --valid-data valid.jsonl --epochs 1 --beta 0.1 \\
        --micro-batch-size 2 --global-batch-size 64 --seq-length 2048 --lr 5e-7 --bf16
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from megatron_patch.rlhf.dpo import DPOData
    from megatron_patch.training.run import main as run_main

    return run_main("python -m megatron_patch.dpo",
                    "DPO of a megatron_patch language model on megatron-core (start it with "
                    "torchrun).", DPOData, argv)


if __name__ == "__main__":
    sys.exit(main())
