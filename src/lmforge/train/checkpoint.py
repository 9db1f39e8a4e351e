"""Checkpoints that survive a crash: written whole or not at all, and checked before they are trusted.

Layout: RUN_DIR/checkpoints/step_000500/{model.safetensors, optimizer.pt, state.json}. A checkpoint is
written into `checkpoints/.tmp-step_000500-PID`, every file fsynced, then renamed into place and the parent
directory fsynced, so a reader sees either the whole checkpoint or none of it. state.json is written last
and names the files with their sizes; a checkpoint whose files do not match is skipped with a warning for
the previous one. The optimizer state is loaded with `weights_only=True`: no pickle code is executed.

model.safetensors always holds the plain GPT, which generation, serving and export read. A fine-tune whose trained
module is more than that (LoRA adapters, a classification head) also writes `training.safetensors`, the trained
module's own state, which resuming reads; its model.safetensors holds the adapters merged in. `init_from` starts a
new run from another run's weights (its newest checkpoint, weights-only or full) with a fresh optimizer.
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
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lmforge.errors import LMForgeError
from lmforge.files import sha256_file
from lmforge.model.gpt import fuse_qkv

CHECKPOINTS = "checkpoints"
TRAINING = "training.safetensors"


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


def _optimizer_list(optimizer) -> list:
    if optimizer is None:
        return []
    return list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _uses_distributed_state(optimizers: list) -> bool:
    """Whether a save or load goes through torch.distributed.checkpoint: under torchrun (DDP, FSDP2's sharded
    parameters) and for optimizer state (keyed by parameter name there). Reading or writing weights alone in one
    process is the module's own state_dict, which is the same thing there, and spares every command that only reads
    weights (generate, eval, serve, export) the second that importing torch.distributed.checkpoint takes."""
    return bool(optimizers) or dist.is_initialized()


def save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file of a full state dict; a tensor shared under two names (tied weights) is stored once."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, tensor in tensors.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = tensor.detach().contiguous()
    save_file(unique, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for name, original in aliases.items():
        tensors[name] = tensors[original]
    return tensors


def save(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer,
    state: dict,
    keep_last: int,
    protect: tuple[int, ...] = (),
    published: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest keep_last complete ones (and `protect`).

    optimizer may be one optimizer, a list of them, or None (an imported or exported model: weights only).
    published: the plain GPT's state when `model` is a training module around it; it becomes model.safetensors and
    model's own state training.safetensors. Under torchrun every rank calls this (FSDP gathers the full state);
    only rank 0 writes.
    """
    optimizers = _optimizer_list(optimizer)
    if _uses_distributed_state(optimizers):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=full)
        optim_state = get_optimizer_state_dict(model, optimizers, options=full) if optimizers else None
    else:
        model_state, optim_state = {name: t.detach().cpu() for name, t in model.state_dict().items()}, None
    files = {"model.safetensors": model_state} if published is None else {"model.safetensors": published}
    if published is not None:
        files[TRAINING] = model_state
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_name(step)
    error = None
    if _is_main():
        try:
            _write(root, final, step, files, optim_state, state)
            prune(root, keep_last, protect)
        # a full disk: torch.save raises RuntimeError ("unexpected pos"), safetensors its own SafetensorError
        except (OSError, RuntimeError, SafetensorError) as exc:
            error = exc
    _barrier()
    if error is not None:
        raise LMForgeError(f"cannot write checkpoint {final}: {error}; earlier checkpoints are untouched") from error
    return final


