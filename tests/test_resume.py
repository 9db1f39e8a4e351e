"""Resuming repeats the straight run (docs/reliability.md items 3, 4, 5 and 12).

A run killed right after checkpoint k is simulated by copying a finished run dir and deleting its checkpoints after
k (`rewind`): what a kill leaves on disk, metrics.jsonl lines past k included. The loop is observed from outside:
the objective's train_batch is wrapped to record the state the loop holds when it draws each batch.
"""

import json
import os
import random
import shutil
import signal

import numpy as np
import pytest
import torch

from conftest import quiet
from lmforge.api import LM
from lmforge.config import RunConfig
from lmforge.data.loader import DataDir
from lmforge.data.prepare import prepare
from lmforge.errors import LMForgeError
from lmforge.train import checkpoint, objectives, trainer
from lmforge.train.trainer import train

# dropout makes every step draw from torch's RNG, so a resume with a wrong RNG state shows in the losses
FAST = {"train.max_steps": 12, "train.save_every": 2, "train.keep_last": 20, "train.log_every": 1,
        "train.eval_every": 4, "train.eval_batches": 2, "model.dropout": 0.1, "train.threads": 1}  # fmt: skip
TIMING = ("tokens_per_s", "mfu", "elapsed")


def records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return LM.load(run_dir).model.state_dict()


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def rewind(run_dir, to, step: int):
    """A copy of run_dir as a kill right after checkpoint `step` leaves it."""
    shutil.copytree(run_dir, to)
    for path in checkpoint.complete_checkpoints(to):
        if int(path.name.removeprefix("step_")) > step:
            shutil.rmtree(path)
    assert checkpoint.complete_checkpoints(to)[-1].name == checkpoint.step_name(step)
    return to


def observe(monkeypatch) -> list[dict]:
    """Record, each time the loop draws a global batch, that batch and everything it carries into the update."""
    seen: list[dict] = []
    optimizers: list = []
    build = trainer.build_optimizers

    def build_and_keep(*args, **kwargs):
        optimizers[:] = build(*args, **kwargs)
        return optimizers

    draw = objectives.LanguageModeling.train_batch

    def draw_and_record(self, step, part):
        if part == 0:
            params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
            seen.append(
                {
                    "batch": step,
                    "rng": checkpoint.rng_state(),  # python, numpy, torch (and cuda) as comparable strings
                    "lr": [g["lr"] for o in optimizers for g in o.param_groups],
                    "moments": [{k: v.clone() for k, v in o.state[p].items()} for o in optimizers for p in params],
                    "params": [p.detach().clone() for p in params],
                }
            )
        batch = draw(self, step, part)
        if part == 0:
            seen[-1]["inputs"] = batch.inputs[0].clone()
        return batch

    monkeypatch.setattr(trainer, "build_optimizers", build_and_keep)
    monkeypatch.setattr(objectives.LanguageModeling, "train_batch", draw_and_record)
    return seen


def assert_same_state(a: dict, b: dict) -> None:
    assert a["batch"] == b["batch"]
    assert torch.equal(a["inputs"], b["inputs"])
    assert a["rng"] == b["rng"]
    assert a["lr"] == b["lr"]
    assert len(a["moments"]) == len(b["moments"]) and a["moments"][0]  # AdamW has moments after a step
    for ma, mb in zip(a["moments"], b["moments"]):
        assert ma.keys() == mb.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, char_data):
    """A run of 12 steps that keeps every checkpoint, and the state it held at each batch."""
    out = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as mp:
        seen = observe(mp)
        result = train(str(char_data), out, preset="tiny", overrides=FAST, progress_bar=False, echo=quiet)
    return out, result, {s["batch"]: s for s in seen}


def test_the_first_resumed_batch_sees_the_straight_runs_state(tmp_path, straight, monkeypatch):
    """Item 3: batch k, LR, optimizer moments, weights and RNG states are equal before the first resumed update."""
    run, result, states = straight
    resumed_dir = rewind(run, tmp_path / "run", 6)
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))  # an empty cache: the hardware probe runs again
    random.seed(99)  # a new process's RNGs are wherever they are
    np.random.seed(99)
    torch.manual_seed(99)
    seen = observe(monkeypatch)
    resumed = train(None, resumed_dir, progress_bar=False, echo=quiet)
    assert [s["batch"] for s in seen] == list(range(6, 12))
    for state in seen:
        assert_same_state(state, states[state["batch"]])
    assert (resumed["step"], resumed["tokens"]) == (result["step"], result["tokens"]) == (12, 12 * 8 * 32)
    assert records(resumed_dir) == records(run)
    assert_same_weights(resumed_dir, run)


