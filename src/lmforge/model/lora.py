"""LoRA: low-rank adapters on a model's linear layers (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large
Language Models").

A wrapped layer computes `base(x) + (alpha / rank) * B(A(dropout(x)))`, with the base layer frozen, A (rank x in)
drawn from a Gaussian and B (out x rank) zero, so training starts from exactly the base model. Only A and B train.
`merged_state_dict` folds each adapter into its base weight, `W + (alpha / rank) * B @ A`, under the plain model's
parameter names: what export, generation and serving read, with outputs equal to the wrapped model's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.scaling = rank, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, **factory) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        self.dropout = nn.Dropout(dropout)
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scaling


def apply_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Freeze every parameter of model and wrap each nn.Linear named in targets (by its last name) with an adapter.

    Returns the wrapped modules' names. Call it after loading the base weights and before building the optimizer.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    return wrapped


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model's state dict with every adapter folded into its base weight, under the unwrapped model's names.

    Tensors the model shares under two names (tied embeddings) stay shared.
    """
    lora = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    state = {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        owner, _, leaf = key.rpartition(".")
        if owner in lora and leaf in ("lora_A", "lora_B"):
            continue
        if owner.endswith(".base") and owner[: -len(".base")] in lora:
            name = owner[: -len(".base")]
            tensor = lora[name].merged_weight().detach() if leaf == "weight" else tensor
            key = f"{name}.{leaf}"
        state[key] = tensor
    return state
