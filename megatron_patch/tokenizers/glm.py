"""The GLM tokenizers from their own SentencePiece files, read locally.

The originals need remote code (ChatGLM's ``tokenization_chatglm.py``) or download their model
(icetk fetches ``ice_text.model`` at first use); here the file on disk is the whole input. The
scheme follows from the tokenizer type and the file:

=================================  =============================================================
``--tokenizer-type glm130b``       GLM-130B's ``ice_text.model`` (icetk's text model). As SAT's
                                   ``GLM130BTokenizer`` builds it: appended to the pieces are the
                                   CONTROL tokens ``[MASK] [gMASK] [sMASK] <eod> <sop> <eop> <ENC>
                                   <dBLOCK>``, the USER_DEFINED ``<|tab|>`` and ``<|blank_2|>`` ..
                                   ``<|blank_80|>``, and 256 byte-fallback pieces; every id is the
                                   piece id + 20000 (icetk's image tokens come first), so the
                                   release's ``[gMASK]`` is 150001 and ``</s>`` 20002.
``chatglm``, a model with          ChatGLM-6B (from 2023-04-06): the same scheme already saved in
``[gMASK]`` among its pieces       the file (``[MASK]`` 130000, ``[gMASK]`` 130001, ``<sop>``
(``ice_text.model``)               130004, ``<eop>`` 130005, ``<pad>`` 3), no offset.
``chatglm``, a model without       ChatGLM2-6B / ChatGLM3-6B ``tokenizer.model``: ``[MASK]
(``tokenizer.model``)              [gMASK] [sMASK] sop eop`` (ChatGLM3 also ``<|system|> <|user|>
                                   <|assistant|> <|observation|>``) numbered after the pieces;
                                   every text starts ``[gMASK] sop``; pad is ``<unk>``.
=================================  =============================================================

A directory works too: with a ``tokenizer.json`` it is an HF fast tokenizer (GLM-4's), else its
``ice_text.model`` or ``tokenizer.model``; ChatGLM3's role tokens are used when the directory's
``tokenization_chatglm.py`` declares them.

The ice schemes preprocess text as the originals do: ``\\n`` -> ``<n>``, ``\\t`` -> ``<|tab|>``,
a run of 2..80 spaces -> ``<|blank_n|>`` (longer runs in pieces of 80), and ``detokenize``
undoes it. ``tokenize`` of ChatGLM-6B / GLM-130B gives the text's ids only: where ``[gMASK]
<sop>`` go depends on the sample (the pretraining collate, the SFT sample builder and the
generation prompt builder place them), so the data keeps no copy of them.
"""
from __future__ import annotations

from typing import Sequence

from megatron_patch.tokenizers.base import MegatronPatchTokenizer
from megatron_patch.tokenizers.glm_files import (CHATGLM2_SPECIALS, CHATGLM3_ROLES,
                                                 GLM130B_ID_OFFSET, declares_chatglm3_roles,
                                                 decode_whitespace, encode_whitespace,
                                                 glm130b_proto, resolve_model_file)

__all__ = ["GLM130B_ID_OFFSET", "GLMTokenizer", "resolve_model_file"]


