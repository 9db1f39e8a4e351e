"""`lmforge train --time` with no preset: the sizing rule (presets.for_time_budget) and how a run uses it."""

import json

import pytest
import torch

from conftest import quiet
from lmforge import hardware, presets
from lmforge.config import RunConfig, apply_overrides
from lmforge.errors import LMForgeError
from lmforge.info import model_info
from lmforge.train.trainer import train

CPU = torch.device("cpu")
SECONDS = [10, 30, 120, 600, 3600, 36000]
PEAKS = [1e10, 1.8e11, 1.6e12, 4e14, 1e15]


def size(config: dict) -> tuple:
    return config["model.n_layer"], config["model.seq_len"], config["train.batch_size"]


def test_the_rule_is_monotone_in_budget_and_speed():
    for peak in PEAKS:
        sizes = [size(presets.for_time_budget(s, peak, vocab_size=65)[0]) for s in SECONDS]
        assert sizes == sorted(sizes), (peak, sizes)  # more time never buys a smaller model, context or batch
    for seconds in SECONDS:
        sizes = [size(presets.for_time_budget(seconds, p, vocab_size=65)[0]) for p in PEAKS]
        assert sizes == sorted(sizes), (seconds, sizes)
    small, big = presets.for_time_budget(10, 1e10)[0], presets.for_time_budget(36000, 1e15, "cuda")[0]
    assert small["model.n_layer"] < big["model.n_layer"]  # the range is not one size


def test_the_rule_is_pure_and_its_config_valid():
    first = presets.for_time_budget(120, 1.6e12, "cpu", 65, memory_bytes=2**34, precision="bf16")
    assert first == presets.for_time_budget(120, 1.6e12, "cpu", 65, memory_bytes=2**34, precision="bf16")
    overrides, reasons = first
    config = apply_overrides(RunConfig(), {**overrides, "model.vocab_size": 65, "train.time": 120})
    assert config.model.n_embd % config.model.n_head == 0 and config.model.head_dim == presets.HEAD_SIZE
    assert any("TFLOP to spend" in line for line in reasons) and any("tokens" in line for line in reasons)
    # Muon where allowed, AdamW otherwise (FSDP)
    assert overrides["optim.name"] == "muon"
    assert presets.for_time_budget(120, 1.6e12, muon=False)[0]["optim.name"] == "adamw"
    with pytest.raises(LMForgeError, match="positive"):
        presets.for_time_budget(0, 1e12)


@pytest.mark.parametrize("memory", [2**28, 2**31])
def test_the_rule_stays_within_memory(memory):
    """A GPU-sized budget on a device with little memory: micro-batches (then fewer layers) that fit."""
    overrides, _ = presets.for_time_budget(3600, 1e15, "cuda", 50257, memory_bytes=memory, precision="bf16")
    unbounded, _ = presets.for_time_budget(3600, 1e15, "cuda", 50257, precision="bf16")
    config = apply_overrides(RunConfig(), {**overrides, "model.vocab_size": 50257, "train.time": 3600})
    micro = config.train.micro_batch_size or config.train.batch_size
    assert model_info(config.model, batch_size=micro, dtype="bf16").train_bytes <= presets.BUDGET_MEMORY_SHARE * memory
    assert micro < unbounded["train.batch_size"] or config.model.n_layer < unbounded["model.n_layer"]
    assert config.train.batch_size % micro == 0


def fake_speed(monkeypatch, tmp_path, fp32: float, bf16: float) -> None:
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    hardware.remember(hardware.Speed(hardware.device_key(CPU), fp32, bf16))


