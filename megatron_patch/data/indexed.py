"""Stream a megatron-core indexed dataset (``.bin`` + ``.idx``) to disk in bounded memory.

The file format is the one megatron-core's ``IndexedDatasetBuilder`` writes (0.16.1)::

    .bin  token ids of every sequence, back to back, in the dataset dtype
    .idx  b"MMIDIDX\\x00\\x00" | <Q version=1 | <B dtype code | <Q sequence count
          | <Q document count (= len(document_indices)) | int32 sequence lengths
          | int64 sequence byte offsets into .bin | int64 document_indices (0, then the
          sequence count at the end of each document)

``IndexedDatasetBuilder`` keeps the lengths in Python lists until ``finalize``; here they are
spooled to side files so memory stays flat for billions of documents. Everything is written under
temporary names; ``finalize`` renames ``.bin`` then ``.idx``, so an interrupted run never leaves a
pair that megatron-core's ``IndexedDataset.exists`` would accept.
"""
from __future__ import annotations

import os
import shutil
import struct

import numpy as np

_HEADER = b"MMIDIDX\x00\x00"
# megatron.core.datasets.indexed_dataset.DType codes
_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3,
                np.dtype(np.int32): 4, np.dtype(np.int64): 5, np.dtype(np.float64): 6,
                np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
_BLOCK = 1 << 22  # sequences per block when turning lengths into byte offsets


def token_dtype(vocab_size: int) -> np.dtype:
    """Megatron-LM's choice (``DType.optimal_dtype``): uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


class IndexedDatasetWriter:
    """Append documents, then ``finalize()`` into ``{prefix}.bin`` / ``{prefix}.idx``.

    Use as a context manager: leaving the block with an exception removes the temporary files.
    """

    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._tmp = f"{prefix}.tmp{os.getpid()}"
        self._files = {}
        try:
            for part in ("bin", "lengths", "docs"):
                self._files[part] = open(f"{self._tmp}.{part}", "wb")
        except OSError:
            self.abort()
            raise
        self._files["docs"].write(np.zeros(1, np.int64).tobytes())  # document_indices[0]
        self.sequences = 0
        self.documents = 0
        self.tokens = 0

    def add_documents(self, tokens: np.ndarray, sequence_lengths: np.ndarray,
                      sequences_per_document: np.ndarray) -> None:
        """Append documents given as their concatenated ``tokens``, the length of every sequence,
        and how many sequences each document holds (0 for an empty document)."""
        self._files["bin"].write(np.ascontiguousarray(tokens, self.dtype).tobytes())
        self._files["lengths"].write(np.asarray(sequence_lengths, np.int32).tobytes())
        ends = self.sequences + np.cumsum(sequences_per_document, dtype=np.int64)
        self._files["docs"].write(ends.tobytes())
        self.sequences += int(len(sequence_lengths))
        self.documents += int(len(sequences_per_document))
        self.tokens += int(len(tokens))

    def finalize(self) -> None:
        """Write the index, then move ``.bin`` and ``.idx`` to their final names."""
        for handle in self._files.values():
            handle.close()
        with open(f"{self._tmp}.idx", "wb") as idx:
            idx.write(_HEADER + struct.pack("<Q", 1) + struct.pack("<B", _DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", self.sequences) + struct.pack("<Q", self.documents + 1))
            with open(f"{self._tmp}.lengths", "rb") as lengths:
                shutil.copyfileobj(lengths, idx, 1 << 24)
            self._write_pointers(idx)
            with open(f"{self._tmp}.docs", "rb") as docs:
                shutil.copyfileobj(docs, idx, 1 << 24)
        os.replace(f"{self._tmp}.bin", f"{self.prefix}.bin")
        os.replace(f"{self._tmp}.idx", f"{self.prefix}.idx")
        self._remove_temporaries()

    def _write_pointers(self, idx) -> None:
        # offset[i] = itemsize * sum(lengths[:i]), computed a block at a time with a carry.
        carry = np.int64(0)
        with open(f"{self._tmp}.lengths", "rb") as lengths:
            while block := lengths.read(_BLOCK * 4):
                sizes = np.frombuffer(block, np.int32).astype(np.int64) * self.dtype.itemsize
                ends = np.cumsum(sizes) + carry
                idx.write((ends - sizes).tobytes())
                carry = ends[-1]

    def abort(self) -> None:
        """Close and delete everything written so far."""
        for handle in self._files.values():
            handle.close()
        self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        for part in ("bin", "lengths", "docs", "idx"):
            try:
                os.remove(f"{self._tmp}.{part}")
            except FileNotFoundError:
                pass

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
