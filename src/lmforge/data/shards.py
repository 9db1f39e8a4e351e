"""Token shards: flat arrays of token ids on disk, written streaming and read with numpy.memmap.

A split (train or val) is a sequence of files `{split}_{index:06d}.bin`, each a raw little-endian array of
uint16 (vocab < 65536) or uint32. A shard is written under a `.tmp` name and renamed when complete, so a
reader never mistakes a half-written shard for a whole one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lmforge.errors import LMForgeError

DEFAULT_SHARD_TOKENS = 100_000_000


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32).newbyteorder("<")


class ShardWriter:
    """Writes one split's tokens to fixed-size shards, streaming: memory holds only the array being written.

    Each shard is written to `{name}.tmp`, fsynced and renamed when it is full (or at close), so a shard with its
    final name is always complete.
    """

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        if shard_tokens < 1:
            raise LMForgeError(f"--shard-tokens must be at least 1, not {shard_tokens}")
        self.directory, self.split, self.dtype, self.shard_tokens = Path(directory), split, dtype, shard_tokens
        self.files: list[str] = []
        self.tokens = 0
        self._file = None
        self._in_shard = 0

    def write(self, ids) -> None:
        array = np.asarray(ids, dtype=self.dtype)
        self.tokens += len(array)
        while len(array):
            if self._file is None:
                self._file = open(self._tmp_path(), "wb")  # noqa: SIM115 - closed in _finish
            take = min(len(array), self.shard_tokens - self._in_shard)
            self._file.write(array[:take].tobytes())
            self._in_shard += take
            array = array[take:]
            if self._in_shard == self.shard_tokens:
                self._finish()

    def close(self) -> list[str]:
        if self._file is not None:
            self._finish()
        return self.files

    def _tmp_path(self) -> Path:
        return self.directory / (f"{self.split}_{len(self.files):06d}.bin" + ".tmp")

    def _finish(self) -> None:
        name = f"{self.split}_{len(self.files):06d}.bin"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp_path(), self.directory / name)
        self.files.append(name)
        self._file, self._in_shard = None, 0


class TokenSplit:
    """The shards of one split, read lazily with memmap; windows never cross a shard boundary."""

    def __init__(self, directory: Path, files: list[str], dtype: np.dtype):
        self.shards = []
        for name in files:
            path = Path(directory) / name
            if not path.is_file():
                raise LMForgeError(f"shard {path} is missing; prepare the data dir again")
            self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self.lengths = np.array([len(s) for s in self.shards], dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def window_starts(self, window: int) -> np.ndarray:
        """How many windows of `window` tokens start in each shard."""
        return np.maximum(self.lengths - window + 1, 0)

    def windows(self, flat_starts: np.ndarray, window: int) -> np.ndarray:
        """Rows of `window` tokens for window indices counted across shards (see window_starts)."""
        counts = np.cumsum(self.window_starts(window))
        rows = np.empty((len(flat_starts), window), dtype=np.int64)
        for i, flat in enumerate(flat_starts):
            shard = int(np.searchsorted(counts, flat, side="right"))
            offset = int(flat - (counts[shard - 1] if shard else 0))
            rows[i] = self.shards[shard][offset : offset + window]
        return rows
