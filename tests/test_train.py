import json
import math

import pytest
import torch

from conftest import losses, quiet
from lmforge.api import LM
from lmforge.config import OptimConfig, RunConfig, apply_overrides, parse_duration
from lmforge.errors import LMForgeError
from lmforge.train import checkpoint
from lmforge.train.schedule import lr_at
from lmforge.train.trainer import train

FAST = {"train.max_steps": 24, "train.save_every": 8, "train.log_every": 1, "train.eval_every": 8}


class Crash(Exception):
    pass


def test_resume_after_crash_repeats_the_straight_run(tmp_path, char_data, monkeypatch):
    straight = train(
        str(char_data), tmp_path / "straight", preset="tiny", overrides=FAST, progress_bar=False, echo=quiet
    )
    real_save = checkpoint.save

    def save_then_crash(run_dir, step, *args, **kwargs):
        path = real_save(run_dir, step, *args, **kwargs)
        if step == 16:
            raise Crash  # the process dies right after writing checkpoint 16
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(Crash):
        train(str(char_data), tmp_path / "crashed", preset="tiny", overrides=FAST, progress_bar=False, echo=quiet)
    monkeypatch.setattr(checkpoint, "save", real_save)
    resumed = train(None, tmp_path / "crashed", progress_bar=False, echo=quiet)
    assert resumed["step"] == straight["step"] == 24
    assert resumed["tokens"] == straight["tokens"] == 24 * 8 * 32
    assert losses(tmp_path / "crashed") == losses(tmp_path / "straight")
    a, b = LM.load(tmp_path / "straight").model, LM.load(tmp_path / "crashed").model
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_gradient_accumulation_matches_one_big_batch(tmp_path, char_data):
    common = {**FAST, "train.max_steps": 5, "train.batch_size": 8}
    one = train(str(char_data), tmp_path / "one", preset="tiny", overrides=common, progress_bar=False, echo=quiet)
    acc = train(
        str(char_data),
        tmp_path / "acc",
        preset="tiny",
        overrides={**common, "train.micro_batch_size": 2},
        progress_bar=False,
        echo=quiet,
    )
    assert one["step"] == acc["step"]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "acc")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)


def test_training_lowers_loss_and_writes_artifacts(tiny_run):
    steps = losses(tiny_run)
    assert steps[30] < steps[5] - 0.5
    assert (tiny_run / "loss.png").stat().st_size > 1000
    assert (tiny_run / "tokenizer.json").is_file()
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["model"]["vocab_size"] > 0 and config["preset"] == "tiny"
    names = [p.name for p in checkpoint.complete_checkpoints(tiny_run)]
    assert names == ["step_000025", "step_000030"]  # keep_last=2
    files = sorted(p.name for p in (tiny_run / "checkpoints" / "step_000030").iterdir())
    assert files == ["model.safetensors", "optimizer.pt", "state.json"]


def test_damaged_newest_checkpoint_falls_back(tmp_path, char_data):
    run = tmp_path / "run"
    train(str(char_data), run, preset="tiny", overrides=FAST, progress_bar=False, echo=quiet)
    newest = checkpoint.complete_checkpoints(run)[-1]
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    (run / "checkpoints" / ".tmp-step_000099-1").mkdir()  # a save that died half-way
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        lm = LM.load(run)
    assert lm.model is not None
    with pytest.warns(UserWarning):
        result = train(None, run, progress_bar=False, echo=quiet)
    assert result["step"] == 24
    assert not (run / "checkpoints" / ".tmp-step_000099-1").exists()


