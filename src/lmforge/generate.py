"""Text generation outside the model: a sampler, a batched KV-cached decoder, beam search and streaming.

Top to bottom:
- `SamplingParams`: every setting of one request, validated once, with messages that say what to do.
- `sample()`: logits -> token ids. Pure but for its random generators; parameters may differ per row, so one
  call serves a batch of requests that asked for different things.
- `Sequence`: one prompt being continued: its tokens, random generator, text, stop conditions and log-probs.
- `Engine`: continuous batching. Sequences join and leave between steps and every step decodes one token for
  all of them in one forward pass. The Python API, the CLI, the chat and the server all drive this one class.
- `generate()`, `stream()`, `beam_search()`: the entry points; `score()` and `continuation_logprobs()`: the
  log-probabilities of given tokens, with no generation.

Scoring is a prefill: with `echo=True` the engine keeps the log-probability of every prompt token (and its top
alternatives) from the same forward pass that predicts the first new token, and `max_new_tokens=0` stops there
(without reading the last token, which is only predicted: a text one token longer than the context is scored).
The server's `echo`, `lmforge eval --task` on multiple-choice records and the lm-evaluation-harness adapter all
score through it, so a prompt's log-probs are the same numbers whichever of them asks.

The context: a prompt must leave room for at least one new token, else it is an error (or, with
`truncate="left"`, its oldest tokens are dropped). Generation stops with finish_reason "length" when prompt and
output fill the context. Going on with a sliding window (keep the newest half of the context, re-encode it and
continue) happens only when asked for with `overflow="slide"`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmforge.errors import LMForgeError
from lmforge.model.kv_cache import KVCache

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
SCORE_BLOCK = 256  # prompt positions scored at once: a (block, vocab) table of logits, never (prompt, vocab)
Alternatives = list[tuple[int, float]]  # the most likely tokens at one position: (id, log-prob), best first


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    """What to generate for one prompt. The defaults sample at temperature 1 until end of text or 200 tokens."""

    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 is greedy
    top_k: int | None = None  # keep only the k most likely tokens (None or 0: no limit)
    top_p: float | None = None  # keep the most likely tokens whose probabilities sum to top_p (None or 1: all)
    min_p: float | None = None  # drop tokens less likely than min_p times the most likely one (None or 0: none)
    repetition_penalty: float = 1.0  # divide positive logits (multiply negative ones) of tokens already seen
    frequency_penalty: float = 0.0  # subtract this times the count of each token already generated
    presence_penalty: float = 0.0  # subtract this once from each token already generated
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end the output; the output stops before the first one
    stop_token_ids: tuple[int, ...] | None = None  # ids that end the output; None: the tokenizer's end of text
    logprobs: int | None = None  # None: none; 0: the chosen token's log-probability; k: also the k most likely
    # also score the prompt's tokens (Completion.prompt_logprobs; max_new_tokens may then be 0), and keep a stop token
    # that ends the output in token_ids and logprobs, as OpenAI's echo shows every token
    echo: bool = False
    num_beams: int = 1  # more than 1: beam search, which is deterministic (sampling settings do not apply)
    length_penalty: float = 1.0  # beam score = sum of log-probs / (generated length ** length_penalty)
    truncate: str | None = None  # "left": drop the oldest prompt tokens that do not fit the context
    overflow: str = "stop"  # the context is full: "stop" (finish_reason "length") or "slide" (sliding window)

    def __post_init__(self) -> None:
        self.top_k = 0 if self.top_k is None else self.top_k
        self.top_p = 1.0 if self.top_p is None else self.top_p
        self.min_p = 0.0 if self.min_p is None else self.min_p
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if self.stop_token_ids is not None:
            self.stop_token_ids = tuple(self.stop_token_ids)
        checks = [
            (
                _is_int(self.max_new_tokens) and self.max_new_tokens >= (0 if self.echo else 1),
                f"max_new_tokens must be a positive integer (or 0 with echo, to score the prompt only), "
                f"not {self.max_new_tokens!r}",
            ),
            (
                _is_number(self.temperature) and self.temperature >= 0,
                f"temperature must be 0 (greedy) or positive, not {self.temperature!r}",
            ),
            (_is_int(self.top_k) and self.top_k >= 0, f"top_k must be a positive integer, not {self.top_k!r}"),
            (_is_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], not {self.top_p!r}"),
            (_is_number(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], not {self.min_p!r}"),
            (
                _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
                f"repetition_penalty must be positive (1 is none), not {self.repetition_penalty!r}",
            ),
            (
                _is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                f"frequency_penalty must be in [-2, 2], not {self.frequency_penalty!r}",
            ),
            (
                _is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
                f"presence_penalty must be in [-2, 2], not {self.presence_penalty!r}",
            ),
            (
                self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
                f"seed must be a non-negative integer, not {self.seed!r}",
            ),
            (
                len(self.stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) and s for s in self.stop),
                f"stop must be at most {MAX_STOP_STRINGS} non-empty strings, not {self.stop!r}",
            ),
            (
                self.stop_token_ids is None or all(_is_int(i) and i >= 0 for i in self.stop_token_ids),
                f"stop_token_ids must be token ids, not {self.stop_token_ids!r}",
            ),
            (
                self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
                f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, not {self.logprobs!r}",
            ),
            (_is_int(self.num_beams) and self.num_beams >= 1, f"num_beams must be at least 1, not {self.num_beams!r}"),
            (_is_number(self.length_penalty), f"length_penalty must be a number, not {self.length_penalty!r}"),
            (self.truncate in (None, "left"), f"truncate must be None or 'left', not {self.truncate!r}"),
            (self.overflow in ("stop", "slide"), f"overflow must be 'stop' or 'slide', not {self.overflow!r}"),
            (
                self.num_beams == 1 or self.overflow == "stop",
                "beam search stays within the context; use overflow='stop' with num_beams > 1",
            ),
            (self.num_beams == 1 or not self.echo, "echo scores the prompt with num_beams=1; beam search does not"),
        ]
        for ok, message in checks:
            if not ok:
                raise LMForgeError(message)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


@dataclass
class Chunk:
    """What one step added to a sequence's output: text (possibly empty while held back) and the new tokens."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None


