"""Supervised fine-tuning records -> token sequences whose loss covers the response and nothing else.

Records are JSON objects, one per line, in one of these formats (the roles; `finetune.fields` maps roles to other
record keys, e.g. `source=en,target=fr`):

    prompt          {"prompt": ..., "response": ...}
    chat            {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}
    translation     {"source": ..., "target": ...}
    summarization   {"document": ..., "summary": ...}
    qa              {"context": ..., "question": ..., "answer": ...}

The last role is the response; the prompt is `finetune.template` filled from the other roles (each format has a
default: translation `{source}\n`, summarization `{document}\nTL;DR: `, qa `{context}\nQuestion: {question}\nAnswer: `,
prompt `{prompt}`: put your own separator at its end). A response given as a list of strings is a set of references:
training uses the first, evaluation scores against all.

A plain record becomes `prompt tokens + response tokens + <|endoftext|>`, the prompt encoded as generation encodes
one (`Tokenizer.encode_prompt`: after the beginning-of-sequence token of a model that has one). A chat record (or
any record with `finetune.chat true`, as one user turn and the reply) becomes ChatML,
`<|im_start|>ROLE\nCONTENT<|im_end|>\n` per message, the template `lmforge.chat.CHATML_TEMPLATE` renders (no
beginning-of-sequence token: that template has none); the special ids are inserted here, never made from text
(the tokenizer encodes text that looks like `<|im_end|>` as plain characters). The loss covers the response tokens
and the end marker (each assistant message's content and its `<|im_end|>`); the prompt's targets are -100.

A record longer than the context (`model.seq_len` + 1 tokens, as inputs and targets are shifted by one) follows
`finetune.overflow`: `truncate` (a single turn: the prompt loses its oldest tokens while it is longer than half
the context, then the response loses its last tokens and its end marker; a chat: its oldest tokens go, and a record
left with no trained token is skipped), `skip` (the record is left out), `error` (refused, naming its line).
Truncated and skipped records are counted in the run's first lines of output.
"""

from __future__ import annotations

import contextlib
import json
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.chat import IM_END, IM_START
from lmforge.config import FinetuneConfig
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import LMForgeError

# format -> (roles, the last one being the response; default prompt template)
FORMATS: dict[str, tuple[tuple[str, ...], str]] = {
    "chat": (("messages",), ""),
    "prompt": (("prompt", "response"), "{prompt}"),
    "translation": (("source", "target"), "{source}\n"),
    "summarization": (("document", "summary"), "{document}\nTL;DR: "),
    "qa": (("context", "question", "answer"), "{context}\nQuestion: {question}\nAnswer: "),
}
ROLES = ("system", "user", "assistant")


@dataclass
class Record:
    where: str  # "FILE line N", for messages
    data: dict


