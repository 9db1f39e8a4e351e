"""Benchmark `lmforge prepare` against the raw throughput of `tokenizers`' own encode_batch.

    python bench/prepare.py                       # 200 MB and 2 GB corpora, 2 workers
    python bench/prepare.py --sizes 50M --workers 1

For each size it generates (once, cached under --dir) a synthetic JSONL corpus from the built-in pydocs corpus,
perturbed: paragraphs recombined into documents, words swapped for made-up ones and numbers, a share of
documents with CRLF line ends, runs of spaces, control characters, non-ASCII text, and exact duplicates, so
every cleaning rule and the deduplication have work to do. A byte-level BPE is trained once on a sample. Then:

- `lmforge prepare CORPUS --tokenizer bpe.json --workers N` runs as a subprocess; the script records its wall
  time, MB/s, the peak RSS of the main process and the peak of the summed PSS of the whole process tree (the
  workers share pages with the parent after fork, which a plain RSS sum would count twice).
- In the same run, the same documents are read into memory batch by batch and passed to the same tokenizer's
  `encode_batch` (and `encode_batch_fast`), with the library's thread pool on all cores; only the encode calls
  are timed. That is the ceiling a pipeline that also reads, cleans, deduplicates and writes can approach.

The ratio of the two is the figure to compare; absolute numbers on shared machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

CORPUS_VERSION = 2
FILE_BYTES = 100_000_000
SEED = 0


def parse_size(text: str) -> int:
    units = {"k": 10**3, "m": 10**6, "g": 10**9}
    text = text.strip().lower().removesuffix("b")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


# --------------------------------------------------------------------------------------------- synthetic corpus


def paragraph_pool(rng: random.Random, count: int = 20000) -> list[str]:
    """Perturbed paragraphs of the Python reference docs: the raw material of every document."""
    from pydoc_data.topics import topics

    paragraphs = [p for text in topics.values() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 40]
    words = sorted({w for p in paragraphs for w in re.findall(r"[A-Za-z]{4,}", p)})
    letters = "abcdefghijklmnopqrstuvwxyz"
    made_up = []
    for _ in range(3000):
        word = list(rng.choice(words))
        for _ in range(rng.randint(1, 3)):
            word[rng.randrange(len(word))] = rng.choice(letters)
        made_up.append("".join(word))
    extras = ["café", "naïve", "東京", "Ünïcödé", "🙂", "—", "“quoted”", "größer", "İstanbul", "ﬁne"]
    pool = []
    for _ in range(count):
        tokens = rng.choice(paragraphs).split(" ")
        for _ in range(max(1, len(tokens) // 15)):
            i = rng.randrange(len(tokens))
            roll = rng.random()
            tokens[i] = (
                rng.choice(made_up)
                if roll < 0.7
                else str(rng.randint(0, 10 ** rng.randint(1, 6)))
                if roll < 0.9
                else rng.choice(extras)
            )
        pool.append(" ".join(tokens))
    return pool


def dirty(text: str, rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.03:
        return text.replace("\n", "\r\n")
    if roll < 0.06:
        return text.replace(". ", ".   ").replace("\n", "  \n")
    if roll < 0.08:
        return text.replace(" the ", " the\u200b ").replace("\n\n", "\n\n\n\n")
    if roll < 0.09:
        return "\ufeff" + text.replace("e", "e\u0301", 3)
    return text


def make_corpus(directory: Path, size: int) -> list[Path]:
    """JSONL files of about FILE_BYTES each, summing to size bytes; reused when already there."""
    directory.mkdir(parents=True, exist_ok=True)
    done = directory / "done.json"
    if done.is_file() and json.loads(done.read_text()) == {"version": CORPUS_VERSION, "size": size}:
        return sorted(directory.glob("*.jsonl"))
    for old in directory.glob("*.jsonl"):
        old.unlink()
    rng = random.Random(SEED)
    pool = paragraph_pool(rng)
    recent: list[str] = []
    written, index = 0, 0
    started = time.time()
    while written < size:
        path = directory / f"part-{index:04d}.jsonl"
        lines = []
        in_file = 0
        while in_file < min(FILE_BYTES, size - written):
            if recent and rng.random() < 0.01:
                text = rng.choice(recent)  # an exact duplicate of a recent document
            else:
                text = dirty("\n\n".join(rng.choices(pool, k=rng.randint(3, 30))), rng)
                recent = (recent + [text])[-1000:]
            line = json.dumps({"id": written + in_file, "text": text}, ensure_ascii=False) + "\n"
            lines.append(line)
            in_file += len(line.encode("utf-8"))
        path.write_text("".join(lines), encoding="utf-8")
        written += in_file
        index += 1
        print(f"  wrote {path.name}: {written / 1e6:,.0f} MB of {size / 1e6:,.0f} MB", flush=True)
    done.write_text(json.dumps({"version": CORPUS_VERSION, "size": size}))
    print(f"  generated in {time.time() - started:.0f}s", flush=True)
    return sorted(directory.glob("*.jsonl"))


def documents(files: list[Path], limit: int | None = None):
    read = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                read += len(line)
                yield text
                if limit and read >= limit:
                    return


# ----------------------------------------------------------------------------------------------- measurements


def train_tokenizer(files: list[Path], out: Path, vocab_size: int, sample: int) -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from lmforge.data.tokenizer import bpe_tokenizer

    started = time.time()
    tok = bpe_tokenizer(documents(files, sample), vocab_size)
    tok.save(out)
    return time.time() - started


def raw_encode(files: list[Path], tokenizer: Path, limit: int | None) -> dict:
    """MB/s of encode_batch and encode_batch_fast on the same documents, batched like the pipeline."""
    from tokenizers import Tokenizer

    results = {}
    for name in ("encode_batch", "encode_batch_fast"):
        hf = Tokenizer.from_file(str(tokenizer))  # a fresh one each time: no warm BPE cache
        hf.encode_special_tokens = True
        encode = getattr(hf, name)
        batch, size, seconds, total, tokens = [], 0, 0.0, 0, 0
        for text in [*documents(files, limit), None]:
            if text is not None:
                batch.append(text)
                size += len(text)
                total += len(text.encode("utf-8"))
            if batch and (text is None or size >= 1 << 19 or len(batch) >= 1024):
                started = time.perf_counter()
                out = encode(batch, add_special_tokens=False)
                seconds += time.perf_counter() - started
                tokens += sum(len(e.ids) for e in out)
                batch, size = [], 0
        results[name] = {"bytes": total, "seconds": seconds, "mb_per_s": total / seconds / 1e6, "tokens": tokens}
        print(f"  raw {name}: {total / 1e6:,.0f} MB in {seconds:.1f}s = {total / seconds / 1e6:.2f} MB/s", flush=True)
    return results


def tree_memory(root: int) -> tuple[int, int]:
    """(RSS of root, summed PSS of root and its descendants), in bytes, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    todo, pss, rss = [root], 0, 0
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                    elif line.startswith("Rss:") and pid == root:
                        rss = int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


