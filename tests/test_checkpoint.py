"""Checkpoints against damage: truncation, bit flips, missing files, a kill during the purge, pickles."""

import os
import pickle

import pytest
import torch

from conftest import quiet
from lmforge.api import LM
from lmforge.errors import LMForgeError
from lmforge.train import checkpoint
from lmforge.train.trainer import train

FAST = {"train.max_steps": 12, "train.save_every": 4, "train.log_every": 1, "train.eval_every": 4, "train.keep_last": 3}


@pytest.fixture
def run(tmp_path, char_data):
    out = tmp_path / "run"
    train(str(char_data), out, preset="tiny", overrides=FAST, progress_bar=False, echo=quiet)
    return out


def flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) - 7] ^= 0x10  # inside the tensor data: same size, different numbers
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: flip_a_bit(p / "model.safetensors"),
        lambda p: flip_a_bit(p / "optimizer.pt"),
        lambda p: (p / "optimizer.pt").unlink(),
        lambda p: (p / "state.json").write_text("{not json"),
        lambda p: (p / "model.safetensors").write_bytes(b""),
    ],
    ids=["model-bitflip", "optimizer-bitflip", "optimizer-missing", "state-garbage", "model-empty"],
)
def test_damaged_newest_checkpoint_is_skipped_for_the_previous(run, damage):
    newest = checkpoint.complete_checkpoints(run)[-1]
    assert newest.name == "step_000012"
    damage(newest)
    previous = LM.load(run, step=8)
    fresh = LM.untrained(previous.config, previous.tokenizer).model
    with pytest.warns(UserWarning, match="step_000012"):
        state = checkpoint.load_latest(run, fresh)
    assert state["step"] == 8
    for a, b in zip(previous.model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_naming_a_damaged_step_fails_fast(run):
    flip_a_bit(run / "checkpoints" / "step_000012" / "model.safetensors")
    with pytest.raises(LMForgeError, match="damaged"):
        LM.load(run, step=12)


def test_resume_skips_damaged_and_finishes(run):
    flip_a_bit(run / "checkpoints" / "step_000012" / "optimizer.pt")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        result = train(None, run, overrides={"train.max_steps": 16}, progress_bar=False, echo=quiet)
    assert result["step"] == 16


def test_kill_during_purge_leaves_a_complete_checkpoint(run):
    # A purge renames a checkpoint to .tmp-deleting-* and then removes it; die between the two.
    root = run / "checkpoints"
    victim = checkpoint.complete_checkpoints(run)[0]
    os.replace(victim, root / f".tmp-deleting-{victim.name}")
    assert checkpoint.complete_checkpoints(run)
    result = train(None, run, overrides={"train.max_steps": 20}, progress_bar=False, echo=quiet)
    assert result["step"] == 20
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step_000012", "step_000016", "step_000020"]  # exactly keep_last, no leftovers


def test_malicious_pickle_is_not_executed(run, tmp_path):
    sentinel = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    newest = checkpoint.complete_checkpoints(run)[-1]
    with open(newest / "optimizer.pt", "wb") as f:
        pickle.dump({"state": Exploit()}, f, protocol=2)
    import json

    state = json.loads((newest / "state.json").read_text())
    state["files"]["optimizer.pt"] = (newest / "optimizer.pt").stat().st_size
    state["sha256"]["optimizer.pt"] = checkpoint.sha256_file(newest / "optimizer.pt")
    (newest / "state.json").write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        train(None, run, overrides={"train.max_steps": 16}, progress_bar=False, echo=quiet)
    assert not sentinel.exists()


def test_no_bare_torch_load_in_the_package():
    from pathlib import Path

    import lmforge

    for path in Path(lmforge.__file__).parent.rglob("*.py"):
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


def test_read_only_directory_keeps_the_previous_checkpoint(run):
    if os.geteuid() == 0:
        # root ignores directory permissions; simulate a full disk by making the target a file instead
        root = run / "checkpoints"
        blocker = root / f".tmp-step_000013-{os.getpid()}"
        blocker.write_text("in the way")
        model = LM.load(run).model
        with pytest.raises(LMForgeError, match="cannot write checkpoint"):
            checkpoint.save(run, 13, model, None, {}, keep_last=3)
        blocker.unlink()
    assert checkpoint.complete_checkpoints(run)[-1].name == "step_000012"
    assert LM.load(run).model is not None
