"""Checkpoints against damage: truncation, bit flips, missing files, a kill during the purge, pickles, a read-only
directory."""

import contextlib
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import losses, quiet
from lmforge.api import LM
from lmforge.config import RunConfig
from lmforge.errors import LMForgeError
from lmforge.files import sha256_file
from lmforge.model.gpt import qkv_sizes, split_qkv
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


@contextlib.contextmanager
def read_only(directory: Path, monkeypatch):
    """Make directory read-only for real: a read-only bind mount for root (who ignores permissions), the
    directory's permissions for any other user. Where root may not mount, an EROFS is raised at the write instead.
    Yields how the fault was made."""
    if os.geteuid() != 0:
        mode = directory.stat().st_mode
        directory.chmod(0o555)
        try:
            yield "permissions"
        finally:
            directory.chmod(mode)
        return
    mount = ["mount", "--bind", str(directory), str(directory)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        from lmforge.train import checkpoint as module

        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(directory))

        monkeypatch.setattr(module, "_write", refuse)
        yield "injected"
        monkeypatch.undo()
        return
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory), str(directory)], check=True)
        yield "mount"
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def snapshot(run) -> dict[str, str]:
    return {f"{p.name}/{f.name}": sha256_file(f) for p in checkpoint.complete_checkpoints(run) for f in p.iterdir()}


def test_a_checkpoint_from_before_the_fused_qkv_projection_resumes_the_same_run(run, tmp_path):
    """Cross-commit compatibility: a checkpoint written when q, k and v were three projections (weights and AdamW
    moments under q_proj/k_proj/v_proj names) resumes, and the run goes on as the straight run did."""
    old = tmp_path / "old"
    shutil.copytree(run, old)
    for later in checkpoint.complete_checkpoints(old)[1:]:
        shutil.rmtree(later)  # keep step 4, as an older lmforge wrote it
    path = checkpoint.complete_checkpoints(old)[0]
    config = RunConfig.load(old / "config.json").model
    checkpoint.save_weights(
        split_qkv(checkpoint.load_weights(path / "model.safetensors"), config), path / "model.safetensors"
    )
    optim = torch.load(path / "optimizer.pt", weights_only=True)
    for name in [n for n in optim["state"] if ".qkv_proj." in n]:
        entry = optim["state"].pop(name)
        pieces = {k: v.split(qkv_sizes(config)) if v.dim() else [v] * 3 for k, v in entry.items()}
        for i, part in enumerate("qkv"):
            optim["state"][name.replace("qkv_proj", f"{part}_proj")] = {k: v[i].clone() for k, v in pieces.items()}
    for group in optim["param_groups"]:
        group["params"] = [
            n.replace("qkv_proj", f"{p}_proj") for n in group["params"] for p in ("qkv" if ".qkv_proj." in n else "-")
        ]
    torch.save(optim, path / "optimizer.pt")
    state = json.loads((path / "state.json").read_text())
    for name in state["files"]:
        state["files"][name] = (path / name).stat().st_size
        state["sha256"][name] = sha256_file(path / name)
    (path / "state.json").write_text(json.dumps(state))

    resumed = train(None, old, progress_bar=False, echo=quiet)
    assert resumed["step"] == 12
    straight, again = losses(run), losses(old)
    assert straight.keys() == again.keys()
    assert all(abs(straight[s] - again[s]) < 1e-5 for s in straight), (straight, again)
    a, b = LM.load(run).model.state_dict(), LM.load(old).model.state_dict()
    assert all(torch.allclose(a[name], b[name], atol=1e-5) for name in a)


def run_files(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): sha256_file(p) for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_run_whose_every_state_json_is_gone_is_refused_not_started_afresh(run):
    """issue 15 item 1; RELIABILITY 6: never a silent fresh start over a run's checkpoints."""
    for path in checkpoint.complete_checkpoints(run):
        (path / "state.json").unlink()
    before = run_files(run)
    with pytest.warns(UserWarning, match="state.json is missing"):
        with pytest.raises(LMForgeError, match="no checkpoint in .* loads into this run's model"):
            train(None, run, overrides={"train.max_steps": 50}, progress_bar=False, echo=quiet)
    assert run_files(run) == before  # checkpoints, metrics.jsonl and config.json as they were


def test_a_missing_newest_state_json_falls_back_with_a_warning(run):
    newest = checkpoint.complete_checkpoints(run)[-1]
    (newest / "state.json").unlink()
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint {newest}: its state.json is missing"):
        resumed = train(None, run, progress_bar=False, echo=quiet)
    assert resumed["step"] == 12


def test_a_config_with_more_layers_than_the_weights_is_refused_on_resume(run):
    """issue 15 item 2: set_model_state_dict(strict=True) alone lets extra layers resume random."""
    config = json.loads((run / "config.json").read_text())
    config["model"]["n_layer"] += 1
    (run / "config.json").write_text(json.dumps(config))
    before = run_files(run)
    with pytest.warns(UserWarning, match=r"lacks 12 of the model's weights \(blocks\.2\."):
        with pytest.raises(LMForgeError, match="loads into this run's model"):
            train(None, run, overrides={"train.max_steps": 16}, progress_bar=False, echo=quiet)
    assert run_files(run) == before


