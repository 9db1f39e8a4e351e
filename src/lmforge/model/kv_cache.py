"""A preallocated key/value cache for incremental decoding.

One tensor pair for all layers, written in place, so decoding a token does not concatenate (which would copy the
whole cache at every step). Its length grows by doubling, up to the model's context, as sequences get longer: a
model with a 128k-token context does not allocate 128k positions per slot for a 100-token chat. A batch's
rows map to cache rows ("slots"), so sequences can join and leave a running batch; a `Placement`, made once per
forward pass, says where each row's new keys go and which cached keys its queries read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Placement:
    """Where one forward pass's rows read and write, for all layers at once (indexing per layer costs time)."""

    end: int  # keys 0..end-1 are read
    keys: torch.Tensor | None = None  # views (n_layer, B, n_kv_head, end, head_dim) of the rows' keys and values,
    # when the rows' slots are consecutive
    values: torch.Tensor | None = None
    new_keys: torch.Tensor | None = None  # views (n_layer, B, n_kv_head, T, head_dim) the new keys go to
    new_values: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # when not written through views: the cache rows (B, 1) and positions (B, T)
    positions: torch.Tensor | None = None


class KVCache:
    def __init__(
        self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int, device, dtype, initial=256
    ):
        """max_len: the most positions a row can hold; initial: the positions allocated until more are needed."""
        shape = (n_layer, batch_size, n_kv_head, min(max_len, initial), head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None, initial: int = 256) -> KVCache:
        c = model.config
        param = next(model.parameters())
        max_len = max_len or c.seq_len
        return cls(c.n_layer, batch_size, c.kv_heads, max_len, c.head_dim, param.device, param.dtype, initial)

    @property
    def capacity(self) -> int:
        return self.k.size(3)

    def reserve(self, length: int) -> None:
        """Make room for positions 0..length-1: at least double the allocation when it must grow."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"the cache holds at most {self.max_len} positions, not {length}")
        size = min(self.max_len, max(length, 2 * self.capacity))
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], size, old.size(4))
            new[:, :, :, : old.size(3)] = old
            setattr(self, name, new)

    def place(self, slots: list[int], positions: torch.Tensor, end: int) -> Placement:
        """Where a batch goes: batch row b in cache row slots[b], at positions (T,) shared by every row or (B, T).

        Consecutive slots are read through views (else gathered), and rows at one shared position are written
        through views (else scattered to each row's positions).
        """
        self.reserve(end)
        B = len(slots)
        place = Placement(end)
        if slots == list(range(slots[0], slots[0] + B)):
            k, v = self.k[:, slots[0] : slots[0] + B], self.v[:, slots[0] : slots[0] + B]
            place.keys, place.values = k[:, :, :, :end], v[:, :, :, :end]
            if positions.dim() == 1:
                span = slice(end - positions.numel(), end)
                place.new_keys, place.new_values = k[:, :, :, span], v[:, :, :, span]
        if place.new_keys is None:
            place.rows = torch.tensor(slots, device=positions.device)[:, None]
            place.positions = positions.expand(B, -1)
        return place

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, place: Placement):
        """Store k, v (B, n_kv_head, T, head_dim) as `place` says; return the rows' keys and values 0..end-1."""
        if place.new_keys is not None:
            place.new_keys[layer].copy_(k)
            place.new_values[layer].copy_(v)
        else:  # scatter (B, T, n_kv_head, head_dim) into each row's slot at its positions
            self.k[layer][place.rows, :, place.positions] = k.transpose(1, 2)
            self.v[layer][place.rows, :, place.positions] = v.transpose(1, 2)
        if place.keys is not None:
            return place.keys[layer], place.values[layer]
        rows = place.rows[:, 0]
        return self.k[layer][rows, :, : place.end], self.v[layer][rows, :, : place.end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the batch rows given by index (beam search reorders hypotheses)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
