"""Load test of `lmforge serve`: N concurrent clients for a bounded time against a local server.

    python bench/serve_load.py RUN_DIR --clients 1,8 --duration 10 --rounds 3 --max-tokens 40

Starts `lmforge serve RUN_DIR` on 127.0.0.1 as a separate process, then for each client count runs that many
closed-loop clients (each sends a completion, waits for it, sends the next) for --duration seconds and reports
requests, p50/p99 latency, generated tokens/s and status counts (the target is zero 5xx). With --stream the
clients stream and time-to-first-token is reported too. With --rate R the clients are replaced by an open-loop
Poisson stream of R requests/s (a soak), and the server's resident memory before and after is reported.
Requests ask for exactly --max-tokens tokens (ignore_eos), so tokens/s compares like with like; a client told 429
waits the Retry-After seconds before its next request, as the openai client does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class Stats:
    def __init__(self):
        self.latencies: list[float] = []
        self.first_token: list[float] = []
        self.tokens = 0
        self.statuses: dict[int, int] = {}
        self.failures = 0

    def status(self, code: int) -> None:
        self.statuses[code] = self.statuses.get(code, 0) + 1


class Connection:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams: a load generator built on a full HTTP library
    spends more CPU than the server it measures (this machine has two cores)."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.headers: dict[str, str] = {}
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes):
        """Yield (status, piece of body) as the response arrives; the connection stays open for the next one."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status = int((await self.reader.readline()).split()[1])
        self.headers = headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if headers.get("transfer-encoding") == "chunked":
            while size := int((await self.reader.readline()).strip(), 16):
                yield status, await self.reader.readexactly(size)
                await self.reader.readline()
            await self.reader.readline()
        else:
            yield status, await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection") == "close":
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def one_request(connection: Connection, args, stats: Stats) -> None:
    body = {
        "prompt": random.choice(args.prompt_ids),
        "max_tokens": args.max_tokens,
        "temperature": 0.8,
        "seed": random.randrange(1 << 30),
        "ignore_eos": True,
    }
    if args.stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    code, first, received = 0, None, b""

    async def receive() -> None:
        nonlocal code, first, received
        async for status, piece in connection.post("/v1/completions", json.dumps(body).encode()):
            code, received = status, received + piece
            if first is None and b'"text": "' in piece and b'"text": ""' not in piece:
                first = time.perf_counter() - start

    try:
        await asyncio.wait_for(receive(), args.timeout)
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        stats.failures += 1
        connection.close()
        return
    stats.status(code)
    if code == 429:  # as the openai client does: wait as told, then try again
        await asyncio.sleep(float(connection.headers.get("retry-after", 1)))
    if code == 200:
        stats.latencies.append(time.perf_counter() - start)
        stats.tokens += int(re.findall(rb'"completion_tokens":\s*(\d+)', received)[-1])
        if args.stream and first is not None:
            stats.first_token.append(first)


async def closed_loop(port: int, clients: int, args) -> tuple[Stats, float]:
    stats = Stats()
    deadline = time.perf_counter() + args.duration

    async def client() -> None:
        connection = Connection(port)
        while time.perf_counter() < deadline:
            await one_request(connection, args, stats)
        connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return stats, time.perf_counter() - start


async def open_loop(port: int, rate: float, args) -> tuple[Stats, float]:
    stats = Stats()
    tasks = []

    async def one() -> None:
        connection = Connection(port)
        await one_request(connection, args, stats)
        connection.close()

    start = time.perf_counter()
    while time.perf_counter() - start < args.duration:
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(random.expovariate(rate))
    await asyncio.gather(*tasks)
    return stats, time.perf_counter() - start


