"""The server as clients meet it: a real uvicorn on 127.0.0.1, the real openai client, raw HTTP for bad input."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from lmforge.api import LM
from lmforge.model.gpt import GPT, ModelConfig
from lmforge.serve.app import ServeSettings, create_app
from lmforge.train import checkpoint

KEY = "test-key-123456"


pytestmark = pytest.mark.usefixtures("one_thread")


class Server:
    """A real uvicorn server on 127.0.0.1 and a free port, in a thread; stopped (gracefully) on exit."""

    def __init__(self, lm: LM, **settings):
        self.app = create_app(lm, ServeSettings(**settings))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        assert not self.thread.is_alive() and not self.app.state.scheduler.thread.is_alive()

    def health(self) -> dict:
        response = httpx.get(self.url + "/health", timeout=10)
        assert response.status_code == 200
        return response.json()

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=30)

    def wait_idle(self, within: float = 30) -> float:
        """Seconds until no sequence is decoding or waiting; fails after `within` (a hang, not a slow machine)."""
        start = time.time()
        while True:
            stats = self.health()
            if stats["active"] == 0 and stats["waiting"] == 0:
                return time.time() - start
            assert time.time() - start < within, f"still busy after {within}s: {stats}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def lm(tiny_run) -> LM:
    return LM.load(tiny_run)


@pytest.fixture(scope="module")
def long_lm(lm) -> LM:
    """An untrained model with a 1024-token context and the tiny run's tokenizer: long generations to interrupt."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=lm.tokenizer.vocab_size, seq_len=1024, n_layer=2, n_head=2, n_embd=32)
    run_config = dataclasses.replace(lm.config, model=config)
    return LM(GPT(config).eval(), lm.tokenizer, run_config)


@pytest.fixture(scope="module")
def server(lm):
    with Server(lm, max_batch=8, max_queue=64) as s:
        yield s


@pytest.fixture(scope="module")
def long_server(long_lm):
    with Server(long_lm, max_batch=8, max_queue=128) as s:
        yield s


