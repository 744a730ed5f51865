"""Errors, atomic directory writes and plain-read tensor access shared by the checkpoint
readers and writers.

Readers take each tensor's bytes with one ``read`` into memory the caller owns, never through a
memory map: the touched pages of a mapped file count in the process's resident memory for as
long as the mapping lives, which for a whole checkpoint is the whole checkpoint.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil

import torch


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not match what was asked."""


def require_dir(path: str, what: str) -> None:
    """``path`` must be an existing, non-empty directory."""
    if not os.path.exists(path):
        raise CheckpointError(f"{what} '{path}' does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"{what} '{path}' is not a directory")
    if not os.listdir(path):
        raise CheckpointError(f"{what} '{path}' is empty")


def read_json(path: str):
    """A JSON file's content; a malformed file is a CheckpointError that names it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from err


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False):
    """Yield a temporary sibling of ``path``; on success it is renamed to ``path``, on failure
    removed, so ``path`` is never left half-written."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"output '{path}' exists and is not a directory")
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise CheckpointError(f"output '{path}' exists and is not empty; remove it or pass "
                              f"--overwrite")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"cannot write into '{parent}'")
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def read_bytes(path: str, offset: int, nbytes: int) -> torch.Tensor:
    """``nbytes`` bytes of ``path`` from ``offset``, as a new uint8 tensor."""
    data = torch.empty(nbytes, dtype=torch.uint8)
    with open(path, "rb") as handle:
        handle.seek(offset)
        got = handle.readinto(data.numpy())
    if got != nbytes:
        raise CheckpointError(f"{path}: truncated (wanted {nbytes} bytes at offset {offset}, "
                              f"got {got})")
    return data


@functools.cache
def _meta_load_knows_offsets() -> bool:
    """Whether this torch's ``torch.load(map_location="meta")`` tags each storage with its
    offset in the file (``_checkpoint_offset``, with no data read: torch >= 2.10)."""
    buffer = io.BytesIO()
    torch.save(torch.zeros(1), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, map_location="meta", weights_only=True)
    return hasattr(loaded.untyped_storage(), "_checkpoint_offset")


def load_lazily(path: str, weights_only: bool):
    """The objects of a ``torch.save`` file with its tensors on the meta device, read no further
    than their shapes: :func:`read_tensor` fetches one's data. Where torch cannot say where a
    storage lies in the file, the tensors are memory-mapped instead (their touched pages then
    stay resident)."""
    if _meta_load_knows_offsets():
        return torch.load(path, map_location="meta", weights_only=weights_only)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)


def read_tensor(path: str, tensor: torch.Tensor) -> torch.Tensor:
    """The data of ``tensor``, an entry of :func:`load_lazily`'s ``path``, in new memory."""
    if tensor.device.type != "meta":
        return tensor  # memory-mapped already
    extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    extent = extent if tensor.numel() else 0
    itemsize = tensor.element_size()
    start = tensor.untyped_storage()._checkpoint_offset + tensor.storage_offset() * itemsize
    data = read_bytes(path, start, extent * itemsize).view(tensor.dtype)
    return data.as_strided(tensor.shape, tensor.stride())


class TensorSpill:
    """Tensors parked in a file until they are needed again: plain writes land in the page
    cache, which the kernel writes back and drops as it needs, instead of in this process's
    memory."""

    def __init__(self, path: str):
        self.path = path
        self._entries: list[tuple[str, torch.dtype, torch.Size]] = []
        self._handle = open(path, "wb")

    def put(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        self._entries.append((name, tensor.dtype, tensor.shape))
        self._handle.write(tensor.reshape(-1).view(torch.uint8).numpy())

    def take(self) -> dict[str, torch.Tensor]:
        """Every parked tensor by name, in the order they were put; the file is removed."""
        self._handle.close()
        state, offset = {}, 0
        for name, dtype, shape in self._entries:
            nbytes = shape.numel() * torch.empty(0, dtype=dtype).element_size()
            state[name] = read_bytes(self.path, offset, nbytes).view(dtype).reshape(shape)
            offset += nbytes
        os.remove(self.path)
        return state


def unmap_large_allocations_on_free() -> None:
    """Give every allocation of 1 MiB or more its own memory mapping (glibc's M_MMAP_THRESHOLD).

    glibc raises that threshold by itself up to 32 MB, so tensors of a few MB come from the
    heap, where the intermediates a conversion frees (HF tensors, fused copies) leave holes
    that stay resident: HF -> Megatron TP1 of a 2.2 GB checkpoint peaked between 1.2x and 1.4x
    its bytes instead of 1.06x. Elsewhere (no glibc) nothing changes."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD in glibc's malloc.h
    except (OSError, AttributeError):
        pass
