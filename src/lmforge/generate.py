"""Text generation outside the model: a pure sampler, KV-cached decoding, and streaming.

`sample()` turns logits into token ids and touches no state but its generator. `generate_tokens()` is a
generator that yields one column of new token ids per step, decoding with a preallocated KV cache (or, with
use_cache=False, recomputing the whole window each step: the reference the cached path is tested against).

When a sequence reaches the model's context, the window slides: the newest half of the context is kept and
re-encoded, and decoding goes on. Both paths slide at the same steps, so they stay token-for-token equal.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmforge.errors import LMForgeError
from lmforge.model.kv_cache import KVCache


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if not temperature >= 0:  # also rejects NaN
        raise LMForgeError(f"temperature must be 0 (greedy) or positive, not {temperature}")
    if top_k is not None and top_k < 1:
        raise LMForgeError(f"top_k must be at least 1, not {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise LMForgeError(f"top_p must be in (0, 1], not {top_p}")
    if max_new_tokens < 1:
        raise LMForgeError(f"max_new_tokens must be at least 1, not {max_new_tokens}")


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, vocab) -> token ids (B,). Temperature 0 is greedy; top-k, then top-p (nucleus) filtering."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the most likely token always stays.
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(
    model,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    num_samples: int = 1,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield (num_samples,) new token ids per step, max_new_tokens times, for the same prompt in each row."""
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    context = model.config.seq_len
    if not prompt:
        raise LMForgeError("the prompt is empty; give at least one token of text")
    if len(prompt) > context:
        raise LMForgeError(f"the prompt has {len(prompt)} tokens, more than the model's context of {context}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    was_training = model.training
    model.eval()
    tokens = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)  # (B, T)
    keep = max(1, context // 2)
    cache = KVCache.for_model(model, num_samples) if use_cache else None
    pos = 0  # how many tokens of the current window are in the cache
    window_start = 0
    try:
        for _ in range(max_new_tokens):
            if tokens.size(1) - window_start > context:  # the next token would not fit: slide the window
                window_start = tokens.size(1) - keep
                pos = 0
            if cache is not None:
                logits, _ = model(tokens[:, window_start + pos :], cache=cache, pos=pos)
                pos = tokens.size(1) - window_start
            else:
                logits, _ = model(tokens[:, window_start:])
            next_ids = sample(logits[:, -1, :], temperature, top_k, top_p, generator)
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
            yield next_ids
    finally:
        model.train(was_training)


class TextStream:
    """Turns a growing list of token ids into text increments, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a byte-level token that ends mid-character: wait for the rest
            return ""
        new, self.emitted = text[self.emitted :], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.emitted = text[self.emitted :], len(text)
        return new
