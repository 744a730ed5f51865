"""megatron_patch.kernels in Triton's interpreter (conftest sets TRITON_INTERPRET=1): the
matrix-vector kernel against fp64 matrix products, flash-decoding against torch SDPA, and both
custom ops through torch.library.opcheck (schema, fake tensors for torch.compile)."""
import pytest
import torch
import torch.nn.functional as F

from megatron_patch import kernels
from megatron_patch.kernels.decode_attention import decode_attention
from megatron_patch.kernels.gemv import gemv


def test_runs_in_the_interpreter():
    assert kernels.interpreting() and kernels.supported_on(torch.device("cpu"))


@pytest.mark.parametrize("rows,outputs,inner", [(1, 37, 100), (4, 96, 64), (3, 5, 7),
                                                (2, 130, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_equals_the_matrix_product(rows, outputs, inner, dtype):
    torch.manual_seed(rows * outputs + inner)
    x, weight = torch.randn(rows, inner, dtype=dtype), torch.randn(outputs, inner, dtype=dtype)
    y = gemv(x, weight)
    assert y.dtype == dtype and y.shape == (rows, outputs)
    exact = (x.double() @ weight.double().t())
    # fp32 accumulation, then one rounding to the output dtype
    tolerance = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=8e-3,
                                                                               atol=1e-2)
    torch.testing.assert_close(y.double(), exact.to(dtype).double(), **tolerance)


def test_gemv_reads_strided_rows_and_rejects_bad_shapes():
    torch.manual_seed(0)
    wide, weight = torch.randn(2, 80), torch.randn(24, 40)
    x = wide[:, :40]  # rows 80 apart
    torch.testing.assert_close(gemv(x, weight), x @ weight.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"x \[M, K\] and weight \[N, K\]"):
        gemv(torch.randn(2, 41), weight)


def sdpa_reference(query, keys, values, masked, window, scale):
    """torch SDPA over the same cache layout: [b, h, d] queries, [slots, b, g, d] caches."""
    repeat = query.size(1) // keys.size(2)
    k, v = (t[:window].permute(1, 2, 0, 3).repeat_interleave(repeat, 1).float()
            for t in (keys, values))
    out = F.scaled_dot_product_attention(query.float()[:, :, None], k, v,
                                         attn_mask=~masked[:, None, None, :], scale=scale)
    return out[:, :, 0]


@pytest.mark.parametrize("splits", [1, 2, 4, 8])
@pytest.mark.parametrize("heads,groups", [(4, 2), (2, 2), (4, 1)])
def test_decode_attention_equals_sdpa(splits, heads, groups):
    torch.manual_seed(splits + 10 * heads + groups)
    batch, head_dim, slots, window = 3, 16, 80, 70
    query = torch.randn(batch, heads, head_dim)
    keys, values = torch.randn(2, slots, batch, groups, head_dim).unbind(0)
    masked = torch.rand(batch, window) < 0.4
    masked[0, :40] = True          # row 0: the first chunks see nothing at all
    masked[:, window - 1] = False  # every row sees its newest slot
    out = decode_attention(query, keys, values, masked, window, 0.3, splits)
    torch.testing.assert_close(out, sdpa_reference(query, keys, values, masked, window, 0.3),
                               rtol=1e-5, atol=1e-5)


def test_decode_attention_bf16_and_more_splits_than_keys():
    """bf16 caches (fp32 inside), and 8 chunks over a 20-slot window: most chunks are empty."""
    torch.manual_seed(3)
    query = torch.randn(1, 2, 32, dtype=torch.bfloat16)
    keys, values = torch.randn(2, 24, 1, 2, 32, dtype=torch.bfloat16).unbind(0)
    masked = torch.zeros(1, 20, dtype=torch.bool)
    out = decode_attention(query, keys, values, masked, 20, 32 ** -0.5, 8)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), sdpa_reference(query, keys, values, masked, 20,
                                                           32 ** -0.5), rtol=1e-2, atol=1e-2)


def test_decode_attention_merges_in_the_last_chunk_and_resets_its_counters():
    """Pass 2 runs in whichever chunk of a (row, head) finishes last, counted by an atomic
    counter that the kernel leaves at zero: a second call (a CUDA-graph replay) gives the same
    output."""
    from megatron_patch.kernels import decode_attention as module

    torch.manual_seed(5)
    query = torch.randn(2, 4, 16)
    keys, values = torch.randn(2, 64, 2, 2, 16).unbind(0)
    masked = torch.zeros(2, 64, dtype=torch.bool)
    first = decode_attention(query, keys, values, masked, 64, 0.25, 4)
    counters = module._counters(query.device, 2 * 4)
    assert counters.eq(0).all()
    torch.testing.assert_close(decode_attention(query, keys, values, masked, 64, 0.25, 4), first,
                               rtol=0, atol=0)
    torch.testing.assert_close(first, sdpa_reference(query, keys, values, masked, 64, 0.25),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_reads_nothing_after_last_slot(splits):
    """With ``last_slot`` the slots after it are not read: NaN there (masked) leaves the output
    equal to SDPA over the slots up to it; without it, the masked NaN values would leak."""
    torch.manual_seed(7)
    query = torch.randn(2, 4, 16)
    keys, values = torch.randn(2, 64, 2, 2, 16).unbind(0)
    last = 37
    keys[last + 1:], values[last + 1:] = float("nan"), float("nan")
    masked = torch.zeros(2, 64, dtype=torch.bool)
    masked[:, last + 1:] = True
    masked[1, :10] = True
    out = decode_attention(query, keys, values, masked, 64, 0.25, splits,
                           torch.tensor([last]))
    expected = sdpa_reference(query, keys[: last + 1], values[: last + 1],
                              masked[:, : last + 1], last + 1, 0.25)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert decode_attention(query, keys, values, masked, 64, 0.25, splits).isnan().any()


def test_decode_attention_rejects_mismatched_shapes():
    query, keys = torch.randn(2, 4, 16), torch.randn(10, 2, 2, 16)
    with pytest.raises(ValueError, match=r"window 12: expected"):
        decode_attention(query, keys, keys, torch.zeros(2, 12, dtype=torch.bool), 12, 1.0)
    with pytest.raises(ValueError, match=r"splits must be a power of two"):
        decode_attention(query, keys, keys, torch.zeros(2, 8, dtype=torch.bool), 8, 1.0, 3)


def test_custom_ops_pass_opcheck():
    """Schema, fake-tensor (torch.compile) and dispatch checks of torch.library."""
    torch.manual_seed(0)
    torch.library.opcheck(torch.ops.megatron_patch.gemv.default,
                          (torch.randn(2, 24), torch.randn(8, 24)))
    keys = torch.randn(12, 1, 2, 16)
    torch.library.opcheck(torch.ops.megatron_patch.decode_attention.default,
                          (torch.randn(1, 4, 16), keys, keys.clone(),
                           torch.zeros(1, 10, dtype=torch.bool), 10, 0.25, 2,
                           torch.tensor([8])))


def test_decode_kernels_need_a_power_of_two_head_dim():
    from megatron_patch.generation import decode_kernels

    cpu = torch.device("cpu")  # the interpreter counts as supported here
    assert decode_kernels.resolve("on", cpu, "static", 128)
    assert not decode_kernels.resolve("auto", torch.device("cuda"), "graph", 80)
    with pytest.raises(ValueError, match="head dim that is a power of two up to 256; this "
                                         "model's is 80"):
        decode_kernels.resolve("on", cpu, "static", 80)
