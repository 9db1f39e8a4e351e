"""Presets: named starting configs, as plain functions returning dotted overrides of the defaults.

`tiny` trains on a CPU in seconds and is what the tests use; `demo` is the model `lmforge demo` and the
speedrun benchmark train on a CPU; `small` is the classic 6-layer character-level GPT for one GPU. `gpt2` and
`gpt2-medium` are GPT-2's layouts (124M and 355M parameters with its 50257-token vocabulary), `llama-20m`,
`llama-60m` and `llama-150m` Llama-style models (RoPE, RMSNorm, SwiGLU, grouped-query attention; sizes counted
with a 32k vocabulary, tied embeddings), and `bert` a BERT-base-style encoder trained with masked tokens.

`from_depth(d)` is the one size dial (after nanochat's `--depth`): width, heads, learning rate, batch and
horizon all follow from the number of layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lmforge.errors import LMForgeError


def tiny() -> dict:
    return {
        "model.seq_len": 32,
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "train.batch_size": 8,
        "train.max_steps": 50,
        "train.eval_every": 25,
        "train.eval_batches": 4,
        "train.save_every": 25,
        "train.log_every": 5,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 5,
    }


def demo() -> dict:
    return {
        "model.seq_len": 64,
        "model.n_layer": 4,
        "model.n_head": 4,
        "model.n_embd": 128,
        "train.batch_size": 12,
        "train.time": 120.0,
        "train.eval_every": 250,
        "train.eval_batches": 20,
        "train.save_every": 500,
        "optim.lr": 1e-3,
        "optim.warmup_steps": 100,
        "optim.weight_decay": 0.1,
    }


def small() -> dict:
    return {
        "model.seq_len": 256,
        "model.n_layer": 6,
        "model.n_head": 6,
        "model.n_embd": 384,
        "model.dropout": 0.2,
        "train.batch_size": 64,
        "train.max_steps": 5000,
        "train.eval_every": 250,
        "optim.lr": 1e-3,
        "optim.min_lr_ratio": 0.1,
        "optim.warmup_steps": 100,
    }


def gpt2() -> dict:
    """GPT-2 small (124M): 12 layers, 12 heads, 768 wide, context 1024; 10B tokens in 0.5M-token steps."""
    return {
        "model.seq_len": 1024,
        "model.n_layer": 12,
        "model.n_head": 12,
        "model.n_embd": 768,
        "train.batch_tokens": 2**19,
        "train.micro_batch_size": 16,
        "train.max_steps": 19073,
        "train.eval_every": 250,
        "train.save_every": 1000,
        "optim.lr": 6e-4,
        "optim.min_lr_ratio": 0.1,
        "optim.warmup_steps": 700,
        "optim.beta2": 0.95,
        "optim.weight_decay": 0.1,
    }


def gpt2_medium() -> dict:
    """GPT-2 medium (355M): 24 layers, 16 heads, 1024 wide, the same data and schedule as gpt2."""
    return {
        **gpt2(),
        "model.n_layer": 24,
        "model.n_head": 16,
        "model.n_embd": 1024,
        "train.micro_batch_size": 8,
        "optim.lr": 3e-4,
    }


def llama(n_layer: int, n_embd: int, n_head: int, n_kv_head: int, lr: float, batch_tokens: int, steps: int) -> dict:
    """A Llama-style layout, trained for about 20 tokens per parameter (Chinchilla)."""
    return {
        "model.seq_len": 1024,
        "model.n_layer": n_layer,
        "model.n_head": n_head,
        "model.n_kv_head": n_kv_head,
        "model.n_embd": n_embd,
        "model.pos_emb": "rope",
        "model.norm": "rmsnorm",
        "model.mlp": "swiglu",
        "model.bias": False,
        "train.batch_tokens": batch_tokens,
        "train.micro_batch_size": 16,
        "train.max_steps": steps,
        "train.eval_every": 250,
        "train.save_every": 1000,
        "optim.lr": lr,
        "optim.min_lr_ratio": 0.1,
        "optim.warmup_steps": max(100, steps // 50),
        "optim.beta2": 0.95,
        "optim.weight_decay": 0.1,
    }


def llama_20m() -> dict:
    return llama(n_layer=16, n_embd=256, n_head=4, n_kv_head=2, lr=2e-3, batch_tokens=2**17, steps=3000)


def llama_60m() -> dict:
    return llama(n_layer=16, n_embd=512, n_head=8, n_kv_head=4, lr=1e-3, batch_tokens=2**18, steps=4800)


def llama_150m() -> dict:
    return llama(n_layer=20, n_embd=768, n_head=12, n_kv_head=4, lr=6e-4, batch_tokens=2**19, steps=5700)


def bert() -> dict:
    """BERT-base's layout (12 layers, 768 wide, context 512), bidirectional, trained on masked tokens (15%)."""
    return {
        "model.seq_len": 512,
        "model.n_layer": 12,
        "model.n_head": 12,
        "model.n_embd": 768,
        "model.causal": False,
        "model.dropout": 0.1,
        "train.objective": "mlm",
        "train.mlm_probability": 0.15,
        "train.batch_tokens": 2**17,
        "train.micro_batch_size": 32,
        "train.max_steps": 100_000,
        "train.eval_every": 1000,
        "train.save_every": 5000,
        "optim.lr": 1e-4,
        "optim.min_lr_ratio": 0.0,
        "optim.schedule": "linear",
        "optim.warmup_steps": 10_000,
        "optim.beta2": 0.999,
        "optim.weight_decay": 0.01,
    }