def test_resume_at_step_zero_from_a_run_dir_without_checkpoints(tmp_path, char_data, straight, monkeypatch):
    """Item 4, step 0: killed before its first checkpoint, the run dir holds config and metrics but no checkpoint."""
    run, result, _ = straight

    class Crash(Exception):
        pass

    def crash(*args, **kwargs):
        raise Crash

    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "save", crash)
    with pytest.raises(Crash):
        train(str(char_data), out, preset="tiny", overrides=FAST, progress_bar=False, echo=quiet)
    monkeypatch.undo()
    assert (out / "config.json").is_file() and records(out) and not checkpoint.complete_checkpoints(out)
    resumed = train(None, out, progress_bar=False, echo=quiet)
    assert (resumed["step"], resumed["tokens"]) == (result["step"], result["tokens"])
    assert records(out) == records(run)
    assert_same_weights(out, run)


def test_a_finished_run_resumed_trains_no_more_and_reports_the_same(tmp_path, straight, monkeypatch):
    """Item 4, last step: nothing is drawn or written; the summary is the finished run's, not an empty one."""
    run, result, _ = straight
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    states = {p.name: (p / "state.json").read_bytes() for p in checkpoint.complete_checkpoints(copy)}
    seen = observe(monkeypatch)
    again = train(None, copy, overrides={"train.max_steps": 12}, progress_bar=False, echo=quiet)
    assert seen == []
    for key in ("step", "tokens", "train_loss", "val_loss", "best_val_loss", "best_step"):
        assert again[key] == result[key], key
    assert {p.name: (p / "state.json").read_bytes() for p in checkpoint.complete_checkpoints(copy)} == states
    assert records(copy) == records(run)


def test_an_early_stopped_run_resumed_stays_stopped(tmp_path, char_data, monkeypatch):
    """Item 4: a run that stopped early must not train another eval_every steps when rerun."""
    # every evaluation after the first counts as no improvement: the run stops at the second, step 8
    overrides = {**FAST, "train.max_steps": 40, "early_stop.patience": 1, "early_stop.min_delta": 100.0}
    run = tmp_path / "run"
    first = train(str(char_data), run, preset="tiny", overrides=overrides, progress_bar=False, echo=quiet)
    assert first["step"] == 8 and first["stop_reason"].startswith("early stopping")
    seen = observe(monkeypatch)
    again = train(None, run, progress_bar=False, echo=quiet)
    assert seen == []
    assert (again["step"], again["tokens"], again["best_step"]) == (8, first["tokens"], 4)
    assert again["stop_reason"].startswith("early stopping")


SPIKE = {**FAST, "train.spike_factor": 3.0, "train.spike_window": 4}


def spike(monkeypatch, batches, factor: float = 10.0) -> None:
    """Multiply the loss of the global batches numbered in `batches` by factor, as bad batches would."""
    current = {}
    draw, loss = objectives.LanguageModeling.train_batch, objectives.LanguageModeling.loss

    def draw_and_note(self, step, part):
        current["batch"] = step
        return draw(self, step, part)

    def spiked_loss(self, output, targets):
        return loss(self, output, targets) * (factor if current["batch"] in batches else 1.0)

    monkeypatch.setattr(objectives.LanguageModeling, "train_batch", draw_and_note)
    monkeypatch.setattr(objectives.LanguageModeling, "loss", spiked_loss)


def test_spike_guard_skips_a_10x_batch_and_a_resume_repeats_it(tmp_path, char_data, monkeypatch):
    """Item 12: batch 6's loss is 10x; the guard skips it (no update), and resumes make the same decisions."""
    spike(monkeypatch, {6})
    seen = observe(monkeypatch)
    run = tmp_path / "run"
    result = train(str(char_data), run, preset="tiny", overrides=SPIKE, progress_bar=False, echo=quiet)
    skips = [r for r in records(run) if "skipped" in r]
    assert [(r["step"], r["skipped"], r["batch"], r["skipped_batches"]) for r in skips] == [(7, "loss spike", 6, 1)]
    losses = {r["step"]: r["loss"] for r in records(run) if "loss" in r}
    assert skips[0]["batch_loss"] > 8 * losses[6]
    assert sorted(losses) == list(range(1, 13))  # 12 updates from 13 batches
    assert (result["step"], result["tokens"]) == (12, 12 * 8 * 32)
    by_batch = {s["batch"]: s for s in seen}
    assert [s["batch"] for s in seen] == list(range(13))
    assert all(torch.equal(p, q) for p, q in zip(by_batch[6]["params"], by_batch[7]["params"]))  # unchanged
    assert not all(torch.equal(p, q) for p, q in zip(by_batch[5]["params"], by_batch[6]["params"]))
    state = json.loads((run / "checkpoints" / "step_000008" / "state.json").read_text())
    assert (state["data_position"], state["skipped_batches"]) == (9, 1)

    # killed before the spike (the guard's recent losses come from the checkpoint) and after it (the data
    # position, one ahead of the step, does): both resumes repeat the straight run
    for step in (4, 8):
        resumed_dir = rewind(run, tmp_path / f"from{step}", step)
        resumed = train(None, resumed_dir, progress_bar=False, echo=quiet)
        assert (resumed["step"], resumed["tokens"]) == (12, result["tokens"])
        assert records(resumed_dir) == records(run)
        assert_same_weights(resumed_dir, run)