def row(label: str, stats: Stats, elapsed: float) -> tuple[str, float]:
    fivexx = sum(n for code, n in stats.statuses.items() if code >= 500)
    tokens_per_s = stats.tokens / elapsed
    ttft = f"{percentile(stats.first_token, 50) * 1000:.0f} / {percentile(stats.first_token, 99) * 1000:.0f}"
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(stats.statuses.items()))
    if stats.failures:
        statuses += f", transport errors: {stats.failures}"
    line = (
        f"| {label} | {len(stats.latencies)} | {percentile(stats.latencies, 50) * 1000:.0f} | "
        f"{percentile(stats.latencies, 99) * 1000:.0f} | {ttft if stats.first_token else '-'} | "
        f"{tokens_per_s:,.0f} | {fivexx} | {statuses} |"
    )
    return line, tokens_per_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--clients", default="1,8", help="comma-separated client counts (default: 1,8)")
    parser.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many requests/s instead")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per client count (default: 15)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the client counts, alternating (default: 1)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream", action="store_true", help="stream responses and report time to first token")
    parser.add_argument("--prompt-tokens", default="4,8,16", help="lengths of the random prompts (default: 4,8,16)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (default: 1)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=64)
    args = parser.parse_args()
    # Prompts of random ordinary tokens, sent as token ids: valid for any run's tokenizer.
    from lmforge.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(Path(args.run_dir) / "tokenizer.json")
    ordinary = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i])]
    rng = random.Random(0)
    args.prompt_ids = [[rng.choice(ordinary) for _ in range(int(n))] for n in args.prompt_tokens.split(",")]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "lmforge.cli", "serve", args.run_dir, "--port", str(port), "--threads",
               str(args.threads), "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue),
               "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(command)
    try:
        deadline = time.time() + 120
        while True:
            try:
                health = httpx.get(url + "/health", timeout=1).json()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)
        warm = {"prompt": args.prompt_ids[0], "max_tokens": args.max_tokens, "ignore_eos": True}
        httpx.post(url + "/v1/completions", json=warm, timeout=args.timeout)
        mode = "streaming" if args.stream else "non-streaming"
        print(f"model {health['model']}, {args.max_tokens} tokens per request, {mode}, server threads {args.threads}, "
              f"max batch {args.max_batch}, {args.duration:g} s per row")  # fmt: skip
        print("| load | requests ok | p50 ms | p99 ms | TTFT p50 / p99 ms | tokens/s | 5xx | statuses |")
        print("|---|---|---|---|---|---|---|---|")
        if args.rate:
            before = rss_mib(server.pid)
            stats, elapsed = asyncio.run(open_loop(port, args.rate, args))
            print(row(f"Poisson {args.rate:g}/s", stats, elapsed)[0])
            after = rss_mib(server.pid)
            print(f"\nserver RSS {before:.0f} MiB -> {after:.0f} MiB ({(after / before - 1) * 100:+.1f}%)")
        else:
            # Rounds alternate the client counts, so a slow spell of a shared machine hits every count alike;
            # the ratio is of the medians.
            throughput: dict[int, list[float]] = {}
            for _ in range(args.rounds):
                for clients in (int(c) for c in args.clients.split(",")):
                    stats, elapsed = asyncio.run(closed_loop(port, clients, args))
                    line, tokens_per_s = row(f"{clients} client{'s' * (clients > 1)}", stats, elapsed)
                    throughput.setdefault(clients, []).append(tokens_per_s)
                    print(line, flush=True)
            counts = sorted(throughput)
            if len(counts) > 1 and min(throughput[counts[0]]) > 0:
                ratio = statistics.median(throughput[counts[-1]]) / statistics.median(throughput[counts[0]])
                print(f"\nthroughput at {counts[-1]} clients / {counts[0]} (medians of {args.rounds}): {ratio:.2f}x")
        health = httpx.get(url + "/health", timeout=5).json()
        print(f"after the run: active {health['active']}, waiting {health['waiting']}, errors {health['errors']}")
    finally:
        server.terminate()
        code = server.wait(timeout=60)
        print(f"server exit code after SIGTERM: {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
