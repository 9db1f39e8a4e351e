"""ModelConfig: every architecture choice of the transformer in model/gpt.py, as one dataclass.

It lives apart from the model so that reading, checking and printing configs (the CLI, `lmforge prepare`,
config files) does not import torch, which costs about a second and 280 MiB per process.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LMForgeError

POS_EMBS = ("learned", "sinusoidal", "rope", "none")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0 means "take it from the data dir's tokenizer"
    seq_len: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # 0 means n_head (plain multi-head attention); fewer gives GQA, 1 gives MQA
    n_embd: int = 128
    mlp_ratio: float = 4.0
    n_inner: int = 0  # MLP hidden width; 0 derives it from mlp_ratio (set by imports whose width is not derivable)
    pos_emb: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    bias: bool = True
    tie_embeddings: bool = True
    qk_norm: bool = False
    dropout: float = 0.0
    causal: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.pos_emb in POS_EMBS, f"model.pos_emb must be one of {', '.join(POS_EMBS)}, not {self.pos_emb!r}"),
            (self.norm in NORMS, f"model.norm must be one of {', '.join(NORMS)}, not {self.norm!r}"),
            (self.mlp in MLPS, f"model.mlp must be one of {', '.join(MLPS)}, not {self.mlp!r}"),
            (self.n_layer >= 1, f"model.n_layer must be at least 1, not {self.n_layer}"),
            (self.n_head >= 1, f"model.n_head must be at least 1, not {self.n_head}"),
            (self.seq_len >= 1, f"model.seq_len must be at least 1, not {self.seq_len}"),
            (self.vocab_size >= 0, f"model.vocab_size must be positive, not {self.vocab_size}"),
            (
                self.n_embd % self.n_head == 0,
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})",
            ),
            (
                self.n_kv_head >= 0 and self.n_head % self.kv_heads == 0,
                f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.n_kv_head})",
            ),
            (0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), not {self.dropout}"),
            (self.n_inner >= 0, f"model.n_inner must not be negative, not {self.n_inner}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LMForgeError(message)
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise LMForgeError(f"rope needs an even head size; n_embd/n_head is {self.head_dim}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.n_inner:
            return self.n_inner
        hidden = int(self.mlp_ratio * self.n_embd)
        if self.mlp == "swiglu":  # keep the parameter count of a 2-matrix MLP, rounded to a multiple of 64
            hidden = int(2 * hidden / 3)
            hidden = 64 * ((hidden + 63) // 64)
        return hidden
