"""Optimizers and their parameter groups, built from outside the model.

Weight decay applies to the 2-D matrices of attention and MLP only; norms, biases and embeddings (and a head
tied to them) are not decayed, as in GPT-2/nanoGPT practice.
"""

from __future__ import annotations

import torch

from lmforge.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, config: OptimConfig, device_type: str = "cpu") -> torch.optim.Optimizer:
    groups = param_groups(model, config.weight_decay)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=device_type == "cuda" or None,
    )