@dataclass
class Completion:
    """A finished sequence. completion_tokens counts every generated token, the stop token included.

    With echo, prompt_ids are the prompt's tokens as the model saw them (after any truncation), prompt_logprobs
    their log-probabilities (None for the first, which nothing predicts) and prompt_top_logprobs the `logprobs`
    most likely tokens at each position (empty for the first)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_ids: list[int] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None


# ---------------------------------------------------------------------------------------------------- sampling


def _per_row(value, batch: int, neutral, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.full((batch,), neutral if value is None else value, dtype=dtype, device=device)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the logits (B, vocab) outside each row's top-k, then outside its top-p nucleus, then those
    below min_p times its best probability. top_k 0, top_p 1 and min_p 0 turn a filter off for a row."""
    vocab = logits.size(-1)
    use_k, use_p = bool((top_k > 0).any()), bool((top_p < 1).any())
    if use_k or use_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)
        drop = rank[None, :] >= torch.where(top_k > 0, top_k, vocab)[:, None]
        if use_p:
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            # Drop a token when the more likely ones already reach top_p; the most likely token always stays.
            drop |= (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (top_p[:, None] < 1)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def uniforms(generator: torch.Generator | list[torch.Generator] | None, batch: int) -> torch.Tensor:
    """One uniform number in [0, 1) per row: from one generator, or from each row's own (so that a seeded request
    draws the same numbers whatever else shares its batch)."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else "cpu"
        return torch.rand(batch, generator=generator, device=device)
    return torch.stack([torch.rand((), generator=g, device=g.device) for g in generator])


def sample(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    min_p: float | torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """logits (B, vocab) -> token ids (B,). Temperature 0 is greedy; then top-k, top-p and min-p filtering.

    Each setting is one number for all rows or a (B,) tensor of per-row values. A row is drawn by inverting the
    cumulative distribution at one uniform number from its generator.
    """
    batch, vocab = logits.shape
    device = logits.device
    temperature = _per_row(temperature, batch, 1.0, torch.float32, device)
    greedy = temperature == 0
    best = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return best
    scaled = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]
    scaled = filter_logits(
        scaled,
        _per_row(top_k, batch, 0, torch.long, device),
        _per_row(top_p, batch, 1.0, torch.float32, device),
        _per_row(min_p, batch, 0.0, torch.float32, device),
    )
    probs = scaled.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    u = uniforms(generator, batch).to(device=device, dtype=cdf.dtype)
    ids = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous(), right=True).squeeze(-1).clamp_(max=vocab - 1)
    # Rounding can land u * total past the last kept token; the most likely token is then the safe answer.
    ids = torch.where(probs.gather(-1, ids[:, None]).squeeze(-1) > 0, ids, probs.argmax(dim=-1))
    return torch.where(greedy, best, ids)


# --------------------------------------------------------------------------------------------------- scoring


def pick_logprobs(logprobs: torch.Tensor, ids: list[int], top: int) -> tuple[list[float], list[Alternatives]]:
    """Rows of log-probabilities (N, vocab) -> each row's log-prob of its id in ids, and its `top` most likely
    (id, log-prob) pairs, best first."""
    picked = logprobs.gather(-1, torch.tensor(ids, device=logprobs.device)[:, None]).squeeze(-1).tolist()
    if not top:
        return picked, [[] for _ in ids]
    values, indices = logprobs.topk(top, dim=-1)
    return picked, [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]


def prompt_logprobs(logits_of, prompt: list[int], top: int) -> tuple[list[float | None], list[Alternatives]]:
    """Each prompt token's log-probability after the tokens before it (None for the first, which nothing predicts),
    and the `top` most likely tokens at each position. logits_of(a, b) gives the logits (b - a, vocab) that
    positions a..b-1 predict the next token with."""
    chosen: list[float | None] = [None]
    tops: list[Alternatives] = [[]]
    for a in range(0, len(prompt) - 1, SCORE_BLOCK):
        b = min(a + SCORE_BLOCK, len(prompt) - 1)
        picked, best = pick_logprobs(logits_of(a, b).float().log_softmax(dim=-1), prompt[a + 1 : b + 1], top)
        chosen += picked
        tops += best
    return chosen, tops


# ------------------------------------------------------------------------------------------------- sequences


def check_prompt(prompt: list[int], params: SamplingParams, context: int, vocab_size: int) -> list[int]:
    """The prompt to use, or an LMForgeError: empty, unknown ids, or too long for the context."""
    prompt = list(prompt)
    if not prompt:
        raise LMForgeError("the prompt is empty; give at least one token of text")
    bad = [i for i in prompt if not (_is_int(i) and 0 <= i < vocab_size)]
    if bad:
        raise LMForgeError(f"the prompt has token ids outside the vocabulary of {vocab_size}: {bad[:5]}")
    if params.max_new_tokens == 0:  # scoring only: the last token is predicted, never read, so one more fits
        prompt = prompt[-(context + 1) :] if params.truncate == "left" else prompt
        if len(prompt) > context + 1:
            raise LMForgeError(
                f"the text to score has {len(prompt)} tokens; a model with a context of {context} scores at most "
                f"{context + 1} (the last is only predicted); shorten it or truncate it (--truncate left)"
            )
        return prompt
    if params.truncate == "left":
        # Leave room for max_new_tokens, but keep at least half the context of prompt.
        keep = max(1, min(context - 1, max(context - params.max_new_tokens, context // 2)))
        prompt = prompt[-keep:]
    if len(prompt) >= context:
        raise LMForgeError(
            f"the prompt has {len(prompt)} tokens and the model's context is {context}, which must also hold the "
            f"output; shorten the prompt to at most {context - 1} tokens or truncate it (--truncate left)"
        )
    return prompt


class TextStream:
    """Turns token ids into text increments as they arrive.

    Holds back text that may still change: an incomplete UTF-8 character (a byte-level token that ends
    mid-character decodes to U+FFFD) and a tail that could be the start of a stop string. Decodes only a short
    window of recent tokens per push, so a long output costs linear time.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already in self.text
        self.read = 0
        self.text = ""  # text of ids[:read]; cut before the stop string once one is found
        self.emitted = 0  # characters of self.text handed out
        self.stopped = False

    def _decode_new(self) -> None:
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)

    def push(self, token_id: int) -> str:
        if self.stopped or self.tokenizer is None:
            return ""
        self.ids.append(token_id)
        self._decode_new()
        return self._release(final=False)

    def flush(self) -> str:
        """The held-back text, at the end of generation (an unfinished character stays as U+FFFD)."""
        if self.stopped or self.tokenizer is None:
            return ""
        after = self.tokenizer.decode(self.ids[self.prefix :])
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        self.text += after[len(before) :]
        self.prefix = self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            out, self.text, self.emitted, self.stopped = self.text[self.emitted : end], self.text[:end], end, True
            return out
        end = len(self.text)
        if not final:
            end -= max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if self.text.endswith(s[:n])), default=0)
        out, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return out

    @property
    def output(self) -> str:
        return self.text[: self.emitted]