def _write(root: Path, final: Path, step: int, weights: dict[str, dict], optim_state: dict | None, state: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, tensors in weights.items():
            save_weights(tensors, tmp / name)
        names = list(weights)
        if optim_state is not None:
            torch.save(optim_state, tmp / "optimizer.pt")
            names.append("optimizer.pt")
        files = {name: (tmp / name).stat().st_size for name in names}
        digests = {name: sha256_file(tmp / name) for name in names}
        state = {**state, "step": step, "files": files, "sha256": digests, "rng": rng_state()}
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        for name in (*files, "state.json"):
            _fsync_file(tmp / name)
        if final.exists():  # a checkpoint of this step from an earlier attempt: move it aside, then drop it
            doomed = root / f".tmp-deleting-{final.name}-{os.getpid()}"
            os.replace(final, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint dirs, oldest first; partial `.tmp-*` dirs are never listed.

    A `step_*` dir only ever appears whole (it is renamed into place), so one is listed even when its state.json
    has since gone missing: loading it then fails and says so, and a run whose every state.json was deleted is
    refused rather than silently started afresh over its checkpoints.
    """
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")]
    return sorted(found, key=lambda p: p.name)


def remove_partial(run_dir: Path) -> None:
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def prune(root: Path, keep_last: int, protect: tuple[int, ...] = ()) -> None:
    checkpoints = complete_checkpoints(root.parent)
    keep = {p.name for p in checkpoints[-keep_last:]} | {step_name(step) for step in protect}
    for old in checkpoints:
        if old.name in keep:
            continue
        # Rename first so a crash mid-delete leaves a .tmp dir (cleaned later), never a partial step_ dir.
        doomed = root / f".tmp-deleting-{old.name}"
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def read_state(path: Path) -> dict:
    if not (path / "state.json").is_file():
        raise ValueError("its state.json is missing")
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    for name, size in state["files"].items():
        actual = (path / name).stat().st_size
        if actual != size:
            raise ValueError(f"{name} has {actual} bytes, state.json says {size}")
    for name, digest in state.get("sha256", {}).items():  # catches bit flips that keep the size
        if sha256_file(path / name) != digest:
            raise ValueError(f"{name} does not match its sha256 in state.json")
    return state


def load(path: Path, model: torch.nn.Module, optimizer=None, training: bool | None = None) -> dict:
    """Load a checkpoint into model (and optimizers); raise ValueError/OSError if any part is damaged.

    training: read the trained module's state (training.safetensors) when the checkpoint has one; by default when
    optimizers are given (resuming), else the plain model.safetensors.
    """
    state = read_state(path)
    optimizers = _optimizer_list(optimizer)
    if training is None:
        training = bool(optimizers)
    name = TRAINING if training and TRAINING in state["files"] else "model.safetensors"
    weights = load_weights(path / name)
    if not _uses_distributed_state(optimizers):
        model.load_state_dict(weights, strict=True)
        return state
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # set_model_state_dict(strict=True) does not report weights the file lacks: a model with more layers than the
    # checkpoint would resume with the extra ones random
    missing = missing_weights(model, weights)
    if missing:
        raise ValueError(f"{name} lacks {len(missing)} of the model's weights ({', '.join(missing[:3])}, ...)")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=True))
    if optimizers:
        if "optimizer.pt" not in state["files"]:
            raise ValueError("it holds weights only (no optimizer.pt), so training cannot resume from it")
        optim_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        optim_state = fuse_qkv_optimizer_state(optim_state)  # a checkpoint from before the fused projection
        set_optimizer_state_dict(model, optimizers, optim_state, options=StateDictOptions(full_state_dict=True))
    return state


def missing_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """The model's state names that `weights` does not provide (its q/k/v pieces stand in for a fused qkv_proj)."""

    def provided(name: str) -> bool:
        if name in weights:
            return True
        prefix, fused, leaf = name.rpartition("qkv_proj.")
        return bool(fused) and all(f"{prefix}{part}_proj.{leaf}" in weights for part in "qkv")

    return [name for name in model.state_dict() if not provided(name)]


def fuse_qkv_optimizer_state(optim_state: dict) -> dict:
    """An optimizer state saved before the fused q/k/v projection, under the fused parameter names (in place).

    Per-element state (AdamW's moments, momentum buffers) is stacked like the weights, so training continues
    exactly; per-parameter scalars (the step count, equal for the three) are q's.
    """

    def stack(parts: list[dict]) -> dict:
        return {
            key: torch.cat([p[key] for p in parts]) if isinstance(value, torch.Tensor) and value.dim() else value
            for key, value in parts[0].items()
        }

    names = [name for group in optim_state["param_groups"] for name in group["params"]]
    prefixes = [name[: -len("q_proj.weight")] for name in names if name.endswith(".q_proj.weight")]
    for prefix in prefixes:
        fuse_qkv(optim_state["state"], prefix, stack)
    renamed = {
        f"{prefix}{part}_proj.{leaf}": f"{prefix}qkv_proj.{leaf}"
        for prefix in prefixes
        for part in "qkv"
        for leaf in ("weight", "bias")
    }
    for group in optim_state["param_groups"]:
        group["params"] = list(dict.fromkeys(renamed.get(name, name) for name in group["params"]))
    return optim_state


def load_latest(run_dir: Path, model: torch.nn.Module, optimizer=None, training: bool | None = None) -> dict | None:
    """Load the newest checkpoint that reads cleanly, warning about each damaged one skipped; None if none."""
    for path in reversed(complete_checkpoints(run_dir)):
        try:
            return load(path, model, optimizer, training)
        except Exception as exc:  # a damaged file can fail in safetensors, torch or json in many ways
            warnings.warn(f"skipping damaged checkpoint {path}: {exc}", stacklevel=2)
    return None


def init_from(run_dir: Path, model: torch.nn.Module) -> dict:
    """Start a new run from another run's weights: its newest readable checkpoint's model.safetensors.

    Works on weights-only checkpoints (an import) and full ones alike; no optimizer state is read, so the new run's
    optimizer starts fresh. Returns that checkpoint's state.json.
    """
    state = load_latest(run_dir, model)
    if state is None:
        raise LMForgeError(f"{run_dir} has no usable checkpoint to start from; train or import it first")
    return state
