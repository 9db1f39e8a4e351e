"""`lmforge train` and `lmforge finetune`: the training loop, visible top to bottom.

`train()` resolves the config (preset, config file, overrides, or the run dir's own config when resuming),
builds the model and optimizers, resumes from the newest complete checkpoint if there is one, and runs:
batch, forward, loss, backward, clip, step, schedule, log, maybe-eval, maybe-save. Batches are a pure
function of (seed, batch number), and the batch number, RNG states and the spike guard's recent losses are
checkpointed, so a resumed run repeats an uninterrupted one. A batch whose loss or gradient is NaN/inf, or whose
loss spikes (train.spike_factor), is skipped: no update, and the next batch is drawn for the same step.

`finetune()` makes a new run from a base run (its model config and newest weights, loaded into a fresh optimizer)
and runs the same loop with another objective (train/objectives.py: sft, classify) and, with `lora.rank`, LoRA
adapters as the only trained weights. Its run dir is an ordinary one; rerunning the command resumes it.

The same function runs under `torchrun`: each process takes its slice of every global batch, DDP or FSDP2
wraps the model from outside (train/dist.py), and only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmforge import hardware, presets
from lmforge.config import BatchPlan, RunConfig, apply_overrides, conflicts, convert, flatten, parse_duration
from lmforge.data.loader import DataDir
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import LMForgeError
from lmforge.files import exclusive, sha256_file, write_text_atomic
from lmforge.model.gpt import GPT
from lmforge.model.lora import has_lora, merged_state_dict
from lmforge.train import checkpoint, dist, objectives
from lmforge.train.log import Loggers, MetricsLog
from lmforge.train.optim import build_optimizers, l1_penalty
from lmforge.train.schedule import lr_at, progress


def resolve_config(
    out: Path,
    data: str | None,
    preset: str | None,
    config_file: str | None,
    overrides: dict[str, Any],
    depth: int | None = None,
) -> tuple[RunConfig, bool]:
    """The run's config and whether it continues an existing run dir.

    Later sources win: the preset, the sizes --depth derives, the config file, then the dotted overrides. With
    neither a preset nor --depth, a new run with a time budget (and no step count) gets the preset `budget`, which
    `size_for_budget` fills in for the device; any other gets `demo`.
    """
    requested = requested_overrides(config_file, overrides, depth)
    saved_path = out / "config.json"
    if saved_path.is_file():
        saved = RunConfig.load(saved_path)
        if preset and preset != saved.preset:
            raise LMForgeError(
                f"{out} was trained with preset {saved.preset!r}, not {preset!r}; "
                "rerun without --preset to resume it, or choose another --out"
            )
        check_resumable(out, saved, requested)
        if data and Path(data).resolve() != Path(saved.data).resolve():
            theirs, ours = Path(data) / "tokenizer.json", out / "tokenizer.json"
            if not theirs.is_file() or sha256_file(theirs) != sha256_file(ours):
                raise LMForgeError(
                    f"--data {data} has a different tokenizer than the run in {out}; "
                    "resume with the run's own data dir or choose another --out"
                )
            requested["data"] = str(Path(data).resolve())
        return resumed(saved, requested), True
    if not data:
        raise LMForgeError("--data is required for a new run; create a data dir with lmforge prepare")
    if preset:
        base = presets.get(preset)
    elif depth is not None:
        base = {"preset": f"depth{depth}"}
    elif parse_duration(requested.get("train.time") or 0) > 0 and not requested.get("train.max_steps"):
        base = {"preset": presets.BUDGET}
    else:
        base = presets.get("demo")
    config = apply_overrides(RunConfig(), {**base, **requested, "data": str(Path(data).resolve())})
    return config, False


def check_resumable(out: Path, saved: RunConfig, requested: dict[str, Any]) -> None:
    problems = conflicts(saved, requested)
    if problems:
        raise LMForgeError(
            f"{out} holds a run whose config differs: {'; '.join(problems)}; "
            "drop those flags to resume it, or choose another --out for a new run"
        )


def resumed(saved: RunConfig, requested: dict[str, Any]) -> RunConfig:
    """The saved config with the requested changes a resume may make; asking for precision auto again keeps the
    precision auto chose when the run began (resolve_precision)."""
    if requested.get("train.precision") == "auto":
        requested = {k: v for k, v in requested.items() if k != "train.precision"}
    return apply_overrides(saved, requested)


def requested_overrides(config_file: str | None, overrides: dict[str, Any], depth: int | None) -> dict[str, Any]:
    """What the command asked for, the preset aside: --depth's sizes, then the config file, then the flags."""
    requested: dict[str, Any] = presets.from_depth(depth) if depth is not None else {}
    if config_file:
        requested.update(_read_config_file(config_file))
    requested.update(overrides)
    return requested


