"""Typed configs, one dataclass per concern, and how they are read, overridden, saved and compared.

A run's config is `RunConfig(model, optim, train, early_stop, finetune, lora)`. It starts from a preset, then a
JSON config file, then dotted overrides (`model.n_layer=6`), each value converted to the field's type; unknown fields
and bad values raise `LMForgeError` naming the field. The resolved config is saved as the run dir's config.json; a
config.json written before a section existed reads that section's defaults, and one written before a field existed
the value its run had (BEFORE_FIELD).
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lmforge.errors import LMForgeError
from lmforge.files import write_text_atomic
from lmforge.model.config import ModelConfig

OPTIMIZERS = ("adamw", "sgd", "muon")
SCHEDULES = ("cosine", "linear", "wsd", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OBJECTIVES = ("clm", "mlm", "sft", "classify")
DIST_MODES = ("ddp", "fsdp")
LOGGERS = ("tensorboard", "wandb")
SFT_FORMATS = ("auto", "prompt", "chat", "translation", "summarization", "qa")
OVERFLOW_POLICIES = ("truncate", "skip", "error")
SAMPLERS = ("random", "balanced")
POOLINGS = ("auto", "last", "mean")
ORDERS = ("epoch", "random")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "up_proj", "gate_proj", "down_proj")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw, sgd, or muon (Muon for 2-D hidden weights, AdamW for the rest)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    schedule: str = "cosine"  # cosine, linear, wsd (warmup-stable-decay) or constant, each after the warmup
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the final share of the run spent decaying
    weight_decay: float = 0.1  # L2, applied to 2-D weights only, not to norms, biases or embeddings
    l1: float = 0.0  # L1 penalty on the same 2-D weights, added to the loss
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise LMForgeError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, not {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise LMForgeError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if not self.lr > 0:
            raise LMForgeError(f"optim.lr must be positive, not {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise LMForgeError(f"optim.min_lr_ratio must be in [0, 1], not {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.l1 < 0:
            raise LMForgeError("optim.warmup_steps, weight_decay, l1 and grad_clip must not be negative")
        if not 0 < self.decay_fraction <= 1:
            raise LMForgeError(f"optim.decay_fraction must be in (0, 1], not {self.decay_fraction}")


@dataclass
class TrainConfig:
    max_steps: int = 0  # optimizer steps; 0 means "until the time budget"
    time: float = 0.0  # wall-clock budget in seconds for this run; 0 means none
    batch_size: int = 32  # sequences per optimizer step, across all micro-batches and processes
    batch_tokens: int = 0  # if set, the batch in tokens: batch_size = batch_tokens // model.seq_len
    micro_batch_size: int = 0  # sequences per forward pass per process; 0 means as large as the batch allows
    eval_every: int = 250
    eval_interval: float = 0.0  # if set: evaluate every this many seconds of training, not every eval_every steps
    eval_batches: int = 20  # val batches per evaluation; 0 means the whole val split
    save_every: int = 500
    keep_last: int = 2  # checkpoints kept (the newest N)
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    precision: str = "auto"  # auto (bf16 where measured faster: CUDA, AMX CPUs), fp32, bf16, fp16 (CUDA + scaler)
    compile: bool = False  # torch.compile the model
    objective: str = "clm"  # clm: next-token prediction; mlm: masked tokens (encoders); sft, classify: fine-tuning
    mlm_probability: float = 0.15
    label_smoothing: float = 0.0
    order: str = "epoch"  # pretraining windows: epoch (each once per epoch, reshuffled) or random (any offset)
    # Skip a batch whose loss is above spike_factor x the median loss of the last spike_window steps (pretraining:
    # 3 or so). 0, the default: off, since fine-tuning losses near zero vary by more than any such factor.
    spike_factor: float = 0.0
    spike_window: int = 50  # the guard starts once it has this many steps' losses
    max_bad_steps: int = 5  # stop after this many skipped batches in a row (NaN/inf loss or gradient, or spikes)
    dist: str = "ddp"  # under torchrun: ddp or fsdp (FSDP2 fully_shard)
    log: str = ""  # extra loggers, comma-separated: tensorboard, wandb
    deterministic: bool = False  # torch.use_deterministic_algorithms, for bitwise-repeatable runs

    def __post_init__(self) -> None:
        choices = [
            ("train.precision", self.precision, PRECISIONS),
            ("train.objective", self.objective, OBJECTIVES),
            ("train.dist", self.dist, DIST_MODES),
            ("train.order", self.order, ORDERS),
        ]
        for name, value, allowed in choices:
            if value not in allowed:
                raise LMForgeError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        for logger in filter(None, self.log.split(",")):
            if logger.strip() not in LOGGERS:
                raise LMForgeError(f"train.log takes {', '.join(LOGGERS)} (comma-separated), not {logger!r}")
        if not 0 < self.mlm_probability < 1 or not 0 <= self.label_smoothing < 1:
            raise LMForgeError("train.mlm_probability must be in (0, 1) and train.label_smoothing in [0, 1)")
        if self.max_bad_steps < 1 or self.batch_tokens < 0:
            raise LMForgeError("train.max_bad_steps must be at least 1 and train.batch_tokens not negative")
        if not (self.spike_factor == 0 or self.spike_factor > 1) or self.spike_window < 1:
            raise LMForgeError(
                "train.spike_factor must be 0 (off) or above 1, like 3, and train.spike_window at least 1; "
                f"not {self.spike_factor} and {self.spike_window}"
            )
        if self.max_steps < 0 or self.time < 0 or self.eval_interval < 0:
            raise LMForgeError("train.max_steps, train.time and train.eval_interval must not be negative")
        if self.batch_size < 1:
            raise LMForgeError(f"train.batch_size must be at least 1, not {self.batch_size}")
        if self.threads < 0 or self.micro_batch_size < 0:
            raise LMForgeError(
                f"train.threads and train.micro_batch_size must not be negative (0: the default), not "
                f"{self.threads} and {self.micro_batch_size}"
            )
        if self.eval_every < 1 or self.save_every < 1 or self.log_every < 1 or self.keep_last < 1:
            raise LMForgeError("train.eval_every, save_every, log_every and keep_last must be at least 1")


@dataclass
class EarlyStopConfig:
    patience: int = 0  # evaluations without improvement before stopping; 0 disables early stopping
    min_delta: float = 0.0  # an improvement smaller than this does not count

    def __post_init__(self) -> None:
        if self.patience < 0 or self.min_delta < 0:
            raise LMForgeError("early_stop.patience and early_stop.min_delta must not be negative")


@dataclass
class FinetuneConfig:
    """What a fine-tune run learns from: its base run, its records and how they become sequences or labels."""

    base: str = ""  # the run dir whose newest checkpoint's weights the run started from (set by lmforge finetune)
    data: str = ""  # JSONL of training records
    data_sha256: str = ""  # set by lmforge: the records' hash, so a resumed run trains on the same ones
    val_data: str = ""  # JSONL of validation records; empty: hold out val_fraction of the training records
    val_fraction: float = 0.1
    format: str = "auto"  # sft records: auto (from the first record's fields), prompt, chat, translation, ...
    fields: str = ""  # record keys for the format's roles, e.g. "source=en,target=fr" or "label=sentiment"
    template: str = ""  # the prompt made from a record, with {role} slots; empty: the format's default
    chat: bool = False  # render prompt/response records as a one-turn ChatML conversation
    overflow: str = "truncate"  # a record longer than the context: truncate (see data/sft.py), skip, or error
    class_weights: str = ""  # classify: "" (none), "balanced", or one weight per label in label order: "1,5"
    sampler: str = "random"  # classify: random (shuffled epochs) or balanced (every class equally often)
    pooling: str = "auto"  # classify: auto (last token for causal models, mean for encoders), last, or mean

    def __post_init__(self) -> None:
        choices = [
            ("finetune.format", self.format, SFT_FORMATS),
            ("finetune.overflow", self.overflow, OVERFLOW_POLICIES),
            ("finetune.sampler", self.sampler, SAMPLERS),
            ("finetune.pooling", self.pooling, POOLINGS),
        ]
        for name, value, allowed in choices:
            if value not in allowed:
                raise LMForgeError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        if not 0 <= self.val_fraction < 1:
            raise LMForgeError(f"finetune.val_fraction must be in [0, 1), not {self.val_fraction}")
        if self.class_weights not in ("", "balanced"):
            try:
                weights = [float(w) for w in self.class_weights.split(",")]
            except ValueError:
                weights = []
            if not weights or not all(w > 0 for w in weights):
                raise LMForgeError(
                    "finetune.class_weights takes balanced or positive numbers in label order, like 1,5; "
                    f"not {self.class_weights!r}"
                )
        for item in filter(None, self.fields.split(",")):
            role, sep, key = item.partition("=")
            if not sep or not role.strip() or not key.strip():
                raise LMForgeError(f"finetune.fields takes role=key pairs, like source=en,target=fr; not {item!r}")

    def field_map(self) -> dict[str, str]:
        """{role: record key} from `fields`."""
        pairs = (item.partition("=") for item in filter(None, self.fields.split(",")))
        return {role.strip(): key.strip() for role, _, key in pairs}


@dataclass
class LoraConfig:
    rank: int = 0  # 0: full fine-tuning; N > 0: train rank-N adapters on the target modules, the rest frozen
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input
    targets: str = "q_proj,v_proj"  # comma-separated module names (q_proj k_proj v_proj o_proj up_proj ...) or all

    def __post_init__(self) -> None:
        if self.rank < 0 or not self.alpha > 0 or not 0 <= self.dropout < 1:
            raise LMForgeError("lora.rank must not be negative, lora.alpha must be positive, lora.dropout in [0, 1)")
        unknown = [t for t in self.target_names() if t not in LORA_TARGETS]
        if unknown or not self.target_names():
            raise LMForgeError(
                f"lora.targets takes all or names from {', '.join(LORA_TARGETS)}, comma-separated; not {self.targets!r}"
            )

    def target_names(self) -> list[str]:
        if self.targets.strip() == "all":
            return list(LORA_TARGETS)
        return [t.strip() for t in self.targets.split(",") if t.strip()]


@dataclass
class BatchPlan:
    """How a step's batch is cut: sequences per step, per forward pass, and forward passes per process."""

    batch_size: int
    micro_batch_size: int
    accumulation: int
    world_size: int

    @classmethod
    def derive(cls, train: TrainConfig, seq_len: int, world_size: int = 1) -> BatchPlan:
        batch = train.batch_tokens // seq_len if train.batch_tokens else train.batch_size
        if train.batch_tokens and batch < world_size:
            raise LMForgeError(
                f"train.batch_tokens={train.batch_tokens} is less than {world_size} sequence(s) of model.seq_len="
                f"{seq_len} tokens; raise it to at least {world_size * seq_len}"
            )
        if batch < world_size:
            raise LMForgeError(
                f"a batch of {batch} sequences cannot be split over {world_size} processes; raise train.batch_size"
            )
        if batch % world_size:
            raise LMForgeError(f"the batch of {batch} sequences must be a multiple of the {world_size} processes")
        per_rank = batch // world_size
        micro = min(train.micro_batch_size or per_rank, per_rank)
        if per_rank % micro:
            raise LMForgeError(
                f"the per-process batch ({per_rank} sequences) must be a multiple of train.micro_batch_size ({micro})"
            )
        return cls(batch, micro, per_rank // micro, world_size)


# What a config saved before a field existed meant, where that differs from the field's default: such a run dir
# resumes doing what it did.
BEFORE_FIELD: dict[str, Any] = {"train.order": "random"}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    preset: str = ""
    data: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        return apply_overrides(cls(), {**BEFORE_FIELD, **flatten(data)})

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise LMForgeError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise LMForgeError(f"config {path} must hold a JSON object")
        return cls.from_dict(data)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"n_layer": 4}} -> {"model.n_layer": 4}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def field_types(cls=RunConfig, prefix: str = "") -> dict[str, type]:
    """Every leaf field of the config tree by dotted name, with its Python type."""
    hints = typing.get_type_hints(cls)
    result: dict[str, type] = {}
    for f in fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            result.update(field_types(kind, f"{prefix}{f.name}."))
        else:
            result[f"{prefix}{f.name}"] = kind
    return result


