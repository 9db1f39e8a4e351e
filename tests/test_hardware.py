"""The hardware probe: measured once per machine and cached; precision auto and MFU follow what it measured."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import quiet
from lmforge import hardware
from lmforge.model.config import ModelConfig
from lmforge.model.gpt import GPT
from lmforge.train.log import read_metrics
from lmforge.train.trainer import train

CPU = torch.device("cpu")


def fake_probe(monkeypatch, tmp_path, fp32: float, bf16: float) -> None:
    """A cache that says this machine multiplies at these rates, as a probe on another CPU would have found."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    hardware.remember(hardware.Speed(hardware.device_key(CPU), fp32, bf16))


@pytest.mark.parametrize(
    "fp32, bf16, want",
    [(1e11, 7e11, "bf16"), (1.2e11, 1.3e9, "fp32"), (1e11, 1.1e11, "fp32")],
    ids=["amx-like", "avx2-like", "barely-faster"],
)
def test_precision_auto_follows_the_probe(tmp_path, monkeypatch, char_data, fp32, bf16, want):
    fake_probe(monkeypatch, tmp_path, fp32, bf16)
    assert hardware.auto_precision(CPU) == want
    said = []
    overrides = {"train.max_steps": 2, "train.log_every": 1}  # the thread count the probe was cached for
    train(str(char_data), tmp_path / "run", preset="tiny", overrides=overrides, progress_bar=False, echo=said.append)
    assert any(f"; {want} on cpu" in line for line in said), said
    # MFU is against the peak of the precision in use
    config = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    flops = GPT(ModelConfig(**config)).flops_per_token()
    peak = bf16 if want == "bf16" else fp32
    for record in (r for r in read_metrics(tmp_path / "run") if "mfu" in r):
        assert record["mfu"] == pytest.approx(record["tokens_per_s"] * flops / peak, abs=6e-5)


def test_the_probe_runs_once_per_machine_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    probes = []
    real = hardware._matmul_rate
    monkeypatch.setattr(hardware, "_matmul_rate", lambda dtype, *args: probes.append(dtype) or real(dtype, *args))
    rng = torch.get_rng_state()
    first = hardware.speed(CPU)
    assert probes == [torch.float32, torch.bfloat16] and first.fp32 > 0 and first.bf16 > 0
    assert torch.equal(torch.get_rng_state(), rng)  # the probe draws no random numbers
    assert hardware.speed(CPU) == first and len(probes) == 2  # read from the cache, not measured again
    stored = json.loads(hardware.cache_file().read_text())
    assert stored[first.key] == {"fp32": first.fp32, "bf16": first.bf16}
    assert "threads" in first.key and torch.__version__ in first.key
    # another thread count is another entry; a damaged cache file is measured again, not an error
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert hardware.speed(CPU).key != first.key and len(probes) == 4
    finally:
        torch.set_num_threads(threads)
    hardware.cache_file().write_text("{not json")
    assert hardware.speed(CPU).key == first.key and len(probes) == 6
    assert first.key in json.loads(hardware.cache_file().read_text())


def test_an_unwritable_cache_only_costs_a_probe(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("LMFORGE_CACHE", str(blocker / "cache"))
    assert hardware.speed(CPU).fp32 > 0
    assert hardware.auto_precision(CPU) in ("fp32", "bf16")


def test_mfu_stays_within_its_limit_while_another_process_loads_the_cpu(tmp_path, char_data):
    """MFU is against a peak probed once, at rest, and cached, and tokens/s counts training time only: a machine kept
    busy by other processes slows training and lowers MFU, but cannot push it past 1 or make the run probe again.
    One torch thread: more would spin against the busy processes and make the run take minutes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    busy = []
    try:
        peak = hardware.speed(CPU)  # probed now, before the load starts, or read from this session's cache
        cached = hardware.cache_file().read_text()
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
        overrides = {"train.max_steps": 20, "train.log_every": 1}
        train(str(char_data), tmp_path / "run", preset="tiny", overrides=overrides, progress_bar=False, echo=quiet)
    finally:
        for process in busy:
            process.kill()
            process.wait()
        torch.set_num_threads(threads)
    records = [r for r in read_metrics(tmp_path / "run") if "mfu" in r]
    assert hardware.cache_file().read_text() == cached  # no probe under load
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    flops = GPT(ModelConfig(**config["model"])).flops_per_token()
    precision = config["train"]["precision"].replace("auto", "bf16" if peak.bf16_faster else "fp32")
    assert len(records) == 20
    for record in records:  # each MFU is its step's measured rate against that cached peak (logged to 4 decimals)
        exact = record["tokens_per_s"] * flops / peak.peak(precision)
        assert 0 < exact <= 1 and 0 <= record["mfu"] <= 1, record
        assert record["mfu"] == pytest.approx(exact, abs=6e-5)
