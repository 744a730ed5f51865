"""The optimizer's multi-tensor operations on torch's foreach / fused kernels, for a
megatron-core without Transformer Engine or apex (compat.use_fused_optimizer_ops installs them;
megatron-core's own ``local_multi_tensor_applier`` calls them).

megatron-core 0.16.1's fallbacks for those libraries' kernels (``megatron.core.utils``) loop
over the parameters in Python: the gradient norm takes one ``torch.norm`` per tensor and then
copies every norm to the host (one device synchronisation per parameter tensor, every step),
and the scale / copy take two kernels per tensor. These do the same arithmetic in a few
launches and without a synchronisation:

* :func:`multi_tensor_l2norm`: ``torch._foreach_norm`` and the norm of those norms (the value
  of megatron-core's fallback, which also sums per-tensor norms in fp32, up to rounding);
* :func:`multi_tensor_scale`: ``dst = src * scale`` per pair (bitwise megatron-core's
  fallback: the same multiply, in place when the lists are the same);
* :func:`use_fused_adam`: torch's AdamW / Adam with its fused kernel (``fused=True``: one
  launch for all parameters, on CUDA and CPU) instead of the foreach default. The same update
  (torch's implementation of it; see tests/test_fused_optimizer.py), kept through
  ``load_state_dict``, which would otherwise restore the saved groups' flags.
* :func:`clip_grad_by_total_norm_fp32`: megatron-core's gradient clipping for the parameters of
  one such fused Adam done inside its kernel, which divides each gradient by ``grad_scale``
  as it reads it (the hook torch's GradScaler uses): ``grad_scale = 1 / clip_coeff`` instead of
  a pass over every gradient (2.1 of 102 ms per step of the 0.95B shape on an H200). The same
  clipped gradients up to the rounding of that reciprocal; other parameters take megatron-core's
  own multiply.
"""
from __future__ import annotations

import weakref

import torch


def multi_tensor_l2norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm`` (total norm only): (norm [1] fp32, None)."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float, device=noop_flag.device), None
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float else t for t in tensors])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst.copy_(src * scale)`` for each pair."""
    sources, targets = tensor_lists[0], tensor_lists[1]
    if not sources:
        return
    if all(s is t for s, t in zip(sources, targets)):
        torch._foreach_mul_(targets, scale)
    elif scale == 1.0:
        torch._foreach_copy_(targets, sources)
    else:
        torch._foreach_copy_(targets, torch._foreach_mul(sources, scale))


def _fused_supported(optimizer) -> bool:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return bool(params) and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                and p.device.type in ("cuda", "cpu") for p in params)


def _set_fused(optimizer) -> None:
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, False
        for param in group["params"]:
            state = optimizer.state.get(param)
            step = state.get("step") if state else None
            if isinstance(step, torch.Tensor) and (step.device != param.device
                                                   or step.dtype != torch.float32):
                state["step"] = step.to(device=param.device, dtype=torch.float32)


# The optimizers use_fused_adam switched (not an attribute on the parameters: those are
# pickled with their attributes when a checkpoint is saved).
_FUSED: weakref.WeakSet = weakref.WeakSet()


def _clear_grad_scale(optimizer, args, kwargs) -> None:
    optimizer.grad_scale = None


def use_fused_adam(optimizer) -> bool:
    """Switch a torch Adam / AdamW to its fused kernel (now and after every load_state_dict).
    False, leaving it as it is, for another optimizer or parameters fused does not take."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) \
            or not _fused_supported(optimizer):
        return False
    if not getattr(optimizer, "_megatron_patch_fused", False):
        optimizer.register_load_state_dict_post_hook(_set_fused)
        # A clipping scale is for one step (clip_grad_by_total_norm_fp32 sets it before it).
        optimizer.register_step_post_hook(_clear_grad_scale)
        optimizer._megatron_patch_fused = True
        _FUSED.add(optimizer)
    _set_fused(optimizer)
    return True


def _fused_owner(params):
    """The fused Adam that steps exactly ``params`` (those with a gradient), else None."""
    for optimizer in list(_FUSED):
        stepped = [p for group in optimizer.param_groups for p in group["params"]
                   if p.grad is not None]
        if len(stepped) == len(params) and all(a is b for a, b in zip(stepped, params)):
            return optimizer if all(group["fused"] for group in optimizer.param_groups) else None
    return None


def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's ``clip_grad_by_total_norm_fp32``; for the parameters of one fused Adam
    the scale goes to its ``grad_scale`` (applied in its next step) instead of into the grads."""
    from megatron.core.optimizer import clip_grads

    params = [p for p in parameters if p.grad is not None]
    owner = None if use_decoupled_grad else _fused_owner(params)
    if owner is None:
        return clip_grads.clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm,
                                                       use_decoupled_grad)
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    owner.grad_scale = (torch.full((), 1.0 / clip_coeff, dtype=torch.float32,
                                   device=params[0].grad.device) if clip_coeff < 1.0 else None)
