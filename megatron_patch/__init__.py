"""megatron_patch: LLM families, data tools and checkpoint conversion on an unmodified megatron-core.

Importing the package only puts a Megatron-LM checkout named by ``MEGATRON_PATH`` first on
``sys.path`` (when it holds ``megatron/core``) and hooks the import of ``megatron.core.jit`` so
that its ``jit_fuser`` compiles lazily (:func:`megatron_patch.compat.defer_jit_fuser`);
megatron-core itself is imported lazily by the modules that need it, through
:mod:`megatron_patch.compat`.
"""
import importlib.abc
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


class _DeferJitFuser(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``megatron.core.jit`` with the other finders, runs it, then hands the module to
    compat.defer_jit_fuser. Every other import passes through untouched."""

    NAME = "megatron.core.jit"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.NAME:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None and spec.loader is not None:
                    self._loader = spec.loader
                    spec.loader = self
                    return spec
        return None

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        from megatron_patch import compat

        compat.defer_jit_fuser(module)


_put_megatron_path_first()
if not any(isinstance(finder, _DeferJitFuser) for finder in sys.meta_path):
    sys.meta_path.insert(0, _DeferJitFuser())
