"""Language-model loss on a split: mean cross-entropy per token (nats) and perplexity."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not -100."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, label_smoothing=label_smoothing
    )


@torch.no_grad()
def evaluate(model, batches, device, autocast=None) -> dict:
    """Token-weighted mean loss over (inputs, targets) batches; the model is put back in its previous mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast if autocast is not None else contextlib.nullcontext():
            logits, _ = model(x)
        n = int((y != -100).sum())
        total += lm_loss(logits, y).item() * n
        count += n
    model.train(was_training)
    if count == 0:
        return {}
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}