class Sequence:
    """One prompt being continued: its tokens, random generator, text, stop conditions and log-probs."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer, context: int, vocab_size: int, tag=None):
        self.params = params
        self.prompt = check_prompt(prompt, params, context, vocab_size)
        self.context = context
        self.tag = tag  # the caller's own label (the server's request and choice index)
        self.tokens = list(self.prompt)  # prompt + output, including the stop token if one came
        if params.max_new_tokens == 0:  # scoring only: the model reads every token but the last, which it predicts
            self.tokens = self.tokens[: max(1, len(self.tokens) - 1)]
        self.window_start = 0  # where the context window starts in tokens (moves only with overflow="slide")
        self.cached = 0  # tokens of the window whose keys and values are in the cache
        self.slot: int | None = None
        self.output: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.generated = 0
        self.finish_reason: str | None = None
        self.text = TextStream(tokenizer, params.stop)
        if params.stop_token_ids is not None:
            self.stop_ids = frozenset(params.stop_token_ids)
        else:
            self.stop_ids = frozenset([tokenizer.eot_id]) if tokenizer is not None else frozenset()
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)
        self.counts: torch.Tensor | None = None  # per-token counts of the output, for the penalties
        self.pending = 0  # output tokens not yet reported in a chunk
        # with echo: set by the engine's first forward pass over the prompt
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def window(self) -> list[int]:
        return self.tokens[self.window_start :]

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the repetition (prompt and output), frequency and presence (output) penalties to logits (vocab,)."""
        p = self.params
        if self.counts is None:
            self.counts = torch.zeros(logits.size(-1), device=logits.device)
            self.in_prompt = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)
            self.in_prompt[torch.tensor(self.prompt, device=logits.device)] = True
            for token in self.output:
                self.counts[token] += 1
        seen = self.counts > 0
        if p.repetition_penalty != 1:
            penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(seen | self.in_prompt, penalized, logits)
        return logits - p.frequency_penalty * self.counts - p.presence_penalty * seen.float()

    def append(self, token: int, logprob: float | None = None, top: list[tuple[int, float]] | None = None):
        """Add one generated token; return the chunk to report (None while text is held back)."""
        self.generated += 1
        self.tokens.append(token)
        if self.counts is not None:
            self.counts[token] += 1
        stopped = token in self.stop_ids
        if stopped and not self.params.echo:
            return self._finish("stop")
        # echo shows every token the model produced, the one that ended the output too (its text stays out)
        self.output.append(token)
        if self.params.logprobs is not None:
            self.logprobs.append(logprob)
            self.top_logprobs.append(top or [])
        self.pending += 1
        if stopped:
            return self._finish("stop")
        text = self.text.push(token)
        if self.text.stopped:
            return self._finish("stop", text)
        if self.generated >= self.params.max_new_tokens:
            return self._finish("length", text)
        if self.params.overflow == "stop" and len(self.tokens) >= self.context:
            return self._finish("length", text)
        return self._chunk(text) if text else None

    def finish_scored(self) -> Chunk:
        """End a sequence that only scores its prompt (echo with max_new_tokens 0), before any token is generated."""
        return self._finish("length")

    def _finish(self, reason: str, text: str = "") -> Chunk:
        self.finish_reason = reason
        return self._chunk(text + self.text.flush())

    def _chunk(self, text: str) -> Chunk:
        n, self.pending = self.pending, 0
        start = len(self.output) - n
        want = self.params.logprobs is not None
        return Chunk(
            text,
            self.output[start:],
            self.logprobs[start:] if want else None,
            self.top_logprobs[start:] if want else None,
            self.finish_reason,
        )

    def completion(self) -> Completion:
        want = self.params.logprobs is not None
        return Completion(
            self.text.output,
            list(self.output),
            self.finish_reason or "cancelled",
            len(self.prompt),
            self.generated,
            list(self.logprobs) if want else None,
            list(self.top_logprobs) if want else None,
            list(self.prompt) if self.params.echo else None,
            self.prompt_logprobs,
            self.prompt_top_logprobs,
        )


