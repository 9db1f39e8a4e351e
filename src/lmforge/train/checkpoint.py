"""Checkpoints that survive a crash: written whole or not at all, and checked before they are trusted.

Layout: RUN_DIR/checkpoints/step_000500/{model.safetensors, optimizer.pt, state.json}. A checkpoint is
written into `checkpoints/.tmp-step_000500-PID`, every file fsynced, then renamed into place and the parent
directory fsynced, so a reader sees either the whole checkpoint or none of it. state.json is written last
and names the files with their sizes; a checkpoint whose files do not match is skipped with a warning for
the previous one. The optimizer state is loaded with `weights_only=True`: no pickle code is executed.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from lmforge.errors import LMForgeError

CHECKPOINTS = "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _numpy_state() -> dict:
    _, key, *rest = np.random.get_state(legacy=True)
    return {"key": key.tolist(), "rest": [int(rest[0]), int(rest[1]), float(rest[2])]}


def rng_state() -> dict:
    state = {
        "python": base64.b64encode(json.dumps(random.getstate()).encode()).decode(),
        "numpy": _numpy_state(),
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    python_state = json.loads(base64.b64decode(state["python"]))
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    numpy_state = state["numpy"]
    np.random.set_state(
        ("MT19937", np.array(numpy_state["key"], dtype=np.uint32), *numpy_state["rest"])  # type: ignore[arg-type]
    )
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer, state: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest keep_last complete ones.

    optimizer may be None (an imported or exported model): the checkpoint then holds the weights only.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        names = ["model.safetensors"]
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            names.append("optimizer.pt")
        files = {name: (tmp / name).stat().st_size for name in names}
        state = {**state, "step": step, "files": files, "rng": rng_state()}
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        for name in (*files, "state.json"):
            _fsync_file(tmp / name)
        if final.exists():  # a checkpoint of this step from an earlier attempt: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LMForgeError(f"cannot write checkpoint {final}: {exc}; earlier checkpoints are untouched") from exc
    prune(root, keep_last)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint dirs whose state.json exists, oldest first; partial `.tmp-*` dirs are never listed."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def remove_partial(run_dir: Path) -> None:
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def prune(root: Path, keep_last: int) -> None:
    checkpoints = complete_checkpoints(root.parent)
    for old in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        # Rename first so a crash mid-delete leaves a .tmp dir (cleaned later), never a partial step_ dir.
        doomed = root / f".tmp-deleting-{old.name}"
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def read_state(path: Path) -> dict:
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    for name, size in state["files"].items():
        actual = (path / name).stat().st_size
        if actual != size:
            raise ValueError(f"{name} has {actual} bytes, state.json says {size}")
    return state


def load(path: Path, model: torch.nn.Module, optimizer=None) -> dict:
    """Load a checkpoint into model (and optimizer); raise ValueError/OSError if any part is damaged."""
    state = read_state(path)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True)
    if optimizer is not None:
        if "optimizer.pt" not in state["files"]:
            raise ValueError("it holds weights only (no optimizer.pt), so training cannot resume from it")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    return state


def load_latest(run_dir: Path, model: torch.nn.Module, optimizer=None) -> dict | None:
    """Load the newest checkpoint that reads cleanly, warning about each damaged one skipped; None if none."""
    for path in reversed(complete_checkpoints(run_dir)):
        try:
            return load(path, model, optimizer)
        except Exception as exc:  # a damaged file can fail in safetensors, torch or json in many ways
            warnings.warn(f"skipping damaged checkpoint {path}: {exc}", stacklevel=2)
    return None
