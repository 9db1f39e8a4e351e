"""The transformer (gpt.py) and its decoding cache (kv_cache.py)."""

from lmforge.model.gpt import GPT, ModelConfig
from lmforge.model.kv_cache import KVCache

__all__ = ["GPT", "KVCache", "ModelConfig"]
