"""A preallocated key/value cache for incremental decoding.

One tensor pair for all layers, allocated once for the longest sequence a generation may reach, so decoding
a token writes in place instead of concatenating (which would copy the whole cache at every step).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int, device, dtype):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None) -> KVCache:
        c = model.config
        param = next(model.parameters())
        return cls(c.n_layer, batch_size, c.kv_heads, max_len or c.seq_len, c.head_dim, param.device, param.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, T, head_dim) at positions pos..pos+T-1; return keys and values 0..pos+T-1."""
        end = pos + k.size(2)
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the batch rows given by index (beam search reorders hypotheses)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