# ---------------------------------------------------------------------------------------------------- engine


class Engine:
    """Continuous batching over one preallocated KV cache.

    The cache has a row of the model's full context for each of max_batch slots. A sequence holds a slot from
    `add` until it finishes or is cancelled; `step` decodes one token for every sequence holding one: new
    sequences' prompts in one padded forward pass, the others' last tokens in another. With use_cache=False
    every step recomputes each window with GPT.forward instead: the reference the cached path is tested against.
    """

    def __init__(self, model, tokenizer=None, max_batch: int = 8, use_cache: bool = True):
        if max_batch < 1:
            raise LMForgeError(f"max_batch must be at least 1, not {max_batch}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.use_cache = max_batch, use_cache
        self.context = model.config.seq_len
        self.device = next(model.parameters()).device
        self.slots: list[Sequence | None] = [None] * max_batch
        self.cache: KVCache | None = None
        self.steps = 0
        self.tokens_generated = 0

    def sequence(self, prompt: list[int], params: SamplingParams, tag=None) -> Sequence:
        """A validated sequence for this model, not yet decoding (see add)."""
        if params.num_beams > 1:
            raise LMForgeError("beam search runs on its own (beam_search), not in a shared batch")
        return Sequence(prompt, params, self.tokenizer, self.context, self.model.config.vocab_size, tag)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def free(self) -> int:
        return self.max_batch - self.active

    def add(self, seq: Sequence) -> None:
        slot = self.slots.index(None) if None in self.slots else None
        if slot is None:
            raise LMForgeError(f"the engine is full ({self.max_batch} sequences); wait for one to finish")
        seq.slot, seq.cached = slot, 0
        self.slots[slot] = seq

    def cancel(self, seq: Sequence) -> None:
        """Stop seq and free its slot (a client went away, or its time ran out)."""
        if seq.slot is not None and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
        seq.slot = None
        if seq.finish_reason is None:
            seq.finish_reason = "cancelled"

    def _slide(self, seq: Sequence) -> None:
        if len(seq.window) > self.context:  # the next forward would not fit: keep the newest half, re-encode
            seq.window_start = len(seq.tokens) - max(1, self.context // 2)
            seq.cached = 0

    def _cached_logits(self, rows: list[Sequence]) -> torch.Tensor:
        model, device = self.model, self.device
        if self.cache is None:
            self.cache = KVCache.for_model(model, self.max_batch)
        prefill = [i for i, s in enumerate(rows) if len(s.window) - s.cached > 1]
        decode = [i for i, s in enumerate(rows) if len(s.window) - s.cached == 1]
        parts = []
        for group in (prefill, decode):
            if not group:
                continue
            seqs = [rows[i] for i in group]
            new = [s.window[s.cached :] for s in seqs]
            width = max(len(n) for n in new)
            ids = torch.tensor([n + [0] * (width - len(n)) for n in new], device=device)  # right-padded
            starts, slots = [s.cached for s in seqs], [s.slot for s in seqs]
            hidden, _ = model(ids, cache=self.cache, pos=starts, slots=slots, return_hidden=True)
            for row, seq in enumerate(seqs):
                if seq.params.echo and seq.prompt_logprobs is None:  # its first pass: new is the whole prompt
                    self._score_prompt(seq, lambda a, b, h=hidden[row]: model.lm_head(h[a:b]))
            if width > 1:  # each row's last real token
                hidden = hidden[torch.arange(len(seqs), device=device), torch.tensor([len(n) - 1 for n in new])]
            else:
                hidden = hidden[:, 0]
            parts.append(model.lm_head(hidden))  # (rows of the group, vocab)
        if len(parts) == 1:
            return parts[0]
        logits = torch.cat(parts)
        order = torch.tensor(prefill + decode, device=device).argsort()
        return logits[order]

    def _uncached_logits(self, rows: list[Sequence]) -> torch.Tensor:
        last = []
        for seq in rows:
            logits = self.model(torch.tensor([seq.window], device=self.device))[0][0]  # (window, vocab)
            if seq.params.echo and seq.prompt_logprobs is None:
                self._score_prompt(seq, lambda a, b, logits=logits: logits[a:b])
            last.append(logits[-1:])
        return torch.cat(last)

    @staticmethod
    def _score_prompt(seq: Sequence, logits_of) -> None:
        seq.prompt_logprobs, seq.prompt_top_logprobs = prompt_logprobs(logits_of, seq.prompt, seq.params.logprobs or 0)

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> list[int]:
        return sample(
            logits,
            torch.tensor([s.params.temperature for s in rows]),
            torch.tensor([s.params.top_k for s in rows]),
            torch.tensor([s.params.top_p for s in rows]),
            torch.tensor([s.params.min_p for s in rows]),
            [s.generator for s in rows],
        ).tolist()

    def _choose(self, rows: list[Sequence], logits: torch.Tensor):
        logits = logits.float()
        want = [s.params.logprobs for s in rows]
        logprobs = logits.log_softmax(dim=-1) if any(w is not None for w in want) else None
        if any(s.params.penalized for s in rows):
            logits = torch.stack([s.penalize(row) if s.params.penalized else row for s, row in zip(rows, logits)])
        if all(s.params.temperature == 0 for s in rows):
            ids = logits.argmax(dim=-1).tolist()
        else:
            ids = self._sample(rows, logits)
        chosen: list[float | None] = [None] * len(rows)
        tops: list[list[tuple[int, float]] | None] = [None] * len(rows)
        if logprobs is not None:
            picked, best = pick_logprobs(logprobs, ids, max(w or 0 for w in want))
            for i, w in enumerate(want):
                if w is not None:
                    chosen[i], tops[i] = picked[i], best[i][:w]
        return ids, chosen, tops

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, Chunk]]:
        """Decode one token for every active sequence; return the chunks to report. Finished ones leave."""
        rows = [s for s in self.slots if s is not None]
        if not rows:
            return []
        was_training = self.model.training  # checked first: switching modes walks every module, every step
        if was_training:
            self.model.eval()
        try:
            for seq in rows:
                if seq.params.overflow == "slide":
                    self._slide(seq)
            logits = self._cached_logits(rows) if self.use_cache else self._uncached_logits(rows)
            ids, chosen, tops = self._choose(rows, logits)
        finally:
            if was_training:
                self.model.train()
        self.steps += 1
        events = []
        for seq, token, logprob, top in zip(rows, ids, chosen, tops):
            seq.cached = len(seq.window)
            if seq.params.max_new_tokens == 0:  # echo only: the prompt is scored, nothing is generated
                chunk = seq.finish_scored()
            else:
                self.tokens_generated += 1
                chunk = seq.append(token, logprob, top)
            if seq.finish_reason is not None:
                self.slots[seq.slot] = None
                seq.slot = None
            if chunk is not None:
                events.append((seq, chunk))
        return events


