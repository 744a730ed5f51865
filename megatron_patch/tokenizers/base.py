"""The interface every megatron_patch tokenizer offers: megatron-core's tokenizer base plus the
fields the trainer, the converter and the data tools need (``padded_vocab_size``, ``pad`` with a
fallback, ``hf_tokenizer``, batch ``tokenize_batch``)."""
from __future__ import annotations

import logging
from typing import Sequence

from megatron_patch.tokenizers.vocab import padded_vocab_size

try:
    # megatron-core 0.16.1: GPTDatasetConfig.tokenizer is typed as the new tokenizer system, but
    # the datasets only read eod / pad / vocab_size / unique_identifiers, which this legacy base
    # (the class Megatron-LM's own training tokenizers still use) provides.
    from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer as _MegatronBase
except ImportError:  # megatron-core < 0.14 named it MegatronTokenizer
    from megatron.core.datasets.megatron_tokenizer import MegatronTokenizer as _MegatronBase


class _DropLegacyNotice(logging.Filter):
    """megatron-core logs "legacy tokenizer system is deprecated" on every construction, i.e.
    once per preprocessing worker; the notice is about Megatron-LM's own tokenizers, not ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "legacy tokenizer system" not in record.getMessage()


logging.getLogger(_MegatronBase.__module__).addFilter(_DropLegacyNotice())


class MegatronPatchTokenizer(_MegatronBase):
    """Common behaviour; subclasses load a concrete tokenizer and answer the abstract members."""

    def __init__(self, path: str, tokenizer_type: str, extra_vocab_size: int = 0,
                 make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1):
        super().__init__(path, tokenizer_type=tokenizer_type, extra_vocab_size=extra_vocab_size)
        self.tokenizer_type = tokenizer_type
        self.path = path
        self._padding = (make_vocab_size_divisible_by, tensor_model_parallel_size,
                         extra_vocab_size)
        self._inv_vocab: dict | None = None

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[self.tokenize(t) for t in texts]``; subclasses override it with a faster batch call
        that must give the same ids."""
        return [self.tokenize(text) for text in texts]

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the Megatron embedding (true size + ``extra_vocab_size``, rounded up)."""
        divisible_by, tensor_parallel, extra = self._padding
        return padded_vocab_size(self.vocab_size, divisible_by, tensor_parallel, extra)

    @property
    def inv_vocab(self) -> dict:
        """Id -> token text."""
        if self._inv_vocab is None:
            self._inv_vocab = {index: token for token, index in self.vocab.items()}
        return self._inv_vocab

    @property
    def pad(self) -> int | None:
        """The tokenizer's pad id, or ``eod`` when it has none (the seed's convention)."""
        own = self._pad_id()
        return self.eod if own is None else own

    @property
    def eos(self) -> int | None:
        """Same as ``eod``: every tokenizer here ends a document with its end-of-sequence token."""
        return self.eod

    @property
    def hf_tokenizer(self):
        """The underlying HuggingFace tokenizer (chat templates for SFT), or None."""
        return None

    def _pad_id(self) -> int | None:
        """The tokenizer's own pad id, None when it defines none."""
        return None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.tokenizer_type!r}, {self.path!r}, "
                f"vocab_size={self.vocab_size}, padded_vocab_size={self.padded_vocab_size})")