def read_records(path: str | Path) -> list[Record]:
    """The JSON objects of a JSONL file, each with where it came from; blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LMForgeError(f"cannot read {path}: {exc}") from exc
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LMForgeError(f"{path} line {number} is not JSON ({exc.msg}); fix or remove it") from None
        if not isinstance(data, dict):
            raise LMForgeError(f"{path} line {number} must be a JSON object, not {type(data).__name__}")
        records.append(Record(f"{path} line {number}", data))
    if not records:
        raise LMForgeError(f"{path} holds no records; write one JSON object per line")
    return records


def split_records(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded random val_fraction of the records held out, none when that rounds to zero."""
    n_val = int(round(len(records) * val_fraction))
    if n_val == 0 or n_val >= len(records):
        return list(records), []
    order = np.random.default_rng([seed, 7]).permutation(len(records))
    held = set(order[:n_val].tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


@dataclass
class Example:
    """One sequence: its token ids and, per token, whether the loss predicts it."""

    ids: list[int]
    trained: list[bool]

    def inputs_and_targets(self) -> tuple[list[int], list[int]]:
        """inputs ids[:-1]; targets ids[1:], with -100 where the token is not trained (the prompt)."""
        targets = [t if keep else -100 for t, keep in zip(self.ids[1:], self.trained[1:])]
        return self.ids[:-1], targets


@dataclass
class Recipe:
    """How records of one format become prompts and responses."""

    format: str
    keys: dict[str, str]  # role -> record key
    template: str
    chat: bool  # render as ChatML

    @classmethod
    def from_config(cls, config: FinetuneConfig, first: Record) -> Recipe:
        mapping = config.field_map()
        fmt = config.format
        if fmt == "auto":
            fmt = next(
                (name for name, (roles, _) in FORMATS.items() if all(mapping.get(r, r) in first.data for r in roles)),
                "",
            )
            if not fmt:
                raise LMForgeError(
                    f"{first.where} has fields {sorted(first.data)}; give records with messages, prompt/response, "
                    "source/target, document/summary or context/question/answer, or map your field names with "
                    "--finetune.fields role=key (e.g. source=en,target=fr)"
                )
        roles, default = FORMATS[fmt]
        unknown = sorted(set(mapping) - set(roles))
        if unknown:
            raise LMForgeError(f"finetune.fields maps {', '.join(unknown)}, which the {fmt} format has no role for")
        template = config.template or default
        if fmt != "chat":
            slots = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
            allowed = set(roles[:-1])
            if not slots <= allowed:
                raise LMForgeError(
                    f"finetune.template {template!r} has slot(s) {sorted(slots - allowed)}; "
                    f"the {fmt} format fills {', '.join('{' + r + '}' for r in roles[:-1])}"
                )
        return cls(fmt, {r: mapping.get(r, r) for r in roles}, template, fmt == "chat" or config.chat)

    def _texts(self, record: Record, role: str) -> list[str]:
        """A role's text, as a list: one string, or a record's list of alternatives (references)."""
        key = self.keys[role]
        value = record.data.get(key)
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) for v in values):
            raise LMForgeError(f"{record.where} needs a text field {key!r} (the {self.format} {role})")
        return values

    def _text(self, record: Record, role: str) -> str:
        return self._texts(record, role)[0]

    def messages(self, record: Record) -> list[dict]:
        """The record as a conversation (chat records, or others rendered as one user turn and the reply)."""
        if self.format == "chat":
            messages = record.data.get(self.keys["messages"])
            if not isinstance(messages, list) or not messages:
                raise LMForgeError(f"{record.where} needs a non-empty list {self.keys['messages']!r} of messages")
            for m in messages:
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise LMForgeError(
                        f"{record.where}: each message needs a role ({', '.join(ROLES)}) and text content, not {m!r}"
                    )
            return messages
        prompt, response = self.prompt_text(record), self._text(record, self.response_role)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]

    @property
    def response_role(self) -> str:
        return FORMATS[self.format][0][-1]

    def prompt_text(self, record: Record) -> str:
        values = {role: self._text(record, role) for role in FORMATS[self.format][0][:-1]}
        return self.template.format_map(values)

    def references(self, record: Record) -> list[str]:
        """The reference answer(s) evaluation scores a generated response against."""
        if self.format == "chat":
            replies = [m for m in self.messages(record) if m["role"] == "assistant"]
            if not replies:
                raise LMForgeError(f"{record.where} has no assistant message to compare a generated reply with")
            return [replies[-1]["content"]]
        return self._texts(record, self.response_role)

    def example(self, record: Record, tokenizer: Tokenizer) -> Example:
        """The training sequence of a record, before any truncation."""
        if self.chat:
            messages = self.messages(record)
            if not any(m["role"] == "assistant" for m in messages):
                raise LMForgeError(f"{record.where} has no assistant message to learn from")
            with _at(record):
                return encode_messages(tokenizer, messages)
        prompt_text, response_text = self.prompt_text(record), self._text(record, self.response_role)
        with _at(record):
            prompt = tokenizer.encode_prompt(prompt_text)
            response = tokenizer.encode(response_text) + [tokenizer.eot_id]
        if not prompt:
            raise LMForgeError(f"{record.where}: the prompt is empty; the response needs a prompt to follow")
        return Example(prompt + response, [False] * len(prompt) + [True] * len(response))

    def prompt_ids(self, record: Record, tokenizer: Tokenizer) -> list[int]:
        """The tokens a model continues to answer the record: up to the start of the (last) response."""
        if self.chat:
            messages = self.messages(record)
            replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            messages = messages[: replies[-1]] if replies else messages  # up to the last reply
            with _at(record):
                return chat_prompt(tokenizer, messages)
        text = self.prompt_text(record)
        with _at(record):
            return tokenizer.encode_prompt(text)


