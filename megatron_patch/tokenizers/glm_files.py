"""The GLM tokenizers' files and rules without megatron-core (the way to HF counts tokens with
them): which file a path means, GLM-130B's appended pieces, the whitespace pieces. The tokenizer
itself, and the schemes, are in ``tokenizers/glm.py``."""
from __future__ import annotations

import os
import re

GLM130B_ID_OFFSET = 20000  # icetk's image tokens precede the text pieces
ICE_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<eod>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
MAX_BLANK = 80
TAB = "<|tab|>"
CHATGLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
CHATGLM3_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
_FILES = ("ice_text.model", "tokenizer.model")
_BLANKS = re.compile(" {2,%d}" % MAX_BLANK)
_BLANK_TOKEN = re.compile(r"<\|blank_(\d+)\|>")


def blank_token(length: int) -> str:
    return f"<|blank_{length}|>"


def encode_whitespace(text: str) -> str:
    """``\\n``, ``\\t`` and runs of spaces as the ice tokenizers' pieces (the originals replace
    runs of 80 spaces first, then 79, ... 2: the same as a greedy left-to-right match)."""
    text = text.replace("\n", "<n>").replace("\t", TAB)
    return _BLANKS.sub(lambda match: blank_token(len(match.group())), text)


def decode_whitespace(text: str) -> str:
    text = text.replace("<n>", "\n").replace(TAB, "\t")
    return _BLANK_TOKEN.sub(lambda match: " " * int(match.group(1)), text)


def glm130b_proto(model_bytes: bytes) -> bytes:
    """icetk's text model with the pieces SAT's ``GLM130BTokenizer`` appends (and byte
    fallback switched on), serialized for ``SentencePieceProcessor(model_proto=...)``."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as sp_model
    except ImportError as err:  # sentencepiece's proto module needs google.protobuf
        raise ImportError("--tokenizer-type glm130b edits the SentencePiece model and needs "
                          "protobuf: pip install protobuf") from err
    proto = sp_model.ModelProto()
    proto.ParseFromString(model_bytes)
    piece = sp_model.ModelProto.SentencePiece
    control, user_defined, byte = piece.CONTROL, piece.USER_DEFINED, piece.BYTE
    for token in ICE_SPECIALS:
        proto.pieces.append(piece(piece=token, score=0.0, type=control))
    for token in [TAB] + [blank_token(n) for n in range(2, MAX_BLANK + 1)]:
        proto.pieces.append(piece(piece=token, score=0.0, type=user_defined))
    proto.trainer_spec.byte_fallback = True
    for value in range(256):
        proto.pieces.append(piece(piece=f"<0x{value:02X}>", score=0.0, type=byte))
    return proto.SerializeToString()


def resolve_model_file(path: str, tokenizer_type: str) -> str | None:
    """The SentencePiece file behind ``path``; None for an HF fast tokenizer directory."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--tokenizer-model {path!r} does not exist; --tokenizer-type {tokenizer_type} "
            f"takes an {' or '.join(_FILES)} file or the directory holding it (or an HF fast "
            "tokenizer directory with tokenizer.json); nothing is downloaded.")
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None
    for name in _FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(
        f"--tokenizer-model {path!r}: the directory has none of tokenizer.json, "
        f"{', '.join(_FILES)}; --tokenizer-type {tokenizer_type} needs one of them.")


def declares_chatglm3_roles(model_file: str) -> bool:
    """ChatGLM3's ``tokenization_chatglm.py`` (beside the model) lists its role tokens; the
    file is read as text, never run."""
    code = os.path.join(os.path.dirname(model_file), "tokenization_chatglm.py")
    if not os.path.isfile(code):
        return False
    with open(code, encoding="utf-8", errors="replace") as handle:
        return CHATGLM3_ROLES[-1] in handle.read()


def token_count(path: str, tokenizer_type: str) -> int | None:
    """``GLMTokenizer(path).vocab_size`` without building it; None for an HF directory."""
    import sentencepiece

    model_file = resolve_model_file(path, tokenizer_type)
    if model_file is None:
        return None
    processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
    pieces = processor.get_piece_size()
    ice = processor.piece_to_id("[gMASK]") != processor.unk_id()
    if tokenizer_type == "glm130b":
        return GLM130B_ID_OFFSET + pieces + (0 if ice else len(ICE_SPECIALS) + MAX_BLANK + 256)
    if ice:
        return pieces
    roles = CHATGLM3_ROLES if declares_chatglm3_roles(model_file) else ()
    return pieces + len(CHATGLM2_SPECIALS) + len(roles)


def check_special_ids(tokenizer, prefix_lm_ids: dict | None, where: str) -> None:
    """Refuse a GLM tokenizer whose ``[gMASK]`` / ``[MASK]`` / ``<sop>`` / ``<eop>`` are not the
    ids the model's config.json names (another release's tokenizer, or a wrong path)."""
    own = getattr(tokenizer, "special_ids", None)
    if not own or not prefix_lm_ids:
        return
    wrong = [f"{key} {own[key]} (tokenizer) vs {prefix_lm_ids[key]} (model)"
             for key in ("gmask", "mask", "sop", "eop")
             if prefix_lm_ids.get(key) is not None and own[key] != prefix_lm_ids[key]]
    if wrong:
        raise ValueError(f"{where}: the tokenizer's special tokens are not the model's: "
                         f"{', '.join(wrong)}. Give the tokenizer of this checkpoint's release "
                         "(--tokenizer-model / --tokenizer-path).")
