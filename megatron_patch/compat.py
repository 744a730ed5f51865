"""The one place that knows megatron-core's version and touches its internals.

* :func:`require_megatron_core` imports megatron-core and refuses versions outside
  ``SUPPORTED`` with a message that says what to install.
* :func:`enable_cpu_mode` lets the unmodified megatron-core run on a machine without a GPU
  (gloo instead of NCCL). It is a small, explicit set of patches, checked against
  megatron-core 0.16.1; the model math is the same code on CPU and GPU:

  1. ``torch.cuda.current_device()`` answers the CPU device, so ``device=current_device()``
     places tensors on the CPU;
  2. tensor factories asked for ``device="cuda"`` build on the CPU, ``Tensor.cuda()`` is the
     identity, and synchronize / streams / events are no-ops;
  3. ``Tensor.type()`` (no argument) names CPU float tensors ``torch.cuda.*Tensor``, because
     megatron-core's optimizer asserts on that string;
  4. the model-parallel RNG tracker keeps CPU generator states (``CpuRNGStatesTracker``).
* :func:`initialize_parallel` brings up torch.distributed (torchrun's environment, or a single
  local process) and megatron-core's ``parallel_state``.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

SUPPORTED = ((0, 16, 1), (0, 17, 0))  # [lowest, first unsupported)
SUPPORTED_TEXT = "megatron-core>=0.16.1,<0.17"
ALLOW_ENV = "MEGATRON_PATCH_ALLOW_ANY_MCORE"

_CPU_MODE = False


class UnsupportedMegatronCore(RuntimeError):
    """megatron-core is missing or its version is outside the tested range."""


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def require_megatron_core():
    """Import megatron.core and check its version; returns the module."""
    # megatron-core warns at import about every optional accelerator it does not find.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    try:
        import megatron.core as mcore
    except ImportError as err:
        raise UnsupportedMegatronCore(
            f"megatron-core is not importable ({err}). Install it with "
            f"`pip install '{SUPPORTED_TEXT}'`, or set MEGATRON_PATH to a Megatron-LM checkout."
        ) from err
    version = _version_tuple(getattr(mcore, "__version__", "0"))
    if not SUPPORTED[0] <= version < SUPPORTED[1] and not os.environ.get(ALLOW_ENV):
        raise UnsupportedMegatronCore(
            f"megatron-core {mcore.__version__} from {os.path.dirname(mcore.__file__)} is not "
            f"supported: megatron_patch is tested with {SUPPORTED_TEXT}. Install that range, "
            f"point MEGATRON_PATH at a matching checkout, or set {ALLOW_ENV}=1 to try anyway."
        )
    return mcore


def exit_unless_supported() -> None:
    """A command line's first step: one line on stderr and exit status 2 when megatron-core is
    missing or outside the tested range (under torchrun from global rank 0 only), instead of
    tracebacks per rank or an ImportError deep in megatron-core's modules."""
    import sys

    try:
        require_megatron_core()
    except UnsupportedMegatronCore as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def optional_accelerators() -> dict[str, bool]:
    """Which optional packages are importable. None is required: megatron_patch's own path
    (torch SDPA, torch.compile, its norms) runs without them; megatron-core uses apex's fused
    kernels and optimizers by itself when it finds them."""
    import importlib.util

    return {name: importlib.util.find_spec(module) is not None for name, module in
            (("apex", "apex"), ("flash-attn", "flash_attn"),
             ("transformer-engine", "transformer_engine"))}


def on_gpu() -> bool:
    """True when CUDA is usable (and CPU mode was not forced)."""
    return torch.cuda.is_available() and not os.environ.get("MEGATRON_PATCH_FORCE_CPU")


def device() -> torch.device:
    """The device this process computes on."""
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


# --------------------------------------------------------------------------- CPU mode


def _cpu_device(value):
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cpu")
    if isinstance(value, str) and value.startswith("cuda"):
        return torch.device("cpu")
    return value


class _CudaToCpu(torch.overrides.TorchFunctionMode):
    """Torch-function mode that builds tensors asked for on ``cuda`` on the CPU instead.

    A mode rather than wrapped factories: other modes (``with torch.device("meta")``, which
    transformers uses while loading) stack on top of it unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func is torch.Tensor.to:  # t.to("cuda"), t.to(torch.device("cuda"), dtype)
            args = args[:1] + tuple(a if isinstance(a, (int, torch.dtype)) else _cpu_device(a)
                                    for a in args[1:])
        return func(*args, **kwargs)


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, other):
        return 0.0

    def query(self):
        return True


class _NullStream(_NullEvent):
    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass


def _patch_tensor_methods():
    original_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return _CUDA_TYPE_NAMES.get(self.dtype, original_type(self))
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def _patch_torch_cuda():
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.empty_cache = lambda: None
    cuda.set_device = lambda *args, **kwargs: None
    cuda.current_stream = lambda *args, **kwargs: _NullStream()
    cuda.default_stream = lambda *args, **kwargs: _NullStream()
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    cuda.memory_allocated = lambda *args, **kwargs: 0
    cuda.max_memory_allocated = lambda *args, **kwargs: 0
    cuda.memory_reserved = lambda *args, **kwargs: 0
    cuda.max_memory_reserved = lambda *args, **kwargs: 0


def _patch_rng_tracker():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Model-parallel RNG states kept as CPU generator states.

        On CPU the global CPU generator plays the CUDA default generator's role, so ``fork``
        swaps its state in and out (megatron-core's version would warn on every fork that the
        CPU state changed, which here is the point).
        """

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mrandom.initialize_rng_tracker(force_reset=True)