def resolve_precision(config: RunConfig, device, resuming: bool) -> RunConfig:
    """A new run's precision auto, made what the hardware probe chose here at the run's thread count: config.json
    records it, so a resume trains in the same precision even where a probe taken then (say, under load) would
    choose otherwise. Sets the run's thread count (the probe is per thread count)."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if resuming or config.train.precision != "auto":
        return config
    return apply_overrides(config, {"train.precision": hardware.auto_precision(device)})


def size_for_budget(config: RunConfig, requested: dict[str, Any], device, world_size: int, echo) -> RunConfig:
    """A new `budget` run's model and recipe, chosen by presets.for_time_budget for this device's measured speed
    (the flags given beside --time win), and said in words."""
    tc = config.train
    precision = tc.precision  # resolved by resolve_precision
    peak = hardware.speed(device).peak(precision) * world_size
    if not peak > 0:
        raise LMForgeError(f"the speed of {device} is unknown, so --time cannot size the run; give --preset or --depth")
    vocab_size = config.model.vocab_size or Tokenizer.load(tokenizer_source(config)).vocab_size
    rule, reasons = presets.for_time_budget(
        tc.time,
        peak,
        device.type,
        vocab_size,
        memory_bytes=hardware.memory_bytes(device),
        precision=precision,
        muon=not (world_size > 1 and tc.dist == "fsdp"),  # Muon is refused under FSDP
    )
    chosen = {**rule, **requested}
    if "model.n_embd" in requested and "model.n_head" not in requested:  # a width alone: heads that divide it
        width = convert("model.n_embd", int, chosen["model.n_embd"])
        chosen["model.n_head"] = max(h for h in range(1, max(1, width // presets.HEAD_SIZE) + 1) if width % h == 0)
    given = sorted(k for k in rule if k in requested)
    if int(os.environ.get("RANK", "0")) == 0:
        for line in reasons:
            echo(f"time budget: {line}")
        if given:
            echo(f"time budget: given on the command line, and kept: {', '.join(given)}")
    return apply_overrides(config, chosen)


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


@contextlib.contextmanager
def torch_settings_restored():
    """A run sets torch's thread count and deterministic mode for itself; the calling process gets its own back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def locked(out: Path, info: dist.Dist, what: str):
    """The run dir's lock, held by the main process for the whole run: a second trainer on it is refused."""
    return exclusive(out, what) if info.is_main else contextlib.nullcontext()


def setup_precision(precision: str, device: torch.device) -> tuple[str, Any, Any]:
    """(resolved precision, autocast context, GradScaler or None)."""
    if precision == "auto":
        precision = hardware.auto_precision(device)
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
        with torch_settings_restored():
            config = resolve_precision(config, device, resuming)
            if config.preset == presets.BUDGET and not resuming:
                requested = requested_overrides(config_file, dict(overrides or {}), depth)
                config = size_for_budget(config, requested, device, info.world_size, echo)
            with locked(out, info, "lmforge train"):
                return _train(out, config, resuming, info, device, progress_bar, echo)
    finally:
        dist.teardown(info)


# A new fine-tune's starting point for what its base run's config does not decide: a short run at a lower
# learning rate, evaluated on the whole val set. Flags and --config override these.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "optim.lr": 1e-4,
    "optim.warmup_steps": 20,
    "optim.weight_decay": 0.0,
    "train.batch_size": 16,
    "train.eval_every": 100,
    "train.eval_batches": 0,
    "train.save_every": 200,
}
# The model fields a fine-tune may change: the rest must match the base weights.
FINETUNE_MODEL_CHANGES = {"model.dropout"}


