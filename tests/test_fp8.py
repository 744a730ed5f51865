"""FP8 linear layers (kernels/fp8.py) against a written-out reference: the scaling and
saturation of each cast, and every GEMM of the forward and backward as dequantised operands
multiplied in float64. Training with --fp8-format end to end is in test_training.py."""
import re

import pytest
import torch

from megatron_patch.kernels import fp8

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def reference_cast(t, dtype, margin=0):
    """The tensorwise recipe, written out: scale = max / amax / 2**margin, saturate, round."""
    fp8_max = {E4M3: 448.0, E5M2: 57344.0}[dtype]
    amax = t.double().abs().max().item()
    scale = fp8_max / amax / 2 ** margin if amax else 1.0
    scaled = (t.double() * scale).clamp(-fp8_max, fp8_max).float()
    return scaled.to(dtype).double() / scale  # the value the GEMM sees


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("margin", [0, 2])
def test_cast_scales_by_the_current_amax_and_saturates(dtype, margin):
    t = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 3
    t[5, 7] = -40.0  # the amax: maps to -fp8_max / 2**margin
    q, inverse = fp8.quantize(t, dtype, margin)
    assert q.dtype == dtype and inverse.dtype == torch.float32 and inverse.shape == ()
    fp8_max = torch.finfo(dtype).max
    assert inverse.item() == pytest.approx(40.0 * 2 ** margin / fp8_max, rel=1e-6)
    assert q[5, 7].float().item() == -fp8_max / 2 ** margin
    torch.testing.assert_close(q.double() * inverse.double(), reference_cast(t, dtype, margin),
                               rtol=1e-6, atol=0)
    # Relative error of a cast: E4M3 keeps 3 mantissa bits, E5M2 two.
    big = t.abs() > 1
    rel = ((q.double() * inverse.double() - t.double()).abs() / t.double().abs())[big].max()
    assert rel <= {E4M3: 2 ** -4, E5M2: 2 ** -3}[dtype] + 1e-6
    zeros, inverse = fp8.quantize(torch.zeros(16, 16), dtype)
    assert inverse.item() == 1.0 and not zeros.float().any()


@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_forward_and_backward_are_the_fp8_operands_multiplied(fmt, bias):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 32, generator=generator, requires_grad=True)
    w = torch.randn(48, 32, generator=generator).mul_(0.1).requires_grad_()
    b = torch.randn(48, generator=generator, requires_grad=True) if bias else None
    dy = torch.randn(2, 16, 48, generator=generator)
    recipe = fp8.Fp8Recipe(fmt)
    out = fp8.fp8_linear(recipe, input=x, weight=w, bias=b, gradient_accumulation_fusion=False,
                         allreduce_dgrad=False, sequence_parallel=False, tp_group=object())
    out.backward(dy)

    xq, wq = reference_cast(x.detach().reshape(32, 32), E4M3), reference_cast(w.detach(), E4M3)
    gq = reference_cast(dy.reshape(32, 48), E4M3 if fmt == "e4m3" else E5M2)
    expected = xq @ wq.t() + (b.detach().double() if bias else 0)
    torch.testing.assert_close(out.detach().double().reshape(32, 48), expected,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double().reshape(32, 32), gq @ wq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), gq.t() @ xq, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(b.grad, dy.reshape(32, 48).sum(0))
    # And it is the linear layer: within FP8's error of the exact product.
    exact = x.detach().double().reshape(32, 32) @ w.detach().double().t()
    error = out.detach().double().reshape(32, 48) - (expected - xq @ wq.t()) - exact
    assert error.norm() < 0.05 * exact.norm()


def test_weight_gradient_accumulates_into_main_grad_as_megatron_core_fuses_it():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(16, 32, generator=generator)
    w = torch.nn.Parameter(torch.randn(16, 32, generator=generator))
    w.main_grad = torch.randn(16, 32, generator=generator)
    w.grad_added_to_main_grad = False
    before = w.main_grad.clone()
    dy = torch.randn(16, 16, generator=generator)
    fp8.fp8_linear(fp8.Fp8Recipe("hybrid"), input=x, weight=w, bias=None,
                   gradient_accumulation_fusion=True, allreduce_dgrad=False,
                   sequence_parallel=False, tp_group=object()).backward(dy)
    expected = before.double() + reference_cast(dy, E5M2).t() @ reference_cast(x, E4M3)
    torch.testing.assert_close(w.main_grad.double(), expected, rtol=1e-5, atol=1e-5)
    assert w.grad_added_to_main_grad