def convert(name: str, kind: type, value: Any) -> Any:
    """Convert a string (from the command line) or JSON value to the field's type, or say what was expected."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise LMForgeError(f"{name} takes true or false, not {value!r}")
    if kind is float and name == "train.time":
        return parse_duration(value)
    if kind in (int, float) and isinstance(value, bool):  # JSON's true is no number of layers
        raise LMForgeError(f"{name} takes {'an integer' if kind is int else 'a number'}, not {value!r}")
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
    except (TypeError, ValueError):
        raise LMForgeError(f"{name} takes {'an integer' if kind is int else 'a number'}, not {value!r}") from None
    return str(value)


def apply_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A new RunConfig with dotted overrides applied; each sub-config is validated again."""
    types = field_types()
    data = config.to_dict()
    for name, value in overrides.items():
        if name not in types:
            close = [known for known in types if known.split(".")[-1] == name.split(".")[-1]]
            hint = f"; did you mean {close[0]}?" if close else "; see lmforge train --help for the fields"
            raise LMForgeError(f"unknown config field {name!r}{hint}")
        *parents, leaf = name.split(".")
        target = data
        for parent in parents:
            target = target[parent]
        target[leaf] = convert(name, types[name], value)
    return RunConfig(
        model=ModelConfig(**data["model"]),
        optim=OptimConfig(**data["optim"]),
        train=TrainConfig(**data["train"]),
        early_stop=EarlyStopConfig(**data["early_stop"]),
        finetune=FinetuneConfig(**data["finetune"]),
        lora=LoraConfig(**data["lora"]),
        preset=data["preset"],
        data=data["data"],
    )


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr)?\s*$")


