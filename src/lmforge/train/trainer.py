"""`lmforge train`: the training loop, visible top to bottom.

`train()` resolves the config (preset, config file, overrides, or the run dir's own config when resuming),
builds the model and optimizers, resumes from the newest complete checkpoint if there is one, and runs:
batch, forward, loss, backward, clip, step, schedule, log, maybe-eval, maybe-save. Batches are a pure
function of (seed, step), RNG states are checkpointed, so a resumed run repeats an uninterrupted one.

The same function runs under `torchrun`: each process takes its slice of every global batch, DDP or FSDP2
wraps the model from outside (train/dist.py), and only rank 0 writes logs and checkpoints.
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

import numpy as np
import torch
from tqdm import tqdm

from lmforge import presets
from lmforge.config import BatchPlan, RunConfig, apply_overrides, conflicts, flatten
from lmforge.data.loader import DataDir, mask_tokens
from lmforge.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from lmforge.errors import LMForgeError
from lmforge.eval.lm import evaluate, lm_loss
from lmforge.model.gpt import GPT
from lmforge.train import checkpoint, dist
from lmforge.train.log import Loggers, MetricsLog, peak_flops
from lmforge.train.optim import build_optimizers, l1_penalty
from lmforge.train.schedule import lr_at, progress


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resolve_config(
    out: Path,
    data: str | None,
    preset: str | None,
    config_file: str | None,
    overrides: dict[str, Any],
    depth: int | None = None,
) -> tuple[RunConfig, bool]:
    """The run's config and whether it continues an existing run dir.

    Later sources win: the preset (demo when neither a preset nor --depth is given), the sizes --depth derives,
    the config file, then the dotted overrides.
    """
    requested: dict[str, Any] = presets.from_depth(depth) if depth is not None else {}
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
    base = presets.get(preset) if preset else {} if depth is not None else presets.get("demo")
    if depth is not None and not preset:
        base = {"preset": f"depth{depth}"}
    config = apply_overrides(RunConfig(), {**base, **requested, "data": str(Path(data).resolve())})
    return config, False


def config_value(config: RunConfig, dotted: str) -> Any:
    return flatten(config.to_dict())[dotted]


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LMForgeError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise LMForgeError(f"config file {path} must hold a JSON object")
    return flatten(data)


def setup_precision(precision: str, device: torch.device) -> tuple[str, Any, Any]:
    """(resolved precision, autocast context, GradScaler or None)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise LMForgeError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on this device")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if precision == "fp32":
        return precision, contextlib.nullcontext(), None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return precision, torch.autocast(device.type, dtype=dtype), scaler