def test_a_nan_batch_is_skipped_the_same_way(tmp_path, char_data, monkeypatch):
    """Item 11's policy shares the guard's path: the NaN batch is skipped, the next one drawn, a counter logged."""
    spike(monkeypatch, {6}, factor=float("nan"))
    seen = observe(monkeypatch)
    run = tmp_path / "run"
    result = train(str(char_data), run, preset="tiny", overrides=FAST, progress_bar=False, echo=quiet)
    skips = [(r["step"], r["skipped"], r["batch"]) for r in records(run) if "skipped" in r]
    assert skips == [(7, "non-finite loss or gradient", 6)]
    assert (result["step"], result["tokens"]) == (12, 12 * 8 * 32)
    by_batch = {s["batch"]: s for s in seen}
    assert all(torch.equal(p, q) for p, q in zip(by_batch[6]["params"], by_batch[7]["params"]))


def test_spike_guard_is_off_by_default_and_gives_up_on_a_lasting_rise(tmp_path, char_data, monkeypatch):
    """Without spike_factor the 10x batch is trained on. Turned on when resuming, the guard skips a loss that stays
    10x up only max_bad_steps times in a row, then stops with a message."""
    spike(monkeypatch, set(range(6, 100)))
    run = tmp_path / "run"
    train(str(char_data), run, preset="tiny", overrides={**FAST, "train.max_steps": 8}, progress_bar=False, echo=quiet)
    losses = {r["step"]: r["loss"] for r in records(run) if "loss" in r}
    assert not any("skipped" in r for r in records(run)) and losses[7] > 8 * losses[6]
    guard = {"train.spike_factor": 3.0, "train.spike_window": 4}
    with pytest.raises(LMForgeError, match="median loss of the last 4 steps for 5 batches in a row at step 6"):
        train(None, rewind(run, tmp_path / "guarded", 6), overrides=guard, progress_bar=False, echo=quiet)
    skips = [r for r in records(tmp_path / "guarded") if "skipped" in r]
    assert [(r["batch"], r["bad_steps"]) for r in skips] == [(b, b - 5) for b in range(6, 11)]
    assert checkpoint.complete_checkpoints(tmp_path / "guarded")[-1].name == "step_000006"


@pytest.fixture(scope="module")
def epoch_data(tmp_path_factory):
    """A data dir whose train split is exactly 16 windows of 32 tokens: with a batch of 4, an epoch is 4 steps."""
    root = tmp_path_factory.mktemp("epochs")
    rng = random.Random(0)
    (root / "text.txt").write_text("".join(rng.choice("abcdefgh") for _ in range(590)))
    prepare([str(root / "text.txt")], root / "data", tokenizer="char", progress=False)
    assert len(DataDir(root / "data").epoch_windows(32)) == 16
    return root / "data"


