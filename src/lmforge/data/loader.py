"""Batches of (inputs, targets) from a data dir's shards, and the batch order of record datasets.

Training batches are random windows whose positions are a pure function of (seed, step, micro-step, rank):
no loader state to save, and a resumed run draws exactly the batches an uninterrupted one would. Evaluation
walks the val split in order, in non-overlapping windows. Fine-tuning records (data/sft.py, data/classify.py)
are drawn the same way: `shuffled_indices` walks seeded permutations of the records, one per epoch.
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

    def train_batch(self, step: int, part: int, micro_batch: int, batch_size: int, seq_len: int, seed: int):
        """(inputs, targets), each (micro_batch, seq_len) int64: part `part` of step `step`'s global batch.

        The global batch (batch_size windows) is drawn from (seed, step) alone and cut into parts of micro_batch
        rows; part = micro_step * world_size + rank. So one process accumulating two parts sees exactly the
        rows that two processes see at once.
        """
        split = self.splits["train"]
        n_windows = int(split.window_starts(seq_len + 1).sum())
        starts = np.random.default_rng([seed, step]).integers(0, n_windows, size=batch_size)
        rows = torch.from_numpy(split.windows(starts[part * micro_batch : (part + 1) * micro_batch], seq_len + 1))
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


def mask_tokens(
    rows: torch.Tensor, vocab_size: int, mask_id: int, special_ids: list[int], probability: float, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masked-LM inputs and targets from token rows.

    Each non-special token is chosen with `probability`; a chosen token becomes <|mask|> 80% of the time, a
    random token 10% and stays itself 10%. Targets hold the original id at chosen positions and -100 elsewhere.
    At least one position per row is chosen, so every row contributes to the loss.
    """
    chosen = torch.rand(rows.shape, generator=generator) < probability
    special = torch.isin(rows, torch.tensor(special_ids, dtype=rows.dtype))
    chosen &= ~special
    empty = ~chosen.any(dim=1)
    if empty.any():
        scores = torch.rand(rows.shape, generator=generator).masked_fill(special, -1.0)
        first = scores.argmax(dim=1)
        chosen[empty, first[empty]] = ~special[empty, first[empty]]
    targets = torch.where(chosen, rows, torch.full_like(rows, -100))
    roll = torch.rand(rows.shape, generator=generator)
    inputs = rows.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    random_pick = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[random_pick] = torch.randint(0, vocab_size, (int(random_pick.sum()),), generator=generator)
    return inputs, targets


def shuffled_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The record indices of step `step`'s global batch: the records in a fresh seeded order each epoch.

    A pure function of (n, step, batch_size, seed): batch k holds positions k*batch_size... of the endless
    sequence perm(epoch 0) + perm(epoch 1) + ..., so every record is seen once per epoch.
    """
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        out[chosen] = np.random.default_rng([seed, int(epoch)]).permutation(n)[offsets[chosen]]
    return out


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    """(len(rows), longest) int64, each row right-padded with value."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)
