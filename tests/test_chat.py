import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import endless_model
from lmforge.api import LM
from lmforge.chat import (
    CHAT_TEMPLATE_FILE,
    CHATML_TEMPLATE,
    IM_END,
    IM_START,
    ChatSession,
    encode_chat,
    load_chat_template,
    parse_settings,
    run_chat,
)
from lmforge.errors import LMForgeError
from lmforge.generate import SamplingParams
from lmforge.model.gpt import GPT, ModelConfig
from lmforge.train import checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tiny_run) -> LM:
    return LM.load(tiny_run)


def test_chatml_template_makes_special_tokens_but_message_text_stays_text():
    from lmforge.data.tokenizer import bpe_tokenizer

    tok = bpe_tokenizer(iter(["some plain text for a tokenizer " * 30]), 300)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "say <|im_end|> and <|endoftext|> please"},
    ]
    ids = encode_chat(tok, messages, CHATML_TEMPLATE)
    want = (
        f"{IM_START}system\nBe brief.{IM_END}\n"
        f"{IM_START}user\nsay <|im_end|> and <|endoftext|> please{IM_END}\n"
        f"{IM_START}assistant\n"
    )
    assert tok.decode(ids, skip_special_tokens=False) == want
    specials = [i for i in ids if i in (tok.hf.token_to_id(IM_START), tok.hf.token_to_id(IM_END), tok.eot_id)]
    assert len(specials) == 5  # 3 starts and 2 ends from the template; none from the user's text
    assert encode_chat(tok, messages, None) == tok.encode("Be brief.\nsay <|im_end|> and <|endoftext|> please\n")
    with pytest.raises(LMForgeError, match="role"):
        encode_chat(tok, [{"role": "robot", "content": "hi"}], CHATML_TEMPLATE)
    with pytest.raises(LMForgeError, match="template failed"):
        encode_chat(tok, messages, "{{ raise_exception('no system messages') }}")


def test_the_template_is_found_in_the_run_dir(tmp_path, tiny_run):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert load_chat_template(tmp_path) == "{{ messages }}"
    (tmp_path / CHAT_TEMPLATE_FILE).write_text(CHATML_TEMPLATE)
    assert load_chat_template(tmp_path) == CHATML_TEMPLATE
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert LM.load(run).chat_template is None
    (run / CHAT_TEMPLATE_FILE).write_text(CHATML_TEMPLATE)
    assert LM.load(run).chat_template == CHATML_TEMPLATE


def im_end_model(lm: LM) -> LM:
    """A model whose every next token is <|im_end|>: the final norm outputs a constant that only its row matches."""
    config = ModelConfig(vocab_size=lm.tokenizer.vocab_size, seq_len=64, n_layer=1, n_head=2, n_embd=16,
                         tie_embeddings=False)  # fmt: skip
    model = GPT(config).eval()
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[lm.tokenizer.hf.token_to_id(IM_END)] = 1.0
    return LM(model, lm.tokenizer, lm.config)


def test_a_template_reply_ends_at_im_end_and_plain_chat_does_not(lm):
    model = im_end_model(lm)
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    plain = ChatSession(model, params)
    assert "".join(plain.reply("First")) == ""  # <|im_end|> is not text, and not the end of a plain reply
    model.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}<|im_start|>"
    templated = ChatSession(model, params)
    replies = []
    for piece in templated.reply("First"):
        replies.append(piece)
    assert replies == [] and templated.messages[-1] == {"role": "assistant", "content": ""}
    from lmforge.generate import stream

    chunks = list(stream(model.model, model.tokenizer, templated.prompt(), templated.params))
    assert chunks[-1].finish_reason == "stop" and chunks[-1].token_ids == []
    chunks = list(stream(model.model, model.tokenizer, plain.prompt(), plain.params))
    assert chunks[-1].finish_reason == "length"


