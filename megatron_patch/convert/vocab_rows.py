"""How many embedding rows Megatron -> HF keeps.

A Megatron embedding has ``vocab_size`` rows for the model's tokens, then ``--extra-vocab-size``
rows reserved for tokens added later, then zero rows up to a multiple of
``make-vocab-size-divisible-by x TP``::

    | vocab_size rows | extra rows | padding rows |   = padded_vocab_size

When the checkpoint's tokenizer has more tokens than ``vocab_size`` (tokens were added and
trained into the reserved rows) the HF model keeps a row for each of them and its config.json
says so; otherwise only ``vocab_size`` rows go to HF, and the summary says what was cut and why.
"""
from __future__ import annotations

import os

from megatron_patch.convert.io_utils import CheckpointError


def tokenizer_tokens(root: str, meta: dict) -> int | None:
    """Tokens (added ones included, ``len(tokenizer)``) of the tokenizer a Megatron checkpoint
    carries (``meta["tokenizer"]``), or None without one. Loaded here with transformers or
    SentencePiece directly: ``megatron_patch.tokenizers`` would import megatron-core, which the
    way to HF does not otherwise need."""
    carried = meta.get("tokenizer")
    path = os.path.join(root, carried["path"]) if carried else None
    if path is None or not os.path.exists(path):
        return None
    try:
        if carried.get("type") in ("chatglm", "glm130b"):  # their own SentencePiece schemes
            from megatron_patch.tokenizers.glm_files import token_count

            tokens = token_count(path, carried["type"])
            if tokens is not None:
                return tokens
        if os.path.isfile(path):  # a SentencePiece model, as the trainer saves one
            from sentencepiece import SentencePieceProcessor

            return SentencePieceProcessor(model_file=path).get_piece_size()
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(path, trust_remote_code=False,
                                                 local_files_only=True))
    except Exception as err:  # transformers raises many types for an unusable directory
        raise CheckpointError(f"{path}: cannot load the checkpoint's tokenizer to count its "
                              f"tokens ({type(err).__name__}: {err})") from err


def tokenizer_pad_id(root: str, meta: dict) -> int | None:
    """The pad id (else eos) of the HF tokenizer a checkpoint carries, or None."""
    carried = meta.get("tokenizer")
    path = os.path.join(root, carried["path"]) if carried else None
    if path is None or not os.path.isdir(path):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False,
                                                  local_files_only=True)
    except Exception:  # a tokenizer transformers cannot load (GLM's SentencePiece files)
        return None
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id


def hf_vocab_rows(vocab: int, extra: int, padded: int, tokens: int | None,
                  where: str) -> tuple[int, str | None]:
    """(rows the HF model keeps, a note for the summary or None). ``where``: the tokenizer's
    path, for messages."""
    padding = padded - vocab - extra
    if tokens is not None and tokens > padded:
        raise CheckpointError(f"{where} has {tokens} tokens but the checkpoint's embedding has "
                              f"{padded} rows (vocab {vocab} + --extra-vocab-size {extra} + "
                              f"{padding} padding rows): tokens {padded} and up have no weights")
    if tokens is not None and tokens > vocab:
        kept_padding = max(0, tokens - vocab - extra)
        kept = f"{tokens - vocab - kept_padding} --extra-vocab-size rows" + (
            f" and {kept_padding} padding rows" if kept_padding else "")
        return tokens, (f"kept {kept} as added tokens (the tokenizer has {tokens} tokens: "
                        f"config.json vocab_size {tokens}), dropped {padded - tokens} rows past "
                        f"them")
    if extra == 0:
        return vocab, None  # only the padding that every Megatron embedding has
    why = (f"the tokenizer has {tokens} tokens" if tokens is not None
           else "the checkpoint carries no tokenizer to name more tokens")
    return vocab, (f"dropped {extra} --extra-vocab-size rows and {padding} padding rows: {why} "
                   f"(config.json vocab_size {vocab})")
