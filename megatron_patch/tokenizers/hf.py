"""A HuggingFace tokenizer directory behind the Megatron tokenizer interface.

``tokenize(text)`` is ``tokenizer(text).input_ids`` (special tokens included, e.g. LLaMA's BOS),
as in Megatron-LM's ``_HuggingFaceTokenizer`` and the seed's tokenizers. Only local files are
read: ``HF_HUB_OFFLINE`` is set and ``local_files_only=True``, so a missing directory is an error,
never a download. ``trust_remote_code`` stays False: ChatGLM-style tokenizers must be saved as a
fast tokenizer (``tokenizer.json``).
"""
from __future__ import annotations

import os
from typing import Sequence

from megatron_patch.tokenizers.base import MegatronPatchTokenizer


def load_hf_tokenizer(path: str, flag: str = "--tokenizer-model"):
    """``AutoTokenizer.from_pretrained(path)`` from local files only, with errors naming ``flag``."""
    if not os.path.isdir(path):
        what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(
            f"{flag} {path!r} {what}. It must be a local HuggingFace tokenizer directory "
            "(tokenizer.json and/or tokenizer_config.json; give the directory that holds "
            "them); nothing is downloaded.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as err:  # transformers raises many types for an unusable directory
        raise ValueError(
            f"{flag} {path!r}: could not load a HuggingFace tokenizer with "
            f"trust_remote_code=False ({type(err).__name__}: {err}). Tokenizers that need remote "
            "code (ChatGLM, GLM-130B) must be saved as a fast tokenizer (tokenizer.json).") from err


class HFTokenizer(MegatronPatchTokenizer):
    """Wraps ``transformers.AutoTokenizer``; ``vocab_size`` is ``len(tokenizer)`` (added tokens
    included), ``eod`` its EOS id."""

    def __init__(self, path: str, tokenizer_type: str, **padding):
        super().__init__(path, tokenizer_type, **padding)
        self._hf = load_hf_tokenizer(path)
        self._vocab = None
        # One call through transformers leaves the Rust backend configured exactly as
        # ``tokenizer(text)`` uses it (no truncation/padding, special-token splitting), so the
        # backend's batch call below gives the same ids.
        self._hf("")
        self._backend = getattr(self._hf, "backend_tokenizer", None)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, special tokens included (Megatron-LM's behaviour)."""
        return self._hf(text).input_ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of many texts in one Rust call: no per-text BatchEncoding and no offsets."""
        if self._backend is None:
            return self._hf(list(texts)).input_ids
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [encoding.ids for encoding in encode(list(texts), add_special_tokens=True)]

    def detokenize(self, ids) -> str:
        """Text of ``ids`` (special tokens kept, like Megatron-LM)."""
        return self._hf.decode(list(ids))

    @property
    def vocab(self) -> dict:
        """Token text -> id, added tokens included."""
        if self._vocab is None:
            self._vocab = self._hf.get_vocab()
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """True vocabulary size, added tokens included."""
        return len(self._hf)

    @property
    def eod(self) -> int | None:
        """The EOS id, None when the tokenizer defines no EOS token."""
        return self._hf.eos_token_id

    @property
    def bos(self) -> int | None:
        """The BOS id, or None."""
        return self._hf.bos_token_id

    @property
    def hf_tokenizer(self):
        """The ``transformers`` tokenizer (chat templates, special tokens)."""
        return self._hf

    def _pad_id(self) -> int | None:
        return self._hf.pad_token_id