@pytest.mark.parametrize("batch_size", [4, 5])
def test_epoch_order_visits_every_window_once_per_epoch(epoch_data, batch_size):
    data = DataDir(epoch_data)
    tiles = data.epoch_windows(32)
    assert np.all(np.diff(tiles) == 32)  # targets tile the split: no token predicted twice, none left out
    steps = range(-(-48 // batch_size))  # enough for 3 epochs of 16 windows
    drawn = np.concatenate([data.batch_windows(step, batch_size, 32, seed=7, order="epoch") for step in steps])
    epochs = [drawn[i : i + 16] for i in range(0, 48, 16)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(tiles)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    x, y = data.train_batch(3, 1, 2, batch_size, 32, seed=7, order="epoch")
    rows = data.splits["train"].windows(drawn[3 * batch_size + 2 : 3 * batch_size + 4], 33)
    assert torch.equal(x, torch.from_numpy(rows[:, :-1])) and torch.equal(y, torch.from_numpy(rows[:, 1:]))


@pytest.mark.parametrize("killed_at", [4, 6], ids=["epoch-end", "mid-epoch-2"])
def test_kill_in_epoch_two_of_three_resumes_the_same_order(tmp_path, epoch_data, monkeypatch, killed_at):
    """Item 5: 3 epochs of 4 steps; killed at the end of epoch 1 or within epoch 2, the order is the straight run's."""
    drawn: list[tuple[int, tuple]] = []
    windows = DataDir.batch_windows

    def record(self, step, batch_size, seq_len, seed, order="random"):
        ids = windows(self, step, batch_size, seq_len, seed, order)
        drawn.append((step, tuple(ids.tolist())))
        return ids

    monkeypatch.setattr(DataDir, "batch_windows", record)
    overrides = {**FAST, "train.batch_size": 4}
    run = tmp_path / "run"
    result = train(str(epoch_data), run, preset="tiny", overrides=overrides, progress_bar=False, echo=quiet)
    straight = list(drawn)
    assert [step for step, _ in straight] == list(range(12))
    flat = [i for _, ids in straight for i in ids]
    tiles = sorted(DataDir(epoch_data).epoch_windows(32).tolist())
    assert [sorted(flat[e * 16 : (e + 1) * 16]) for e in range(3)] == [tiles] * 3
    epochs = {r["step"]: r["epoch"] for r in records(run) if "epoch" in r}
    assert (epochs[4], epochs[6], epochs[12]) == (1.0, 1.5, 3.0)

    drawn.clear()
    resumed_dir = rewind(run, tmp_path / "resumed", killed_at)
    resumed = train(None, resumed_dir, progress_bar=False, echo=quiet)
    assert straight[:killed_at] + drawn == straight
    assert (resumed["step"], resumed["tokens"]) == (result["step"], result["tokens"]) == (12, 12 * 4 * 32)
    assert records(resumed_dir) == records(run)
    assert_same_weights(resumed_dir, run)


def test_a_run_dir_from_before_train_order_resumes_with_random_windows(tmp_path, straight, monkeypatch):
    """A config.json written before train.order existed (the default is now epoch) keeps the order it trained with."""
    assert RunConfig().train.order == "epoch"
    copy = rewind(straight[0], tmp_path / "run", 10)
    config = json.loads((copy / "config.json").read_text())
    assert config["train"].pop("order") == "epoch"
    (copy / "config.json").write_text(json.dumps(config))
    orders = []
    windows = DataDir.batch_windows

    def record(self, step, batch_size, seq_len, seed, order="random"):
        orders.append(order)
        return windows(self, step, batch_size, seq_len, seed, order)

    monkeypatch.setattr(DataDir, "batch_windows", record)
    assert train(None, copy, progress_bar=False, echo=quiet)["step"] == 12
    assert orders == ["random", "random"]
    assert json.loads((copy / "config.json").read_text())["train"]["order"] == "random"


def test_ctrl_c_finishes_the_step_saves_it_and_the_resumed_run_equals_the_straight_one(tmp_path, straight, monkeypatch):
    """Ctrl-C right after the optimizer's update of step 5 (before the loop counts it): the step finishes, its
    checkpoint is written at the step boundary, and resuming repeats the straight run exactly."""
    run, _, _ = straight
    real = trainer.build_optimizers

    def with_ctrl_c(*args, **kwargs):
        optimizers = real(*args, **kwargs)
        updates = iter(range(1, 100))

        def press(optimizer, args, kwargs):
            if next(updates) == 5:
                os.kill(os.getpid(), signal.SIGINT)  # delivered in the main thread, inside this hook

        optimizers[0].register_step_post_hook(press)
        return optimizers

    monkeypatch.setattr(trainer, "build_optimizers", with_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)  # Python's own, or SIG_IGN under a runner that ignores Ctrl-C
    stopped = tmp_path / "stopped"
    config = RunConfig.load(run / "config.json")
    with pytest.raises(KeyboardInterrupt):
        train(str(config.data), stopped, preset="tiny", overrides=FAST, progress_bar=False, echo=quiet)
    assert checkpoint.complete_checkpoints(stopped)[-1].name == "step_000005"
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is put back
    monkeypatch.setattr(trainer, "build_optimizers", real)
    train(None, stopped, progress_bar=False, echo=quiet)
    assert records(stopped) == records(run)
    assert_same_weights(stopped, run)