def test_completions_with_the_openai_client(server, lm):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    result = client.completions.create(model="tiny", prompt="First", max_tokens=12, temperature=0, logprobs=2)
    choice = result.choices[0]
    assert choice.text == lm.complete("First", max_new_tokens=12, temperature=0.0)[0].text
    assert result.usage.prompt_tokens == 5 and result.usage.completion_tokens <= 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == len(choice.logprobs.top_logprobs)
    assert "".join(choice.logprobs.tokens) == choice.text
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    # streaming gives the same text, in pieces, then usage
    pieces, usage = [], None
    for event in client.completions.create(
        model="tiny", prompt="First", max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    ):
        if event.usage:
            usage = event.usage
        pieces += [c.text for c in event.choices]
    assert "".join(pieces) == choice.text and len([p for p in pieces if p]) > 1
    assert usage.completion_tokens == result.usage.completion_tokens
    # a seed reproduces a sample; batched prompts, n choices, and stop strings
    seeded = [
        client.completions.create(model="tiny", prompt="All:", max_tokens=15, temperature=1.0, seed=5).choices[0].text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    batch = client.completions.create(model="tiny", prompt=["First", "All:"], max_tokens=15, seed=5, n=2)
    assert len(batch.choices) == 4 and batch.choices[2].text == seeded[0]
    # 20 tokens whatever the model says (no end-of-text stop); the stop string is cut from them
    greedy = {
        "model": "tiny",
        "prompt": "First",
        "max_tokens": 20,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    full = client.completions.create(**greedy).choices[0]
    stop = full.text[4:6]
    assert len(stop) == 2, full.text
    cut = client.completions.create(**greedy, stop=[stop]).choices[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"


def test_echo_scores_the_prompt_with_the_openai_client(server, lm):
    """echo returns the prompt's tokens and their log-probs (the first null), then any generated ones, as OpenAI did;
    max_tokens 0 scores without generating. The numbers are those of a plain forward pass over the prompt."""
    client = server.client()
    prompt = "First Citizen:\nSpeak"
    ids = lm.tokenizer.encode_prompt(prompt)
    with torch.no_grad():
        logp = lm.model(torch.tensor([ids[:-1]]))[0][0].float().log_softmax(dim=-1)
    expected = [logp[i, t].item() for i, t in enumerate(ids[1:])]
    scored = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice, lp = scored.choices[0], scored.choices[0].logprobs
    assert (choice.text, choice.finish_reason, scored.usage.completion_tokens) == (prompt, "length", 0)
    assert lp.tokens == list(prompt) and lp.text_offset == list(range(len(prompt)))  # one character per token
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert all(max(top.values()) >= value - 1e-6 for top, value in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    # with generation: the output is the one without echo, after the prompt; streaming sends the prompt first
    greedy = {"model": "tiny", "prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 0}
    plain = client.completions.create(**greedy, extra_body={"ignore_eos": True}).choices[0]
    echoed = client.completions.create(**greedy, echo=True, extra_body={"ignore_eos": True}).choices[0]
    assert echoed.text == prompt + plain.text and echoed.logprobs.tokens == lp.tokens + plain.logprobs.tokens
    assert echoed.logprobs.token_logprobs[len(ids) :] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-6)
    assert echoed.logprobs.text_offset == list(range(len(echoed.text)))
    events = list(client.completions.create(**greedy, echo=True, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(e.choices[0].text for e in events) == echoed.text
    assert [t for e in events for t in e.choices[0].logprobs.tokens] == echoed.logprobs.tokens
    # token-id prompts in a batch, echo without log-probs, and a text one token longer than the context
    batch = client.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=0, echo=True)
    assert [c.text for c in batch.choices] == [prompt, prompt[:3]] and batch.choices[0].logprobs is None
    longest = lm.tokenizer.encode("First Citizen:\nBefore we proceed any further")[: lm.context + 1]
    full = client.completions.create(model="tiny", prompt=longest, max_tokens=0, echo=True, logprobs=0)
    assert len(full.choices[0].logprobs.tokens) == lm.context + 1
    with pytest.raises(openai.BadRequestError, match="most scored is 33"):
        client.completions.create(model="tiny", prompt=longest + [1], max_tokens=0, echo=True)
    with pytest.raises(openai.BadRequestError, match="0 \\(with echo\\) or 1"):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=-1, echo=True)


def test_chat_with_the_openai_client(server):
    client = server.client()
    messages = [{"role": "system", "content": "Speak."}, {"role": "user", "content": "First Citizen:"}]
    result = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    message = result.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert result.usage.completion_tokens <= 10 and result.usage.prompt_tokens > 10
    deltas, roles, usage = [], [], None
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            roles.append(choice.delta.role)
            deltas.append(choice.delta.content or "")
    assert roles[0] == "assistant" and "".join(deltas) == message.content
    assert usage.total_tokens == result.usage.total_tokens
    with_logprobs = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = with_logprobs.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == with_logprobs.choices[0].message.content
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob for e in entries)
    assert all(bytes(e.bytes).decode() == e.token for e in entries)


def test_errors_through_the_openai_client(server):
    client = server.client()
    cases = [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 30}, "context"),  # 5 prompt tokens + 30 > 32
        ({"prompt": "First " * 10}, "context"),
        ({"prompt": ""}, "empty"),
    ]
    for overrides, message in cases:
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(**{"model": "tiny", "prompt": "First", "max_tokens": 5, **overrides})
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        client.completions.create(model="gpt-4", prompt="First", max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="character"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "\u2603"}], max_tokens=5)
    assert server.health()["status"] == "ok"


