import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
# The CPU suite: megatron-core runs in CPU mode (gloo) even where a GPU is visible, in this
# process and in the ones the tests start.
os.environ.setdefault("MEGATRON_PATCH_FORCE_CPU", "1")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
# megatron_patch.kernels (Triton) run in Triton's interpreter on CPU tensors; it reads this when
# a kernel is defined, so before anything imports them.
os.environ.setdefault("TRITON_INTERPRET", "1")
