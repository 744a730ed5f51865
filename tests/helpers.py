"""Shared test helpers: tiny tokenizers and models built on the spot, and a torchrun runner."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# A rendezvous of this process (if any) must not leak into the processes it starts.
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def child_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    env.update(extra or {})
    return env


def run_torchrun(args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run --nproc-per-node N <args>`` on CPU (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=child_env(env), cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def run_python(args: list[str], timeout: int = 300, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python <args>`` from the repository root."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env(env), cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"python {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def train_tiny_tokenizer(output_dir: str, vocab_size: int = 500, docs: int = 400) -> str:
    """A byte-level BPE tokenizer trained on the standard library's docstrings."""
    from megatron_patch.data.corpus import iter_stdlib_docstrings
    from megatron_patch.tokenizers.train import train_bpe_tokenizer

    texts = [t for _, t in zip(range(docs), iter_stdlib_docstrings())]
    return train_bpe_tokenizer(texts, vocab_size, output_dir)


def train_tiny_sentencepiece(path: str, vocab_size: int = 320, byte_fallback: bool = False,
                             user_defined: tuple = ("<n>",)) -> str:
    """A unigram SentencePiece model at ``path`` trained on the standard library's docstrings
    (pieces 0-3: ``<unk> <s> </s> <pad>``, as the GLM releases number them)."""
    import io

    import sentencepiece

    from megatron_patch.data.corpus import iter_stdlib_docstrings

    lines = [line for _, text in zip(range(300), iter_stdlib_docstrings())
             for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", byte_fallback=byte_fallback, user_defined_symbols=list(user_defined),
        pad_id=3, character_coverage=1.0, num_threads=1, minloglevel=2)
    with open(path, "wb") as handle:
        handle.write(model.getvalue())
    return path


def save_tiny_llama(output_dir: str, seed: int = 0, qk_scale: float = 1.0, **overrides) -> str:
    """A random HF LlamaForCausalLM (2 layers, hidden 64 unless overridden), saved as safetensors.

    ``qk_scale`` multiplies the query and key projections: random weights of std 0.02 give
    nearly uniform attention, whose logits hardly depend on positions; sharper attention makes
    a rotary or masking mistake move the logits by orders of magnitude more."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=250, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    # Random norms too, so a swapped or missing norm weight cannot go unnoticed.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            if "q_proj" in name or "k_proj" in name:
                param.mul_(qk_scale)
    model.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def save_tiny_hf(family_name: str, output_dir: str, size: str = "tiny", seed: int = 0,
                 qk_scale: float = 1.0, hf_extra: dict | None = None, **overrides) -> str:
    """A random HF model of any registered family, from its sizes-table row (``overrides`` are
    ModelArgs fields, ``hf_extra`` more config.json fields): the config.json the family's own
    declaration writes, the weights drawn by transformers, norms randomised (as in
    :func:`save_tiny_llama`). ``reward_head=True``: its ``*ForSequenceClassification``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from megatron_patch.registry import get_family

    family = get_family(family_name)
    config = family.hf_config_from_args(family.args_for_size(size, **overrides))
    config.update(hf_extra or {})
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if overrides.get("reward_head") else \
        AutoModelForCausalLM
    model = auto.from_config(AutoConfig.for_model(**config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(("ln_attn.weight", "ln_mlp.weight", "ln_f.weight")):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.02)  # transformers zeroes them: a swapped bias would hide
            if any(p in name for p in ("q_proj", "k_proj", "query_key_value")):
                param.mul_(qk_scale)
    model.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def live_tiny_llama(root, vocab_size: int = 300, qk_scale: float = 5.0):
    """A generator for a module-scoped fixture: a random tiny llama converted under ``root``
    and loaded as a GPTModel in this process (TP1), parallel state torn down after."""
    from megatron_patch import compat
    from megatron_patch.convert import engine
    from megatron_patch.generation.loading import load_model, open_checkpoint

    save_tiny_hf("llama", str(root / "hf"), vocab_size=vocab_size, qk_scale=qk_scale)
    engine.convert_hf_to_megatron(str(root / "hf"), str(root / "mg"), progress=False)
    compat.initialize_parallel(1, 1)
    try:
        yield load_model(open_checkpoint(str(root / "mg")), 1)
    finally:
        compat.destroy_parallel()
