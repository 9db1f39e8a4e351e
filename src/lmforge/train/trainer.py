"""`lmforge train`: the training loop, visible top to bottom.

`train()` resolves the config (preset, config file, overrides, or the run dir's own config when resuming),
builds the model and optimizer, resumes from the newest complete checkpoint if there is one, and runs:
batch, forward, loss, backward, clip, step, schedule, log, maybe-eval, maybe-save. Batches are a pure
function of (seed, step), RNG states are checkpointed, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmforge import presets
from lmforge.config import RunConfig, apply_overrides, conflicts, flatten
from lmforge.data.loader import DataDir
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import LMForgeError
from lmforge.eval.lm import evaluate
from lmforge.model.gpt import GPT
from lmforge.train import checkpoint
from lmforge.train.log import MetricsLog
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import lr_at, progress

MAX_BAD_STEPS = 5


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LMForgeError(f"train.device={name} but no CUDA device is available; use --train.device cpu")
    return torch.device(name)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resolve_config(
    out: Path, data: str | None, preset: str | None, config_file: str | None, overrides: dict[str, Any]
) -> tuple[RunConfig, bool]:
    """The run's config and whether it continues an existing run dir."""
    requested: dict[str, Any] = {}
    if config_file:
        requested.update(_read_config_file(config_file))
    requested.update(overrides)
    saved_path = out / "config.json"
    if saved_path.is_file():
        saved = RunConfig.load(saved_path)
        if preset and preset != saved.preset:
            raise LMForgeError(
                f"{out} was trained with preset {saved.preset!r}, not {preset!r}; "
                "rerun without --preset to resume it, or choose another --out"
            )
        problems = conflicts(saved, requested)
        if problems:
            raise LMForgeError(
                f"{out} holds a run whose config differs: {'; '.join(problems)}; "
                "drop those flags to resume it, or choose another --out for a new run"
            )
        if data and Path(data).resolve() != Path(saved.data).resolve():
            theirs, ours = Path(data) / "tokenizer.json", out / "tokenizer.json"
            if not theirs.is_file() or file_sha256(theirs) != file_sha256(ours):
                raise LMForgeError(
                    f"--data {data} has a different tokenizer than the run in {out}; "
                    "resume with the run's own data dir or choose another --out"
                )
            requested["data"] = str(Path(data).resolve())
        return apply_overrides(saved, requested), True
    if not data:
        raise LMForgeError("--data is required for a new run; create a data dir with lmforge prepare")
    base = presets.get(preset or "demo")
    config = apply_overrides(RunConfig(), {**base, **requested, "data": str(Path(data).resolve())})
    return config, False


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LMForgeError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise LMForgeError(f"config file {path} must hold a JSON object")
    return flatten(data)


