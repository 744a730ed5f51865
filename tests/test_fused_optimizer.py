"""The optimizer's fused / foreach operations (kernels/multi_tensor.py, installed by
compat.use_fused_optimizer_ops) against plain formulas and megatron-core's own fallbacks."""
import copy

import pytest
import torch

from megatron_patch.kernels import multi_tensor


def tensors(seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (64,), (3, 4, 9), (1,), (130, 33)]
    return [torch.randn(shape, generator=generator).to(dtype) * (i + 1)
            for i, shape in enumerate(shapes)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2norm_is_the_norm_of_all_elements(dtype):

    parts = tensors(dtype=dtype)
    flag = torch.zeros(1, dtype=torch.int)
    from megatron.core.utils import local_multi_tensor_applier

    norm, per_tensor = local_multi_tensor_applier(multi_tensor.multi_tensor_l2norm, flag,
                                                  [parts], False)
    expected = torch.cat([p.double().flatten() for p in parts]).norm()
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    empty, _ = multi_tensor.multi_tensor_l2norm(0, flag, [[]], False)
    assert empty.tolist() == [0.0]


@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16])
def test_scale_and_copy_are_bitwise_megatron_cores_fallback(scale, target_dtype):
    from megatron.core.utils import local_multi_tensor_scale

    sources = tensors(1)
    ours = [torch.empty_like(s, dtype=target_dtype) for s in sources]
    theirs = [torch.empty_like(s, dtype=target_dtype) for s in sources]
    flag = torch.zeros(1, dtype=torch.int)
    multi_tensor.multi_tensor_scale(0, flag, [sources, ours], scale)
    local_multi_tensor_scale(0, flag, [sources, theirs], scale)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    in_place, reference = tensors(2), tensors(2)
    multi_tensor.multi_tensor_scale(0, flag, [in_place, in_place], scale)
    for a, b in zip(in_place, reference):
        assert torch.equal(a, b * scale)


def adamw_reference(params, grads_per_step, lr, betas, eps, weight_decay):
    """AdamW written out (Loshchilov & Hutter, torch's bias correction), in float64."""
    params = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            g = g.double()
            params[i] *= 1 - lr * weight_decay
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            m_hat = m[i] / (1 - betas[0] ** step)
            v_hat = v[i] / (1 - betas[1] ** step)
            params[i] -= lr * m_hat / (v_hat.sqrt() + eps)
    return params


def run_steps(optimizer, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()


def test_fused_adamw_follows_the_formula_and_survives_a_state_dict_round_trip():
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    start = tensors(3)
    grads = [tensors(10 + k) for k in range(6)]
    expected = adamw_reference(start, grads, **hyper)

    params = [torch.nn.Parameter(p.clone()) for p in start]
    optimizer = torch.optim.AdamW(params, **hyper)
    assert multi_tensor.use_fused_adam(optimizer)
    assert optimizer.param_groups[0]["fused"] and not optimizer.param_groups[0]["foreach"]
    run_steps(optimizer, params, grads[:3])

    # A checkpoint written by the foreach optimizer (its groups say fused=None) resumes fused.
    plain_params = [torch.nn.Parameter(p.clone()) for p in start]
    plain = torch.optim.AdamW(plain_params, **hyper)
    run_steps(plain, plain_params, grads[:3])
    saved = copy.deepcopy(plain.state_dict())
    assert not saved["param_groups"][0]["fused"]
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in plain_params]
    resumed = torch.optim.AdamW(resumed_params, **hyper)
    multi_tensor.use_fused_adam(resumed)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["fused"] is True
    run_steps(optimizer, params, grads[3:])
    run_steps(resumed, resumed_params, grads[3:])
    for got, again, want in zip(params, resumed_params, expected):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(again.detach().double(), want, rtol=1e-5, atol=1e-6)