class Batches:
    """Training and evaluation batches for the run's objective (next token, or masked tokens)."""

    def __init__(self, data: DataDir, tokenizer: Tokenizer, config: RunConfig, plan: BatchPlan):
        self.data, self.config, self.plan = data, config, plan
        self.mlm = config.train.objective == "mlm"
        if self.mlm:
            self.mask_id = tokenizer.hf.token_to_id("<|mask|>")
            if self.mask_id is None:
                raise LMForgeError("train.objective=mlm needs a <|mask|> token; prepare the data with lmforge prepare")
            self.special = [i for t in SPECIAL_TOKENS if (i := tokenizer.hf.token_to_id(t)) is not None]

    def _masked(self, x: torch.Tensor, *key: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed = int(np.random.default_rng([self.config.train.seed, *key]).integers(2**62))
        generator = torch.Generator().manual_seed(seed)
        tc, mc = self.config.train, self.config.model
        return mask_tokens(x, mc.vocab_size, self.mask_id, self.special, tc.mlm_probability, generator)

    def train(self, step: int, part: int) -> tuple[torch.Tensor, torch.Tensor]:
        p, mc = self.plan, self.config.model
        x, y = self.data.train_batch(step, part, p.micro_batch_size, p.batch_size, mc.seq_len, self.config.train.seed)
        return self._masked(x, step, part) if self.mlm else (x, y)

    def eval(self):
        mc, tc = self.config.model, self.config.train
        batches = self.data.eval_batches(mc.seq_len, self.plan.micro_batch_size, tc.eval_batches or None)
        for index, (x, y) in enumerate(batches):
            yield self._masked(x, 2**31, index) if self.mlm else (x, y)  # a key no train step uses


def train(
    data: str | None = None,
    out: str | Path = "runs/run",
    preset: str | None = None,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress_bar: bool = True,
    echo=print,
    depth: int | None = None,
) -> dict:
    """Train (or resume) the run in `out`; return a summary dict of the finished run.

    depth: the one size dial (presets.from_depth); the values it derives are printed at the start.
    """
    out = Path(out)
    config, resuming = resolve_config(out, data, preset, config_file, dict(overrides or {}), depth)
    if depth is not None and int(os.environ.get("RANK", "0")) == 0:
        derived = presets.from_depth(depth)
        echo(f"depth {depth}: " + " ".join(f"{k.split('.')[-1]}={config_value(config, k)}" for k in derived))
    info, device = dist.setup(config.train.device)
    try:
        return _train(out, config, resuming, info, device, progress_bar, echo)
    finally:
        dist.teardown(info)


def _train(out: Path, config: RunConfig, resuming: bool, info: dist.Dist, device, progress_bar: bool, echo) -> dict:
    data_dir = DataDir(config.data)
    tokenizer = Tokenizer.load(data_dir.tokenizer_path)
    if config.model.vocab_size == 0:
        config = apply_overrides(config, {"model.vocab_size": tokenizer.vocab_size})
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise LMForgeError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}"
        )
    tc, oc, mc, es = config.train, config.optim, config.model, config.early_stop
    data_dir.check_context(mc.seq_len)
    if not tc.max_steps and not tc.time:
        raise LMForgeError("the run has no end; give --max-steps N or --time 5m")
    if tc.objective == "mlm" and mc.causal:
        raise LMForgeError("train.objective=mlm trains an encoder; add --model.causal false (or use a bert preset)")
    if oc.name == "muon" and info.enabled and tc.dist == "fsdp":
        raise LMForgeError("optim.name=muon is not supported with --train.dist fsdp; use ddp or adamw")
    plan = BatchPlan.derive(tc, mc.seq_len, info.world_size)
    batches = Batches(data_dir, tokenizer, config, plan)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    precision, autocast, scaler = setup_precision(tc.precision, device)

    torch.manual_seed(tc.seed)
    model = GPT(mc).to(device)
    flops_per_token = model.flops_per_token()
    n_params = model.num_params()
    train_model = dist.wrap(model, tc.dist, info, device)
    optimizers = build_optimizers(model, oc, device.type)
    if tc.compile:
        train_model = torch.compile(train_model)

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resuming:
            shutil.copyfile(data_dir.tokenizer_path, out / "tokenizer.json")
        config.save(out / "config.json.tmp")
        os.replace(out / "config.json.tmp", out / "config.json")
        checkpoint.remove_partial(out)
    dist.barrier(info)

    state = checkpoint.load_latest(out, model, optimizers)
    if state is None and checkpoint.complete_checkpoints(out):
        raise LMForgeError(f"every checkpoint in {out / 'checkpoints'} is damaged; remove them to start over")
    if state and state.get("world_size", 1) != info.world_size:
        raise LMForgeError(
            f"{out} was trained with {state.get('world_size', 1)} process(es), not {info.world_size}; "
            f"resume with torchrun --nproc_per_node {state.get('world_size', 1)}"
        )
    state = state or {}
    step = state.get("step", 0)
    tokens_seen = state.get("tokens", 0)
    elapsed_before = state.get("elapsed", 0.0)
    best_val, best_step = state.get("best_val_loss"), state.get("best_step")
    bad_evals = state.get("bad_evals", 0)
    if state:
        checkpoint.set_rng_state(state["rng"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    metrics = MetricsLog(out, step) if info.is_main else None
    loggers = Loggers(out, tc.log, config.to_dict()) if info.is_main else None
    peak = peak_flops(device) * info.world_size

    tokens_per_step = plan.batch_size * mc.seq_len
    if info.is_main:
        echo(
            f"model: {n_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOPs/token "
            f"(train), {mc.n_layer} layers x {mc.n_embd} wide, {mc.n_head} heads, context {mc.seq_len}, "
            f"vocab {mc.vocab_size}, objective {tc.objective}"
        )
        echo(
            f"batch: {plan.batch_size} x {mc.seq_len} = {tokens_per_step:,} tokens/step over {info.world_size} "
            f"process(es), {plan.accumulation} micro-batch(es) of {plan.micro_batch_size} each; {oc.name} "
            f"lr {oc.lr:g}, {oc.schedule} schedule; {precision} on {device}"
            + (f"; resuming at step {step}" if state else "")
        )

    config_hash = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()

    def is_done(step: int, elapsed: float) -> bool:
        done = bool((tc.max_steps and step >= tc.max_steps) or (tc.time and elapsed >= tc.time))
        return dist.all_agree(done, info, device)  # ranks' clocks differ: stop together

    def save() -> Path:
        run_state = {
            "tokens": tokens_seen,
            "elapsed": elapsed,
            "best_val_loss": best_val,
            "best_step": best_step,
            "bad_evals": bad_evals,
            "data_position": step,
            "world_size": info.world_size,
            "config_sha256": config_hash,
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        protect = (best_step,) if best_step is not None and es.patience else ()
        return checkpoint.save(out, step, model, optimizers, run_state, tc.keep_last, protect)

    def log(record: dict) -> None:
        if info.is_main:
            metrics.write(record)
            loggers.write(record)

    bar_total = tc.max_steps or int(tc.time)
    bar = tqdm(
        total=bar_total,
        initial=step if tc.max_steps else min(int(elapsed_before), bar_total),
        unit="step" if tc.max_steps else "s",
        disable=not progress_bar or not info.is_main,
        dynamic_ncols=True,
    )
    say = bar.write if not bar.disable else (echo if info.is_main else lambda *_: None)
    train_model.train()
    started = time.time()
    elapsed = elapsed_before
    window_tokens, window_start = 0, time.time()
    loss_value, val, bad_steps, stop_reason = float("nan"), {}, 0, "reached max_steps or the time budget"
    last_saved = step if state else None
    try:
        while not is_done(step, elapsed):
            lr = lr_at(oc, step, progress(step, elapsed, tc.max_steps, tc.time))
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            loss_sum = 0.0
            for micro_step in range(plan.accumulation):
                x, y = batches.train(step, micro_step * info.world_size + info.rank)
                x, y = x.to(device), y.to(device)
                last = micro_step == plan.accumulation - 1
                sync = (
                    contextlib.nullcontext() if last or not hasattr(train_model, "no_sync") else train_model.no_sync()
                )
                with sync:
                    with autocast:
                        logits, _ = train_model(x)
                    loss = lm_loss(logits, y, tc.label_smoothing)
                    if oc.l1:
                        loss = loss + oc.l1 * l1_penalty(model)
                    scaled = loss / plan.accumulation
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_sum += loss.item()
            loss_value = dist.all_reduce_mean(loss_sum / plan.accumulation, info, device)
            if scaler is not None:
                for optimizer in optimizers:
                    scaler.unscale_(optimizer)
            grad_norm = clip_gradients(model, oc.grad_clip)
            bad = not math.isfinite(loss_value) or (scaler is None and not math.isfinite(grad_norm))
            if dist.all_agree(bad, info, device):
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.update()
                bad_steps += 1
                log({"step": step, "skipped": "non-finite loss or gradient", "bad_steps": bad_steps})
                if bad_steps >= tc.max_bad_steps:
                    raise LMForgeError(
                        f"loss or gradient was NaN/inf for {bad_steps} steps in a row at step {step}; "
                        f"lower --optim.lr (now {oc.lr:g}); checkpoints are intact"
                    )
                continue
            bad_steps = 0
            for optimizer in optimizers:
                if scaler is not None:
                    scaler.step(optimizer)
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            elapsed = elapsed_before + time.time() - started
            finished = is_done(step, elapsed)

            if step % tc.log_every == 0 or finished:
                rate = window_tokens / max(1e-9, time.time() - window_start)
                window_tokens, window_start = 0, time.time()
                mfu = rate * flops_per_token / peak if peak else 0.0
                log(
                    {"step": step, "loss": round(loss_value, 7), "lr": lr, "grad_norm": round(grad_norm, 4),
                     "tokens": tokens_seen, "tokens_per_s": round(rate, 1), "mfu": round(mfu, 4),
                     "elapsed": round(elapsed, 2)}
                )  # fmt: skip
                bar.set_postfix_str(f"step {step} loss {loss_value:.4f} {rate:,.0f} tok/s MFU {mfu:.1%}", refresh=False)
            if step % tc.eval_every == 0 or finished:
                val = evaluate(model, batches.eval(), device, autocast)
                if val:
                    improved = best_val is None or val["val_loss"] < best_val - es.min_delta
                    if improved:
                        best_val, best_step, bad_evals = val["val_loss"], step, 0
                    else:
                        bad_evals += 1
                    log({"step": step, **val, "gap": round(val["val_loss"] - loss_value, 5), "best_val_loss": best_val})
                    say(f"step {step}: train loss {loss_value:.4f}, val loss {val['val_loss']:.4f}")
                    if es.patience and improved and step % tc.save_every:
                        save()  # keep the best weights on disk
                        last_saved = step
                    if es.patience and bad_evals >= es.patience:
                        stop_reason = (
                            f"early stopping: val loss did not improve by more than {es.min_delta:g} in "
                            f"{bad_evals} evaluations; best {best_val:.4f} at step {best_step}"
                        )
                        say(stop_reason)
                        break
                if info.is_main:
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
    final = save() if step != last_saved else out / checkpoint.CHECKPOINTS / checkpoint.step_name(step)
    plot = metrics.plot() if info.is_main else None
    if loggers is not None:
        loggers.close()
    run_time = time.time() - started
    return {
        "run_dir": str(out),
        "step": step,
        "tokens": tokens_seen,
        "train_loss": loss_value,
        "val_loss": val.get("val_loss"),
        "best_val_loss": best_val,
        "best_step": best_step,
        "stop_reason": stop_reason,
        "elapsed": elapsed,
        "tokens_per_s": (tokens_seen - state.get("tokens", 0)) / max(run_time, 1e-9),
        "checkpoint": str(final),
        "plot": str(plot),
        "params": n_params,
        "rank": info.rank,
    }


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to max_norm (if set) and return the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)
