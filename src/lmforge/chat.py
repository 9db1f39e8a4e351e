"""Chat: a conversation turned into a prompt, and the `lmforge chat` terminal session.

A fine-tuned model keeps its chat template (Jinja, the format transformers uses) in its run dir as
`chat_template.jinja`, or under "chat_template" in `tokenizer_config.json`; `CHATML_TEMPLATE` is the one lmforge's
fine-tuning writes, with the `<|im_start|>` and `<|im_end|>` tokens every lmforge tokenizer reserves. The template
text becomes special tokens, while the messages' own text is encoded as plain text: a user who types
`<|im_end|>` gets those characters, never the special token.

A model without a template (anything trained by `lmforge train` alone) is a plain continuation model: the
conversation is its messages joined by newlines, and the model continues that text.

A model whose sequences begin with a beginning-of-sequence token (an imported Llama) gets it as transformers'
`apply_chat_template` gives it: where its template writes `{{ bos_token }}`, once; without a template, before the
plain text (`Tokenizer.encode_prompt`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from lmforge.data.tokenizer import SPECIAL_TOKENS
from lmforge.errors import LMForgeError
from lmforge.generate import SamplingParams, stream

if TYPE_CHECKING:
    from lmforge.api import LM

CHAT_TEMPLATE_FILE = "chat_template.jinja"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROLES = ("system", "user", "assistant")
# Private-use characters mark where each message's text goes, so it can be encoded apart from the template.
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("(\ue000\\d+\ue001)")


def load_chat_template(run_dir: str | Path) -> str | None:
    """The run dir's chat template: chat_template.jinja, else tokenizer_config.json's "chat_template", else None."""
    run_dir = Path(run_dir)
    path = run_dir / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    config = run_dir / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise LMForgeError(f"cannot read {config}: {exc}; fix or remove it") from exc
        if isinstance(template, str) and template:
            return template
    return None


def check_messages(messages: list[dict]) -> None:
    if not messages:
        raise LMForgeError("the conversation is empty; send at least one message")
    for message in messages:
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise LMForgeError(f"each message needs a role ({', '.join(ROLES)}) and text content, not {message!r}")


def encode_with_special_tokens(tokenizer, text: str) -> list[int]:
    """Encode template text, turning the reserved token strings it contains (and the model's bos_token) into their
    special ids."""
    specials = [t for t in [*SPECIAL_TOKENS, tokenizer.bos_token] if t and tokenizer.hf.token_to_id(t) is not None]
    ids: list[int] = []
    for piece in re.split("(" + "|".join(re.escape(t) for t in specials) + ")", text):
        if piece in specials:
            ids.append(tokenizer.hf.token_to_id(piece))
        elif piece:
            ids.extend(tokenizer.encode(piece))
    return ids


def encode_chat(tokenizer, messages: list[dict], template: str | None) -> list[int]:
    """Token ids of the conversation, ready for the assistant's reply."""
    check_messages(messages)
    if template is None:
        return tokenizer.encode_prompt(plain_prompt(messages))
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
    try:
        rendered = env.from_string(template).render(
            messages=marked,
            add_generation_prompt=True,
            eos_token=SPECIAL_TOKENS[0],
            bos_token=tokenizer.bos_token or "",
        )
    except TemplateError as exc:
        raise LMForgeError(f"the chat template failed: {exc}") from exc
    ids: list[int] = []
    for piece in _MARK_RE.split(rendered):
        if _MARK_RE.fullmatch(piece):
            ids.extend(tokenizer.encode(messages[int(piece[1:-1])]["content"]))
        elif piece:
            ids.extend(encode_with_special_tokens(tokenizer, piece))
    return ids


def plain_prompt(messages: list[dict]) -> str:
    """A conversation as plain text for a model without a chat template: the messages, one per line."""
    return "\n".join(m["content"] for m in messages) + "\n"


def chat_stop_ids(tokenizer, template: str | None) -> tuple[int, ...]:
    """End of text, and with a template also <|im_end|>: the end of the assistant's turn."""
    ids = [tokenizer.eot_id]
    im_end = tokenizer.hf.token_to_id(IM_END)
    if template is not None and im_end is not None:
        ids.append(im_end)
    return tuple(ids)


class ChatSession:
    """A conversation with a model: history, sampling settings, and the oldest turns dropped to fit the context."""

    def __init__(self, lm: LM, params: SamplingParams, system: str | None = None):
        self.lm, self.system = lm, system
        self.params = dataclasses.replace(params, stop_token_ids=chat_stop_ids(lm.tokenizer, lm.chat_template))
        self.messages: list[dict] = []
        self.trimmed = False  # whether the last prompt left out old turns

    @property
    def template(self) -> str | None:
        return self.lm.chat_template

    def reset(self) -> None:
        self.messages = []

    def set(self, **changes) -> None:
        """Change sampling settings; raises LMForgeError (and changes nothing) when one is invalid."""
        self.params = dataclasses.replace(self.params, **changes)

    def prompt(self) -> list[int]:
        """The conversation's token ids, dropping the oldest turns until the reply has room."""
        context = self.lm.context
        room = min(self.params.max_new_tokens, context // 2)
        system = [{"role": "system", "content": self.system}] if self.system else []
        turns = list(self.messages)
        self.trimmed = False
        while True:
            ids = encode_chat(self.lm.tokenizer, system + turns, self.template)
            if len(ids) + room <= context or len(turns) <= 1:
                break
            turns = turns[2:] if len(turns) > 2 else turns[1:]  # a user turn and its reply leave together
            self.trimmed = True
        if len(ids) >= context:
            if self.template is not None:
                raise LMForgeError(
                    f"the message is {len(ids)} tokens with the template, more than the model's context of "
                    f"{context}; send a shorter one"
                )
            ids, self.trimmed = ids[-(context - room) :], True  # plain text: keep its newest tokens
        return ids

    def reply(self, text: str) -> Iterator[str]:
        """Send a user message; yield the reply as it is generated. The reply so far is kept if interrupted."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.prompt()
        except LMForgeError:
            self.messages.pop()
            raise
        pieces: list[str] = []
        try:
            for chunk in stream(self.lm.model, self.lm.tokenizer, ids, self.params):
                if chunk.text:
                    pieces.append(chunk.text)
                    yield chunk.text
        finally:
            self.messages.append({"role": "assistant", "content": "".join(pieces)})


def parse_settings(text: str) -> dict:
    """`temperature=0.5 top_k=40 stop=` -> {"temperature": 0.5, "top_k": 40, "stop": ()}."""
    fields = {f.name: f for f in dataclasses.fields(SamplingParams)}
    settable = set(fields) - {"stop_token_ids", "num_beams", "length_penalty", "logprobs"}
    changes: dict = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or name not in settable:
            raise LMForgeError(f"expected NAME=VALUE with NAME one of {', '.join(sorted(settable))}, not {item!r}")
        if name == "stop":
            changes[name] = tuple(s for s in value.split(",") if s)
        elif value.lower() in ("", "none"):
            changes[name] = None if name in ("top_k", "top_p", "min_p", "seed", "truncate") else value
        elif name in ("overflow", "truncate"):
            changes[name] = value
        else:
            try:
                number = float(value)
            except ValueError:
                raise LMForgeError(f"{name} must be a number, not {value!r}") from None
            changes[name] = (
                int(number) if name in ("max_new_tokens", "top_k", "seed") and number.is_integer() else number
            )
    return changes


def show_settings(params: SamplingParams) -> str:
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
             "frequency_penalty", "presence_penalty", "seed", "stop", "overflow")  # fmt: skip
    return " ".join(f"{name}={getattr(params, name)!r}" for name in names)


HELP = "/reset clears the history, /params [NAME=VALUE ...] shows or sets settings, /quit or Ctrl-D leaves"


def run_chat(
    session: ChatSession,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> None:
    """The terminal loop: read a line, stream the reply; Ctrl-C stops a reply (or clears the line) but stays."""
    mode = "its chat template" if session.template else "plain continuation (the run dir has no chat template)"
    out.write(f"chat with {session.lm.run_dir or 'the model'} using {mode}.\n{HELP}; Ctrl-C stops a reply.\n")
    out.flush()
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n(Ctrl-D or /quit leaves)\n")
            continue
        command, _, rest = line.strip().partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            session.reset()
            out.write("(history cleared)\n")
        elif command == "/params":
            try:
                if rest.strip():
                    session.set(**parse_settings(rest))
                out.write(show_settings(session.params) + "\n")
            except LMForgeError as exc:
                out.write(f"error: {exc}\n")
        elif command.startswith("/"):
            out.write(f"unknown command {command}; {HELP}\n")
        elif line.strip():
            out.write("model> ")
            out.flush()
            try:
                for piece in session.reply(line):
                    out.write(piece)
                    out.flush()
            except KeyboardInterrupt:
                out.write(" [stopped]")
            except LMForgeError as exc:
                out.write(f"error: {exc}")
            if session.trimmed:
                out.write("\n(the oldest turns no longer fit the context and were left out)")
            out.write("\n")
        out.flush()