def finetune(
    base: str | Path | None,
    data: str | Path | None,
    out: str | Path,
    task: str | None = None,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress_bar: bool = True,
    echo=print,
) -> dict:
    """Fine-tune the base run's newest weights on the records in data into the run dir out; or resume out.

    task: sft (default for a new run; prompt/response, chat, translation, summarization, qa records) or classify.
    overrides: dotted config fields, e.g. {"lora.rank": 8, "train.max_steps": 300, "finetune.format": "qa"}.
    Rerunning with the same arguments continues from out's newest checkpoint; base and data may then be None.
    Returns the summary dict of the finished run, as train() does.
    """
    out = Path(out)
    config, resuming = resolve_finetune_config(base, data, out, task, config_file, dict(overrides or {}))
    info, device = dist.setup(config.train.device)
    try:
        with torch_settings_restored(), locked(out, info, "lmforge finetune"):
            config = resolve_precision(config, device, resuming)
            return _train(out, config, resuming, info, device, progress_bar, echo)
    finally:
        dist.teardown(info)


def resolve_finetune_config(
    base: str | Path | None,
    data: str | Path | None,
    out: Path,
    task: str | None,
    config_file: str | None,
    overrides: dict[str, Any],
) -> tuple[RunConfig, bool]:
    """The fine-tune's config and whether it continues out; refuses a resume whose base, data or config differ."""
    requested: dict[str, Any] = _read_config_file(config_file) if config_file else {}
    requested.update(overrides)
    if task is not None:
        requested["train.objective"] = task
    for name in ("finetune.base", "finetune.data", "finetune.data_sha256"):
        if name in requested:
            raise LMForgeError(f"{name} is set by lmforge finetune from its arguments; do not pass it")
    if requested.get("finetune.val_data"):
        if not Path(requested["finetune.val_data"]).is_file():
            raise LMForgeError(f"finetune.val_data {requested['finetune.val_data']} is not a file")
        requested["finetune.val_data"] = str(Path(requested["finetune.val_data"]).resolve())
    if data is not None and not Path(data).is_file():
        raise LMForgeError(f"--data {data} is not a file; give a JSONL file of records")
    if (out / "config.json").is_file():
        saved = RunConfig.load(out / "config.json")
        if not saved.finetune.base:
            raise LMForgeError(f"{out} holds a pretraining run, not a fine-tune; choose another --out")
        if base is not None and Path(base).resolve() != Path(saved.finetune.base).resolve():
            theirs = Path(base) / "tokenizer.json"
            if not theirs.is_file() or sha256_file(theirs) != sha256_file(out / "tokenizer.json"):
                raise LMForgeError(
                    f"{out} fine-tunes {saved.finetune.base}, not {base}; rerun with that base or choose another --out"
                )
        if data is not None and sha256_file(Path(data)) != saved.finetune.data_sha256:
            raise LMForgeError(
                f"{data} is not the data {out} was fine-tuned on ({saved.finetune.data}); "
                "resume with that file or choose another --out"
            )
        check_resumable(out, saved, requested)
        return resumed(saved, requested), True
    if base is None or data is None:
        raise LMForgeError("a new fine-tune needs a base run dir and --data FILE.jsonl")
    base = Path(base)
    if not (base / "config.json").is_file() or not (base / "tokenizer.json").is_file():
        raise LMForgeError(f"{base} is not a run dir (no config.json and tokenizer.json); train or import one first")
    if not checkpoint.complete_checkpoints(base):
        raise LMForgeError(f"{base} has no checkpoint to start from; train it first")
    base_config = RunConfig.load(base / "config.json")
    fixed = sorted(n for n in requested if n.startswith("model.") and n not in FINETUNE_MODEL_CHANGES)
    if fixed:
        raise LMForgeError(
            f"{', '.join(fixed)} cannot change in a fine-tune: the model must match the base weights "
            f"(only {', '.join(sorted(FINETUNE_MODEL_CHANGES))} may)"
        )
    values = {
        **{f"model.{k}": v for k, v in base_config.to_dict()["model"].items()},
        **FINETUNE_DEFAULTS,
        "train.objective": "sft",
        **requested,
        "preset": base_config.preset,
        "finetune.base": str(base.resolve()),
        "finetune.data": str(Path(data).resolve()),
        "finetune.data_sha256": sha256_file(Path(data)),
    }
    config = apply_overrides(RunConfig(), values)
    if config.train.objective not in ("sft", "classify"):
        raise LMForgeError(f"lmforge finetune trains sft or classify, not {config.train.objective!r}")
    return config, False