class GLMTokenizer(MegatronPatchTokenizer):
    """ChatGLM-6B, ChatGLM2/3 and GLM-130B SentencePiece tokenizers (module docstring);
    ``special_ids`` maps ``mask gmask smask sop eop`` to their ids."""

    def __init__(self, path: str, tokenizer_type: str, **padding):
        import sentencepiece

        model_file = resolve_model_file(path, tokenizer_type)
        super().__init__(path, tokenizer_type, **padding)
        with open(model_file, "rb") as handle:
            model_bytes = handle.read()
        try:
            probe = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
        except (OSError, RuntimeError) as err:
            raise ValueError(
                f"--tokenizer-model {model_file!r}: not a SentencePiece model ({err}). "
                "GLM-4's tokenizer.model is tiktoken's format: give its HF directory with "
                "tokenizer.json instead.") from err
        self.model_file = model_file
        self.offset = 0
        self.ice = probe.piece_to_id("[gMASK]") != probe.unk_id()
        self._appended: dict[str, int] = {}
        self.text_prefix: list[int] = []
        if tokenizer_type == "glm130b":
            if not self.ice:
                model_bytes = glm130b_proto(model_bytes)
                self.ice = True
            self.offset = GLM130B_ID_OFFSET
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
        else:
            self._sp = probe
        if self.ice:
            names = dict(mask="[MASK]", gmask="[gMASK]", smask="[sMASK]", sop="<sop>",
                         eop="<eop>")
            self.special_ids = {key: self._piece_id(piece) for key, piece in names.items()}
        else:  # ChatGLM2/3: the special tokens follow the pieces
            specials = CHATGLM2_SPECIALS + (
                CHATGLM3_ROLES if declares_chatglm3_roles(model_file) else ())
            size = self._sp.get_piece_size()
            self._appended = {token: size + index for index, token in enumerate(specials)}
            self.special_ids = {key: self._appended[token] for key, token in zip(
                ("mask", "gmask", "smask", "sop", "eop"), CHATGLM2_SPECIALS)}
            self.text_prefix = [self.special_ids["gmask"], self.special_ids["sop"]]
        self._by_id = {index: token for token, index in self._appended.items()}
        self._vocab = None

    def _piece_id(self, piece: str, required: bool = True) -> int | None:
        index = self._sp.piece_to_id(piece)
        if index == self._sp.unk_id() and piece != self._sp.id_to_piece(index):
            if required:
                raise ValueError(f"--tokenizer-model {self.model_file!r} has no {piece!r} "
                                 "piece, which a ChatGLM-6B ice_text.model holds")
            return None
        return index + self.offset

    def _own(self, index: int) -> int | None:
        return index + self.offset if index >= 0 else None

    def tokenize_text(self, text: str) -> list[int]:
        """Ids of ``text`` alone (no ``[gMASK] sop`` prefix)."""
        return self.tokenize_batch([text], prefix=False)[0]

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text``; ChatGLM2/3 start it with ``[gMASK] sop`` as their tokenizer does."""
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str], prefix: bool = True) -> list[list[int]]:
        """One C++ call for many texts (one thread: a preprocessing worker is one core)."""
        if self.ice:
            texts = [encode_whitespace(text) for text in texts]
        head = self.text_prefix if prefix else []
        return [head + [index + self.offset for index in pieces]
                for pieces in self._sp.encode(list(texts), num_threads=1)]

    def detokenize(self, ids) -> str:
        """Text of ``ids``: ids below the offset (GLM-130B's image tokens) are dropped, control
        tokens decode to nothing, ChatGLM2/3's special tokens to their names."""
        text, run = [], []
        size = self._sp.get_piece_size()
        for index in (int(i) - self.offset for i in ids):
            if 0 <= index < size:
                run.append(index)
            elif index + self.offset in self._by_id:
                text += [self._sp.decode(run), self._by_id[index + self.offset]]
                run = []
        text.append(self._sp.decode(run))
        joined = "".join(text)
        return decode_whitespace(joined) if self.ice else joined

    @property
    def vocab(self) -> dict:
        """Piece -> id (offset included), appended special tokens too."""
        if self._vocab is None:
            self._vocab = {self._sp.id_to_piece(i): i + self.offset
                           for i in range(self._sp.get_piece_size())}
            self._vocab.update(self._appended)
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """Ids in use: pieces + offset + appended special tokens (GLM-130B 150344, ChatGLM-6B
        130344, ChatGLM2 64794 for the releases)."""
        return self.offset + self._sp.get_piece_size() + len(self._appended)

    @property
    def eod(self) -> int | None:
        """ChatGLM-6B: ``<eop>`` (its eos); GLM-130B and ChatGLM2/3: the model's ``</s>``."""
        if self.ice and not self.offset:
            return self.special_ids["eop"]
        return self._own(self._sp.eos_id())

    @property
    def bos(self) -> int | None:
        """``<sop>`` for ChatGLM-6B / GLM-130B (the prefix-LM start), None for ChatGLM2/3
        (their texts start with ``text_prefix``)."""
        return self.special_ids["sop"] if self.ice else None

    def _pad_id(self) -> int | None:
        if self.ice and not self.offset:
            return self._piece_id("<pad>", required=False)
        if not self.ice:
            return self._own(self._sp.unk_id())
        return None
