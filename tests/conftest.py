import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
# The CPU suite: megatron-core runs in CPU mode (gloo) even where a GPU is visible, in this
# process and in the ones the tests start.
os.environ.setdefault("MEGATRON_PATCH_FORCE_CPU", "1")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
