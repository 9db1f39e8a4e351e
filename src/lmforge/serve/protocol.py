"""The OpenAI wire format: request schemas (strictly typed, so a wrong type is a 400 and never a guess) and the
JSON of responses, stream chunks and log-probs.

Fields lmforge does not implement are refused when set to anything but their neutral value, rather than
silently ignored. `echo` on completions returns the prompt before the output and, with `logprobs`, its tokens'
log-probs in front of the generated ones, the first token's null as OpenAI sent it; `max_tokens: 0` with echo
scores the prompt and generates nothing (how lm-evaluation-harness and other clients score text).

top_k, min_p, repetition_penalty and ignore_eos are accepted as extensions (as other OpenAI-compatible servers do;
the openai client sends them with extra_body).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lmforge.generate import Chunk, Completion


class APIError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    logit_bias: dict | None = None
    user: str | None = None
    # extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None


def refuse_unsupported(request: SamplingFields) -> None:
    unsupported = [
        ("logit_bias", bool(request.logit_bias)),
        ("best_of", getattr(request, "best_of", None) not in (None, 1)),
        ("suffix", getattr(request, "suffix", None) is not None),
        ("tools", bool(getattr(request, "tools", None))),
        ("tool_choice", getattr(request, "tool_choice", None) not in (None, "none")),
        (
            "response_format",
            getattr(request, "response_format", None) not in (None, {"type": "text"}),
        ),
    ]
    for name, used in unsupported:
        if used:
            raise APIError(400, f"{name} is not supported by this server; leave it out", name)


# ------------------------------------------------------------------------------------------------ log-probs


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


BYTE_DECODER = _byte_decoder()


class TokenText:
    """Text and bytes of single tokens, for log-probs; a byte-level piece of a character gets its raw bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}
        self.special = frozenset(tokenizer.special_ids)

    def width(self, token_id: int) -> int:
        """Characters the token adds to a response's text: none for a special token (decoding leaves those out) or
        a byte-level piece of a character."""
        text = self(token_id)[0]
        return 0 if token_id in self.special or text.startswith("bytes:") else len(text)

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            raw = text.encode("utf-8")
            if "\ufffd" in text:
                piece = self.tokenizer.hf.id_to_token(token_id) or ""
                if piece and all(c in BYTE_DECODER for c in piece):
                    raw = bytes(BYTE_DECODER[c] for c in piece)
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self.cache[token_id] = (text, list(raw))
        return self.cache[token_id]


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else -9999.0  # JSON has no -Infinity


def completion_logprobs(
    chunk: Chunk, token_text: TokenText, offset: int, echo: Completion | None = None
) -> dict | None:
    """The legacy completions format: parallel lists of tokens, their log-probs, top alternatives, offsets. With
    echo (the sequence's Completion), the prompt's tokens come first; nothing predicts the first one, so its
    log-prob and alternatives are null."""
    if chunk.logprobs is None:
        return None
    ids, logprobs, tops = list(chunk.token_ids), list(chunk.logprobs), list(chunk.top_logprobs)
    if echo is not None:
        ids = echo.prompt_ids + ids
        logprobs = echo.prompt_logprobs + logprobs
        tops = [None, *echo.prompt_top_logprobs[1:], *tops]
    offsets = []
    for token in ids:
        offsets.append(offset)
        offset += token_text.width(token)
    return {
        "tokens": [token_text(t)[0] for t in ids],
        "token_logprobs": [None if lp is None else _finite(lp) for lp in logprobs],
        "top_logprobs": [None if top is None else {token_text(t)[0]: _finite(lp) for t, lp in top} for top in tops],
        "text_offset": offsets,
    }


def chat_logprobs(chunk: Chunk, token_text: TokenText) -> dict | None:
    """The chat format: one entry per token with its text, log-prob, bytes and top alternatives."""
    if chunk.logprobs is None:
        return None

    def entry(token: int, logprob: float) -> dict:
        text, raw = token_text(token)
        return {"token": text, "logprob": _finite(logprob), "bytes": raw}

    return {
        "content": [
            {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]}
            for t, lp, top in zip(chunk.token_ids, chunk.logprobs, chunk.top_logprobs)
        ]
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