def bad_requests() -> list[tuple[str, bytes | dict, set[int]]]:
    completions, chat = "/v1/completions", "/v1/chat/completions"
    ok = {"prompt": "First", "max_tokens": 5}
    chat_ok = {"messages": [{"role": "user", "content": "First"}], "max_tokens": 5}
    return [
        (completions, b"{not json", {400}),
        (completions, b'{"prompt": "First", "temperature": NaN}', {400}),
        (completions, b'{"prompt": "First", "temperature": Infinity}', {400}),
        (completions, b"\xff\xfe\x00garbage", {400}),
        (completions, b"[" * 100_000 + b"]" * 100_000, {400}),
        (completions, b"", {400}),
        (completions, b"[1, 2]", {400}),
        (completions, b'"just a string"', {400}),
        (completions, b"null", {400}),
        (completions, {"max_tokens": 5}, {400}),
        (completions, {**ok, "temperature": "hot"}, {400}),
        (completions, {**ok, "max_tokens": "5"}, {400}),
        (completions, {**ok, "max_tokens": 5.5}, {400}),
        (completions, {**ok, "max_tokens": True}, {400}),
        (completions, {**ok, "prompt": 5}, {400}),
        (completions, {**ok, "prompt": {"text": "First"}}, {400}),
        (completions, {**ok, "stream": "yes"}, {400}),
        (completions, {**ok, "temperature": -0.5}, {400}),
        (completions, {**ok, "top_p": 0}, {400}),
        (completions, {**ok, "top_p": 1.01}, {400}),
        (completions, {**ok, "top_k": -5}, {400}),
        (completions, {**ok, "max_tokens": 0}, {400}),
        (completions, {**ok, "max_tokens": -3}, {400}),
        (completions, {**ok, "max_tokens": 10**12}, {400}),
        (completions, {**ok, "prompt": ""}, {400}),
        (completions, {**ok, "prompt": []}, {400}),
        (completions, {**ok, "prompt": [[]]}, {400}),
        (completions, {**ok, "prompt": "First Citizen " * 5}, {400}),
        (completions, {**ok, "prompt": [1, 2, 10**6]}, {400}),
        (completions, {**ok, "prompt": [1, -1]}, {400}),
        (completions, {**ok, "prompt": list(range(40))}, {400}),
        (completions, {**ok, "n": 0}, {400}),
        (completions, {**ok, "n": 10_000}, {400}),
        (completions, {**ok, "seed": -1}, {400}),
        (completions, {**ok, "seed": 2**70}, {400}),
        (completions, {**ok, "stop": [""]}, {400}),
        (completions, {**ok, "stop": ["x"] * 100}, {400}),
        (completions, {**ok, "stop": 5}, {400}),
        (completions, {**ok, "logprobs": 99}, {400}),
        (completions, {**ok, "frequency_penalty": 7}, {400}),
        (completions, {**ok, "logit_bias": {"1": 5}}, {400}),
        (completions, {**ok, "model": "other"}, {404}),
        (completions, b'{"prompt": "' + b"x" * (10 << 20) + b'"}', {413}),
        (chat, {"messages": []}, {400}),
        (chat, {"messages": "hello"}, {400}),
        (chat, {"messages": [{"role": "wizard", "content": "hi"}]}, {400}),
        (chat, {"messages": [{"role": "user", "content": 5}]}, {400}),
        (chat, {"messages": [{"role": "user"}]}, {400}),
        (chat, {**chat_ok, "top_logprobs": 3}, {400}),
        (chat, {**chat_ok, "tools": [{"type": "function"}]}, {400}),
        (chat, {**chat_ok, "temperature": float("nan")}, {400}),
        (chat, {**chat_ok, "max_tokens": 10**9}, {400}),
        (chat, {"messages": [{"role": "user", "content": "First " * 20}]}, {400}),
        ("/v1/nothing", {}, {404}),
        ("/v1/models/../../etc/passwd", {}, {404}),
    ]


