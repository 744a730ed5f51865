"""Shard and zstd-compress JSON lines (replaces the seed's cat + split -l 1000 + zstd steps).

    python toolkits/pretrain_data_preprocessing/shard_jsonl.py --input cleaned/ \
        --output-dir shards/ --lines-per-shard 1000 --compress zst --threads 8

The logic lives in ``megatron_patch.data.shard``; this file only runs it from a checkout.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_patch.data.shard import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