# ----------------------------------------------------------------------------------------------- entry points


def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams] | None = None,
    max_batch: int = 32,
    use_cache: bool = True,
) -> list[Completion]:
    """Complete token-id prompts of any lengths, up to max_batch at a time in one batch; one Completion each."""
    params = params or SamplingParams()
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    if len(params_list) != len(prompts):
        raise LMForgeError(f"got {len(params_list)} sampling settings for {len(prompts)} prompts")
    results: list[Completion | None] = [None] * len(prompts)
    engine = Engine(model, tokenizer, max(1, min(max_batch, len(prompts))), use_cache)
    waiting: deque[Sequence] = deque()
    for i, (prompt, p) in enumerate(zip(prompts, params_list)):
        if p.num_beams > 1:
            results[i] = beam_search(model, tokenizer, prompt, p)
        else:
            waiting.append(engine.sequence(prompt, p, tag=i))  # every prompt is checked before any work
    sequences = list(waiting)
    while waiting or engine.active:
        while waiting and engine.free:
            engine.add(waiting.popleft())
        engine.step()
    for seq in sequences:
        results[seq.tag] = seq.completion()
    return results  # type: ignore[return-value]


def stream(
    model, tokenizer, prompt: list[int], params: SamplingParams | None = None, use_cache: bool = True
) -> Iterator[Chunk]:
    """Yield Chunks of one prompt's continuation as they are decoded; the last has finish_reason set."""
    params = params or SamplingParams()
    if params.num_beams > 1:
        raise LMForgeError("beam search cannot stream: it picks the best sequence at the end; use num_beams=1")
    engine = Engine(model, tokenizer, 1, use_cache)
    seq = engine.sequence(prompt, params)
    engine.add(seq)
    while seq.finish_reason is None:
        for _, chunk in engine.step():
            yield chunk


