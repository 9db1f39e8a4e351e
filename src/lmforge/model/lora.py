"""LoRA: low-rank adapters on a model's linear layers (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large
Language Models").

A wrapped layer computes `base(x) + (alpha / rank) * B(A(dropout(x)))`, with the base layer frozen, A (rank x in)
drawn from a Gaussian and B (out x rank) zero, so training starts from exactly the base model. Only A and B train.
An adapter may change only some output rows of its layer: the model's fused q/k/v projection is one nn.Linear, and
targets q_proj and v_proj adapt its query and value rows (the same adapters as on three separate projections).
`merged_state_dict` folds each adapter into its base weight, `W + (alpha / rank) * B @ A`, under the plain model's
parameter names: what export, generation and serving read, with outputs equal to the wrapped model's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rows: list[range] | None = None):
        """rows: the output rows the adapter changes, as ranges; by default all of them."""
        super().__init__()
        self.base = base
        self.rank, self.scaling = rank, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        rows = rows or [range(base.out_features)]
        index = torch.tensor([i for r in rows for i in r], dtype=torch.long, device=base.weight.device)
        self.register_buffer("index", None if len(index) == base.out_features else index, persistent=False)
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, **factory) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(len(index), rank, **factory))
        self.dropout = nn.Dropout(dropout)
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
        out = self.base(x)
        return out + delta if self.index is None else out.index_add(-1, self.index, delta)

    def merged_weight(self) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scaling
        weight = self.base.weight
        return weight + delta if self.index is None else weight.index_add(0, self.index, delta)


def apply_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Freeze every parameter of model and wrap each nn.Linear named in targets (by its last name) with an adapter.

    q_proj, k_proj and v_proj name slices of an attention's fused qkv_proj: the adapter on qkv_proj changes the
    rows of the named ones. Returns the wrapped modules' names, e.g. "blocks.0.attn.qkv_proj[q,v]". Call it after
    loading the base weights and before building the optimizer.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            label, rows = child_name, None
            if child_name == "qkv_proj" and "qkv_proj" not in targets:
                parts = [part for part in "qkv" if f"{part}_proj" in targets]
                if not parts:
                    continue
                starts = [0, module.sizes[0], module.sizes[0] + module.sizes[1]]
                rows = [range(starts[i], starts[i] + module.sizes[i]) for i in ("qkv".index(p) for p in parts)]
                label = f"qkv_proj[{','.join(parts)}]"
            elif child_name not in targets:
                continue
            setattr(module, child_name, LoRALinear(child, rank, alpha, dropout, rows))
            wrapped.append(f"{name}.{label}" if name else label)
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
