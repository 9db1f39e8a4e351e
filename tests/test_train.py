import json
import math

import pytest
import torch

from conftest import losses, quiet
from lmforge.api import LM
from lmforge.config import OptimConfig, RunConfig, apply_overrides, parse_duration
from lmforge.errors import LMForgeError
from lmforge.train import checkpoint
from lmforge.train.log import read_metrics
from lmforge.train.schedule import lr_at
from lmforge.train.trainer import EarlyStopping, train

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
    # fp32: micro-batches sum to one batch's gradient to fp32's rounding, not to bf16's (precision auto on AMX)
    common = {**FAST, "train.max_steps": 5, "train.batch_size": 8, "train.precision": "fp32"}
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
    assert steps[30] < steps[5] - 0.3  # 0.61-0.73 lower over train.seed 0-4
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
    previous = LM.load(run, step=16).model  # the fallback is the checkpoint before the damaged one
    for (name, a), b in zip(lm.model.state_dict().items(), previous.state_dict().values()):
        assert torch.equal(a, b), name
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
    """The run stops at the first step that ends past the budget, however fast or loaded the machine is."""
    overrides = {"train.max_steps": 0, "train.time": 1.0, "train.save_every": 100000, "train.log_every": 1}
    result = train(str(char_data), tmp_path / "t", preset="tiny", overrides=overrides, progress_bar=False, echo=quiet)
    elapsed = {r["step"]: r["elapsed"] for r in read_metrics(tmp_path / "t") if "elapsed" in r}
    last = result["step"]
    assert sorted(elapsed) == list(range(1, last + 1))
    assert elapsed[last] >= 1.0 and (last == 1 or elapsed[last - 1] <= 1.0)  # logged to 2 decimals
    assert checkpoint.complete_checkpoints(tmp_path / "t")[-1].name == f"step_{last:06d}"


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
    for field, value in (("model.n_layer", True), ("optim.lr", False)):  # issue 15 item 9: JSON true is not 1
        with pytest.raises(LMForgeError, match=f"{field} takes an? (integer|number), not {value}"):
            RunConfig.from_dict({"model": {"n_layer": value}} if field == "model.n_layer" else {"optim": {"lr": value}})
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


def test_early_stopping_rule():
    """An evaluation improves when it beats the best by more than min_delta; patience bad ones in a row stop."""
    early = EarlyStopping(patience=3, min_delta=0.05)
    script = [3.0, 2.0, 1.5, 1.49, 1.6, 1.2, 1.3, 1.25, 1.21]
    improved = [early.update(loss, step) for step, loss in enumerate(script, start=1)]
    assert improved == [True, True, True, False, False, True, False, False, False]
    assert (early.best_val, early.best_step, early.bad_evals, early.stopped) == (1.2, 6, 3, True)
    never = EarlyStopping(patience=0)  # patience 0: early stopping is off
    for step in range(10):
        never.update(float(step), step)
    assert never.bad_evals == 9 and not never.stopped
    # a resumed run carries on from its saved counters: one more bad evaluation stops it
    resumed = EarlyStopping(patience=2, best_val=1.0, best_step=4, bad_evals=1)
    assert not resumed.stopped and not resumed.update(1.0, 8) and resumed.stopped


def scripted_evaluations(monkeypatch, losses: list[float]) -> list[int]:
    """Make the loop's evaluations return these val losses in turn; return the list of steps they happen at."""
    from lmforge.train import objectives

    steps: list[int] = []

    def evaluate(self, module, device, autocast):
        steps.append(len(steps))
        return {"val_loss": losses[len(steps) - 1]}

    monkeypatch.setattr(objectives.LanguageModeling, "evaluate", evaluate)
    return steps


