"""Shared fixtures: small corpora written by the tests, a prepared data dir and a trained tiny run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmforge.data.prepare import prepare
from lmforge.train.log import read_metrics
from lmforge.train.trainer import train

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "Ünïcödé line: café, naïve, 東京, emoji 🙂 and a tab\there.\n"
) * 40


@pytest.fixture(scope="session", autouse=True)
def hardware_cache(tmp_path_factory):
    """The hardware probe's cache (lmforge.hardware) in a folder of this session's, not the user's ~/.cache: the
    first run of the session probes, the rest (and their subprocesses) read its result."""
    before = os.environ.get("LMFORGE_CACHE")
    os.environ["LMFORGE_CACHE"] = str(tmp_path_factory.mktemp("hardware-cache"))
    yield Path(os.environ["LMFORGE_CACHE"])
    if before is None:
        del os.environ["LMFORGE_CACHE"]
    else:
        os.environ["LMFORGE_CACHE"] = before


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("data") / "char"
    prepare([str(corpus_file)], out, tokenizer="char", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, char_data) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(
        str(char_data), out, preset="tiny", overrides={"train.max_steps": 30}, progress_bar=False, echo=lambda *a: None
    )
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Decoding tiny models is a string of small ops: one thread is fastest, and fair to a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def losses(run_dir) -> dict[int, float]:
    """The training loss logged at each step of a run, from its metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def quiet(*args) -> None:
    pass


def endless_model(vocab_size: int, eot_id: int, seq_len: int = 512, n_layer: int = 4, n_embd: int = 128):
    """An untrained model whose replies never end by chance: its end-of-text logit is pinned at -n_embd (the final
    LayerNorm's output sums to its bias, 1 per channel, and the end-of-text row of the untied head is all -1)."""
    import torch

    from lmforge.model.gpt import GPT, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=n_layer, n_head=2, n_embd=n_embd,
                         tie_embeddings=False)  # fmt: skip
    model = GPT(config).eval()
    with torch.no_grad():
        model.norm.bias.fill_(1.0)
        model.lm_head.weight[eot_id] = -1.0
    return model
