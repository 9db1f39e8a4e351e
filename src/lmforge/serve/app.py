"""The OpenAI-compatible HTTP server: FastAPI routes over the scheduler, and `serve()` to run it on uvicorn.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with server-sent
events when "stream": true), and GET / (the playground page). Concurrent requests share decoding steps
(see scheduler.py). Every error is a JSON body {"error": {"message", "type", "param", "code"}}: bad input is a
4xx, a full waiting line a 429, a request over its time a 504, and any request while the server drains a 503.

Shutting down drains first (`DrainingServer`): on SIGTERM or Ctrl-C the server keeps listening and answers new
requests, /health included, with a 503, so load balancers stop sending work and clients get an answer instead of
a refused connection, while the requests in flight finish. Then uvicorn stops, and the process exits with 0.

Kept out on purpose: no CORS headers (the playground is same-origin; other sites' pages cannot read
responses), no path parameters, and no logging of prompts or outputs (uvicorn's access log has only the path).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.chat import chat_stop_ids, encode_chat
from lmforge.errors import LMForgeError
from lmforge.generate import Chunk, Completion, Engine, SamplingParams, Sequence
from lmforge.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    SamplingFields,
    TokenText,
    chat_logprobs,
    completion_logprobs,
    refuse_unsupported,
    usage,
)
from lmforge.serve.scheduler import STOPPED, Job, Overloaded, Scheduler

PAGE = Path(__file__).parent / "static" / "index.html"
DRAIN_LIMIT = 64 << 20  # read and discard an oversized body up to this size, so the client sees the 413
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
DISCONNECTED = ("disconnected", None)
TIMED_OUT = ("timed out", None)


@dataclass
class ServeSettings:
    max_batch: int = 16  # sequences decoded together in one step
    max_queue: int = 64  # requests waiting for a free slot; one more gets a 429
    timeout: float = 120.0  # seconds a request may take, waiting included; then 504
    max_tokens: int | None = None  # the most max_tokens a request may ask for; None: the model's context
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    model_name: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.max_batch >= 1, f"--max-batch must be at least 1, not {self.max_batch}"),
            (self.max_queue >= 0, f"--max-queue must not be negative, not {self.max_queue}"),
            (self.timeout > 0, f"--timeout must be positive, not {self.timeout}"),
            (self.max_tokens is None or self.max_tokens >= 1, f"--max-tokens must be positive, not {self.max_tokens}"),
            (self.max_body_bytes >= 1024, f"--max-body-bytes must be at least 1024, not {self.max_body_bytes}"),
            (self.api_key is None or len(self.api_key) >= 8, "--api-key must be at least 8 characters long"),
        ]
        for ok, message in checks:
            if not ok:
                raise LMForgeError(message)


def error_response(error: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class Guard:
    """ASGI middleware run before any parsing: while the server drains every request is a 503, a wrong or missing
    API key on /v1 is a 401, and a body over the limit a 413. The body is read here, then replayed to the app
    (later reads see the client's disconnect)."""

    def __init__(self, app, max_body: int, api_key: str | None, state):
        self.app, self.max_body, self.state = app, max_body, state
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.state.draining:
            message = "the server is shutting down (draining); send requests to another instance"
            headers = {"Retry-After": "1", "Connection": "close"}  # close: a retry opens a new connection, elsewhere
            return await error_response(APIError(503, message, None, "server_error"), headers)(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"].startswith("/v1"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                error = APIError(
                    401, "a valid API key is required: Authorization: Bearer KEY", None, "authentication_error"
                )
                return await error_response(error, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"the request body is larger than {self.max_body} bytes")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > DRAIN_LIMIT:
            return await error_response(too_big, {"Connection": "close"})(scope, receive, send)
        body, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > DRAIN_LIMIT:
                break
            if size <= self.max_body:
                body.append(message.get("body", b""))
        if size > self.max_body:
            return await error_response(too_big, {"Connection": "close"})(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def parse(request: Request, schema: type[BaseModel]):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"the body is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, not {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise APIError(400, f"{where}: {first['msg']}", where) from None


def create_app(lm, settings: ServeSettings | None = None) -> FastAPI:
    """The app serving lm. Its decoding thread starts and stops with the app's lifespan."""
    settings = settings or ServeSettings()
    engine = Engine(lm.model, lm.tokenizer, settings.max_batch)
    scheduler = Scheduler(engine, settings.max_queue)
    name = settings.model_name or (lm.run_dir.name if lm.run_dir else "lmforge")
    context = lm.context
    cap = min(settings.max_tokens or context, context)
    token_text = TokenText(lm.tokenizer)
    template = lm.chat_template
    page = PAGE.read_text(encoding="utf-8")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.settings = settings
    app.state.draining = False  # set by DrainingServer on SIGTERM or Ctrl-C: every new request is then a 503

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc, {"Retry-After": "1"} if exc.status == 429 else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", None, "server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, **scheduler.stats(), "max_batch": settings.max_batch}

    @app.get("/v1/models")
    async def models():
        card = {"id": name, "object": "model", "created": created, "owned_by": "lmforge", "max_model_len": context}
        return {"object": "list", "data": [card]}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(page, headers=PAGE_HEADERS)

    # ------------------------------------------------------------------------------------- building a job

    def check_common(req: SamplingFields, prompts: int) -> None:
        refuse_unsupported(req)
        if req.model is not None and req.model != name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {name!r}", "model")
        if req.n < 1 or req.n * prompts > settings.max_batch:
            raise APIError(400, f"n x prompts must be between 1 and {settings.max_batch}, not {req.n * prompts}", "n")

    def budget(requested: int | None, prompt_tokens: int, default: int | None, echo: bool = False) -> int:
        if prompt_tokens < 1:
            raise APIError(400, "the prompt is empty; give some text", "prompt")
        if echo and requested == 0:  # score the prompt only: its last token is predicted, never read
            if prompt_tokens > context + 1:
                message = f"the prompt has {prompt_tokens} tokens; with a context of {context} the most scored is "
                raise APIError(400, message + f"{context + 1}", "prompt")
            return 0
        room = context - prompt_tokens
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens; the model's context of {context} must also hold the "
                f"output, so it takes at most {context - 1}",
                "prompt",
            )
        if requested is None:
            return min(default or room, room, cap)
        if requested < 1 or requested > cap:
            least = "0 (with echo) or 1" if echo else "1"
            raise APIError(400, f"max_tokens must be between {least} and {cap}, not {requested}", "max_tokens")
        if requested > room:
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens and max_tokens is {requested}, more than the model's "
                f"context of {context}; ask for at most {room} tokens or shorten the prompt",
                "max_tokens",
            )
        return requested

    def sampling(req: SamplingFields, max_new: int, stops: tuple[int, ...], index: int, logprobs) -> SamplingParams:
        try:
            return SamplingParams(
                max_new_tokens=max_new,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_k=None if req.top_k == -1 else req.top_k,  # -1 is "no limit" to some clients
                top_p=req.top_p,
                min_p=req.min_p,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                frequency_penalty=req.frequency_penalty or 0.0,
                presence_penalty=req.presence_penalty or 0.0,
                seed=None if req.seed is None else req.seed + index,
                stop=req.stop or (),
                stop_token_ids=() if req.ignore_eos else stops,
                logprobs=logprobs,
                echo=getattr(req, "echo", False),
            )
        except LMForgeError as exc:
            raise APIError(400, str(exc)) from None

    def sequences(req, prompts: list[list[int]], default: int | None, stops, logprobs) -> list[Sequence]:
        out = []
        for prompt in prompts:
            max_new = budget(req.max_tokens, len(prompt), default, getattr(req, "echo", False))
            for i in range(req.n):
                try:
                    out.append(engine.sequence(prompt, sampling(req, max_new, stops, i, logprobs)))
                except LMForgeError as exc:
                    raise APIError(400, str(exc), "prompt") from None
        return out

    def busy() -> APIError:
        message = f"the server is busy ({settings.max_queue} requests waiting); retry shortly"
        return APIError(429, message, None, "rate_limit_error")

    def refuse_if_full() -> None:
        """Under overload most requests are refused: do it before spending time on parsing them."""
        if scheduler.full:
            raise busy()

    def submit(seqs: list[Sequence], stream: bool) -> Job:
        job = Job(seqs, asyncio.get_running_loop(), stream)
        try:
            scheduler.submit(job)
        except Overloaded:
            raise busy() from None
        return job

    # -------------------------------------------------------------------------------------- running a job

    async def events(job: Job, request: Request):
        """Yield (choice index, Chunk) until every sequence of job has finished; cancel it if left early."""
        remaining = len(job.sequences)

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.events.put_nowait(DISCONNECTED)

        watcher = asyncio.create_task(watch())
        timer = asyncio.get_running_loop().call_later(settings.timeout, job.events.put_nowait, TIMED_OUT)
        try:
            while remaining:
                item = await job.events.get()
                if item is TIMED_OUT:
                    raise APIError(
                        504,
                        f"the request did not finish within {settings.timeout:g}s; ask for fewer tokens or retry",
                        None,
                        "timeout",
                    )
                if item is DISCONNECTED:
                    return
                if item is STOPPED:
                    raise APIError(503, "the server stopped before this request finished", None, "server_error")
                index, chunk = item
                if index == "error":
                    raise APIError(500, chunk, None, "server_error")
                if chunk.finish_reason is not None:
                    remaining -= 1
                yield index, chunk
        finally:
            watcher.cancel()
            timer.cancel()
            if remaining:
                scheduler.cancel(job)

    def sse(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    def streaming(job: Job, request: Request, head: list[dict], payload, tail) -> StreamingResponse:
        async def body():
            for item in head:
                yield sse(item)
            try:
                async for index, chunk in events(job, request):
                    yield sse(payload(index, chunk))
            except APIError as exc:
                yield sse(exc.body())
                return
            for item in tail():
                yield sse(item)
            yield "data: [DONE]\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    async def finish(job: Job, request: Request) -> list[Completion] | None:
        async for _ in events(job, request):
            pass
        if any(s.finish_reason in (None, "cancelled") for s in job.sequences):
            return None  # the client went away
        return [s.completion() for s in job.sequences]

    def totals(completions: list[Completion], n: int) -> dict:
        return usage(sum(c.prompt_tokens for c in completions[::n]), sum(c.completion_tokens for c in completions))

    def whole(c: Completion) -> Chunk:
        return Chunk(c.text, c.token_ids, c.logprobs, c.top_logprobs, c.finish_reason)

    # ------------------------------------------------------------------------------------------------ routes

    @app.post("/v1/completions")
    async def completions(request: Request):
        refuse_if_full()
        req = await parse(request, CompletionRequest)
        if isinstance(req.prompt, str) or (req.prompt and all(isinstance(t, int) for t in req.prompt)):
            items = [req.prompt]  # one text, or one list of token ids
        else:
            items = list(req.prompt)  # a batch of texts or of token-id lists
        if not items:
            raise APIError(400, "the prompt is empty; give some text", "prompt")
        check_common(req, len(items))
        try:
            prompts = [lm.tokenizer.encode_prompt(p) if isinstance(p, str) else list(p) for p in items]
        except LMForgeError as exc:
            raise APIError(400, str(exc), "prompt") from None
        logprobs = req.logprobs
        if logprobs is not None and not 0 <= logprobs <= 5:
            raise APIError(400, f"logprobs must be between 0 and 5, not {logprobs}", "logprobs")
        job = submit(sequences(req, prompts, 16, (lm.tokenizer.eot_id,), logprobs), req.stream)
        rid = f"cmpl-{uuid.uuid4().hex}"

        # echo: the prompt as given (a text, or the text its token ids spell) comes before each choice's output
        echoes = [p if isinstance(p, str) else lm.tokenizer.decode(p) for p in items for _ in range(req.n)]

        def output(index: int, chunk: Chunk, offset: int, echo: Completion | None) -> tuple[str, dict | None]:
            """A choice's text and log-probs; with echo (its Completion, on its first chunk), the prompt's first."""
            if echo is None:
                return chunk.text, completion_logprobs(chunk, token_text, offset)
            return echoes[index] + chunk.text, completion_logprobs(chunk, token_text, 0, echo)

        def frame(choices: list[dict], **extra) -> dict:
            created = int(time.time())
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": name,
                "choices": choices,
                **extra,
            }

        if req.stream:
            offsets = [0] * len(job.sequences)
            echoed = [not req.echo] * len(job.sequences)

            def payload(index: int, chunk: Chunk) -> dict:
                echo = None
                if not echoed[index]:  # the pass that made this first chunk has scored the prompt
                    echo, echoed[index] = job.sequences[index].completion(), True
                text, lp = output(index, chunk, offsets[index], echo)
                offsets[index] += len(text)
                return frame([{"index": index, "text": text, "logprobs": lp, "finish_reason": chunk.finish_reason}])

            def tail() -> list[dict]:
                if not (req.stream_options and req.stream_options.include_usage):
                    return []
                return [frame([], usage=totals([s.completion() for s in job.sequences], req.n))]

            return streaming(job, request, [], payload, tail)
        done = await finish(job, request)
        if done is None:
            return JSONResponse({}, status_code=499)
        choices = []
        for i, c in enumerate(done):
            text, lp = output(i, whole(c), 0, c if req.echo else None)
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
        return frame(choices, usage=totals(done, req.n))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        refuse_if_full()
        req = await parse(request, ChatRequest)
        check_common(req, 1)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = encode_chat(lm.tokenizer, messages, template)
        except LMForgeError as exc:
            raise APIError(400, str(exc), "messages") from None
        if req.top_logprobs is not None and not (0 <= req.top_logprobs <= 20 and req.logprobs):
            raise APIError(400, "top_logprobs must be between 0 and 20, with logprobs true", "top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.max_tokens is None and req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        job = submit(sequences(req, [prompt], None, chat_stop_ids(lm.tokenizer, template), logprobs), req.stream)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def frame(kind: str, choices: list[dict], **extra) -> dict:
            return {"id": rid, "object": kind, "created": int(time.time()), "model": name, "choices": choices, **extra}

        if req.stream:
            kind = "chat.completion.chunk"
            head = [
                frame(kind, [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
                for i in range(req.n)
            ]  # fmt: skip

            def payload(index: int, chunk: Chunk) -> dict:
                delta = {"content": chunk.text} if chunk.text else {}
                return frame(kind, [{"index": index, "delta": delta, "logprobs": chat_logprobs(chunk, token_text),
                                     "finish_reason": chunk.finish_reason}])  # fmt: skip

            def tail() -> list[dict]:
                if not (req.stream_options and req.stream_options.include_usage):
                    return []
                return [frame(kind, [], usage=totals([s.completion() for s in job.sequences], req.n))]

            return streaming(job, request, head, payload, tail)
        done = await finish(job, request)
        if done is None:
            return JSONResponse({}, status_code=499)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(whole(c), token_text),
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(done)
        ]
        return frame("chat.completion", choices, usage=totals(done, req.n))

    app.add_middleware(Guard, max_body=settings.max_body_bytes, api_key=settings.api_key, state=app.state)
    return app


def check_address(host: str, port: int) -> None:
    """Fail with a message a user can act on, before loading the model, when host:port cannot be listened on."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise LMForgeError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") from None


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with a drain phase before its own shutdown.

    uvicorn closes its socket as soon as SIGTERM or SIGINT arrives, so new clients are refused. Here the first
    signal only sets app.state.draining: the socket stays open, every new request gets a 503 (see Guard), and the
    requests in flight go on. uvicorn's shutdown runs once none is left, or, after `timeout` seconds or at a second
    signal, at once: the scheduler is stopped first, so whatever still decodes ends with a 503 (an error event on a
    stream). Unlike uvicorn, this does not re-raise the signals when done, so the process exits with 0.
    """

    def __init__(self, config: uvicorn.Config, timeout: float):
        super().__init__(config)
        self.state = config.app.state
        self.timeout = timeout
        self.signals = 0
        self.deadline: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        # A signal handler runs between two bytecodes of the event loop's thread: set flags, on_tick does the rest.
        self.state.draining = True
        self.signals += 1

    async def on_tick(self, counter: int) -> bool:
        """Called by uvicorn's main loop every 0.1 s; the loop ends, and uvicorn shuts down, once should_exit is set."""
        if self.signals and not self.should_exit:
            if self.deadline is None:
                self.deadline = time.monotonic() + self.timeout
                message = "Draining: new requests get 503 while the %d in flight finish (Ctrl-C again stops them now)"
                logging.getLogger("uvicorn.error").info(message, len(self.server_state.tasks))
            if self.signals > 1 or time.monotonic() > self.deadline:
                self.state.scheduler.stop()
                self.should_exit = True
            elif not self.server_state.tasks:  # uvicorn's own set of requests in progress
                self.should_exit = True
        return await super().on_tick(counter)


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    log_level: str = "info",
    **settings,
) -> None:
    """Load run_dir and serve it until SIGTERM or Ctrl-C, which drain the server (see DrainingServer) and return."""
    from lmforge.api import LM

    options = ServeSettings(**settings)
    check_address(host, port)
    lm = LM.load(run_dir, device=device)
    app = create_app(lm, options)
    # After the drain only requests stuck on a client (one that sends or reads nothing) are left: cancel them soon.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=1)
    server = DrainingServer(config, options.timeout)
    print(f"serving {run_dir} on http://{host}:{port} (playground at /, OpenAI API under /v1)", flush=True)
    try:
        server.run()
    finally:
        app.state.scheduler.stop()  # already done by the app's lifespan, unless uvicorn failed to start