@contextlib.contextmanager
def _at(record: Record):
    """Name the record in a tokenizer's error (a character a character-level vocabulary lacks)."""
    try:
        yield
    except LMForgeError as exc:
        raise LMForgeError(f"{record.where}: {exc}") from None


def chat_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    ids = tokenizer.hf.token_to_id(IM_START), tokenizer.hf.token_to_id(IM_END)
    if None in ids:
        raise LMForgeError(
            f"the tokenizer has no {IM_START} and {IM_END} tokens, which chat fine-tuning needs (every tokenizer "
            "lmforge prepare builds reserves them); use prompt/response records without --finetune.chat"
        )
    return ids  # type: ignore[return-value]


def encode_messages(tokenizer: Tokenizer, messages: list[dict]) -> Example:
    """ChatML tokens of a conversation; trained: each assistant message's content and its <|im_end|>."""
    start, end = chat_ids(tokenizer)
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    trained: list[bool] = []
    for i, message in enumerate(messages):
        head = [start] + tokenizer.encode(message["role"] + "\n")
        body = tokenizer.encode(message["content"]) + [end]
        tail = newline if i < len(messages) - 1 else []  # the last newline is never a target's input
        ids += head + body + tail
        trained += [False] * len(head) + [message["role"] == "assistant"] * len(body) + [False] * len(tail)
    return Example(ids, trained)


def chat_prompt(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """The conversation so far and `<|im_start|>assistant\\n`: what the model continues with its reply."""
    start, _ = chat_ids(tokenizer)
    ids = (encode_messages(tokenizer, messages).ids + tokenizer.encode("\n")) if messages else []
    return ids + [start] + tokenizer.encode("assistant\n")


def fit(example: Example, context: int, overflow: str, chat: bool, where: str) -> Example | None:
    """The example within context + 1 tokens by the overflow policy; None when it is to be skipped."""
    room = context + 1
    if len(example.ids) <= room:
        return example
    if overflow == "error":
        raise LMForgeError(
            f"{where} is {len(example.ids)} tokens, more than the context of {context} + 1; shorten it, or pass "
            "--finetune.overflow truncate (or skip)"
        )
    if overflow == "skip":
        return None
    if chat:
        ids, trained = example.ids[-room:], example.trained[-room:]
        return Example(ids, trained) if any(trained[1:]) else None
    n_prompt = example.trained.index(True)
    prompt, response = example.ids[:n_prompt], example.ids[n_prompt:]
    keep = min(len(prompt), max(room - len(response), room // 2))
    prompt, response = prompt[len(prompt) - keep :], response[: room - keep]
    return Example(prompt + response, [False] * len(prompt) + [True] * len(response))


@dataclass
class SftData:
    recipe: Recipe
    train: list[Example]
    val: list[Example]
    notes: list[str] = field(default_factory=list)


def load_sft(config: FinetuneConfig, tokenizer: Tokenizer, context: int, seed: int) -> SftData:
    """The run's training and validation examples, fitted to the context."""
    records = read_records(config.data)
    recipe = Recipe.from_config(config, records[0])
    if config.val_data:
        train_records, val_records = records, read_records(config.val_data)
    else:
        train_records, val_records = split_records(records, config.val_fraction, seed)
    notes = []

    def encode(chosen: list[Record], split: str) -> list[Example]:
        examples, cut, skipped = [], 0, 0
        for record in chosen:
            example = recipe.example(record, tokenizer)
            fitted = fit(example, context, config.overflow, recipe.chat, record.where)
            if fitted is None:
                skipped += 1
            else:
                examples.append(fitted)
                cut += fitted is not example
        if cut or skipped:
            notes.append(
                f"{split}: {cut} record(s) truncated and {skipped} skipped to fit the context of {context} "
                f"(finetune.overflow={config.overflow})"
            )
        return examples

    train = encode(train_records, "train")
    if not train:
        raise LMForgeError(f"no record of {config.data} fits the context of {context} tokens; shorten them")
    return SftData(recipe, train, encode(val_records, "val"), notes)