def train(
    data: str | None = None,
    out: str | Path = "runs/run",
    preset: str | None = None,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress_bar: bool = True,
    echo=print,
) -> dict:
    """Train (or resume) the run in `out`; return a summary dict of the finished run."""
    out = Path(out)
    config, resuming = resolve_config(out, data, preset, config_file, dict(overrides or {}))
    data_dir = DataDir(config.data)
    tokenizer = Tokenizer.load(data_dir.tokenizer_path)
    if config.model.vocab_size == 0:
        config = apply_overrides(config, {"model.vocab_size": tokenizer.vocab_size})
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise LMForgeError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}"
        )
    data_dir.check_context(config.model.seq_len)
    tc, oc, mc = config.train, config.optim, config.model
    if not tc.max_steps and not tc.time:
        raise LMForgeError("the run has no end; give --max-steps N or --time 5m")

    device = resolve_device(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    torch.manual_seed(tc.seed)
    model = GPT(mc).to(device)
    optimizer = build_optimizer(model, oc, device.type)

    if not resuming:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir.tokenizer_path, out / "tokenizer.json")
        tmp = out / "config.json.tmp"
        config.save(tmp)
        os.replace(tmp, out / "config.json")
    else:
        config.save(out / "config.json.tmp")
        os.replace(out / "config.json.tmp", out / "config.json")

    checkpoint.remove_partial(out)
    state = checkpoint.load_latest(out, model, optimizer)
    if state is None and checkpoint.complete_checkpoints(out):
        raise LMForgeError(f"every checkpoint in {out / 'checkpoints'} is damaged; remove them to start over")
    step = state["step"] if state else 0
    tokens_seen = state["tokens"] if state else 0
    elapsed_before = state["elapsed"] if state else 0.0
    best_val = state.get("best_val_loss") if state else None
    if state:
        checkpoint.set_rng_state(state["rng"])
    metrics = MetricsLog(out, step if state else 0)

    micro = tc.micro_batch_size or tc.batch_size
    tokens_per_step = tc.batch_size * mc.seq_len
    echo(
        f"model: {model.num_params() / 1e6:.2f}M parameters, {model.flops_per_token() / 1e6:.1f} MFLOPs/token "
        f"(train), {mc.n_layer} layers x {mc.n_embd} wide, {mc.n_head} heads, context {mc.seq_len}, "
        f"vocab {mc.vocab_size}"
    )
    echo(
        f"batch: {tc.batch_size} x {mc.seq_len} = {tokens_per_step:,} tokens/step "
        f"({tc.accumulation} micro-batch(es) of {micro}); {oc.name} lr {oc.lr:g}, {oc.schedule} schedule; "
        f"device {device}" + (f"; resuming at step {step}" if state else "")
    )

    def is_done(step: int, elapsed: float) -> bool:
        return bool((tc.max_steps and step >= tc.max_steps) or (tc.time and elapsed >= tc.time))

    def save() -> Path:
        return checkpoint.save(
            out,
            step,
            model,
            optimizer,
            {"tokens": tokens_seen, "elapsed": elapsed, "best_val_loss": best_val, "config_sha256": config_hash},
            tc.keep_last,
        )

    def run_eval() -> dict:
        limit = tc.eval_batches or None
        result = evaluate(model, data_dir.eval_batches(mc.seq_len, micro, limit), device, autocast)
        return result

    config_hash = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()
    bar_total = tc.max_steps or int(tc.time)
    bar = tqdm(
        total=bar_total,
        initial=step if tc.max_steps else min(int(elapsed_before), bar_total),
        unit="step" if tc.max_steps else "s",
        disable=not progress_bar,
        dynamic_ncols=True,
    )
    model.train()
    started = time.time()
    elapsed = elapsed_before
    window_tokens, window_start = 0, time.time()
    last_loss, val, bad_steps = float("nan"), {}, 0
    last_saved = step if state else None
    try:
        while not is_done(step, elapsed):
            lr = lr_at(oc, step, progress(step, elapsed, tc.max_steps, tc.time))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro_step in range(tc.accumulation):
                x, y = data_dir.train_batch(step, micro_step, micro, mc.seq_len, tc.seed)
                x, y = x.to(device), y.to(device)
                with autocast:
                    _, loss = model(x, y)
                (loss / tc.accumulation).backward()
                loss_sum += loss.item()
            loss_value = loss_sum / tc.accumulation
            if oc.grad_clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip).item()
            if not math.isfinite(loss_value) or (oc.grad_clip and not math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
                metrics.write({"step": step, "skipped": "non-finite loss or gradient"})
                if bad_steps >= MAX_BAD_STEPS:
                    raise LMForgeError(
                        f"loss or gradient was NaN/inf for {bad_steps} steps in a row at step {step}; "
                        f"lower --optim.lr (now {oc.lr:g}); checkpoints are intact"
                    )
                continue
            bad_steps = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            last_loss = loss_value
            elapsed = elapsed_before + time.time() - started

            if step % tc.log_every == 0 or is_done(step, elapsed):
                rate = window_tokens / max(1e-9, time.time() - window_start)
                window_tokens, window_start = 0, time.time()
                record = {"step": step, "loss": round(loss_value, 5), "lr": lr, "tokens": tokens_seen}
                metrics.write({**record, "tokens_per_s": round(rate, 1), "elapsed": round(elapsed, 2)})
                bar.set_postfix_str(f"step {step} loss {loss_value:.4f} {rate:,.0f} tok/s", refresh=False)
            if step % tc.eval_every == 0 or is_done(step, elapsed):
                val = run_eval()
                if val:
                    best_val = val["val_loss"] if best_val is None else min(best_val, val["val_loss"])
                    metrics.write({"step": step, **val, "gap": round(val["val_loss"] - loss_value, 5)})
                    bar.write(f"step {step}: train loss {loss_value:.4f}, val loss {val['val_loss']:.4f}")
                metrics.plot()
            if step % tc.save_every == 0:
                save()
                last_saved = step
            bar.update(1 if tc.max_steps else max(0, min(int(elapsed), bar_total) - bar.n))
    except KeyboardInterrupt:
        bar.close()
        if step != last_saved and step > 0:
            save()
        raise
    bar.close()
    final = save() if step != last_saved else checkpoint.complete_checkpoints(out)[-1]
    plot = metrics.plot()
    run_time = time.time() - started
    return {
        "run_dir": str(out),
        "step": step,
        "tokens": tokens_seen,
        "train_loss": last_loss,
        "val_loss": val.get("val_loss"),
        "best_val_loss": best_val,
        "elapsed": elapsed,
        "tokens_per_s": (tokens_seen - (state["tokens"] if state else 0)) / max(run_time, 1e-9),
        "checkpoint": str(final),
        "plot": str(plot),
        "params": model.num_params(),
    }
