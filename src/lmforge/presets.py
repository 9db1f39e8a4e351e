"""Presets: named starting configs, as plain functions returning dotted overrides of the defaults.

`tiny` trains on a CPU in seconds and is what the tests use; `demo` is the model `lmforge demo` and the
speedrun benchmark train on a CPU; `small` is the classic 6-layer character-level GPT for one GPU.
"""

from __future__ import annotations

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


PRESETS: dict[str, Callable[[], dict]] = {"tiny": tiny, "demo": demo, "small": small}


def get(name: str) -> dict:
    if name not in PRESETS:
        raise LMForgeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {"preset": name, **PRESETS[name]()}