def test_early_stopping_stops_on_the_scripted_evaluation_and_keeps_the_best(tmp_path, char_data, monkeypatch):
    """The loop stops at the evaluation the rule says, and the best step's weights stay on disk, outside keep_last."""
    script = [3.0, 2.0, 1.5, 1.49, 1.6, 1.2, 1.3, 1.25, 1.21, 0.1, 0.1]  # stops at the 9th evaluation
    overrides = {"train.max_steps": 55, "train.eval_every": 5, "train.save_every": 1000, "train.keep_last": 1,
                 "train.log_every": 1, "optim.schedule": "constant", "early_stop.patience": 3,
                 "early_stop.min_delta": 0.05}  # fmt: skip
    evaluations = scripted_evaluations(monkeypatch, script)
    result = train(str(char_data), tmp_path / "run", preset="tiny", overrides=overrides, progress_bar=False, echo=quiet)
    assert len(evaluations) == 9
    assert (result["step"], result["best_step"], result["best_val_loss"]) == (45, 30, 1.2)
    assert result["stop_reason"].startswith("early stopping: val loss did not improve by more than 0.05 in 3")
    evaluated = [(r["step"], r["val_loss"]) for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert evaluated == list(zip(range(5, 50, 5), script))
    kept = [p.name for p in checkpoint.complete_checkpoints(tmp_path / "run")]
    assert kept == ["step_000030", "step_000045"]  # the best, protected, and the last
    # the kept best is the model as it was at step 30: a run of exactly 30 steps ends with the same weights
    monkeypatch.undo()
    straight = {**overrides, "train.max_steps": 30, "early_stop.patience": 0}
    train(str(char_data), tmp_path / "thirty", preset="tiny", overrides=straight, progress_bar=False, echo=quiet)
    best, thirty = LM.load(tmp_path / "run", step=30).model, LM.load(tmp_path / "thirty").model
    for (name, a), b in zip(best.state_dict().items(), thirty.state_dict().values()):
        assert torch.equal(a, b), name


def test_early_stopping_catches_overfitting_to_a_val_split_that_contradicts_train(tmp_path):
    """Train text cycles a->b->c->d->a, val text cycles a->d->c->b->a: every val transition is one train never
    shows. The better the model learns the train split, the less likely each val token: val loss must end above
    the uniform guess's ln(vocab), early stopping must fire, and the best evaluation's weights stay on disk."""
    from lmforge.data.clean import CleanConfig
    from lmforge.data.prepare import prepare

    (tmp_path / "corpus.txt").write_text("abcd" * 450 + "adcb" * 50)
    # one document: its last 10% of tokens (exactly the 200 val characters) is the val split
    meta = prepare([str(tmp_path / "corpus.txt")], tmp_path / "data", progress=False, clean=CleanConfig.off())
    assert meta["splits"]["val"]["characters"] == 200
    overrides = {"train.max_steps": 1000, "train.eval_every": 10, "train.eval_batches": 0, "train.save_every": 1000,
                 "train.log_every": 10, "train.keep_last": 1, "early_stop.patience": 3}  # fmt: skip
    result = train(
        str(tmp_path / "data"), tmp_path / "run", preset="tiny", overrides=overrides, progress_bar=False, echo=quiet
    )
    assert result["stop_reason"].startswith("early stopping") and result["step"] < 1000
    assert result["best_step"] == result["step"] - 3 * 10
    vocab = LM.load(tmp_path / "run").model.config.vocab_size
    assert result["val_loss"] > math.log(vocab) > result["train_loss"]
    kept = [p.name for p in checkpoint.complete_checkpoints(tmp_path / "run")]
    assert kept == [f"step_{result['best_step']:06d}", f"step_{result['step']:06d}"]


def test_masked_lm_trains_an_encoder(tmp_path, char_data):
    overrides = {**FAST, "train.objective": "mlm", "model.causal": False}
    train(str(char_data), tmp_path / "mlm", preset="tiny", overrides=overrides, progress_bar=False, echo=quiet)
    steps = losses(tmp_path / "mlm")
    # a masked batch scores ~40 tokens, so one step's loss is noisy: compare the first and last four steps' means
    # (0.30-0.47 lower over train.seed 0-7)
    first, last = sum(steps[s] for s in range(1, 5)) / 4, sum(steps[s] for s in range(21, 25)) / 4
    assert last < first - 0.15, steps
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
    # MFU is tokens/s x FLOPs per token / one peak, probed once per process: the same ratio at every step
    logged = [(r["mfu"], r["tokens_per_s"]) for r in read_metrics(tmp_path / "run") if "mfu" in r]
    assert len(logged) == 4 and all(mfu > 0 for mfu, _ in logged)
    top_mfu, top_rate = max(logged)
    assert all(abs(mfu - rate * top_mfu / top_rate) < 1.5e-4 for mfu, rate in logged), logged  # mfu has 4 decimals
