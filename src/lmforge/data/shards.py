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
    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        self.directory, self.split, self.dtype, self.shard_tokens = Path(directory), split, dtype, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.files: list[str] = []
        self.tokens = 0

    def write(self, ids) -> None:
        array = np.asarray(ids, dtype=self.dtype)
        self.buffer.append(array)
        self.buffered += len(array)
        self.tokens += len(array)
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> list[str]:
        if self.buffered:
            self._flush(self.buffered)
        return self.files

    def _flush(self, count: int) -> None:
        data = np.concatenate(self.buffer)
        shard, rest = data[:count], data[count:]
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)
        name = f"{self.split}_{len(self.files):06d}.bin"
        tmp = self.directory / (name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(shard.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / name)
        self.files.append(name)


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