def test_all_checkpoints_damaged_is_an_error_not_a_fresh_start(tmp_path, char_data):
    run = tmp_path / "run"
    train(str(char_data), run, preset="tiny", overrides=FAST, progress_bar=False, echo=quiet)
    for path in checkpoint.complete_checkpoints(run):
        (path / "optimizer.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(LMForgeError, match="damaged"):
        train(None, run, progress_bar=False, echo=quiet)


def test_resume_refuses_conflicting_config(tiny_run):
    with pytest.raises(LMForgeError, match="model.n_layer=3"):
        train(None, tiny_run, overrides={"model.n_layer": 3}, progress_bar=False, echo=quiet)
    with pytest.raises(LMForgeError, match="preset"):
        train(None, tiny_run, preset="demo", progress_bar=False, echo=quiet)


def test_time_budget_stops_with_a_checkpoint(tmp_path, char_data):
    overrides = {"train.max_steps": 0, "train.time": 1.0, "train.save_every": 100000}
    result = train(str(char_data), tmp_path / "t", preset="tiny", overrides=overrides, progress_bar=False, echo=quiet)
    assert 1.0 <= result["elapsed"] < 10
    assert checkpoint.complete_checkpoints(tmp_path / "t")[-1].name == f"step_{result['step']:06d}"


def test_context_longer_than_corpus_is_refused(tmp_path):
    from lmforge.data.prepare import prepare

    (tmp_path / "short.txt").write_text("just a few words here")
    prepare([str(tmp_path / "short.txt")], tmp_path / "data", progress=False)
    with pytest.raises(LMForgeError, match="fewer than the context"):
        train(str(tmp_path / "data"), tmp_path / "run", preset="tiny", progress_bar=False, echo=quiet)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sgd_trains(tmp_path, char_data):
    overrides = {**FAST, "optim.name": "sgd", "optim.lr": 0.5, "optim.nesterov": True}
    train(str(char_data), tmp_path / "sgd", preset="tiny", overrides=overrides, progress_bar=False, echo=quiet)
    steps = losses(tmp_path / "sgd")
    assert steps[24] < steps[1]


def test_config_overrides_and_errors():
    config = apply_overrides(RunConfig(), {"model.n_layer": "6", "optim.lr": "3e-4", "model.bias": "false"})
    assert (config.model.n_layer, config.optim.lr, config.model.bias) == (6, 3e-4, False)
    with pytest.raises(LMForgeError, match="did you mean model.n_layer"):
        apply_overrides(RunConfig(), {"n_layer": 3})
    with pytest.raises(LMForgeError, match="unknown config field"):
        apply_overrides(RunConfig(), {"model.n_layr": 3})
    with pytest.raises(LMForgeError, match="integer"):
        apply_overrides(RunConfig(), {"model.n_layer": "two"})
    assert RunConfig.from_dict(config.to_dict()) == config
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300 and parse_duration("1.5h") == 5400
    with pytest.raises(LMForgeError, match="duration"):
        parse_duration("soon")


def test_schedule_warms_up_and_decays():
    config = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    assert lr_at(config, 0, 0.0) == pytest.approx(0.1)
    assert lr_at(config, 9, 0.0) == pytest.approx(1.0)
    assert lr_at(config, 50, 0.5) == pytest.approx(0.55)
    assert lr_at(config, 100, 1.0) == pytest.approx(0.1)
    linear = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, schedule="linear")
    assert lr_at(linear, 5, 0.25) == pytest.approx(0.75)
    assert math.isclose(lr_at(OptimConfig(lr=2.0, schedule="constant", warmup_steps=0), 7, 0.9), 2.0)


def test_non_finite_loss_stops_with_message(tmp_path, char_data, monkeypatch):
    from lmforge.model import gpt

    real_forward = gpt.GPT.forward

    def nan_forward(self, idx, targets=None, **kwargs):
        logits, loss = real_forward(self, idx, targets, **kwargs)
        return logits * float("nan"), loss

    train(str(char_data), tmp_path / "run", preset="tiny", overrides=FAST, progress_bar=False, echo=quiet)
    before = checkpoint.complete_checkpoints(tmp_path / "run")
    monkeypatch.setattr(gpt.GPT, "forward", nan_forward)
    with pytest.raises(LMForgeError, match="NaN"):
        train(None, tmp_path / "run", overrides={"train.max_steps": 40}, progress_bar=False, echo=quiet)
    assert checkpoint.complete_checkpoints(tmp_path / "run") == before


