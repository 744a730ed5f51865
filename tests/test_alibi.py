"""ALiBi core attention: the slopes against transformers' BLOOM, each rank's slice, and the
attention against a plain float64 softmax with the bias (causal, padded, decode, grouped)."""
import math

import pytest
import torch

from megatron_patch import compat
from megatron_patch.layers.alibi_attention import ALiBiAttention, alibi_slopes, rank_slopes


@pytest.mark.parametrize("heads", [1, 4, 6, 8, 12, 16, 20, 112])  # 112: bloom-176B
def test_slopes_equal_transformers_bloom(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    mask = torch.ones(1, 3)
    # transformers' bias is slope x (position 0, 1, 2): position 1 holds the slope.
    reference = build_alibi_tensor(mask, heads, torch.float32)[:, 0, 1]
    torch.testing.assert_close(alibi_slopes(heads), reference, rtol=0, atol=0)


def test_paper_values_and_rank_slices():
    assert alibi_slopes(8).tolist() == [2.0 ** -k for k in range(1, 9)]
    # 12 heads: the 8-head sequence, then the 16-head one's 1st and 3rd... (2^-0.5, 2^-1.5, ...)
    assert alibi_slopes(12)[8:].tolist() == pytest.approx([2.0 ** -(k + 0.5) for k in range(4)])
    assert torch.equal(torch.cat([rank_slopes(12, r, 2) for r in range(2)]), alibi_slopes(12))
    assert torch.equal(rank_slopes(12, 2, 3), alibi_slopes(12)[8:])


def reference_attention(q, k, v, slopes, allowed):
    """softmax(q k^T / sqrt(d) + slope_h * j, masked) v in float64; q [sq, b, h, d],
    k/v [sk, b, h, d] (heads already repeated), allowed [b, sq, sk]."""
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    scores = scores + slopes.double()[None, :, None, None] * torch.arange(k.size(2)).double()
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.permute(2, 0, 1, 3).reshape(q.size(2), q.size(0), -1)


@pytest.fixture(scope="module")
def attention():
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_patch.families.llama import LLAMA
    from megatron_patch.families.model import transformer_config

    compat.initialize_parallel(1, 1)
    config = transformer_config(LLAMA, LLAMA.args_for_size("tiny", num_attention_heads=6,
                                                            num_query_groups=3,
                                                            hidden_size=96))
    return ALiBiAttention(config, 1, AttnMaskType.causal, "self")


@pytest.mark.parametrize("case", ["causal", "left-padded", "decode"])
def test_alibi_attention_equals_the_plain_reference(attention, case):
    torch.manual_seed(0)
    sq, sk, batch = {"causal": (10, 10), "left-padded": (10, 10), "decode": (1, 10)}[case] + (2,)
    q = torch.randn(sq, batch, 6, 16)
    k, v = torch.randn(sk, batch, 3, 16), torch.randn(sk, batch, 3, 16)
    allowed = torch.ones(batch, sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
    mask = None
    if case == "left-padded":  # row 1 starts after 3 padding tokens
        allowed[1, :, :3] = False
        mask = ~allowed[:, None]
    got = attention(q, k, v, mask)
    expected = reference_attention(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2),
                                   alibi_slopes(6), allowed)
    rows = slice(3, None) if case == "left-padded" else slice(None)  # padded queries: anything
    torch.testing.assert_close(got[rows, 1].double(), expected[rows, 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[:, 0].double(), expected[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seq", [10, 200])  # 200: more than one 128-wide block of the mask
def test_fused_flex_path_equals_the_reference(attention, seq):
    """The GPU's flex-attention path (here in eager mode, which has no backward on the CPU:
    toolkits/benchmarks/bench_alibi.py compares its gradients on a GPU), grouped heads,
    against the float64 reference and the SDPA-with-bias path."""
    torch.manual_seed(0)
    q = torch.randn(seq, 2, 6, 16)
    k, v = torch.randn(seq, 2, 3, 16), torch.randn(seq, 2, 3, 16)
    outputs = []
    for fused in (True, False):
        attention.fused = fused
        try:
            outputs.append(attention(q, k, v, None))
        finally:
            attention.fused = None
    allowed = torch.ones(2, seq, seq, dtype=torch.bool).tril()
    expected = reference_attention(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2),
                                   alibi_slopes(6), allowed)
    # fp32 scores carry slope x position (up to 100 here): the fused path is no further from
    # the float64 reference than SDPA with the bias tensor is.
    errors = [(out.double() - expected).abs().max().item() for out in outputs]
    assert errors[0] <= max(2 * errors[1], 1e-6), errors
    assert errors[1] < 1e-5


def test_fused_path_refuses_what_it_cannot_compute(attention):
    q, k = torch.randn(1, 1, 6, 16), torch.randn(4, 1, 3, 16)
    attention.fused = True
    try:
        with pytest.raises(ValueError, match="causal self-attention without a mask"):
            attention(q, k, k, None)  # decode: 1 query, 4 keys
    finally:
        attention.fused = None


def test_decode_kernels_keep_sdpa_for_alibi_models(attention):
    """The Triton decode attention adds no ALiBi bias: auto turns it off, on is refused, and
    installing it on an ALiBi model is an error (a benchmark or caller that forces it)."""
    from megatron_patch.generation import decode_kernels

    cuda = torch.device("cuda")
    assert decode_kernels.resolve("auto", cuda, "graph", 64, alibi=True) is False
    with pytest.raises(ValueError, match="no ALiBi bias"):
        decode_kernels.resolve("on", cuda, "graph", 64, alibi=True)
    with pytest.raises(ValueError, match="adds no ALiBi bias"):
        decode_kernels.install(torch.nn.Sequential(attention), holder=None)


def test_decode_biases_outlive_other_shapes(attention):
    """A CUDA graph captured at one cache window keeps reading its bias tensor: building the
    bias of another window (or a prefill) must not free it."""
    first = attention.bias(1, 128, torch.device("cpu"), torch.float32)
    attention.bias(1, 256, torch.device("cpu"), torch.float32)
    attention.bias(10, 10, torch.device("cpu"), torch.float32)
    attention.bias(12, 12, torch.device("cpu"), torch.float32)
    assert attention.bias(1, 128, torch.device("cpu"), torch.float32) is first
    assert [key[:2] for key in attention._bias if key[0] > 1] == [(12, 12)]  # latest prefill