def score(model, tokenizer, sequences: list[list[int]], top: int = 0, max_batch: int = 32) -> list[Completion]:
    """Token-id sequences scored with nothing generated: each Completion's prompt_logprobs holds every token's
    log-probability after those before it (None for the first), prompt_top_logprobs the `top` most likely tokens
    at each position. A sequence may be one token longer than the model's context: the last is only predicted."""
    return generate(model, tokenizer, sequences, SamplingParams(max_new_tokens=0, echo=True, logprobs=top), max_batch)


def continuation_logprobs(
    model, tokenizer, pairs: list[tuple[list[int], list[int]]], max_batch: int = 32
) -> list[tuple[float, bool]]:
    """For each (context, continuation) pair of token-id lists: the continuation's total log-probability after the
    context, and whether greedy decoding would have produced it, as lm-evaluation-harness defines loglikelihood.

    Context and continuation together are cut from the left to one token more than the model's context (the last
    is only predicted), as the harness cuts them: the oldest context tokens go.
    """
    context = model.config.seq_len
    sequences, starts = [], []
    for before, after in pairs:
        if not before or not after:
            raise LMForgeError("scoring needs a context of at least one token and a continuation of at least one")
        if len(after) > context:
            raise LMForgeError(
                f"a continuation of {len(after)} tokens leaves no room for its context in the model's {context}"
            )
        whole = (before + after)[-(context + 1) :]
        sequences.append(whole)
        starts.append(len(whole) - len(after))
    results = []
    for scored, start in zip(score(model, tokenizer, sequences, top=1, max_batch=max_batch), starts):
        best = [top[0][0] for top in scored.prompt_top_logprobs[start:]]
        results.append((float(sum(scored.prompt_logprobs[start:])), best == scored.prompt_ids[start:]))
    return results