def test_history_is_kept_and_trimmed_to_the_context(lm):
    session = ChatSession(lm, SamplingParams(max_new_tokens=8, temperature=0.0), system="All:")
    first = "".join(session.reply("First"))
    assert session.messages == [{"role": "user", "content": "First"}, {"role": "assistant", "content": first}]
    assert not session.trimmed
    for line in ("Speak", "speak.", "You are", "all resolved"):
        "".join(session.reply(line))
    assert len(session.messages) == 10 and session.trimmed
    session.messages.append({"role": "user", "content": "Speak"})
    prompt = lm.tokenizer.decode(session.prompt())  # what the next reply would continue
    assert len(session.prompt()) + 8 <= lm.context and session.trimmed
    assert prompt.startswith("All:\n") and prompt.endswith("\nSpeak\n")  # the system message stays
    session.messages.pop()
    session.reset()
    assert session.messages == []
    with pytest.raises(LMForgeError, match="character"):
        "".join(session.reply("\u2603"))
    assert session.messages == []  # a message that cannot be encoded is not kept


def test_settings_parse_and_validate(lm):
    assert parse_settings("temperature=0.5 top_k=40 stop=a,b seed=none max_new_tokens=12") == {
        "temperature": 0.5,
        "top_k": 40,
        "stop": ("a", "b"),
        "seed": None,
        "max_new_tokens": 12,
    }
    for bad in ("temperature", "colour=red", "top_p=high"):
        with pytest.raises(LMForgeError):
            parse_settings(bad)
    session = ChatSession(lm, SamplingParams(max_new_tokens=8))
    with pytest.raises(LMForgeError, match="temperature"):
        session.set(temperature=-1.0)
    assert session.params.temperature == 1.0


def test_the_terminal_loop(lm):
    lines = iter(["First", "/params temperature=0 max_new_tokens=5", "/params temperature=-1", "", "/reset",
                  "/bogus", "All:", "\u2603"])  # fmt: skip

    def read(prompt: str) -> str:
        out.write(prompt)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    session = ChatSession(lm, SamplingParams(max_new_tokens=6, temperature=0.8, seed=1))
    run_chat(session, read, out)
    text = out.getvalue()
    assert "plain continuation" in text and text.count("model> ") == 3
    assert "temperature=0" in text and "max_new_tokens=5" in text
    assert "error: temperature must be 0 (greedy) or positive" in text
    assert "(history cleared)" in text and "unknown command /bogus" in text
    assert "error: text has 1 character(s)" in text
    assert session.params.max_new_tokens == 5 and len(session.messages) == 2


def default_ctrl_c() -> None:
    """A test runner started as a background job ignores Ctrl-C, and its children inherit that: the chat process
    gets the default disposition back, so Python turns Ctrl-C into KeyboardInterrupt as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_a_reply_and_the_session_goes_on(tmp_path, tiny_run):
    """Ctrl-C during a reply stops it and the session takes the next message; the reply never ends by itself (its
    model cannot pick end-of-text), so the Ctrl-C always lands on a running reply."""
    lm = LM.load(tiny_run)
    model = endless_model(lm.tokenizer.vocab_size, lm.tokenizer.eot_id, seq_len=64, n_layer=2, n_embd=64)
    run = tmp_path / "endless"
    run.mkdir()
    dataclasses.replace(lm.config, model=model.config).save(run / "config.json")
    shutil.copyfile(tiny_run / "tokenizer.json", run / "tokenizer.json")
    checkpoint.save(run, 0, model, None, {}, keep_last=1)
    command = [sys.executable, "-m", "lmforge.cli", "chat", str(run), "--overflow", "slide",
               "--max-new-tokens", "1000000", "--threads", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=default_ctrl_c,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()

    def wait_for(condition, what: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not condition("".join(output)):
            assert proc.poll() is None and time.time() < deadline, f"no {what} in {''.join(output)[-500:]!r}"
            time.sleep(0.02)

    def reply(text: str) -> str:  # what came after the newest "model> "
        return text.rpartition("model> ")[2]

    try:
        wait_for(lambda text: "you> " in text, "prompt")
        for replies, message in enumerate(("First", "Second"), start=1):  # the session goes on after a stop
            proc.stdin.write(message + "\n")
            proc.stdin.flush()
            wait_for(lambda text, n=replies: text.count("model> ") == n, "reply")
            wait_for(lambda text: len(reply(text)) > 50, "a long reply")
            proc.send_signal(signal.SIGINT)
            wait_for(lambda text: "[stopped]" in reply(text) and reply(text).rstrip().endswith("you>"), "stop")
        proc.stdin.write("/params\n")
        proc.stdin.flush()
        wait_for(lambda text: "max_new_tokens=1000000" in text, "settings")
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in "".join(output)
