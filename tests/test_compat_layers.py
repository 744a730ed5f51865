"""compat (version check, MEGATRON_PATH, CPU mode) and the layers that replace megatron-core's
(SDPA core attention, norms) against megatron-core's own modules."""
import pytest
import torch

from helpers import run_python
from megatron_patch import compat


def test_unsupported_megatron_core_version_is_refused(monkeypatch):
    import megatron.core

    monkeypatch.delenv(compat.ALLOW_ENV, raising=False)
    monkeypatch.setattr(megatron.core, "__version__", "0.15.2")
    with pytest.raises(compat.UnsupportedMegatronCore, match=r"0\.15\.2 .* megatron-core>=0\.16"):
        compat.require_megatron_core()
    monkeypatch.setenv(compat.ALLOW_ENV, "1")
    assert compat.require_megatron_core() is megatron.core


def test_megatron_path_with_megatron_core_goes_first(tmp_path):
    fake = tmp_path / "Megatron-LM" / "megatron" / "core"
    fake.mkdir(parents=True)
    (fake.parent / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("__version__ = '0.16.1'\n")
    script = "import megatron_patch, megatron.core; print(megatron.core.__file__)"
    proc = run_python(["-c", script], env={"MEGATRON_PATH": str(tmp_path / "Megatron-LM")})
    assert proc.stdout.strip() == str(fake / "__init__.py")
    proc = run_python(["-c", script], env={"MEGATRON_PATH": str(tmp_path)})  # no megatron/core
    assert "site-packages" in proc.stdout


def old_checkout(tmp_path) -> str:
    """A Megatron-LM checkout whose megatron-core says 0.12.0."""
    fake = tmp_path / "Megatron-LM" / "megatron" / "core"
    fake.mkdir(parents=True)
    (fake.parent / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("__version__ = '0.12.0'\n")
    return str(tmp_path / "Megatron-LM")


TRAINING = ["--micro-batch-size", "1", "--seq-length", "8", "--lr", "1e-3"]


@pytest.mark.parametrize("argv", [
    ["-m", "megatron_patch.pretrain", *TRAINING],
    ["-m", "megatron_patch.finetune", *TRAINING, "--train-data", "x.json"],
    ["-m", "megatron_patch.generate", "--load", "x", "--input-file", "x", "--output-file", "y"],
    ["-m", "megatron_patch.convert", "--load", "x", "--save", "y"],
    ["-m", "megatron_patch.data.sft_preprocess", "--input", "x", "--output-prefix", "y",
     "--tokenizer-type", "llamabpe", "--tokenizer-model", "t", "--seq-length", "8"],
], ids=["pretrain", "finetune", "generate", "convert", "sft_preprocess"])
def test_an_unsupported_megatron_core_is_one_line_and_exit_2(tmp_path, argv):
    proc = run_python(argv, env={"MEGATRON_PATH": old_checkout(tmp_path)}, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: megatron-core 0.12.0 from {tmp_path}/Megatron-LM/megatron/core is not "
        f"supported: megatron_patch is tested with {compat.SUPPORTED_TEXT}. Install that range, "
        f"point MEGATRON_PATH at a matching checkout, or set {compat.ALLOW_ENV}=1 to try anyway."]


@pytest.fixture(scope="module")
def parallel():
    compat.initialize_parallel(1, 1, seed=3)
    return True


def _config(**overrides):
    from megatron_patch.families.llama import LLAMA
    from megatron_patch.families.model import transformer_config

    args = LLAMA.args_for_size("tiny")
    return transformer_config(LLAMA, args, **overrides)


@pytest.mark.parametrize("sq,sk,masked", [(16, 16, False), (16, 16, True), (1, 9, False),
                                          (4, 12, False)])
def test_sdpa_attention_equals_megatron_core_dot_product_attention(parallel, sq, sk, masked):
    """Causal, an explicit mask (packed samples), one decode query and a prefix chunk, with
    grouped-query attention (4 heads, 2 groups)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_patch.layers.sdpa_attention import SDPAttention

    config = _config()
    torch.manual_seed(0)
    q = torch.randn(sq, 2, 4, 16)
    k, v = torch.randn(sk, 2, 2, 16), torch.randn(sk, 2, 2, 16)
    mask = None
    if masked:  # two packed samples of 6 and 10 tokens: causal within each
        segment = torch.tensor([1] * 6 + [2] * 10)
        allowed = (segment[:, None] == segment[None, :]) & torch.ones(16, 16).tril().bool()
        mask = (~allowed).view(1, 1, 16, 16).expand(2, 1, 16, 16)
    elif sq != sk:  # megatron-core's unfused path needs the bottom-right mask spelled out
        mask = ~torch.ones(sq, sk).tril(diagonal=sk - sq).bool().view(1, 1, sq, sk)
    kind = AttnMaskType.padding if mask is not None else AttnMaskType.causal
    ours = SDPAttention(config, 1, AttnMaskType.causal, "self")
    reference = DotProductAttention(config, 1, kind, "self")
    got = ours(q, k, v, mask if masked else None, AttnMaskType.causal)
    want = reference(q, k, v, mask, kind)
    assert got.shape == want.shape == (sq, 2, 64)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_norm_equals_torch_and_marks_sequence_parallel(parallel, normalization):
    from megatron_patch.layers.norms import Norm

    config = _config(normalization=normalization)
    norm = Norm(config, 64, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 2, 64)
    reference = (torch.nn.RMSNorm(64, eps=1e-5) if normalization == "RMSNorm"
                 else torch.nn.LayerNorm(64, eps=1e-5))
    reference.load_state_dict(norm.state_dict())
    assert torch.allclose(norm(x), reference(x), atol=1e-6)
    assert norm.weight.sequence_parallel is False
    assert Norm(_config(sequence_parallel=True, tensor_model_parallel_size=2),
                64).weight.sequence_parallel is True


def test_optional_accelerators_are_reported_not_required():
    found = compat.optional_accelerators()
    assert set(found) == {"apex", "flash-attn", "transformer-engine"}
    assert all(isinstance(v, bool) for v in found.values())


def test_cpu_mode_builds_cuda_requests_on_the_cpu(parallel):
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    with torch.device("meta"):  # a mode stacked on top of CPU mode keeps working
        assert torch.empty(3).device.type == "meta"



def test_compile_megatron_keeps_dynamo_metrics_logging_json_safe(monkeypatch):
    """torch 2.11 (measured on the GPU machine) logs a JSON TypeError traceback per compilation
    once dynamo's config holds warnings.warn; after compile_megatron the metrics go without the
    config instead, and a config that serialises is still returned."""
    import torch._dynamo.utils as dynamo_utils

    from megatron_patch import compat

    def not_json():
        raise TypeError("Object of type builtin_function_or_method is not JSON serializable")

    monkeypatch.setattr(dynamo_utils, "_get_dynamo_config_for_logging", not_json)
    compiled = compat.compile_megatron(lambda x: x * 2)
    assert dynamo_utils._get_dynamo_config_for_logging() is None
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))
    monkeypatch.setattr(dynamo_utils, "_get_dynamo_config_for_logging", lambda: '{"a": 1}')
    compat.compile_megatron(lambda x: x)
    assert dynamo_utils._get_dynamo_config_for_logging() == '{"a": 1}'


LAZY_JIT = r"""
import sys
import torch
import megatron_patch
from megatron_patch import compat
import megatron.core.models.gpt, megatron.core.optimizer, megatron.core.distributed
from megatron.core import jit
from megatron.core.fusions.fused_bias_swiglu import swiglu
from megatron.core.transformer.torch_norm import L2Norm

print("dynamo imported:", "torch._dynamo" in sys.modules)
print("jit_fuser lazy:", jit.jit_fuser is compat.lazy_compile,
      getattr(swiglu, "_megatron_patch_lazy_compile", False))
compiles = []

def counting(gm, example_inputs):
    compiles.append(len(gm.graph.nodes))
    return gm.forward

x = torch.randn(4, 8, dtype=torch.float64)
norm = L2Norm(8)
def block(t):  # megatron-core's decorated function and method inside an enclosing compile
    return norm(swiglu(t).repeat(1, 2))
out = torch.compile(block, backend=counting, fullgraph=True)(x)
h = torch.nn.functional.silu(x[:, :4]) * x[:, 4:]
h = h.repeat(1, 2)
print("nested:", len(compiles), torch.allclose(out, h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)))

class Scale:
    factor = 3.0
    @compat.lazy_compile(backend=counting)
    def __call__(self, t):
        return t * self.factor
scale = Scale()
before = len(compiles)
print("direct:", [torch.equal(scale(x), x * 3.0) for _ in range(3)], len(compiles) - before)
"""


def test_megatron_cores_jit_fuser_compiles_lazily_and_the_same():
    """megatron_patch's import hook makes megatron-core's jit_fuser compile on first call:
    importing megatron-core then does not import dynamo (3-5 s per process), the decorated
    functions and methods trace into an enclosing torch.compile without a graph break, and a
    direct call compiles once and computes what the plain function does."""
    lines = run_python(["-c", LAZY_JIT]).stdout.strip().splitlines()
    assert lines == ["dynamo imported: False", "jit_fuser lazy: True True", "nested: 1 True",
                     "direct: [True, True, True] 1"]