def check_memory(config: RunConfig, plan: BatchPlan, precision: str, device, world_size: int) -> None:
    """Refuse, before allocating anything, a model whose training needs more memory than the device has (the
    estimate `lmforge info` prints: weights, gradients, AdamW state and a micro-batch's activations); a process
    that tries would be killed by the kernel or fail in an allocation minutes later."""
    from lmforge.info import gib, model_info

    available = hardware.memory_bytes(device)
    if not available:
        return
    estimate = model_info(config.model, plan.micro_batch_size, dtype="fp32" if precision == "fp32" else "bf16")
    needed = estimate.train_bytes
    if world_size > 1 and config.train.dist == "fsdp":  # weights, gradients and optimizer state are sharded
        needed -= estimate.train_state_bytes - estimate.train_state_bytes // world_size
    if needed > available:
        raise LMForgeError(
            f"training this model needs about {gib(needed)} ({estimate.params / 1e6:,.0f}M parameters at a "
            f"micro-batch of {plan.micro_batch_size}), more than the {gib(available)} of {device}; make it smaller "
            "(model.n_layer, model.n_embd, model.vocab_size) or lower train.micro_batch_size"
        )


def tokenizer_source(config: RunConfig) -> Path:
    """Where a new run's tokenizer comes from: its base run (a fine-tune) or its data dir."""
    if config.finetune.base:
        return Path(config.finetune.base) / "tokenizer.json"
    return DataDir(config.data).tokenizer_path


