"""``build_tokenizer``: the one place a ``--tokenizer-type`` name turns into a tokenizer."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing the base pulls in megatron-core; only the build needs it
    from megatron_patch.tokenizers.base import MegatronPatchTokenizer

# name -> (loader module attribute, what --tokenizer-model must be)
_HF_DIR = "HuggingFace tokenizer directory"
TOKENIZER_TYPES = {
    "bloombpe": ("hf", f"BLOOM {_HF_DIR}"),
    "llamabpe": ("hf", f"LLaMA {_HF_DIR}"),
    "falconbpe": ("hf", f"Falcon {_HF_DIR}"),
    "galacticabpe": ("hf", f"Galactica {_HF_DIR}"),
    "chatglm": ("glm", "ChatGLM ice_text.model (ChatGLM-6B) or tokenizer.model (ChatGLM2/3), "
                f"or the directory holding it, or an {_HF_DIR} with tokenizer.json (GLM-4)"),
    "glm130b": ("glm", "GLM-130B ice_text.model (icetk's), or the directory holding it, or an "
                f"{_HF_DIR} with tokenizer.json"),
    "HuggingFaceTokenizer": ("hf", f"any {_HF_DIR}"),
    "SentencePieceTokenizer": ("spm", "SentencePiece .model file"),
    "GPTSentencePieceTokenizer": ("spm", "SentencePiece .model file (Megatron-LM's name)"),
}
_BY_LOWER = {name.lower(): name for name in TOKENIZER_TYPES}


def canonical_tokenizer_type(tokenizer_type: str) -> str:
    """The registered spelling of ``tokenizer_type`` (case-insensitive), or a ValueError that
    lists the valid names."""
    name = _BY_LOWER.get(str(tokenizer_type).lower())
    if name is None:
        valid = ", ".join(TOKENIZER_TYPES)
        raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; valid names: "
                         f"{valid}")
    return name


def build_tokenizer(tokenizer_type: str, tokenizer_model: str, extra_vocab_size: int = 0,
                    make_vocab_size_divisible_by: int = 128,
                    tensor_model_parallel_size: int = 1) -> MegatronPatchTokenizer:
    """Load the tokenizer named ``tokenizer_type`` from the local path ``tokenizer_model``.

    ``padded_vocab_size`` of the result is ``vocab_size + extra_vocab_size`` rounded up to a
    multiple of ``make_vocab_size_divisible_by x tensor_model_parallel_size``.
    """
    name = canonical_tokenizer_type(tokenizer_type)
    if not tokenizer_model:
        raise ValueError(f"--tokenizer-model is required for --tokenizer-type {name}: a "
                         f"{TOKENIZER_TYPES[name][1]}")
    padding = dict(extra_vocab_size=extra_vocab_size,
                   make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                   tensor_model_parallel_size=tensor_model_parallel_size)
    if TOKENIZER_TYPES[name][0] == "spm":
        from megatron_patch.tokenizers.spm import SentencePieceTokenizer

        return SentencePieceTokenizer(tokenizer_model, name, **padding)
    from megatron_patch.tokenizers.hf import HFTokenizer

    if TOKENIZER_TYPES[name][0] == "glm":
        from megatron_patch.tokenizers.glm import GLMTokenizer, resolve_model_file

        if resolve_model_file(tokenizer_model, name) is not None:
            return GLMTokenizer(tokenizer_model, name, **padding)

    return HFTokenizer(tokenizer_model, name, **padding)