def test_bad_requests_get_a_json_4xx_and_the_server_stays_healthy(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body, statuses in bad_requests():
            if isinstance(body, bytes):
                response = http.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                response = http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
            assert response.status_code in statuses, (path, str(body)[:80], response.status_code, response.text)
            error = response.json()["error"]
            assert isinstance(error["message"], str) and error["message"], (path, str(body)[:80])
        assert http.get("/v1/completions").status_code == 405
        assert server.health()["status"] == "ok"
        ok = http.post("/v1/completions", json={"prompt": "First", "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 3


def test_api_key_page_and_no_cors(lm):
    with Server(lm, api_key=KEY) as s:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong-key").completions.create(model="tiny", prompt="First", max_tokens=3)
        no_key = httpx.post(s.url + "/v1/completions", json={"prompt": "First", "max_tokens": 3})
        assert no_key.status_code == 401 and "API key" in no_key.json()["error"]["message"]
        assert httpx.get(s.url + "/v1/models").status_code == 401
        result = s.client(KEY).completions.create(model="tiny", prompt="First", max_tokens=3)
        assert result.usage.completion_tokens <= 3
        assert s.health()["status"] == "ok"  # health and the page need no key
        page = httpx.get(s.url + "/", headers={"Origin": "http://evil.example"})
        assert page.status_code == 200 and "<textarea" in page.text
        assert "access-control-allow-origin" not in page.headers
        assert "default-src 'none'" in page.headers["content-security-policy"]
        preflight = httpx.options(
            s.url + "/v1/completions",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers


def test_concurrent_requests_share_decoding_steps(long_server):
    n, tokens = 8, 40
    before = long_server.health()["steps"]

    async def one(http: httpx.AsyncClient, i: int) -> dict:
        body = {"prompt": "First", "max_tokens": tokens, "ignore_eos": True, "seed": i}
        response = await http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    async def all_at_once():
        async with httpx.AsyncClient(base_url=long_server.url, timeout=60) as http:
            return await asyncio.gather(*(one(http, i) for i in range(n)))

    results = asyncio.run(all_at_once())
    assert all(r["usage"]["completion_tokens"] == tokens for r in results)
    steps = long_server.health()["steps"] - before
    assert tokens <= steps < n * tokens / 2, steps  # one at a time would take n * tokens steps


def test_a_client_that_disconnects_frees_its_slot(long_server):
    before = long_server.health()["tokens_generated"]
    body = {"prompt": "First", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=long_server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            events = 0
            for line in response.iter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    break
    # freed at once, however loaded the machine: measured in tokens decoded, not seconds (bench/serve_load.py
    # measures the seconds)
    long_server.wait_idle()
    generated = long_server.health()["tokens_generated"] - before
    assert generated < 500, generated  # stopped early, not after all 1000 tokens
    # a non-streaming client that gives up is noticed too
    before = long_server.health()["tokens_generated"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(long_server.url + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
    long_server.wait_idle()
    assert long_server.health()["tokens_generated"] - before < 900
    ok = httpx.post(long_server.url + "/v1/completions", json={"prompt": "First", "max_tokens": 5}, timeout=30)
    assert ok.status_code == 200


def test_many_clients_disconnecting_mid_stream_leave_nothing_behind(long_server):
    clients = 100
    before = long_server.health()["tokens_generated"]
    body = {"prompt": "First", "max_tokens": 800, "ignore_eos": True, "stream": True}

    async def leave_after_first_token(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if '"text": "' in line and '"text": ""' not in line:
                    return

    async def run():
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=long_server.url, timeout=60, limits=limits) as http:
            await asyncio.gather(*(leave_after_first_token(http) for _ in range(clients)))

    asyncio.run(run())
    long_server.wait_idle()
    generated = long_server.health()["tokens_generated"] - before
    assert generated < clients * 800 / 10, generated  # each stopped within a few tokens of its client leaving
    ok = httpx.post(long_server.url + "/v1/completions", json={"prompt": "First", "max_tokens": 5}, timeout=30)
    assert ok.status_code == 200


def slow_lm(lm: LM) -> LM:
    """6 layers of 192 at a 1024-token context: milliseconds a token on a CPU, so 1000 tokens take seconds."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=lm.tokenizer.vocab_size, seq_len=1024, n_layer=6, n_head=2, n_embd=192)
    return LM(GPT(config).eval(), lm.tokenizer, dataclasses.replace(lm.config, model=config))


def test_a_full_queue_answers_429_at_once(long_lm):
    body = {"prompt": "First", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with Server(slow_lm(long_lm), max_batch=1, max_queue=1) as s, httpx.Client(base_url=s.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # kept: dropping the iterator would close the stream
            next(lines)  # decoding: the only slot is taken
            with http.stream("POST", "/v1/completions", json=body) as waiting:
                assert waiting.status_code == 200 and s.health()["waiting"] == 1  # the only place in line
                client = s.client()
                with pytest.raises(openai.RateLimitError, match="busy"):
                    client.completions.create(model="lmforge", prompt="First", max_tokens=5)
                # at once: the 1000-token request in the slot is still decoding, the waiting one still waits
                assert s.health()["active"] == 1 and s.health()["waiting"] == 1
                refused = http.post("/v1/completions", json={**body, "stream": False})
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        s.wait_idle()  # both streams were closed: the slot and the line are free again
        assert http.post("/v1/completions", json={"prompt": "First", "max_tokens": 5}).status_code == 200


def test_a_request_over_its_time_gets_504_and_frees_its_slot(long_lm):
    body = {"prompt": "First", "max_tokens": 1000, "ignore_eos": True}
    with Server(slow_lm(long_lm), max_batch=1, timeout=0.3) as s, httpx.Client(base_url=s.url, timeout=30) as http:
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 504 and "did not finish" in response.json()["error"]["message"]
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert "did not finish" in events[-1]  # a stream that runs out of time ends with an error event
        s.wait_idle()
        assert s.health()["tokens_generated"] < 1000
        assert http.post("/v1/completions", json={"prompt": "First", "max_tokens": 5}).status_code == 200


def test_streamed_text_equals_the_whole_with_byte_level_tokens(lm):
    """A byte-level BPE model emits pieces of UTF-8 characters; the stream holds them back until whole."""
    from lmforge.data.tokenizer import bpe_tokenizer

    tokenizer = bpe_tokenizer(iter(["naïve café 東京 🙂 plain text " * 40]), 300)
    torch.manual_seed(1)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=128, n_layer=1, n_head=2, n_embd=32)
    byte_lm = LM(GPT(config).eval(), tokenizer, dataclasses.replace(lm.config, model=config))
    with Server(byte_lm) as s:
        client = s.client()
        for seed in range(3):
            args = {"model": "lmforge", "prompt": "東京 🙂", "max_tokens": 40, "seed": seed, "temperature": 1.0}
            whole = client.completions.create(**args).choices[0].text
            pieces = [e.choices[0].text for e in client.completions.create(**args, stream=True) if e.choices]
            assert "".join(pieces) == whole
            assert not any(p.endswith("\ufffd") for p in pieces[:-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory, long_lm) -> Path:
    """slow_lm as a run dir, for `lmforge serve`: a few hundred tokens take a second or more."""
    slow = slow_lm(long_lm)
    root = tmp_path_factory.mktemp("runs") / "slow"
    root.mkdir()
    slow.config.save(root / "config.json")
    slow.tokenizer.save(root / "tokenizer.json")
    checkpoint.save(root, 0, slow.model, None, {}, keep_last=1)
    return root


@contextlib.contextmanager
def lmforge_serve(run_dir: Path):
    """`lmforge serve` in its own process, yielded with its URL once /health answers; killed if still running after.
    Its output goes to a file (a pipe nobody reads would fill up with access-log lines and stall the server)."""
    port = free_port()
    command = [sys.executable, "-m", "lmforge.cli", "serve", str(run_dir), "--port", str(port), "--threads", "1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, "lmforge serve did not start"
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.seek(0)
        proc.output = log.read()
        log.close()


def wait_for_status(http: httpx.Client, path: str, status: int, within: float = 10) -> httpx.Response:
    deadline = time.time() + within
    while (response := http.get(path)).status_code != status:
        assert time.time() < deadline, f"{path} still answers {response.status_code}, not {status}, after {within}s"
        time.sleep(0.01)
    return response


def test_lmforge_serve_drains_on_sigterm(slow_run):
    """In-flight requests finish; new ones, and /health, get a 503 (not a refused connection); then exit 0."""
    tokens = 500  # about 2 s of decoding: the drain lasts that long
    body = {"prompt": "First", "max_tokens": tokens, "ignore_eos": True}
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    results = []
    with lmforge_serve(slow_run) as (proc, url), httpx.Client(base_url=url, timeout=30) as http:
        whole = threading.Thread(
            target=lambda: results.append(httpx.post(url + "/v1/completions", json=body, timeout=30))
        )
        with http.stream("POST", "/v1/completions", json=stream_body) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # decoding
            whole.start()
            deadline = time.time() + 10
            while http.get("/health").json()["active"] < 2:  # the non-streaming request is decoding too
                assert time.time() < deadline and whole.is_alive(), "the second request did not start"
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            health = wait_for_status(http, "/health", 503)
            assert "draining" in health.json()["error"]["message"]
            refused = http.post("/v1/completions", json={"prompt": "First", "max_tokens": 5})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "server_error"
            chat = {"messages": [{"role": "user", "content": "First"}], "max_tokens": 5, "stream": True}
            assert http.post("/v1/chat/completions", json=chat).status_code == 503
            assert proc.poll() is None and whole.is_alive()  # the 503s came while both requests were in flight
            events = [line for line in lines if line]
        whole.join(timeout=30)
        # both finished with all their tokens, then the process exited by itself
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["usage"]["completion_tokens"] == tokens
        assert '"finish_reason": "length"' in events[-3]
        assert results[0].status_code == 200 and results[0].json()["usage"]["completion_tokens"] == tokens
        assert proc.wait(timeout=10) == 0
        with pytest.raises(httpx.ConnectError):  # nothing left listening
            httpx.get(url + "/health", timeout=5)
    assert "Draining" in proc.output
    assert "Traceback" not in proc.output and "ERROR" not in proc.output
    assert "First" not in proc.output  # the prompt is not logged


def test_a_second_ctrl_c_ends_the_drain_at_once(slow_run):
    """Ctrl-C drains too; a second one stops what still decodes (a stream ends with an error event), still cleanly."""
    body = {"prompt": "First", "max_tokens": 1000, "ignore_eos": True, "stream": True}  # 4 s or more of decoding
    with lmforge_serve(slow_run) as (proc, url), httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGINT)
            wait_for_status(http, "/health", 503)
            proc.send_signal(signal.SIGINT)
            events = [line for line in lines if line]
        # the stream ends with an error event (no [DONE]) long before its 1000 tokens
        assert "stopped before this request finished" in events[-1]
        assert sum('"text": "' in line for line in events) < 500
        assert proc.wait(timeout=10) == 0
    assert "Traceback" not in proc.output and "ERROR" not in proc.output
