"""megatron_patch: LLM families, data tools and checkpoint conversion on an unmodified megatron-core.

Importing the package only puts a Megatron-LM checkout named by ``MEGATRON_PATH`` first on
``sys.path`` (when it holds ``megatron/core``); megatron-core itself is imported lazily by the
modules that need it, through :mod:`megatron_patch.compat`.
"""
import os
import sys

__version__ = "0.1.0"


def _put_megatron_path_first() -> None:
    """Honour MEGATRON_PATH like the seed's launchers: a checkout with megatron/core wins."""
    path = os.environ.get("MEGATRON_PATH", "")
    if path and os.path.isdir(os.path.join(path, "megatron", "core")):
        path = os.path.abspath(path)
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)


_put_megatron_path_first()