def enable_cpu_mode() -> None:
    """Patch torch / megatron-core so megatron-core runs on the CPU (idempotent).

    Does nothing on a machine where CUDA is usable.
    """
    global _CPU_MODE
    if _CPU_MODE or on_gpu():
        return
    require_megatron_core()
    _CudaToCpu().__enter__()  # stays active for the life of the process
    _patch_tensor_methods()
    _patch_torch_cuda()
    _patch_rng_tracker()
    _CPU_MODE = True


# --------------------------------------------------------------------------- fixes

_FIXED = False


def _fix_distributed_optimizer_torch_adam() -> None:
    """megatron-core 0.16.1's DistributedOptimizer with torch's Adam (no apex / TE): loading
    the sharded parameter state (``load_parameter_state``) fails with ``KeyError: 'step'``,
    because torch Adam keeps ``step`` per parameter while the saved shards carry only param,
    exp_avg and exp_avg_sq; and ``load_state_dict`` gives every parameter the same ``step``
    tensor, which torch's foreach Adam would then increment once per parameter. Keep each
    parameter's own (already restored) step."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    cls = distrib_optimizer.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        if "step" in state and "step" not in tensors:
            state["step"] = state["step"].clone()
            tensors = dict(tensors, step=state["step"])
        return original(self, model_param, tensors)

    cls._set_main_param_and_optimizer_states = set_states


def use_fused_optimizer_ops(optimizer, enabled: bool = True) -> list[str]:
    """With ``enabled`` (the default), the optimizer step on torch's fused and foreach kernels
    where megatron-core 0.16.1 would fall back to per-tensor Python loops (no Transformer Engine
    or apex here): the gradient norm, the clipping scale and the main-to-model parameter copy in
    ``megatron.core.optimizer.{optimizer,clip_grads}`` (kernels/multi_tensor.py), and each torch
    Adam inside ``optimizer`` (a MegatronOptimizer, chained or not) on its fused kernel.
    ``enabled=False`` puts megatron-core's own fallbacks back (the module functions are
    process-wide). Returns what was switched, for the start-up log."""
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    from megatron_patch.kernels import multi_tensor

    # Without Transformer Engine / apex, megatron-core calls its local applier on these.
    fallbacks = clip_grads.multi_tensor_applier is mcore_utils.local_multi_tensor_applier
    if fallbacks:
        for module in (clip_grads, mcore_optimizer):
            module.multi_tensor_scale_impl = (multi_tensor.multi_tensor_scale if enabled
                                              else mcore_utils.local_multi_tensor_scale)
        clip_grads.l2_norm_impl = (multi_tensor.multi_tensor_l2norm if enabled
                                   else mcore_utils.local_multi_tensor_l2_norm)
    # Clipping inside fused Adam's kernel (its own parameters only; the rest as before).
    mcore_optimizer.clip_grad_by_total_norm_fp32 = (
        multi_tensor.clip_grad_by_total_norm_fp32 if enabled
        else clip_grads.clip_grad_by_total_norm_fp32)
    if not enabled:
        return []
    switched = ["foreach gradient norm, clipping and parameter copies"] if fallbacks else []
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    for part in parts:  # bf16: megatron-core copies tensor by tensor (apex has no bf16)
        if fallbacks and getattr(part, "_dummy_overflow_buf", 0) is None:
            part._dummy_overflow_buf = torch.zeros(1, dtype=torch.int, device=device())
    inner = [getattr(part, "optimizer", None) for part in parts]
    if sum(multi_tensor.use_fused_adam(o) for o in inner if o is not None):
        switched.append("fused Adam")
    return switched


def enable_gradient_accumulation_fusion() -> None:
    """megatron-core's ``gradient_accumulation_fusion`` without apex: its linear layers look up
    ``fused_weight_gradient_mlp_cuda`` at import and refuse the option when apex is absent;
    give them kernels/grad_accumulation.py instead (idempotent; apex's, if present, stays)."""
    from megatron.core.tensor_parallel import layers

    from megatron_patch.kernels import grad_accumulation

    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = grad_accumulation
        layers._grad_accum_fusion_available = True


def optimizer_config_overrides(config):
    """The parameter-group overrides ``get_megatron_optimizer`` builds by default, with the
    --decoupled-lr group marked ``is_decoupled_lr``.

    megatron-core 0.16.1 (and Megatron-LM with it) sets only max_lr/min_lr for that group, so it
    shares its identifying keys (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr) with
    the main group. The distributed optimizer's load_state_dict matches saved groups to live
    ones by those keys, so on resume both got one group's learning rates (measured: the main
    parameters trained at the decoupled rate after a resume). None without --decoupled-lr
    (megatron-core's default then)."""
    from megatron.core.optimizer import get_standard_config_overrides

    if config.decoupled_lr is None:
        return None
    overrides = get_standard_config_overrides(config)
    for override in overrides.values():
        if "max_lr" in override:
            override["is_decoupled_lr"] = True
    return overrides


def compile_megatron(fn, **compile_kwargs):
    """``torch.compile(fn)`` for code that runs megatron-core modules.

    megatron-core 0.16.1's RowParallelLinear passes ``tp_group=None`` and so calls
    ``warnings.warn`` (a deprecation notice) in every forward on rank 0. Dynamo cannot trace
    ``warnings.warn``: it splits each layer there and leaves most of it uncompiled (68 graph
    breaks per model measured on an H200). While the compiled function runs, dynamo is told to
    skip that call, and may keep one compilation per distinct static shape."""
    import warnings

    import torch._dynamo.config as dynamo_config

    ignore = ("ignore_logging_functions" if hasattr(dynamo_config, "ignore_logging_functions")
              else "ignore_logger_methods")  # the older name (torch < 2.12)
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    _json_safe_dynamo_config_logging()
    return dynamo_config.patch({ignore: {warnings.warn}, limit: 64})(
        torch.compile(fn, **compile_kwargs))


def _json_safe_dynamo_config_logging() -> None:
    """Some torch releases (2.11 measured) serialise dynamo's config into their compile metrics
    without leaving out ``ignore_logging_functions``, and log a JSON TypeError traceback for
    every compilation once it holds ``warnings.warn``. Their metrics then go without the config
    instead (idempotent; a torch without that function is left alone)."""
    import torch._dynamo.utils as dynamo_utils

    original = getattr(dynamo_utils, "_get_dynamo_config_for_logging", None)
    if original is None or getattr(original, "_megatron_patch_json_safe", False):
        return

    def config_for_logging():
        try:
            return original()
        except TypeError:  # a callable in the config: not JSON
            return None

    config_for_logging._megatron_patch_json_safe = True
    dynamo_utils._get_dynamo_config_for_logging = config_for_logging


def lazy_compile(fn=None, **compile_kwargs):
    """``torch.compile`` that imports dynamo on the function's first call, not at decoration.

    megatron-core decorates some forty functions with ``jit_fuser`` (``torch.compile``) at
    import; the first such decoration imports torch._dynamo and inductor, 3-5 s of every
    process's start measured here (``import megatron.core`` + gpt/optimizer/distributed: 7.1-8.1
    s, 1.7 s with this). torch.compile compiles on the first call anyway, so when and what is
    compiled is unchanged. Called while dynamo traces an enclosing function (--compile-layers),
    it runs the plain function, which dynamo then inlines as it does a nested torch.compile."""
    import functools

    if fn is None:  # used as @lazy_compile(mode=...)
        return functools.partial(lazy_compile, **compile_kwargs)
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, **compile_kwargs)
        return compiled(*args, **kwargs)

    call._megatron_patch_lazy_compile = True
    return call