PRESETS: dict[str, Callable[[], dict]] = {
    "tiny": tiny,
    "demo": demo,
    "small": small,
    "gpt2": gpt2,
    "gpt2-medium": gpt2_medium,
    "llama-20m": llama_20m,
    "llama-60m": llama_60m,
    "llama-150m": llama_150m,
    "bert": bert,
}

HEAD_SIZE = 64  # width per attention head; with width 64 * depth, depth 12 is GPT-2 small's shape
TOKENS_PER_PARAM = 20  # Chinchilla's compute-optimal data size
TARGET_STEPS = 4000  # the batch is chosen so a compute-optimal run takes about this many steps


def from_depth(depth: int) -> dict:
    """Dotted overrides for a GPT of `depth` layers, every other size following from it (nanochat's dial).

    - width 64 * depth, one head per 64 channels (depth 12 gives GPT-2 small: 768 wide, 12 heads);
    - learning rate 6e-4 * sqrt(768 / width): GPT-2 small's at depth 12, higher for narrower models;
    - horizon: 20 tokens per non-embedding parameter (12 * depth * width^2), Chinchilla's ratio;
    - batch: the power of two of tokens nearest horizon / 4000, within 4K..512K tokens, so runs take about
      4000 steps; max_steps = horizon / batch, and a 4% warmup.

    The values stand in for the preset's; flags given after --depth override them.
    """
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise LMForgeError(f"--depth must be a whole number of layers, at least 1, not {depth!r}")
    width = HEAD_SIZE * depth
    params = 12 * depth * width**2
    tokens = TOKENS_PER_PARAM * params
    batch_tokens = 2 ** min(19, max(12, round(math.log2(tokens / TARGET_STEPS))))
    steps = math.ceil(tokens / batch_tokens)
    return {
        "model.n_layer": depth,
        "model.n_embd": width,
        "model.n_head": width // HEAD_SIZE,
        "optim.lr": float(f"{6e-4 * math.sqrt(768 / width):.3g}"),
        "optim.warmup_steps": max(10, steps // 25),
        "train.batch_tokens": batch_tokens,
        "train.max_steps": steps,
    }


def get(name: str) -> dict:
    if name not in PRESETS:
        raise LMForgeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {"preset": name, **PRESETS[name]()}
