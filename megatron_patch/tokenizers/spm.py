"""A SentencePiece ``.model`` file behind the Megatron tokenizer interface.

Behaves like Megatron-LM's ``GPTSentencePieceTokenizer``: ``tokenize`` is the plain
``encode`` (no BOS/EOS added), ``eod`` is the model's EOS id. (Megatron-LM's BERT/T5
``SentencePieceTokenizer`` appends its own ``<CLS>``/``<EOD>``/... pieces; that variant is not
reproduced here.)
"""
from __future__ import annotations

import os
from typing import Sequence

from megatron_patch.tokenizers.base import MegatronPatchTokenizer


def _id_or_none(value: int) -> int | None:
    # sentencepiece answers -1 for a special piece the model does not define.
    return value if value >= 0 else None


class SentencePieceTokenizer(MegatronPatchTokenizer):
    """Wraps ``sentencepiece.SentencePieceProcessor``; ``hf_tokenizer`` is None."""

    def __init__(self, path: str, tokenizer_type: str, **padding):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--tokenizer-model {path!r}: no such file; {tokenizer_type} needs a "
                "SentencePiece .model file.")
        import sentencepiece

        super().__init__(path, tokenizer_type, **padding)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as err:
            raise ValueError(f"--tokenizer-model {path!r}: not a SentencePiece model "
                             f"({err})") from err
        self._vocab = None

    def tokenize(self, text: str) -> list[int]:
        """Piece ids of ``text`` (no BOS/EOS)."""
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """One C++ call for many texts; one thread, so a preprocessing worker is one core."""
        return self._sp.encode(list(texts), num_threads=1)

    def detokenize(self, ids) -> str:
        """Text of ``ids``."""
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab(self) -> dict:
        """Piece -> id."""
        if self._vocab is None:
            self._vocab = {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """Number of pieces."""
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int | None:
        """The model's EOS id, or None."""
        return _id_or_none(self._sp.eos_id())

    @property
    def bos(self) -> int | None:
        """The model's BOS id, or None."""
        return _id_or_none(self._sp.bos_id())

    def _pad_id(self) -> int | None:
        return _id_or_none(self._sp.pad_id())