@pytest.mark.parametrize(
    "extra",
    [
        {"optim.name": "muon", "optim.lr": 0.02},
        {"optim.schedule": "wsd"},
        {"train.precision": "bf16"},
        {"train.label_smoothing": 0.1, "optim.l1": 1e-5, "model.dropout": 0.1},
    ],
    ids=["muon", "wsd", "bf16", "regularized"],
)
def test_optimizers_precisions_and_regularizers_train(tmp_path, char_data, extra):
    result = train(
        str(char_data), tmp_path / "run", preset="tiny", overrides={**FAST, **extra}, progress_bar=False, echo=quiet
    )
    steps = losses(tmp_path / "run")
    assert steps[24] < steps[1] - 0.3, steps
    assert result["step"] == 24
    # the run resumes from its own checkpoint with its optimizer state (Muon's too)
    again = train(None, tmp_path / "run", overrides={"train.max_steps": 28}, progress_bar=False, echo=quiet)
    assert again["step"] == 28


def test_wsd_schedule_shape():
    config = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(config, 10, 0.5) == 1.0 and lr_at(config, 10, 0.8) == 1.0
    assert lr_at(config, 10, 0.9) == pytest.approx(0.5)
    assert lr_at(config, 10, 1.0) == pytest.approx(0.0)


def test_early_stopping_fires_and_keeps_the_best(tmp_path):
    from lmforge.data.prepare import prepare

    # A small corpus whose val split differs from train: a wide model overfits it quickly.
    docs = tmp_path / "docs"
    docs.mkdir()
    import random

    rng = random.Random(0)
    for i in range(20):
        words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6))) for _ in range(60)]
        (docs / f"{i}.txt").write_text(" ".join(words))
    prepare([str(docs)], tmp_path / "data", progress=False)
    overrides = {
        "train.max_steps": 2000,
        "train.eval_every": 10,
        "train.eval_batches": 0,
        "train.save_every": 1000,
        "model.n_embd": 64,
        "optim.lr": 1e-2,
        "optim.warmup_steps": 0,
        "optim.schedule": "constant",
        "optim.weight_decay": 0.0,
        "early_stop.patience": 3,
    }
    result = train(
        str(tmp_path / "data"), tmp_path / "run", preset="tiny", overrides=overrides, progress_bar=False, echo=quiet
    )
    assert result["step"] < 2000
    assert result["stop_reason"].startswith("early stopping")
    assert result["best_step"] == result["step"] - 30
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["gap"] for r in records if "gap" in r]
    assert gaps[-1] > gaps[0]  # the train/val gap grew: it was overfitting
    kept = [p.name for p in checkpoint.complete_checkpoints(tmp_path / "run")]
    assert f"step_{result['best_step']:06d}" in kept


def test_masked_lm_trains_an_encoder(tmp_path, char_data):
    overrides = {**FAST, "train.objective": "mlm", "model.causal": False}
    train(str(char_data), tmp_path / "mlm", preset="tiny", overrides=overrides, progress_bar=False, echo=quiet)
    steps = losses(tmp_path / "mlm")
    assert steps[24] < steps[1] - 0.3
    with pytest.raises(LMForgeError, match="causal false"):
        train(str(char_data), tmp_path / "bad", preset="tiny", overrides={"train.objective": "mlm"}, echo=quiet)


def test_mask_tokens_policy():
    from lmforge.data.loader import mask_tokens

    rows = torch.randint(5, 100, (64, 128))
    rows[:, 0] = 0  # a special token is never chosen
    inputs, targets = mask_tokens(rows, 100, 4, [0, 1, 2, 3, 4], 0.15, torch.Generator().manual_seed(0))
    chosen = targets != -100
    assert 0.13 < chosen.float().mean() < 0.17
    assert not chosen[:, 0].any()
    assert torch.equal(targets[chosen], rows[chosen])
    assert 0.75 < (inputs[chosen] == 4).float().mean() < 0.85
    assert torch.equal(inputs[~chosen], rows[~chosen])


def test_batch_in_tokens_and_tensorboard(tmp_path, char_data):
    overrides = {**FAST, "train.max_steps": 4, "train.batch_tokens": 256, "train.log": "tensorboard"}
    result = train(str(char_data), tmp_path / "run", preset="tiny", overrides=overrides, progress_bar=False, echo=quiet)
    assert result["tokens"] == 4 * 256  # 256 tokens = 8 sequences of 32
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["mfu"] < 1 for r in records if "mfu" in r)
