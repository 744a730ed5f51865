"""HuggingFace checkpoint directories: a lazy reader (safetensors, or PyTorch .bin as a
fallback) that counts what it hands out, and a sharded safetensors writer."""
from __future__ import annotations

import json
import os
import shutil
import struct

import torch

from megatron_patch.convert.io_utils import (CheckpointError, load_lazily, read_bytes, read_json,
                                             read_tensor, require_dir)

# Files that travel with the weights (tokenizer, generation defaults); never the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "ice_text.model")
# tokenization_chatglm.py: the remote code ChatGLM users load the HF directory with (read as
# text by tokenizers/glm_files.py for ChatGLM3's role tokens, never run here)
SIDE_FILES = TOKENIZER_FILES + ("generation_config.json", "tokenization_chatglm.py")
# safetensors' dtype tags (its format spec).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_hf_config(path: str) -> dict:
    """config.json of an HF checkpoint directory, with errors that name the file."""
    require_dir(path, "HF checkpoint")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        if os.path.isfile(os.path.join(path, "latest")):
            raise CheckpointError(
                f"{path}: a SwissArmyTransformer checkpoint ('latest') without config.json: "
                f"write one beside 'latest' with the model's shape (GLM-130B's: "
                f"{json.dumps(_glm130b_release_config())})")
        raise CheckpointError(f"{path}: no config.json; an HF checkpoint directory holds "
                              f"config.json and *.safetensors")
    return read_json(config_path)


def _glm130b_release_config() -> dict:
    from megatron_patch.families.glm130b import GLM130B

    return GLM130B.hf_config_from_args(GLM130B.args_for_size("130B"))


def read_safetensors_header(path: str) -> tuple[int, dict]:
    """(where the data starts, {tensor name: entry}) of a safetensors file, which begins with
    the length of its JSON header as 8 little-endian bytes."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= os.path.getsize(path) - 8:
            raise CheckpointError(f"{path}: not a safetensors file")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: invalid safetensors header ({err})") from err
    header.pop("__metadata__", None)
    return 8 + length, header


class HFReader:
    """Tensors of an HF checkpoint by name, read one at a time into memory of their own (a
    plain read, nothing stays mapped); remembers which were read."""

    def __init__(self, path: str):
        self.path = path
        self.config = read_hf_config(path)
        self._headers = {}  # file -> safetensors (data start, header) or lazily loaded .bin
        self._where = self._index()  # tensor name -> file
        self.reads: dict[str, int] = {}  # how often each tensor was read

    def _index(self) -> dict[str, str]:
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index_path = os.path.join(self.path, index_name)
            if os.path.isfile(index_path):
                weight_map = read_json(index_path).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise CheckpointError(f"{index_path}: no 'weight_map' object")
                return {k: os.path.join(self.path, v) for k, v in weight_map.items()}
            single_path = os.path.join(self.path, single)
            if os.path.isfile(single_path):
                return {k: single_path for k in self._header(single_path)}
        raise CheckpointError(f"{self.path}: no model.safetensors, model.safetensors.index.json "
                              f"or pytorch_model.bin found")

    def _header(self, file: str) -> dict:
        """{name: safetensors entry or meta tensor} of one weight file, read once."""
        if file not in self._headers:
            if not os.path.isfile(file):
                raise CheckpointError(f"{file}: missing (the weight index names it)")
            self._headers[file] = (read_safetensors_header(file) if file.endswith(".safetensors")
                                   else (0, load_lazily(file, weights_only=True)))
        return self._headers[file][1]

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        """One tensor, counted as consumed."""
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor '{name}' is missing")
        file = self._where[name]
        entry = self._header(file).get(name)
        if entry is None:
            raise CheckpointError(f"{file}: no tensor '{name}' (the index says it is there)")
        tensor = (self._read_safetensors(file, name, entry) if isinstance(entry, dict)
                  else read_tensor(file, entry))
        self.reads[name] = self.reads.get(name, 0) + 1
        return tensor

    def _read_safetensors(self, file: str, name: str, entry: dict) -> torch.Tensor:
        if entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor '{name}' has unsupported dtype "
                                  f"{entry.get('dtype')!r}")
        begin, end = entry["data_offsets"]
        data = read_bytes(file, self._headers[file][0] + begin, end - begin)
        return data.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def unconsumed(self) -> list[str]:
        return sorted(self._where.keys() - self.reads.keys())

    def dtype(self) -> torch.dtype:
        """The dtype the checkpoint stores its floating-point weights in."""
        for name in self._where:
            entry = self._header(self._where[name])[name]
            dtype = entry.dtype if isinstance(entry, torch.Tensor) else \
                SAFETENSORS_DTYPES.get(entry["dtype"])
            floats = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
            return dtype if dtype in floats else torch.float32
        return torch.float32


_DTYPE_TAGS = {dtype: tag for tag, dtype in SAFETENSORS_DTYPES.items()}


class HFWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` (HF's naming and
    index), then config.json; call :meth:`finish` once.

    Streaming: each tensor's bytes go to the shard's data file as it arrives, so memory holds
    one tensor, not a shard; a shard is then its header (which needs every offset) followed by
    that data, copied in 64 MiB pieces (the safetensors format: an 8-byte little-endian header
    length, the JSON header, the concatenated tensor bytes)."""

    COPY_BYTES = 64 * 2**20

    def __init__(self, path: str, max_shard_bytes: int = 5 * 1024**3):
        self.path = path
        self.max_shard_bytes = max_shard_bytes
        self._entries: dict[str, dict] = {}
        self._data = None  # the open data file of the shard being written
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        os.makedirs(path, exist_ok=True)

    def _data_path(self) -> str:
        return os.path.join(self.path, f"part-{len(self._shards) + 1:05d}.data")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._entries and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        if self._data is None:
            self._data = open(self._data_path(), "wb")
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._data.write(memoryview(flat.numpy()))
        self._entries[name] = {"dtype": _DTYPE_TAGS[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._pending_bytes, self._pending_bytes + size]}
        self._pending_bytes += size

    def _flush(self) -> None:
        data_path = self._data_path()
        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries},
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        number = len(self._shards) + 1
        with open(os.path.join(self.path, f"part-{number:05d}.safetensors"), "wb") as out, \
                open(data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(data, out, self.COPY_BYTES)
        os.remove(data_path)
        self._shards.append(list(self._entries))
        self._entries, self._data, self._pending_bytes = {}, None, 0

    def finish(self, config: dict, side_files_from: str | None = None) -> None:
        """Name the shards as HF does, write the index, config.json and side files."""
        if self._entries:
            self._flush()
        total = len(self._shards)
        weight_map = {}
        for number, names in enumerate(self._shards, start=1):
            final = ("model.safetensors" if total == 1
                     else f"model-{number:05d}-of-{total:05d}.safetensors")
            os.replace(os.path.join(self.path, f"part-{number:05d}.safetensors"),
                       os.path.join(self.path, final))
            weight_map.update({name: final for name in names})
        if total > 1:
            with open(os.path.join(self.path, "model.safetensors.index.json"), "w") as handle:
                json.dump({"metadata": {}, "weight_map": weight_map}, handle, indent=2)
        with open(os.path.join(self.path, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
        if side_files_from:
            copy_side_files(side_files_from, self.path)


def copy_side_files(src: str, dst: str) -> bool:
    """Copy tokenizer and generation files from ``src`` to ``dst`` (created if needed); True if
    a tokenizer was among them."""
    os.makedirs(dst, exist_ok=True)
    copied = []
    for name in SIDE_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return any(name in TOKENIZER_FILES for name in copied)