def _train(out: Path, config: RunConfig, resuming: bool, info: dist.Dist, device, progress_bar: bool, echo) -> dict:
    tc, ft = config.train, config.finetune
    if tc.objective in ("sft", "classify") and not ft.base:
        raise LMForgeError(
            f"train.objective={tc.objective} fine-tunes a trained model; "
            "use lmforge finetune BASE_RUN --data FILE.jsonl --out NEW_RUN"
        )
    if config.lora.rank and not ft.base:
        raise LMForgeError("lora.rank adapts a trained model; use lmforge finetune BASE_RUN --lora.rank N")
    source = out / "tokenizer.json" if resuming and (out / "tokenizer.json").is_file() else tokenizer_source(config)
    tokenizer = Tokenizer.load(source)
    if config.model.vocab_size == 0:
        config = apply_overrides(config, {"model.vocab_size": tokenizer.vocab_size})
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise LMForgeError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}"
        )
    tc, oc, mc, es = config.train, config.optim, config.model, config.early_stop
    if not tc.max_steps and not tc.time:
        raise LMForgeError("the run has no end; give --max-steps N or --time 5m")
    if oc.name == "muon" and info.enabled and tc.dist == "fsdp":
        raise LMForgeError("optim.name=muon is not supported with --train.dist fsdp; use ddp or adamw")
    if ft.base and info.enabled and tc.dist == "fsdp":
        raise LMForgeError("fine-tuning runs under torchrun with --train.dist ddp, not fsdp")
    plan = BatchPlan.derive(tc, mc.seq_len, info.world_size)
    objective = objectives.build(config, tokenizer, plan)  # reads and checks the data before anything is written
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    precision, autocast, scaler = setup_precision(tc.precision, device)
    peak = hardware.speed(device).peak(precision) * info.world_size  # MFU's: of the precision in use

    check_memory(config, plan, precision, device, info.world_size)
    torch.manual_seed(tc.seed)
    model = GPT(mc).to(device)
    base_state = None
    if ft.base and not checkpoint.complete_checkpoints(out):  # a new fine-tune: the base's weights, fresh optimizer
        base_state = checkpoint.init_from(Path(ft.base), model)
    module = objectives.task_module(config, model, objective.n_classes).to(device)  # LoRA-adapted, under a head
    flops_per_token = model.flops_per_token()
    n_params = model.num_params()
    n_trained = sum(p.numel() for p in module.parameters() if p.requires_grad)  # parameters() yields tied ones once
    train_model = dist.wrap(module, tc.dist, info, device)
    ns_dtype = torch.bfloat16 if precision != "fp32" else torch.float32  # Muon's Newton-Schulz: as the matmuls
    optimizers = build_optimizers(module, oc, device.type, ns_dtype)
    if tc.compile:
        train_model = torch.compile(train_model)
    plain = module is model and not has_lora(model)  # else model.safetensors gets the plain, merged weights

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resuming:
            shutil.copyfile(source, out / "tokenizer.json")
            # A tokenizer without <|endoftext|> names its end-of-sequence token in tokenizer_config.json.
            tokenizer_config = Path(source).parent / "tokenizer_config.json"
            if tokenizer_config.is_file() and not (out / "tokenizer_config.json").exists():
                shutil.copyfile(tokenizer_config, out / "tokenizer_config.json")
        for name, text in objective.files.items():
            write_text_atomic(out / name, text)
        checkpoint.remove_partial(out)
    dist.barrier(info)

    state = checkpoint.load_latest(out, module, optimizers)
    if state is None and checkpoint.complete_checkpoints(out):
        raise LMForgeError(
            f"no checkpoint in {out / 'checkpoints'} loads into this run's model (the warnings above say why); "
            "nothing was changed: restore the damaged files or the run's config, or choose another --out"
        )
    if state and state.get("world_size", 1) != info.world_size:
        raise LMForgeError(
            f"{out} was trained with {state.get('world_size', 1)} process(es), not {info.world_size}; "
            f"resume with torchrun --nproc_per_node {state.get('world_size', 1)}"
        )
    if info.is_main:  # only once the checkpoints fit it: a refused resume leaves the run's config.json as it was
        config.save(out / "config.json")
    state = state or {}
    step = state.get("step", 0)  # optimizer steps taken
    position = state.get("data_position", step)  # batches drawn: step plus the batches skipped
    tokens_seen = state.get("tokens", 0)
    elapsed_before = state.get("elapsed", 0.0)
    early = EarlyStopping(es.patience, es.min_delta, state.get("best_val_loss"), state.get("best_step"),
                          state.get("bad_evals", 0))  # fmt: skip
    skipped = state.get("skipped_batches", 0)
    recent_losses = collections.deque(state.get("recent_losses", []), maxlen=tc.spike_window)  # the spike guard's
    loss_value, val = state.get("train_loss", float("nan")), state.get("val", {})
    if state:
        checkpoint.set_rng_state(state["rng"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    metrics = MetricsLog(out, step) if info.is_main else None
    loggers = Loggers(out, tc.log, config.to_dict()) if info.is_main else None

    tokens_per_step = plan.batch_size * mc.seq_len  # for records, counted from each step's batches
    if info.is_main:
        echo(
            f"model: {n_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOPs/token "
            f"(train), {mc.n_layer} layers x {mc.n_embd} wide, {mc.n_head} heads, context {mc.seq_len}, "
            f"vocab {mc.vocab_size}, objective {tc.objective}"
        )
        if ft.base:
            adapters = f"LoRA rank {config.lora.rank} on {config.lora.targets}; " if config.lora.rank else ""
            start = f"; starting from {ft.base} step {base_state['step']}" if base_state else ""
            total = sum(p.numel() for p in module.parameters())
            echo(f"fine-tuning: {adapters}{n_trained:,} of {total:,} parameters trained{start}")
        for note in objective.notes:
            echo(note)
        shape = f"{mc.seq_len} = {tokens_per_step:,} tokens/step" if not ft.base else f"up to {mc.seq_len} tokens"
        echo(
            f"batch: {plan.batch_size} x {shape} over {info.world_size} "
            f"process(es), {plan.accumulation} micro-batch(es) of {plan.micro_batch_size} each; {oc.name} "
            f"lr {oc.lr:g}, {oc.schedule} schedule; {precision} on {device}"
            + (f"; resuming at step {step}" if state else "")
        )

    config_hash = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()

    def is_done(step: int, elapsed: float) -> bool:
        nonlocal interrupted, eval_due
        done = bool((tc.max_steps and step >= tc.max_steps) or (tc.time and elapsed >= tc.time))
        due = step % tc.eval_every == 0 if not tc.eval_interval else elapsed >= next_eval
        # ranks' clocks differ, and a Ctrl-C may reach one rank first: stop (and evaluate) together
        done, interrupted, eval_due = dist.all_agree_each([done, ctrl_c.pressed, due], info, device)
        return done or interrupted

    def is_spike(loss: float) -> bool:
        """Whether loss is above spike_factor x the median of the last spike_window steps' losses."""
        full = len(recent_losses) == tc.spike_window
        return bool(tc.spike_factor and full and loss > tc.spike_factor * statistics.median(recent_losses))

    def save() -> Path:
        run_state = {
            "tokens": tokens_seen,
            "elapsed": elapsed,
            "best_val_loss": early.best_val,
            "best_step": early.best_step,
            "bad_evals": early.bad_evals,
            "data_position": position,
            "skipped_batches": skipped,
            "recent_losses": list(recent_losses),
            "train_loss": loss_value,
            "val": val,
            "world_size": info.world_size,
            "config_sha256": config_hash,
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        protect = (early.best_step,) if early.best_step is not None and es.patience else ()
        published = None if plain else merged_state_dict(model)
        return checkpoint.save(out, step, module, optimizers, run_state, tc.keep_last, protect, published)

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
    clock = TrainingClock(elapsed_before)
    elapsed = elapsed_before
    next_eval = (math.floor(elapsed / tc.eval_interval) + 1) * tc.eval_interval if tc.eval_interval else 0.0
    eval_due = False
    window_tokens, window_start = 0, elapsed
    bad_steps, stop_reason = 0, "reached max_steps or the time budget"
    last_saved = step if state else None
    interrupted, ctrl_c = False, CtrlC()
    try:
        finished = is_done(step, elapsed)
        if early.stopped:  # a run that stopped early, resumed with the same patience
            finished = True
            stop_reason = f"early stopping: best val loss {early.best_val:.4f} at step {early.best_step}"
        while not finished:  # one all-reduce per step decides it for every rank
            lr = lr_at(oc, step, progress(step, elapsed, tc.max_steps, tc.time))
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            loss_sum, step_tokens = 0.0, 0
            for micro_step in range(plan.accumulation):
                batch = objective.train_batch(position, micro_step * info.world_size + info.rank).to(device)
                last = micro_step == plan.accumulation - 1
                sync = (
                    contextlib.nullcontext() if last or not hasattr(train_model, "no_sync") else train_model.no_sync()
                )
                with sync:
                    with autocast:
                        output = train_model(*batch.inputs)
                    loss = objective.loss(output, batch.targets)
                    if oc.l1:
                        loss = loss + oc.l1 * l1_penalty(module)
                    scaled = loss / plan.accumulation
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_sum = loss_sum + loss.detach().float()  # on the device: no host sync per micro-step
                step_tokens += batch.tokens
            loss_value = dist.all_reduce_mean(float(loss_sum) / plan.accumulation, info, device)
            tokens_per_step = round(dist.all_reduce_mean(step_tokens, info, device) * info.world_size)
            if scaler is not None:
                for optimizer in optimizers:
                    scaler.unscale_(optimizer)
            grad_norm = clip_gradients(module, oc.grad_clip)
            bad = not math.isfinite(loss_value) or (scaler is None and not math.isfinite(grad_norm))
            spike = not bad and is_spike(loss_value)
            if dist.all_agree(bad or spike, info, device):  # skip the batch: no update, the next batch
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.update()
                position, bad_steps, skipped = position + 1, bad_steps + 1, skipped + 1
                reason = "loss spike" if spike else "non-finite loss or gradient"
                # logged as the step it was drawn for: a resume from the checkpoint before drops it and redoes it
                log({"step": step + 1, "skipped": reason, "batch": position - 1, "batch_loss": round(loss_value, 7),
                     "bad_steps": bad_steps, "skipped_batches": skipped})  # fmt: skip
                if bad_steps >= tc.max_bad_steps:
                    cause = (
                        f"the loss was over {tc.spike_factor:g}x the median loss of the last {tc.spike_window} steps"
                        if spike
                        else "loss or gradient was NaN/inf"
                    )
                    raise LMForgeError(
                        f"{cause} for {bad_steps} batches in a row at step {step}; lower --optim.lr "
                        f"(now {oc.lr:g}){' or raise --train.spike_factor' if spike else ''}; checkpoints are intact"
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
            step, position = step + 1, position + 1
            recent_losses.append(loss_value)
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            elapsed = clock.now()
            finished = is_done(step, elapsed)

            if step % tc.log_every == 0 or finished:
                rate = window_tokens / max(1e-9, elapsed - window_start)
                window_tokens, window_start = 0, elapsed
                mfu = rate * flops_per_token / peak if peak else 0.0
                epochs = position * plan.batch_size / max(objective.epoch_size, 1)  # passes over the data, if any
                epoch = {"epoch": round(epochs, 4)} if objective.epoch_size else {}
                log(
                    {"step": step, "loss": round(loss_value, 7), "lr": lr, "grad_norm": round(grad_norm, 4),
                     "tokens": tokens_seen, "tokens_per_s": round(rate, 1), "mfu": round(mfu, 4),
                     "elapsed": round(elapsed, 2), **epoch}
                )  # fmt: skip
                bar.set_postfix_str(f"step {step} loss {loss_value:.4f} {rate:,.0f} tok/s MFU {mfu:.1%}", refresh=False)
            if eval_due or (finished and not interrupted):
                with clock.pause():  # evaluating is not training: it takes nothing from the budget
                    val = objective.evaluate(module, device, autocast)
                if tc.eval_interval:
                    next_eval = (math.floor(elapsed / tc.eval_interval) + 1) * tc.eval_interval
                if val:
                    improved = early.update(val["val_loss"], step)
                    log({"step": step, **val, "gap": round(val["val_loss"] - loss_value, 5),
                         "best_val_loss": early.best_val, "elapsed": round(elapsed, 2)})  # fmt: skip
                    accuracy = f", val accuracy {val['val_accuracy']:.3f}" if "val_accuracy" in val else ""
                    say(f"step {step}: train loss {loss_value:.4f}, val loss {val['val_loss']:.4f}{accuracy}")
                    if es.patience and improved and step % tc.save_every:
                        with clock.pause():
                            save()  # keep the best weights on disk
                        last_saved = step
                    if early.stopped:
                        stop_reason = (
                            f"early stopping: val loss did not improve by more than {es.min_delta:g} in "
                            f"{early.bad_evals} evaluations; best {early.best_val:.4f} at step {early.best_step}"
                        )
                        say(stop_reason)
                        break
                if info.is_main:
                    with clock.pause():
                        metrics.plot_now_and_then()
            if step % tc.save_every == 0:
                with clock.pause():
                    save()
                last_saved = step
            bar.update(1 if tc.max_steps else max(0, min(int(elapsed), bar_total) - bar.n))
    except KeyboardInterrupt:  # a second Ctrl-C, mid-step: no checkpoint of a half-done step; the last one stays
        bar.close()
        raise
    finally:
        ctrl_c.restore()
    bar.close()
    if interrupted:  # a Ctrl-C: the step in progress finished; save it and stop like any interrupted command
        if step != last_saved and step > 0:
            save()
            say(f"interrupted: saved step {step}; the same command resumes it")
        raise KeyboardInterrupt
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
        "best_val_loss": early.best_val,
        "best_step": early.best_step,
        "stop_reason": stop_reason,
        "elapsed": elapsed,
        "tokens_per_s": (tokens_seen - state.get("tokens", 0)) / max(run_time, 1e-9),
        "checkpoint": str(final),
        "plot": str(plot),
        "params": n_params,
        "rank": info.rank,
    }


class TrainingClock:
    """Seconds of training: wall-clock time since the loop started, less the pauses for evaluation, checkpoints
    and plots, plus the training time of the run before a resume. The time budget (train.time), the schedule's
    progress, evaluation intervals and tokens/s all read it, so those pauses take nothing from the budget."""

    def __init__(self, before: float = 0.0):
        self.before, self.started, self.paused = before, time.monotonic(), 0.0

    def now(self) -> float:
        return self.before + time.monotonic() - self.started - self.paused

    @contextlib.contextmanager
    def pause(self):
        began = time.monotonic()
        try:
            yield
        finally:
            self.paused += time.monotonic() - began


@dataclasses.dataclass
class EarlyStopping:
    """Early stopping on the validation loss, as the loop and state.json keep it.

    An evaluation improves when its loss is below the best so far by more than min_delta (the first always does);
    the run stops after `patience` evaluations in a row that do not improve. patience 0 never stops.
    """

    patience: int
    min_delta: float = 0.0
    best_val: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best one

    def update(self, val_loss: float, step: int) -> bool:
        """Count the evaluation at step; return whether it improved (and is now the best)."""
        improved = self.best_val is None or val_loss < self.best_val - self.min_delta
        if improved:
            self.best_val, self.best_step, self.bad_evals = val_loss, step, 0
        else:
            self.bad_evals += 1
        return improved

    @property
    def stopped(self) -> bool:
        return bool(self.patience) and self.bad_evals >= self.patience


class CtrlC:
    """Ctrl-C while training: the first press asks the loop to stop after the step in progress (it then saves a
    checkpoint at that step boundary, so a resume repeats the straight run); a second press interrupts at once.

    Python only delivers signals to the main thread; elsewhere (a run started from a worker thread) this does
    nothing and Ctrl-C keeps its default behaviour.
    """

    def __init__(self) -> None:
        self.pressed = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._press)

    def _press(self, signum, frame) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        print("\nlmforge: stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


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
