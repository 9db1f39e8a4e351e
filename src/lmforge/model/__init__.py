"""The transformer (gpt.py), its config (config.py, no torch) and its decoding cache (kv_cache.py).

The names are loaded on first use, so importing `lmforge.model.config` does not import torch.
"""

from __future__ import annotations

import importlib

_HOMES = {"GPT": "lmforge.model.gpt", "KVCache": "lmforge.model.kv_cache", "ModelConfig": "lmforge.model.config"}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'lmforge.model' has no attribute {name!r}")