def test_train_with_only_time_sizes_from_the_cached_probe_and_resumes_with_it(tmp_path, char_data, monkeypatch):
    fake_speed(monkeypatch, tmp_path, 1e9, 1e8)  # a slow machine, fp32 faster: fp32 and a small model
    said = []
    run = tmp_path / "run"
    first = train(str(char_data), run, overrides={"train.time": "1s"}, progress_bar=False, echo=said.append)
    vocab_size = json.loads((run / "config.json").read_text())["model"]["vocab_size"]
    expected, reasons = presets.for_time_budget(1.0, 1e9, "cpu", vocab_size, hardware.memory_bytes(CPU), "fp32")
    saved = RunConfig.load(run / "config.json")
    assert saved.preset == presets.BUDGET and saved.train.time == 1.0
    for name, value in expected.items():
        section, field = name.split(".")
        assert getattr(getattr(saved, section), field) == value, name
    assert [f"time budget: {line}" for line in reasons] == [line for line in said if line.startswith("time budget")]
    assert any("; fp32 on cpu" in line for line in said)
    # a faster machine now: the resumed run keeps what it chose, and trains on for a longer budget
    fake_speed(monkeypatch, tmp_path, 1e13, 1e14)
    again = []
    resumed = train(None, run, overrides={"train.time": "2s"}, progress_bar=False, echo=again.append)
    assert RunConfig.load(run / "config.json").model == saved.model
    assert not any(line.startswith("time budget") for line in again)
    assert resumed["step"] > first["step"] and any("resuming at step" in line for line in again)


def test_flags_beside_time_win_and_a_width_alone_gets_heads_that_divide_it(tmp_path, char_data, monkeypatch):
    fake_speed(monkeypatch, tmp_path, 1e9, 1e8)
    said = []
    overrides = {"train.time": 0.5, "model.n_embd": 96, "optim.name": "adamw", "train.batch_size": 4}
    train(str(char_data), tmp_path / "run", overrides=overrides, progress_bar=False, echo=said.append)
    saved = RunConfig.load(tmp_path / "run" / "config.json")
    assert (saved.model.n_embd, saved.optim.name, saved.train.batch_size) == (96, "adamw", 4)
    assert saved.model.n_embd % saved.model.n_head == 0 and saved.model.n_head == 1  # 96 // 64 = 1
    assert any("kept: model.n_embd, optim.name, train.batch_size" in line for line in said)


def test_a_step_count_or_a_preset_is_not_sized_for_time(tmp_path, char_data, monkeypatch):
    fake_speed(monkeypatch, tmp_path, 1e9, 1e8)
    train(str(char_data), tmp_path / "steps", overrides={"train.max_steps": 2, "train.time": 60, "model.seq_len": 32},
          progress_bar=False, echo=quiet)  # fmt: skip
    assert RunConfig.load(tmp_path / "steps" / "config.json").preset == "demo"
    train(str(char_data), tmp_path / "tiny", preset="tiny", overrides={"train.time": 0.5}, progress_bar=False,
          echo=quiet)  # fmt: skip
    assert RunConfig.load(tmp_path / "tiny" / "config.json").preset == "tiny"


def test_precision_auto_is_resolved_once_and_a_resume_keeps_it(tmp_path, char_data, monkeypatch):
    """A probe taken later (on a loaded machine, or another one) must not change a run's precision midway: the new
    run saves what auto chose, and the resumed run trains in that, even when asked for auto again."""
    fake_speed(monkeypatch, tmp_path, 1e11, 7e11)  # bf16 measured faster
    run = tmp_path / "run"
    common = {"train.log_every": 1, "train.save_every": 2}
    train(str(char_data), run, preset="tiny", overrides={**common, "train.max_steps": 2}, progress_bar=False,
          echo=quiet)  # fmt: skip
    assert RunConfig.load(run / "config.json").train.precision == "bf16"
    fake_speed(monkeypatch, tmp_path, 1e11, 1e9)  # now a probe would say fp32
    said = []
    overrides = {"train.max_steps": 4, "train.precision": "auto"}
    train(None, run, overrides=overrides, progress_bar=False, echo=said.append)
    assert any("; bf16 on cpu; resuming at step 2" in line for line in said), said
    assert RunConfig.load(run / "config.json").train.precision == "bf16"