def defer_jit_fuser(jit_module) -> None:
    """Make ``megatron.core.jit.jit_fuser`` :func:`lazy_compile` where megatron-core chose
    torch.compile for it (left alone when it chose a no-op or torch.jit.script). Called by the
    import hook in megatron_patch/__init__.py right after that module runs, before any module
    decorates with it."""
    if getattr(jit_module, "jit_fuser", None) is torch.compile:
        jit_module.jit_fuser = lazy_compile


def fix_megatron_core() -> None:
    """Work around megatron-core bugs that affect megatron_patch (idempotent)."""
    global _FIXED
    if not _FIXED:
        _fix_distributed_optimizer_torch_adam()
        _FIXED = True


# --------------------------------------------------------------------------- distributed


def initialize_distributed(timeout_minutes: float | None = None) -> None:
    """Start torch.distributed from torchrun's variables, or as one local process.

    A single process uses an in-memory store: no port, no environment variables changed (a
    process that starts others, like a test runner, must not hand them a rendezvous).
    ``timeout_minutes`` bounds every collective (Megatron-LM's --distributed-timeout-minutes)."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if on_gpu() else "gloo"
    if on_gpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = {} if timeout_minutes is None else {
        "timeout": datetime.timedelta(minutes=timeout_minutes)}
    if "RANK" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **timeout)
    else:
        dist.init_process_group(backend, **timeout)


def initialize_parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234,
                        virtual_pipeline_parallel: int | None = None,
                        timeout_minutes: float | None = None) -> None:
    """torch.distributed + megatron-core model-parallel groups + the model-parallel RNG seeds."""
    require_megatron_core()
    enable_cpu_mode()
    fix_megatron_core()
    initialize_distributed(timeout_minutes)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    import torch.distributed as dist

    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world} is not divisible by --tensor-model-parallel-size "
            f"{tensor_parallel} x --pipeline-model-parallel-size {pipeline_parallel}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron-core's groups and the process group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