def parse_duration(value: Any) -> float:
    """'90s', '5m', '1.5h' or a number of seconds -> seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise LMForgeError(f"cannot read duration {value!r}; write it like 90s, 5m or 1.5h")
        unit = (match.group(2) or "s")[0]
        seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[unit]
    if seconds < 0:
        raise LMForgeError(f"duration must not be negative, not {value!r}")
    return seconds


# Fields that may change when a run is resumed: they steer how long and how visibly it runs, not what it learns.
RESUMABLE_CHANGES = {
    "train.max_steps",
    "train.time",
    "train.eval_every",
    "train.eval_batches",
    "train.save_every",
    "train.keep_last",
    "train.log_every",
    "train.device",
    "train.threads",
    "train.compile",
    "train.log",
    "train.spike_factor",  # turned on (or tuned) to resume past a spike, the classic recovery
    "train.spike_window",
    "early_stop.patience",
    "early_stop.min_delta",
}


def conflicts(saved: RunConfig, requested: dict[str, Any]) -> list[str]:
    """The explicitly requested fields that differ from a saved run's config and may not change on resume."""
    saved_flat = flatten(saved.to_dict())
    types = field_types()
    problems = []
    for name, value in requested.items():
        if name in RESUMABLE_CHANGES or name not in saved_flat:
            continue
        if name == "train.precision" and value == "auto":  # a new run saves what auto chose: asking again agrees
            continue
        if convert(name, types[name], value) != saved_flat[name]:
            problems.append(f"{name}={value} (the run has {saved_flat[name]})")
    return problems
