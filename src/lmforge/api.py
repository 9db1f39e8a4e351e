"""The Python API: `LM.load(run_dir)` for a trained model; `prepare` and `train` mirror the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from lmforge.config import RunConfig
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import LMForgeError
from lmforge.generate import TextStream, generate_tokens
from lmforge.model.gpt import GPT
from lmforge.train import checkpoint


class LM:
    """A trained model with its tokenizer, ready to generate."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, config: RunConfig, run_dir: Path | None = None):
        self.model, self.tokenizer, self.config, self.run_dir = model, tokenizer, config, run_dir

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu", step: int | None = None) -> LM:
        """Load the newest complete checkpoint of run_dir (or the one of `step`)."""
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
        return cls(model, tokenizer, config, run_dir)

    @classmethod
    def untrained(cls, config: RunConfig, tokenizer: Tokenizer, seed: int = 0) -> LM:
        """A freshly initialised model, to show what training changes."""
        torch.manual_seed(seed)
        return cls(GPT(config.model).eval(), tokenizer, config)

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt) if prompt else []
        return ids or [self.tokenizer.eot_id]  # an empty prompt starts a new document

    def stream(
        self,
        prompt: str = "",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eot: bool = True,
    ) -> Iterator[str]:
        """Yield the continuation of prompt as text pieces, as they are generated."""
        text = TextStream(self.tokenizer)
        steps = generate_tokens(
            self.model, self.encode_prompt(prompt), max_new_tokens, temperature, top_k, top_p, seed, num_samples=1
        )
        for ids in steps:
            token = int(ids[0])
            if stop_at_eot and token == self.tokenizer.eot_id:
                break
            piece = text.push(token)
            if piece:
                yield piece
        rest = text.flush()
        if rest:
            yield rest

    def generate(
        self,
        prompt: str = "",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        num_samples: int = 1,
    ) -> list[str]:
        """num_samples continuations of prompt, decoded in one batch; each ends at end-of-text if reached."""
        columns = list(
            generate_tokens(
                self.model, self.encode_prompt(prompt), max_new_tokens, temperature, top_k, top_p, seed, num_samples
            )
        )
        rows = torch.stack(columns, dim=1).tolist()  # (num_samples, new tokens)
        texts = []
        for row in rows:
            if self.tokenizer.eot_id in row:
                row = row[: row.index(self.tokenizer.eot_id)]
            texts.append(self.tokenizer.decode(row))
        return texts


def prepare(sources: list[str], out: str | Path, **options) -> dict:
    """Same as `lmforge prepare`; returns the data dir's meta.json contents."""
    from lmforge.data.prepare import prepare as run

    return run(sources, out, **options)


def train(data: str | None = None, out: str | Path = "runs/run", **options) -> dict:
    """Same as `lmforge train`; returns a summary of the finished run."""
    from lmforge.train.trainer import train as run

    return run(data, out, **options)
