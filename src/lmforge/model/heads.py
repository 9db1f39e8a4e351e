"""Task heads on the transformer's final hidden states: sequence classification.

`Classifier` runs the GPT body (`return_hidden=True`), pools each row's hidden states into one vector and maps it
to class logits. Pooling: "last" reads the last real token (for a causal model the only position that has seen the
whole text), "mean" averages the real tokens (for a bidirectional encoder). Rows are right-padded; `lengths` says
how many tokens of each are real, and an encoder is told to ignore the padding.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.model.gpt import GPT


def pool(hidden: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, C) hidden states and (B,) real lengths -> (B, C): the last real position's, or the real ones' mean."""
    if how == "last":
        return hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1]
    real = (torch.arange(hidden.size(1), device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
    return (hidden * real[:, :, None]).sum(dim=1) / lengths[:, None].to(hidden.dtype)


class Classifier(nn.Module):
    """A GPT body under a linear classification head: (ids, lengths) -> logits (B, n_classes)."""

    def __init__(self, body: GPT, n_classes: int, pooling: str = "auto"):
        super().__init__()
        self.body = body
        self.pooling = pooling if pooling != "auto" else ("last" if body.config.causal else "mean")
        self.head = nn.Linear(body.config.n_embd, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = None
        if not self.body.config.causal:  # a causal model's real tokens never see the padding after them
            mask = torch.arange(idx.size(1), device=idx.device)[None, :] < lengths[:, None]
        hidden, _ = self.body(idx, attention_mask=mask, return_hidden=True)  # (B, T, n_embd)
        return self.head(pool(hidden, lengths, self.pooling))
