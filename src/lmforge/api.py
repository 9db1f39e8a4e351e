"""The Python API: `LM.load(run_dir)` for a trained model; `prepare` and `train` mirror the CLI."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from lmforge.config import RunConfig
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import LMForgeError
from lmforge.generate import Chunk, Completion, SamplingParams
from lmforge.generate import generate as generate_batch
from lmforge.generate import stream as stream_chunks
from lmforge.model.gpt import GPT
from lmforge.train import checkpoint


class LM:
    """A trained model with its tokenizer (and chat template, if it has one), ready to generate."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        config: RunConfig,
        run_dir: Path | None = None,
        chat_template: str | None = None,
    ):
        self.model, self.tokenizer, self.config, self.run_dir = model, tokenizer, config, run_dir
        self.chat_template = chat_template

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu", step: int | None = None) -> LM:
        """Load the newest complete checkpoint of run_dir (or the one of `step`)."""
        from lmforge.chat import load_chat_template

        run_dir = Path(run_dir)
        if not (run_dir / "config.json").is_file():
            raise LMForgeError(f"{run_dir} is not a run dir (no config.json); train one with lmforge train")
        config = RunConfig.load(run_dir / "config.json")
        tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
        model = GPT(config.model)
        if step is not None:
            path = run_dir / checkpoint.CHECKPOINTS / checkpoint.step_name(step)
            if not (path / "state.json").is_file():
                raise LMForgeError(f"{run_dir} has no complete checkpoint for step {step}")
            try:
                checkpoint.load(path, model)
            except Exception as exc:
                raise LMForgeError(f"checkpoint {path} is damaged ({exc}); load another step") from exc
        elif checkpoint.load_latest(run_dir, model) is None:
            raise LMForgeError(f"{run_dir} has no usable checkpoint; train it first with lmforge train")
        model.to(device).eval()
        return cls(model, tokenizer, config, run_dir, load_chat_template(run_dir))

    @classmethod
    def untrained(cls, config: RunConfig, tokenizer: Tokenizer, seed: int = 0) -> LM:
        """A freshly initialised model, to show what training changes."""
        torch.manual_seed(seed)
        return cls(GPT(config.model).eval(), tokenizer, config)

    @property
    def context(self) -> int:
        return self.model.config.seq_len

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode_prompt(prompt) or [self.tokenizer.document_start]  # empty: a new document

    def warn_context_full(self, completions: list[Completion], max_new_tokens: int) -> None:
        """Warn when a completion stopped short of max_new_tokens because prompt and output filled the context."""
        short = [c for c in completions if c.finish_reason == "length" and c.completion_tokens < max_new_tokens]
        if short:
            warnings.warn(
                f"stopped after {short[0].completion_tokens} new tokens: prompt and output fill the model's context "
                f"of {self.context} tokens; pass overflow='slide' (--overflow slide) to go on with a sliding window",
                stacklevel=3,
            )

    def complete(
        self,
        prompt: str | list[str] = "",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        num_samples: int = 1,
        **options,
    ) -> list[Completion]:
        """Completions (text, token ids, finish_reason, token counts, log-probs) of one prompt or a batch.

        options are the other fields of SamplingParams (top_k, top_p, min_p, penalties, seed, stop, logprobs,
        num_beams, length_penalty, truncate, overflow). Prompts of different lengths decode in one batch; with
        num_samples > 1 each prompt is continued num_samples times, sample i seeded with seed + i.
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise LMForgeError(f"num_samples must be at least 1, not {num_samples}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seed = options.pop("seed", None)
        params = []
        for _ in prompts:
            for i in range(num_samples):
                params.append(
                    SamplingParams(
                        max_new_tokens=max_new_tokens,
                        temperature=temperature,
                        seed=None if seed is None else seed + i,
                        **options,
                    )
                )
        ids = [self.encode_prompt(p) for p in prompts for _ in range(num_samples)]
        return generate_batch(self.model, self.tokenizer, ids, params)

    def generate(
        self,
        prompt: str | list[str] = "",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        num_samples: int = 1,
        **options,
    ) -> list[str]:
        """num_samples continuations of each prompt, decoded in one batch; each ends at end-of-text if reached.

        Warns when a continuation stopped short because the context was full.
        """
        completions = self.complete(
            prompt, max_new_tokens, temperature, num_samples, top_k=top_k, top_p=top_p, seed=seed, **options
        )
        self.warn_context_full(completions, max_new_tokens)
        return [c.text for c in completions]

    def stream_chunks(self, prompt: str = "", **options) -> Iterator[Chunk]:
        """Chunks (text, token ids, log-probs, and finish_reason on the last) of one prompt's continuation."""
        return stream_chunks(self.model, self.tokenizer, self.encode_prompt(prompt), SamplingParams(**options))

    def stream(
        self,
        prompt: str = "",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eot: bool = True,
        **options,
    ) -> Iterator[str]:
        """Yield the continuation of prompt as text pieces, as they are generated."""
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_token_ids=None if stop_at_eot else (),
            **options,
        )
        generated = 0
        for chunk in stream_chunks(self.model, self.tokenizer, self.encode_prompt(prompt), params):
            generated += len(chunk.token_ids)  # a "length" finish has no stop token to count
            if chunk.text:
                yield chunk.text
            if chunk.finish_reason is not None:
                self.warn_context_full([Completion("", [], chunk.finish_reason, 0, generated)], max_new_tokens)


def prepare(sources: list[str], out: str | Path, **options) -> dict:
    """Same as `lmforge prepare`; returns the data dir's meta.json contents."""
    from lmforge.data.prepare import prepare as run

    return run(sources, out, **options)


def train(data: str | None = None, out: str | Path = "runs/run", **options) -> dict:
    """Same as `lmforge train`; returns a summary of the finished run."""
    from lmforge.train.trainer import train as run

    return run(data, out, **options)
