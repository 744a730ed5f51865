"""Clean raw pretraining text: ``python clean_raw_text.py -i IN -o OUT -p N`` (see ``--help``).

The logic lives in ``megatron_patch.data.cleaning``; this is the seed's entry point.
"""
import os
import sys

# Runs from a checkout without ``pip install -e .`` too.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from megatron_patch.data.cleaning import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
