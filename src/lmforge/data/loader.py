"""Batches of (inputs, targets) from a data dir's shards, and the batch order of record datasets.

Training batches are a pure function of (seed, step, micro-step, rank): no loader state to save, and a resumed
run draws exactly the batches an uninterrupted one would. Two orders (train.order): `epoch` tiles the train split
into windows whose targets do not overlap and visits each once per epoch, in a fresh seeded order each epoch;
`random` draws windows at random token offsets, with replacement. Evaluation walks the val split in order, in the
same tiling. `shuffled_indices` walks the seeded permutations, one per epoch, of the windows in epoch order and of
fine-tuning records (data/sft.py, data/classify.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
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
        self._tiles: dict[int, np.ndarray] = {}  # epoch_windows by seq_len

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

    def epoch_windows(self, seq_len: int) -> np.ndarray:
        """The windows that tile the train split, as window indices for TokenSplit.windows(..., seq_len + 1).

        Windows start every seq_len tokens and hold seq_len + 1, so each token is a target exactly once (consecutive
        windows share one token, an input in the second); the shorter tail of each shard is left out.
        """
        if seq_len not in self._tiles:
            starts = self.splits["train"].window_starts(seq_len + 1)
            first = np.concatenate([[0], np.cumsum(starts)[:-1]])
            self._tiles[seq_len] = np.concatenate([f + np.arange(0, n, seq_len) for f, n in zip(first, starts)])
        return self._tiles[seq_len]

    def batch_windows(self, step: int, batch_size: int, seq_len: int, seed: int, order: str = "random") -> np.ndarray:
        """The window indices (see TokenSplit.windows) of step `step`'s global batch of batch_size windows.

        epoch: positions step*batch_size... of the endless sequence of seeded permutations of epoch_windows(), one
        permutation per epoch; random: windows starting at any token, drawn with replacement from (seed, step).
        """
        if order == "epoch":
            tiles = self.epoch_windows(seq_len)
            return tiles[shuffled_indices(len(tiles), step, batch_size, seed)]
        n_windows = int(self.splits["train"].window_starts(seq_len + 1).sum())
        return np.random.default_rng([seed, step]).integers(0, n_windows, size=batch_size)

    def train_batch(
        self, step: int, part: int, micro_batch: int, batch_size: int, seq_len: int, seed: int, order: str = "random"
    ):
        """(inputs, targets), each (micro_batch, seq_len) int64: part `part` of step `step`'s global batch.

        The global batch (batch_size windows, batch_windows) is drawn from (seed, step) alone and cut into parts of
        micro_batch rows; part = micro_step * world_size + rank. So one process accumulating two parts sees exactly
        the rows that two processes see at once.
        """
        starts = self.batch_windows(step, batch_size, seq_len, seed, order)
        rows = self.splits["train"].windows(starts[part * micro_batch : (part + 1) * micro_batch], seq_len + 1)
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
        out[chosen] = _permutation(n, seed, int(epoch))[offsets[chosen]]
    return out


@lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's order, kept: drawing it costs O(n), and every micro-batch of the epoch asks for it again."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    """(len(rows), longest) int64, each row right-padded with value."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)
