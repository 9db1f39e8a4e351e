"""Classification records -> token rows and label ids; class weights and the balanced sampler.

A record is a JSON object with a text and a label (roles `text` and `label`; `finetune.fields` maps them to other
keys, e.g. `label=sentiment`). Labels are compared as strings; their order (numeric when every label is an integer,
else alphabetical) gives the class ids, saved as the run dir's labels.json. A text becomes its tokens and
<|endoftext|>, whose position a causal model's last-token pooling reads; a text longer than the context follows
`finetune.overflow`: truncate (keep its start), skip, or error.

For imbalanced labels: class weights in the loss (`balanced`: n / (classes * count of the class), as scikit-learn
computes them; or given in label order), and the balanced sampler, which draws a class uniformly and then one of its
records for each row of a batch, a pure function of (seed, step) like every other batch order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lmforge.config import FinetuneConfig
from lmforge.data.loader import pad_rows
from lmforge.data.sft import Record, read_records, split_records
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import LMForgeError

LABELS_FILE = "labels.json"


@dataclass
class Item:
    ids: list[int]
    label: int


@dataclass
class ClassifyData:
    labels: list[str]
    train: list[Item]
    val: list[Item]
    notes: list[str] = field(default_factory=list)

    def counts(self) -> list[int]:
        counts = [0] * len(self.labels)
        for item in self.train:
            counts[item.label] += 1
        return counts


def label_order(values: set[str]) -> list[str]:
    """Label names in class-id order: numeric if every one is an integer, else alphabetical."""
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


def label_of(record: Record, key: str) -> str:
    value = record.data.get(key)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise LMForgeError(f"{record.where} needs a label field {key!r} holding a string or an integer")
    return str(value)


def text_of(record: Record, key: str) -> str:
    value = record.data.get(key)
    if not isinstance(value, str):
        raise LMForgeError(f"{record.where} needs a text field {key!r}")
    return value


def encode_text(tokenizer: Tokenizer, text: str, context: int, overflow: str, where: str) -> list[int] | None:
    """The text's tokens (as a prompt: after a beginning-of-sequence token where the model has one) and
    <|endoftext|>, fitted to the context; None when the record is to be skipped."""
    try:
        ids = tokenizer.encode_prompt(text)
    except LMForgeError as exc:
        raise LMForgeError(f"{where}: {exc}") from None
    if len(ids) + 1 > context:
        if overflow == "error":
            raise LMForgeError(
                f"{where} is {len(ids) + 1} tokens, more than the context of {context}; shorten it or pass "
                "--finetune.overflow truncate (or skip)"
            )
        if overflow == "skip":
            return None
        ids = ids[: context - 1]
    return ids + [tokenizer.eot_id]


def load_classify(
    config: FinetuneConfig,
    tokenizer: Tokenizer,
    context: int,
    seed: int,
    labels: list[str] | None = None,
    path: str | None = None,
) -> ClassifyData:
    """Training and validation items of the run (or, with path, all items of that file as `val`).

    labels: the class names of a trained run; without them they are read from the training records.
    """
    keys = {"text": "text", "label": "label", **config.field_map()}
    unknown = sorted(set(keys) - {"text", "label"})
    if unknown:
        raise LMForgeError(f"finetune.fields maps {', '.join(unknown)}; classification records have text and label")
    if path is not None:
        train_records, val_records = [], read_records(path)
    elif config.val_data:
        train_records, val_records = read_records(config.data), read_records(config.val_data)
    else:
        train_records, val_records = split_records(read_records(config.data), config.val_fraction, seed)
    if labels is None:
        labels = label_order({label_of(r, keys["label"]) for r in train_records})
        if len(labels) < 2:
            raise LMForgeError(f"the records of {config.data} have only the label {labels}; classification needs two")
    index = {name: i for i, name in enumerate(labels)}
    notes = []

    def encode(records: list[Record], split: str) -> list[Item]:
        items, skipped = [], 0
        for record in records:
            label = label_of(record, keys["label"])
            if label not in index:
                raise LMForgeError(
                    f"{record.where} has label {label!r}, which the training records do not have ({', '.join(labels)})"
                )
            ids = encode_text(tokenizer, text_of(record, keys["text"]), context, config.overflow, record.where)
            if ids is None:
                skipped += 1
            else:
                items.append(Item(ids, index[label]))
        if skipped:
            notes.append(f"{split}: {skipped} record(s) longer than the context of {context} skipped")
        return items

    return ClassifyData(labels, encode(train_records, "train"), encode(val_records, "val"), notes)


def collate(items: list[Item], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded with pad_id, real lengths (B,), labels (B,))."""
    ids = pad_rows([item.ids for item in items], pad_id)
    return ids, torch.tensor([len(item.ids) for item in items]), torch.tensor([item.label for item in items])


def class_weights(spec: str, counts: list[int], labels: list[str]) -> torch.Tensor | None:
    """The loss's per-class weights: None, balanced (n / (classes * count)), or given in label order."""
    if not spec:
        return None
    if spec == "balanced":
        missing = [name for name, count in zip(labels, counts) if count == 0]
        if missing:
            raise LMForgeError(f"label(s) {', '.join(missing)} have no training records, so they cannot be balanced")
        total = sum(counts)
        return torch.tensor([total / (len(counts) * c) for c in counts], dtype=torch.float32)
    weights = [float(w) for w in spec.split(",")]
    if len(weights) != len(labels):
        raise LMForgeError(
            f"finetune.class_weights gives {len(weights)} weight(s) for {len(labels)} labels ({', '.join(labels)})"
        )
    return torch.tensor(weights, dtype=torch.float32)


def balanced_indices(labels: list[int], n_classes: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Step `step`'s global batch for the balanced sampler: per row a class drawn uniformly, then one of its records.

    Classes without records are never drawn.
    """
    by_class = [np.flatnonzero(np.asarray(labels) == c) for c in range(n_classes)]
    present = [members for members in by_class if len(members)]
    rng = np.random.default_rng([seed, step, 11])
    classes = rng.integers(0, len(present), size=batch_size)
    picks = rng.random(batch_size)
    return np.array([present[c][int(p * len(present[c]))] for c, p in zip(classes, picks)], dtype=np.int64)
