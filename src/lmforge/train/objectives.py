"""What the training loop trains: an objective gives it batches, the module to call, the loss and evaluation.

The loop in trainer.py is the same for every objective: `batch = objective.train_batch(step, part)`, then
`output = module(*batch.inputs)`, `loss = objective.loss(output, batch.targets)`, backward, step; every
`eval_every` steps `objective.evaluate(module, ...)`. Resuming, checkpoints, early stopping, metrics and torchrun
come with the loop. The objectives:

- `clm` / `mlm` (LanguageModeling): windows of a data dir's token shards; next-token or masked-token loss.
- `sft` (SupervisedFinetuning): prompt/response and chat records (data/sft.py), right-padded, loss on the
  response tokens only.
- `classify` (Classification): text/label records (data/classify.py) under a classification head
  (model/heads.py), with optional class weights and a balanced sampler.

`task_module` builds the module a run trains from its config: the GPT itself, with LoRA adapters if
`lora.rank` is set, under a head for classification. Training and evaluation build it the same way.
Every batch is a pure function of (seed, step, part), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.chat import CHAT_TEMPLATE_FILE, CHATML_TEMPLATE
from lmforge.config import BatchPlan, RunConfig
from lmforge.data import classify, sft
from lmforge.data.loader import DataDir, mask_tokens, pad_rows, shuffled_indices
from lmforge.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from lmforge.errors import LMForgeError
from lmforge.eval.lm import evaluate, lm_loss
from lmforge.model.gpt import GPT
from lmforge.model.heads import Classifier
from lmforge.model.lora import apply_lora


@dataclass
class Batch:
    """One forward pass's worth: the module's inputs, the loss's targets, and how many real tokens it holds."""

    inputs: tuple[torch.Tensor, ...]
    targets: torch.Tensor
    tokens: int

    def to(self, device) -> Batch:
        return Batch(tuple(t.to(device) for t in self.inputs), self.targets.to(device), self.tokens)


class Objective:
    name = ""
    n_classes = 0  # classification: the head's output size
    epoch_size = 0  # samples per epoch, for the epoch count in metrics; 0: batches are not drawn in epochs

    def __init__(self, config: RunConfig, plan: BatchPlan):
        self.config, self.plan = config, plan
        self.files: dict[str, str] = {}  # files the run dir holds for this objective (a chat template, the labels)
        self.notes: list[str] = []  # what reading the data changed (truncated or skipped records), printed at start

    def train_batch(self, step: int, part: int) -> Batch:
        """Part `part` of global batch number `step`, a pure function of (seed, step, part).

        step is the loop's data position: the optimizer step plus the batches skipped (NaN/inf, spikes) before it.
        """
        raise NotImplementedError

    def eval_batches(self) -> Iterator[Batch]:
        raise NotImplementedError

    def loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, module: torch.nn.Module, device, autocast) -> dict:
        """Validation metrics ({} without a validation set): val_loss drives early stopping."""
        return evaluate(module, ((b.inputs[0], b.targets) for b in self.eval_batches()), device, autocast)


