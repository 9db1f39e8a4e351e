"""Batches of (inputs, targets) from a data dir's shards.

Training batches are random windows whose positions are a pure function of (seed, step, micro-step, rank):
no loader state to save, and a resumed run draws exactly the batches an uninterrupted one would. Evaluation
walks the val split in order, in non-overlapping windows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmforge.data.prepare import load_meta
from lmforge.data.shards import TokenSplit
from lmforge.errors import LMForgeError


class DataDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = load_meta(self.path)
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.splits = {name: TokenSplit(self.path, info["shards"], dtype) for name, info in self.meta["splits"].items()}

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    def check_context(self, seq_len: int) -> None:
        n = self.splits["train"].num_tokens
        if n < seq_len + 1:
            raise LMForgeError(
                f"the train split has {n} tokens, fewer than the context of {seq_len} + 1; "
                f"use a larger corpus or a shorter context (--model.seq_len {max(8, n // 2)})"
            )

    def train_batch(self, step: int, micro_step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0):
        """(inputs, targets), each (batch_size, seq_len) int64, for this step, micro-step and rank."""
        split = self.splits["train"]
        n_windows = int(split.window_starts(seq_len + 1).sum())
        rng = np.random.default_rng([seed, step, micro_step, rank])
        rows = split.windows(rng.integers(0, n_windows, size=batch_size), seq_len + 1)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def eval_batches(
        self, seq_len: int, batch_size: int, max_batches: int | None = None, split: str = "val"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows of the split; shorter windows if the split is short."""
        tokens = self.splits[split]
        for shard in tokens.shards:
            window = min(seq_len, len(shard) - 1)
            if window < 1:
                continue
            starts = np.arange(0, len(shard) - window, window)
            for begin in range(0, len(starts), batch_size):
                if max_batches is not None and max_batches <= 0:
                    return
                chunk = starts[begin : begin + batch_size]
                rows = torch.from_numpy(np.stack([shard[s : s + window + 1].astype(np.int64) for s in chunk]))
                yield rows[:, :-1], rows[:, 1:]
                if max_batches is not None:
                    max_batches -= 1