def test_a_second_trainer_on_a_run_dir_is_refused_with_the_first_ones_pid(run, char_data):
    """issue 15 item 6: an OS lock, released by a crash (here a SIGKILL) without any cleanup."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lmforge.files import exclusive\n"
         f"with exclusive({str(run)!r}, 'test'):\n    print('locked', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = run_files(run)
        with pytest.raises(LMForgeError, match=f"in use by another lmforge train \\(pid {holder.pid}\\)"):
            train(None, run, overrides={"train.max_steps": 16}, progress_bar=False, echo=quiet)
        assert run_files(run) == before
    finally:
        holder.kill()
        holder.wait()
    assert train(None, run, overrides={"train.max_steps": 16}, progress_bar=False, echo=quiet)["step"] == 16


@contextlib.contextmanager
def full_disk(directory: Path, monkeypatch):
    """directory on a tmpfs just big enough for what it holds now, so the next checkpoint runs out of space; where
    no tmpfs can be mounted (not root), torch.save fails as it does on a full disk (RuntimeError 'unexpected pos')."""
    used = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    saved = directory.with_name(directory.name + "-saved")
    mounted = os.geteuid() == 0 and shutil.move(directory, saved) and directory.mkdir() is None
    if mounted:
        size = used + 64 * 1024  # the files back in, and less room than one more checkpoint
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)])
        mounted = result.returncode == 0
        if not mounted:
            directory.rmdir()
            shutil.move(saved, directory)
    if not mounted:

        def full(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 1024 vs 960")

        monkeypatch.setattr(checkpoint.torch, "save", full)
        yield "injected"
        monkeypatch.undo()
        return
    try:
        shutil.copytree(saved, directory, dirs_exist_ok=True)
        yield "tmpfs"
    finally:
        kept = directory.with_name(directory.name + "-kept")
        shutil.copytree(directory, kept)
        subprocess.run(["umount", str(directory)], check=True)
        directory.rmdir()
        shutil.rmtree(saved)
        shutil.move(kept, directory)


@pytest.mark.parametrize(
    "fault, causes",
    [(read_only, ("Read-only file system", "Permission denied")), (full_disk, ("No space left", "unexpected pos"))],
    ids=["read-only", "full-disk"],
)
def test_a_save_that_cannot_be_written_keeps_the_previous_checkpoint(run, monkeypatch, fault, causes):
    """docs/reliability.md item 8 (and issue 15 item 4, the full disk): the checkpoint directory is read-only or full
    when a save comes: the run stops with a one-line error (not a traceback from torch.save or safetensors), every
    earlier checkpoint is intact and nothing partial is left; once writable, the run resumes."""
    before = snapshot(run)
    with fault(run / "checkpoints", monkeypatch) as how:
        with pytest.raises(LMForgeError) as caught:
            train(None, run, overrides={"train.max_steps": 16}, progress_bar=False, echo=quiet)
        message = str(caught.value)
        assert "cannot write checkpoint" in message and "step_000016" in message and "\n" not in message, message
        assert how == "injected" or any(cause in message for cause in causes), message
    assert snapshot(run) == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000004", "step_000008", "step_000012"]
    result = train(None, run, overrides={"train.max_steps": 16}, progress_bar=False, echo=quiet)
    assert result["step"] == 16 and checkpoint.complete_checkpoints(run)[-1].name == "step_000016"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.threads": -1}, "train.threads and train.micro_batch_size must not be negative"),
        ({"train.device": "tpu9"}, "train.device takes auto, cpu, cuda, cuda:N or mps, not 'tpu9'"),
        ({"train.batch_tokens": 7}, "train.batch_tokens=7 is less than 1 sequence.* raise it to at least 32"),
    ],
)
def test_bad_training_settings_are_one_line_errors(tmp_path, char_data, overrides, message):
    """issue 15 items 7 and 8: no traceback, and a message whose advice works."""
    with pytest.raises(LMForgeError, match=message):
        train(str(char_data), tmp_path / "run", preset="tiny", overrides=overrides, progress_bar=False, echo=quiet)


@pytest.mark.parametrize(
    "overrides", [{"model.vocab_size": 10**9}, {"model.n_embd": 2**20, "model.n_head": 1}, {"model.n_layer": 500,
                  "model.n_embd": 8192, "model.n_head": 64}], ids=["vocab", "width", "depth"])  # fmt: skip
def test_a_model_too_big_for_the_machine_is_refused_before_any_allocation(tmp_path, char_data, overrides):
    """issue 15 item 7 (RELIABILITY 13): an estimate up front, not an allocation error or the OOM killer."""
    with pytest.raises(LMForgeError, match=r"training this model needs about [\d.]+ GiB .* more than the"):
        train(str(char_data), tmp_path / "run", preset="tiny", overrides=overrides, progress_bar=False, echo=quiet)
    assert not (tmp_path / "run" / "checkpoints").exists()