def test_sizes_fp8_cannot_multiply_are_refused_with_the_flags_to_change():
    x = torch.randn(10, 32)
    w = torch.randn(16, 32, requires_grad=True)
    with pytest.raises(ValueError, match="--micro-batch-size x --seq-length"):
        fp8.fp8_linear(fp8.Fp8Recipe("e4m3"), input=x, weight=w, bias=None,
                       gradient_accumulation_fusion=False, allreduce_dgrad=False,
                       sequence_parallel=False, tp_group=object())
    with pytest.raises(ValueError, match="--fp8-format bogus"):
        fp8.Fp8Recipe("bogus")
    with pytest.raises(ValueError, match="--fp8-amax-compute-algo mean"):
        fp8.Fp8Recipe("hybrid", recipe="delayed", amax_compute_algo="mean")
    with pytest.raises(ValueError, match="--fp8-amax-history-len 0"):
        fp8.Fp8Recipe("hybrid", recipe="delayed", amax_history_len=0)


def cast_with(t, dtype, scale):
    """A cast at a given fp32 scale, saturated: the value the GEMM sees."""
    fp8_max = {E4M3: 448.0, E5M2: 57344.0}[dtype]
    return (t.float() * scale).clamp(-fp8_max, fp8_max).to(dtype).double() / scale


@pytest.mark.parametrize("algo", ["most_recent", "max"])
def test_delayed_scaling_follows_the_amax_history(algo):
    """--fp8-recipe delayed against the recipe written out: each iteration's casts use the
    scale from the amax history of the iterations before (the first iteration: the tensor's
    own amax), the running amax is the max over the micro-batches (an evaluation forward does
    not count), values beyond the scaled range saturate, and the history rolls newest first."""
    length, margin = 3, 1
    recipe = fp8.Fp8Recipe("hybrid", margin, "delayed", length, algo)
    scaling = fp8.DelayedScaling(recipe, count=2)
    slot = scaling.slot(1)  # row 0 stays unused: all zeros
    generator = torch.Generator().manual_seed(3)
    maxes = (448.0, 448.0, 57344.0)
    history = [[], [], []]  # per tensor, one amax per finished iteration
    saturated = 0
    for iteration, factor in enumerate([1.0, 4.0, 0.5, 0.25, 2.0, 1.0]):
        scales = []
        for j, dtype_max in enumerate(maxes):
            if history[j]:
                ref = max(history[j][-length:]) if algo == "max" else history[j][-1]
                scales.append(torch.tensor(dtype_max, dtype=torch.float32)
                              / (torch.tensor(ref, dtype=torch.float32) * 2.0 ** margin))
            else:
                scales.append(None)  # the tensor's own amax, per micro-batch
        w = (torch.randn(16, 32, generator=generator) * factor).requires_grad_()
        seen = [0.0, 0.0, 0.0]
        for micro in range(2):
            x = (torch.randn(16, 32, generator=generator) * factor * (1 + micro))
            x.requires_grad_()
            dy = torch.randn(16, 16, generator=generator) * 1e-3 * factor
            out = fp8.fp8_linear(recipe, input=x, weight=w, bias=None,
                                 gradient_accumulation_fusion=False, allreduce_dgrad=False,
                                 sequence_parallel=False, tp_group=object(), slot=slot)
            out.backward(dy)
            operands = []
            for j, (t, dtype) in enumerate(((x, E4M3), (w, E4M3), (dy, E5M2))):
                amax = t.detach().abs().max().item()
                seen[j] = max(seen[j], amax)
                scale = scales[j]
                if scale is None:
                    operands.append(reference_cast(t.detach(), dtype, margin))
                else:
                    saturated += int((t.detach().abs() * scale > maxes[j]).any())
                    operands.append(cast_with(t.detach(), dtype, scale))
            xq, wq, gq = operands
            for got, want in ((out.detach(), xq @ wq.t()), (x.grad, gq @ wq)):  # fp32 sums
                torch.testing.assert_close(got.double(), want, rtol=1e-5,
                                           atol=1e-5 * want.abs().max().item())
            w.grad = None
        with torch.no_grad():  # evaluation: its huge amax must not enter the history
            fp8.fp8_linear(recipe, input=x.detach() * 1e3, weight=w.detach(), bias=None,
                           gradient_accumulation_fusion=False, allreduce_dgrad=False,
                           sequence_parallel=False, tp_group=object(), slot=slot)
        torch.testing.assert_close(scaling.amax[1].double(),
                                   torch.tensor(seen, dtype=torch.float64), rtol=1e-6, atol=0)
        scaling.update()
        for j in range(3):
            history[j].append(seen[j])
        newest_first = torch.zeros(length, 3, dtype=torch.float64)
        for j in range(3):
            for age, value in enumerate(reversed(history[j][-length:])):
                newest_first[age, j] = value
        torch.testing.assert_close(scaling.history[1].double(), newest_first, rtol=1e-6, atol=0)
        assert not scaling.history[0].any() and not scaling.scale[0].any() and \
            not scaling.amax.any()
    assert saturated  # the x4 iteration overflowed the previous iteration's range

    restored = fp8.DelayedScaling(recipe, count=2)
    restored.load_state_dict(scaling.state_dict())
    assert torch.equal(restored.scale, scaling.scale)
    assert torch.equal(restored.history, scaling.history)
    longer = fp8.DelayedScaling(fp8.Fp8Recipe("hybrid", margin, "delayed", 8, algo), count=2)
    with pytest.raises(ValueError, match="--fp8-amax-history-len"):
        longer.load_state_dict(scaling.state_dict())