@torch.inference_mode()
def beam_search(model, tokenizer, prompt: list[int], params: SamplingParams) -> Completion:
    """The most likely continuation found by beam search with params.num_beams beams.

    Each step extends every beam by every token and keeps the num_beams best partial sequences by total
    log-probability; a beam that emits a stop token is set aside as finished. Finished and, at the end, unfinished
    beams are ranked by sum of log-probs / (generated length ** length_penalty). The search ends at max_new_tokens,
    at the context, or when no live beam can beat the worst of num_beams finished ones. Stop strings cut the text.
    """
    context = model.config.seq_len
    prompt = check_prompt(prompt, params, context, model.config.vocab_size)
    if params.stop_token_ids is not None:
        stop_ids = frozenset(params.stop_token_ids)
    else:
        stop_ids = frozenset([tokenizer.eot_id]) if tokenizer is not None else frozenset()
    width, alpha = params.num_beams, params.length_penalty
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def norm(score: float, length: int) -> float:
        return score / max(1, length) ** alpha

    try:
        cache = KVCache.for_model(model, 1)
        logits, _ = model(torch.tensor([prompt], device=device), cache=cache)
        logp = logits[:, -1].float().log_softmax(dim=-1)  # (beams, vocab)
        vocab = logp.size(-1)
        scores = torch.zeros(1, device=device)
        beams: list[list[int]] = [[]]
        beam_lps: list[list[float]] = [[]]
        finished: list[tuple[float, list[int], list[float], str]] = []
        budget = min(params.max_new_tokens, context - len(prompt))
        for step in range(budget):
            total = (scores[:, None] + logp).view(-1)
            top_scores, flat = total.topk(min(2 * width, total.numel()))
            next_beams, next_lps, next_scores, parents, tokens = [], [], [], [], []
            for rank, (score, index) in enumerate(zip(top_scores.tolist(), flat.tolist())):
                parent, token = divmod(index, vocab)
                lps = beam_lps[parent] + [float(logp[parent, token])]
                if token in stop_ids:
                    if rank < width:  # a stop token outside the best num_beams candidates is not a result
                        finished.append((norm(score, len(beams[parent])), beams[parent], lps[:-1], "stop"))
                    continue
                next_beams.append(beams[parent] + [token])
                next_lps.append(lps)
                next_scores.append(score)
                parents.append(parent)
                tokens.append(token)
                if len(next_beams) == width:
                    break
            beams, beam_lps = next_beams, next_lps
            scores = torch.tensor(next_scores, device=device)
            if not beams:
                break
            if len(finished) >= width:
                worst = sorted((f[0] for f in finished), reverse=True)[width - 1]
                if norm(next_scores[0], step + 1) <= worst:
                    beams = []
                    break
            if step == budget - 1:
                break
            cache.reorder(torch.tensor(parents, device=device))
            logits, _ = model(torch.tensor(tokens, device=device)[:, None], cache=cache, pos=len(prompt) + step)
            logp = logits[:, -1].float().log_softmax(dim=-1)
        for score, seq, lps in zip(scores.tolist(), beams, beam_lps):
            finished.append((norm(score, len(seq)), seq, lps, "length"))
    finally:
        model.train(was_training)
    _, output, lps, reason = max(finished, key=lambda f: f[0])
    text = TextStream(tokenizer, params.stop)
    for token in output:
        text.push(token)
        if text.stopped:
            reason = "stop"
            break
    text.flush()
    want = params.logprobs is not None
    ended_by_token = reason == "stop" and not text.stopped  # the stop token was generated too
    return Completion(
        text.output,
        output,
        reason,
        len(prompt),
        len(output) + int(ended_by_token),
        lps if want else None,
        [[] for _ in output] if want else None,
    )