def test_other_optimizers_are_left_alone():
    param = torch.nn.Parameter(torch.ones(3))
    sgd = torch.optim.SGD([param], lr=0.1)
    assert not multi_tensor.use_fused_adam(sgd)
    assert "fused" not in sgd.param_groups[0] or not sgd.param_groups[0]["fused"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_gradient_accumulates_into_main_grad(dtype):
    """apex's wgrad_gemm_accum_fp32 contract: main_grad += grad_output^T @ input, in fp32."""
    from megatron_patch.kernels import grad_accumulation

    generator = torch.Generator().manual_seed(4)
    total_input = torch.randn(24, 8, generator=generator).to(dtype)
    grad_output = torch.randn(24, 5, generator=generator).to(dtype)
    main_grad = torch.randn(5, 8, generator=generator)
    expected = main_grad.double() + grad_output.double().t() @ total_input.double()
    buffer = main_grad.data_ptr()
    grad_accumulation.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)
    assert main_grad.data_ptr() == buffer and main_grad.dtype == torch.float32
    torch.testing.assert_close(main_grad.double(), expected, rtol=1e-6, atol=1e-5)


def test_clipping_inside_fused_adam_is_clipping_the_gradients():
    """clip_grad_by_total_norm_fp32 hands fused Adam the scale (grad_scale) instead of scaling
    the grads: the step equals megatron-core's clip-then-step, and the next unclipped step is
    not scaled again."""
    from megatron.core.optimizer import clip_grads

    from megatron_patch import compat

    compat.enable_cpu_mode()  # megatron-core's clipping asserts its grads are cuda floats

    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    start, grads = tensors(5), [tensors(20 + k) for k in range(3)]
    norms = [torch.cat([g.flatten() for g in step]).norm().item() for step in grads]
    max_norms = [norms[0] / 3, norms[1] * 2, norms[2] / 5]  # clip, no clip, clip
    results = []
    for ours in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = torch.optim.AdamW(params, **hyper)
        multi_tensor.use_fused_adam(optimizer)
        clip = multi_tensor.clip_grad_by_total_norm_fp32 if ours \
            else clip_grads.clip_grad_by_total_norm_fp32
        for step, max_norm, norm in zip(grads, max_norms, norms):
            for p, g in zip(params, step):
                p.grad = g.clone()
            clip(params, max_norm, norm)
            assert (getattr(optimizer, "grad_scale", None) is not None) == (ours and max_norm < norm)
            optimizer.step()
            assert getattr(optimizer, "grad_scale", None) is None
        results.append(params)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # Parameters of no fused Adam (or of two) are scaled in place, as megatron-core does.
    loose = [torch.nn.Parameter(p.clone()) for p in start]
    for p, g in zip(loose, grads[0]):
        p.grad = g.clone()
    multi_tensor.clip_grad_by_total_norm_fp32(loose, max_norms[0], norms[0])
    for p, g in zip(loose, grads[0]):
        torch.testing.assert_close(p.grad, g * (max_norms[0] / (norms[0] + 1e-6)))


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_linear_puts_the_weight_gradient_into_main_grad_eager_and_compiled(compiled):
    """The compiled layers' linear (kernels/grad_accumulation.wgrad_fused_linear): output and
    input gradient of x @ W^T + b, and W's gradient added to main_grad (accumulating over two
    backward passes) with no .grad left for the DDP hook, under torch.compile too."""
    from megatron_patch.kernels import grad_accumulation

    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 16, generator=generator)
    weight = torch.nn.Parameter(torch.randn(8, 16, generator=generator))
    bias = torch.nn.Parameter(torch.randn(8, generator=generator))
    weight.main_grad = torch.randn(8, 16, generator=generator)
    start = weight.main_grad.clone()

    def step(inp):
        out = grad_accumulation.wgrad_fused_linear(
            inp, weight, bias, gradient_accumulation_fusion=False, allreduce_dgrad=False,
            sequence_parallel=False, tp_group=object())
        return (torch.sin(out) * 3).sum()

    run = torch.compile(step) if compiled else step
    inputs = [x.clone().requires_grad_(), (x * 0.5).requires_grad_()]
    for inp in inputs:
        run(inp).backward()
    plain_w = weight.detach().clone().requires_grad_()
    plain_b = bias.detach().clone().requires_grad_()
    expected_inputs = []
    for inp in inputs:
        ref = inp.detach().clone().requires_grad_()
        (torch.sin(ref @ plain_w.t() + plain_b) * 3).sum().backward()
        expected_inputs.append(ref.grad)
    assert weight.grad is None
    torch.testing.assert_close(weight.main_grad, start + plain_w.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, plain_b.grad, rtol=1e-5, atol=1e-5)
    for inp, want in zip(inputs, expected_inputs):
        torch.testing.assert_close(inp.grad, want, rtol=1e-5, atol=1e-5)