class LanguageModeling(Objective):
    """clm: next-token prediction; mlm: BERT-style masked tokens (an encoder). Batches are data dir windows."""

    def __init__(self, config: RunConfig, tokenizer: Tokenizer, plan: BatchPlan):
        super().__init__(config, plan)
        self.name = config.train.objective
        self.data = DataDir(config.data)
        self.data.check_context(config.model.seq_len)
        if config.train.order == "epoch":
            self.epoch_size = len(self.data.epoch_windows(config.model.seq_len))
        self.mlm = self.name == "mlm"
        if self.mlm:
            if config.model.causal:
                raise LMForgeError(
                    "train.objective=mlm trains an encoder; add --model.causal false (or use a bert preset)"
                )
            self.mask_id = tokenizer.hf.token_to_id("<|mask|>")
            if self.mask_id is None:
                raise LMForgeError("train.objective=mlm needs a <|mask|> token; prepare the data with lmforge prepare")
            self.special = [i for t in SPECIAL_TOKENS if (i := tokenizer.hf.token_to_id(t)) is not None]

    def _masked(self, x: torch.Tensor, *key: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed = int(np.random.default_rng([self.config.train.seed, *key]).integers(2**62))
        generator = torch.Generator().manual_seed(seed)
        tc, mc = self.config.train, self.config.model
        return mask_tokens(x, mc.vocab_size, self.mask_id, self.special, tc.mlm_probability, generator)

    def train_batch(self, step: int, part: int) -> Batch:
        p, mc, tc = self.plan, self.config.model, self.config.train
        x, y = self.data.train_batch(step, part, p.micro_batch_size, p.batch_size, mc.seq_len, tc.seed, tc.order)
        if self.mlm:
            x, y = self._masked(x, step, part)
        return Batch((x,), y, x.numel())

    def eval_batches(self) -> Iterator[Batch]:
        mc, tc = self.config.model, self.config.train
        batches = self.data.eval_batches(mc.seq_len, self.plan.micro_batch_size, tc.eval_batches or None)
        for index, (x, y) in enumerate(batches):
            if self.mlm:
                x, y = self._masked(x, 2**31, index)  # a key no train step uses
            yield Batch((x,), y, x.numel())

    def loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        logits, _ = output
        return lm_loss(logits, targets, self.config.train.label_smoothing)


def _limited(batches: Iterator[Batch], limit: int) -> Iterator[Batch]:
    for index, batch in enumerate(batches):
        if limit and index >= limit:
            return
        yield batch


class SupervisedFinetuning(Objective):
    """Prompt/response and chat records; the loss covers the response tokens (data/sft.py)."""

    name = "sft"

    def __init__(self, config: RunConfig, tokenizer: Tokenizer, plan: BatchPlan):
        if not config.model.causal:
            raise LMForgeError("train.objective=sft generates text, which needs a causal model (model.causal true)")
        super().__init__(config, plan)
        data = sft.load_sft(config.finetune, tokenizer, config.model.seq_len, config.train.seed)
        self.recipe, self.train_set, self.val_set, self.notes = data.recipe, data.train, data.val, data.notes
        self.pad_id = tokenizer.hf.token_to_id("<|pad|>")
        if self.pad_id is None or self.pad_id >= config.model.vocab_size:
            self.pad_id = tokenizer.eot_id  # padding is never a target, so any id serves
        self.files = {CHAT_TEMPLATE_FILE: CHATML_TEMPLATE} if self.recipe.chat else {}
        self.rows = [example.inputs_and_targets() for example in self.train_set]
        self.epoch_size = len(self.rows)
        self.val_rows = [example.inputs_and_targets() for example in self.val_set]

    def _batch(self, rows: list[tuple[list[int], list[int]]]) -> Batch:
        x = pad_rows([r[0] for r in rows], self.pad_id)
        y = pad_rows([r[1] for r in rows], -100)
        return Batch((x,), y, sum(len(r[0]) for r in rows))

    def train_batch(self, step: int, part: int) -> Batch:
        p = self.plan
        indices = shuffled_indices(len(self.rows), step, p.batch_size, self.config.train.seed)
        return self._batch([self.rows[i] for i in indices[part * p.micro_batch_size : (part + 1) * p.micro_batch_size]])

    def eval_batches(self) -> Iterator[Batch]:
        size = self.plan.micro_batch_size
        batches = (self._batch(self.val_rows[i : i + size]) for i in range(0, len(self.val_rows), size))
        return _limited(batches, self.config.train.eval_batches)

    def loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        logits, _ = output
        return lm_loss(logits, targets, self.config.train.label_smoothing)


class Classification(Objective):
    """Text/label records under a classification head (data/classify.py, model/heads.py)."""

    name = "classify"

    def __init__(self, config: RunConfig, tokenizer: Tokenizer, plan: BatchPlan):
        super().__init__(config, plan)
        ft = config.finetune
        data = classify.load_classify(ft, tokenizer, config.model.seq_len, config.train.seed)
        self.labels, self.train_set, self.val_set, self.notes = data.labels, data.train, data.val, data.notes
        self.n_classes = len(self.labels)
        if not self.train_set:
            raise LMForgeError(f"no record of {ft.data} fits the context of {config.model.seq_len} tokens")
        counts = data.counts()
        self.weights = classify.class_weights(ft.class_weights, counts, self.labels)
        self.pad_id = tokenizer.eot_id
        self.files = {classify.LABELS_FILE: json.dumps(self.labels) + "\n"}
        self.notes = self.notes + [
            "labels: "
            + ", ".join(f"{name} ({count})" for name, count in zip(self.labels, counts))
            + (f"; class weights {[round(w, 4) for w in self.weights.tolist()]}" if self.weights is not None else "")
            + ("; balanced sampler" if ft.sampler == "balanced" else "")
        ]
        self.train_labels = [item.label for item in self.train_set]
        self.epoch_size = len(self.train_set) if ft.sampler == "random" else 0

    def batch(self, items: list[classify.Item]) -> Batch:
        x, lengths, labels = classify.collate(items, self.pad_id)
        return Batch((x, lengths), labels, int(lengths.sum()))

    def train_batch(self, step: int, part: int) -> Batch:
        p, seed = self.plan, self.config.train.seed
        if self.config.finetune.sampler == "balanced":
            indices = classify.balanced_indices(self.train_labels, len(self.labels), step, p.batch_size, seed)
        else:
            indices = shuffled_indices(len(self.train_set), step, p.batch_size, seed)
        chosen = indices[part * p.micro_batch_size : (part + 1) * p.micro_batch_size]
        return self.batch([self.train_set[i] for i in chosen])

    def eval_batches(self) -> Iterator[Batch]:
        size = self.plan.micro_batch_size
        batches = (self.batch(self.val_set[i : i + size]) for i in range(0, len(self.val_set), size))
        return _limited(batches, self.config.train.eval_batches)

    def loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        weights = self.weights.to(output.device) if self.weights is not None else None
        smoothing = self.config.train.label_smoothing
        return F.cross_entropy(output.float(), targets, weight=weights, label_smoothing=smoothing)

    @torch.no_grad()
    def evaluate(self, module: torch.nn.Module, device, autocast) -> dict:
        was_training = module.training
        module.eval()
        total, weight_sum, correct, count = 0.0, 0.0, 0, 0
        for batch in self.eval_batches():
            batch = batch.to(device)
            with autocast if autocast is not None else contextlib.nullcontext():
                logits = module(*batch.inputs)
            y = batch.targets
            w = self.weights.to(device)[y] if self.weights is not None else torch.ones(len(y), device=device)
            total += float(F.cross_entropy(logits.float(), y, reduction="none").mul(w).sum())
            weight_sum += float(w.sum())
            correct += int((logits.argmax(dim=-1) == y).sum())
            count += len(y)
        module.train(was_training)
        if count == 0:
            return {}
        loss = total / weight_sum
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_accuracy": correct / count}


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "clm": LanguageModeling,
    "mlm": LanguageModeling,
    "sft": SupervisedFinetuning,
    "classify": Classification,
}