def test_delayed_scaling_records_its_amaxes_under_torch_compile():
    """--compile-layers traces the FP8 linear: the in-place amax records inside the autograd
    function must survive compilation (aot_eager: dynamo and AOTAutograd's functionalisation,
    as inductor's, without a C++ compiler), giving the eager losses, histories and scales."""
    recipe = fp8.Fp8Recipe("hybrid", recipe="delayed", amax_history_len=2, amax_compute_algo="max")

    def train(compiled):
        scaling = fp8.DelayedScaling(recipe, count=1)
        generator = torch.Generator().manual_seed(4)
        w = torch.randn(16, 32, generator=generator).requires_grad_()
        slot, group = scaling.slot(0), object()

        def step(x):
            return fp8.fp8_linear(recipe, input=x, weight=w, bias=None,
                                  gradient_accumulation_fusion=False, allreduce_dgrad=False,
                                  sequence_parallel=False, tp_group=group,
                                  slot=slot).pow(2).sum()

        run = torch.compile(step, backend="aot_eager", fullgraph=True) if compiled else step
        losses = []
        for iteration in range(3):
            x = torch.randn(16, 32, generator=generator) * (iteration + 1)
            loss = run(x.requires_grad_())
            loss.backward()
            losses.append(loss.item())
            scaling.update()
        return losses, scaling.history.clone(), scaling.scale.clone()

    eager, compiled = train(False), train(True)
    assert compiled[0] == eager[0]
    assert eager[1].all() and torch.equal(compiled[1], eager[1])
    assert torch.equal(compiled[2], eager[2])


def test_delayed_scaling_ignores_an_overflowed_step_and_keeps_its_scale():
    recipe = fp8.Fp8Recipe("hybrid", recipe="delayed")
    scaling = fp8.DelayedScaling(recipe, count=1)
    scaling.amax[0] = torch.tensor([2.0, 4.0, 8.0])
    scaling.update()
    before = scaling.scale.clone()
    torch.testing.assert_close(before[0], torch.tensor([224.0, 112.0, 57344.0 / 8]))
    scaling.amax[0] = torch.tensor([float("inf"), float("nan"), 0.0])
    scaling.update()  # most_recent of nothing usable: the scales stay
    assert torch.equal(scaling.scale, before) and not scaling.history[0, 0].any()


def test_tensor_parallel_communication_equals_one_process():
    """The collectives the FP8 and fused-wgrad linears share (kernels/tp_linear.py) at TP2:
    output, input gradient and weight gradient equal the unsplit product (fp32)."""
    from helpers import run_torchrun

    out = run_torchrun(["tests/dist/check_tp_linear.py"]).stdout
    # two ranks share one stdout, so their lines may interleave: match, do not split
    assert sorted(re.findall(r"rank \d sequence_parallel=\w+ OK", out)) == [
        f"rank {r} sequence_parallel={sp} OK" for r in (0, 1) for sp in (False, True)]