def run_prepare(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "lmforge.cli",
        "prepare",
        str(corpus),
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--overwrite",
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak_rss = peak_pss = 0
    while process.poll() is None:
        rss, pss = tree_memory(process.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.25)
    elapsed = time.time() - started
    output = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"prepare failed:\n{output}")
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    meta = json.loads((out / "meta.json").read_text())
    read = sum(source["bytes"] for source in meta["sources"])
    print(output.strip(), flush=True)
    return {
        "seconds": elapsed,
        "bytes": read,
        "mb_per_s": read / elapsed / 1e6,
        "peak_rss_main": peak_rss,
        "peak_pss_tree": peak_pss,
        "max_child_rss": maxrss,
        "tokens": meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="200M,2G", help="corpus sizes, comma separated (default: 200M,2G)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="prepare --workers (default: CPUs)")
    parser.add_argument("--dir", default="/tmp/lmforge-bench", help="where corpora and outputs go")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--train-bytes", type=parse_size, default=parse_size("20M"), help="tokenizer sample")
    parser.add_argument(
        "--raw-bytes", type=parse_size, default=parse_size("100M"), help="text the raw encode_batch figure uses"
    )
    args = parser.parse_args()
    root = Path(args.dir)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    corpora = {}
    for size in sizes:
        print(f"corpus {size / 1e6:,.0f} MB", flush=True)
        corpora[size] = make_corpus(root / f"corpus-{size}", size)
    tokenizer = root / f"bpe-{args.vocab_size}.json"
    train_seconds = train_tokenizer(corpora[sizes[0]], tokenizer, args.vocab_size, args.train_bytes)
    print(
        f"trained a {args.vocab_size}-token byte-level BPE on {args.train_bytes / 1e6:.0f} MB in {train_seconds:.1f}s"
    )
    print(f"raw tokenizers throughput on {min(args.raw_bytes, sizes[0]) / 1e6:,.0f} MB, {os.cpu_count()} cores")
    raw = raw_encode(corpora[sizes[0]], tokenizer, args.raw_bytes)
    rows = []
    for size in sizes:
        print(f"lmforge prepare, {size / 1e6:,.0f} MB, --workers {args.workers}", flush=True)
        result = run_prepare(root / f"corpus-{size}", tokenizer, root / f"out-{size}", args.workers)
        result["size"] = size
        rows.append(result)
    print()
    print(
        "| corpus | workers | time | prepare MB/s | raw encode_batch MB/s | ratio | ratio to encode_batch_fast "
        "| peak RSS (main) | peak PSS (all processes) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        base, fast = raw["encode_batch"]["mb_per_s"], raw["encode_batch_fast"]["mb_per_s"]
        print(
            f"| {row['size'] / 1e6:,.0f} MB | {args.workers} | {row['seconds']:.0f}s | {row['mb_per_s']:.2f} | "
            f"{base:.2f} | {row['mb_per_s'] / base:.0%} | {row['mb_per_s'] / fast:.0%} | "
            f"{row['peak_rss_main'] / 2**20:,.0f} MiB | {row['peak_pss_tree'] / 2**20:,.0f} MiB |"
        )


if __name__ == "__main__":
    main()