def build(config: RunConfig, tokenizer: Tokenizer, plan: BatchPlan) -> Objective:
    """The run's objective, its data read and checked (before anything is written to the run dir)."""
    return OBJECTIVES[config.train.objective](config, tokenizer, plan)


def read_labels(run_dir: Path) -> list[str]:
    path = Path(run_dir) / classify.LABELS_FILE
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LMForgeError(f"cannot read {path} ({exc}); a classification run dir holds its labels there") from exc
    return labels


def task_module(config: RunConfig, model: GPT, n_classes: int = 0) -> torch.nn.Module:
    """The module a run trains: model with LoRA adapters if lora.rank is set, under a head for classification.

    Call it after the base weights are in model: the adapters wrap its loaded layers and freeze them.
    """
    if config.lora.rank:
        lc = config.lora
        wrapped = apply_lora(model, lc.target_names(), lc.rank, lc.alpha, lc.dropout)
        if not wrapped:
            raise LMForgeError(f"lora.targets {lc.targets!r} matches no layer of this model")
    if config.train.objective != "classify":
        return model
    classifier = Classifier(model, n_classes, config.finetune.pooling)
    if not config.model.tie_embeddings:
        model.lm_head.weight.requires_grad_(False)  # unused by the head; frozen so DDP sees no unused parameter
    return classifier
