"""`lmforge prepare`: sources -> tokenizer -> train/val token shards + meta.json, in one data dir.

Two passes over the sources: the first counts documents and builds or trains the tokenizer, the second
encodes and writes shards. Memory holds one batch of documents, not the corpus. The data dir is built under
a temporary name beside the target and renamed into place at the end, so an interrupted or failed prepare
never leaves a directory that looks complete.

The train/val split is by document: with 10 or more documents, a seeded random choice of
round(val_fraction * documents) whole documents goes to val; with fewer (one big file, say), the last
val_fraction of every document goes to val, which for a single file is the classic "last 10%" split.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.data import sources as sources_mod
from lmforge.data.shards import DEFAULT_SHARD_TOKENS, ShardWriter, token_dtype
from lmforge.data.tokenizer import Tokenizer, bpe_tokenizer, char_tokenizer
from lmforge.errors import LMForgeError

FORMAT_VERSION = 1
MIN_DOCS_FOR_DOCUMENT_SPLIT = 10
ENCODE_BATCH_DOCS = 256


def prepare(
    sources: list[str],
    out: str | Path,
    tokenizer: str = "char",
    vocab_size: int = 4096,
    val_fraction: float = 0.1,
    seed: int = 1337,
    input: str | None = None,
    overwrite: bool = False,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
) -> dict:
    """Prepare a data dir from sources; return its meta.json contents."""
    if not sources:
        raise LMForgeError("no SOURCE given; name a text file, a folder, a glob, or a named corpus such as pydocs")
    if not 0.0 <= val_fraction < 1.0:
        raise LMForgeError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise LMForgeError(f"{out} already exists; choose another --out or pass --overwrite")
    resolved = [sources_mod.resolve(spec, input) for spec in sources]
    started = time.time()

    # Pass 1: count documents and build the tokenizer.
    stats = [sources_mod.new_stats() for _ in resolved]
    doc_count = 0

    def texts():
        nonlocal doc_count
        for source, stat in zip(resolved, stats):
            for text in source.documents(stat):
                if text:
                    doc_count += 1
                    stat["documents"] += 1
                    yield text
                else:
                    stat["empty"] = stat.get("empty", 0) + 1

    if tokenizer == "char":
        tok = char_tokenizer(texts())
    elif tokenizer == "bpe":
        tok = bpe_tokenizer(texts(), vocab_size)
    else:
        path = Path(tokenizer)
        if not path.is_file():
            raise LMForgeError(f"--tokenizer must be char, bpe, or a tokenizer.json file; {tokenizer} is none")
        tok = Tokenizer.load(path)
        for _ in texts():
            pass
    if doc_count == 0:
        raise LMForgeError(f"the corpus is empty: {', '.join(sources)} gave no text; check the sources")

    val_docs: set[int] = set()
    split_each = doc_count < MIN_DOCS_FOR_DOCUMENT_SPLIT
    if val_fraction > 0 and not split_each:
        n_val = max(1, round(doc_count * val_fraction))
        val_docs = set(np.random.default_rng(seed).choice(doc_count, size=n_val, replace=False).tolist())

    # Pass 2: encode and write shards, in a temporary dir renamed into place at the end.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        dtype = token_dtype(tok.vocab_size)
        writers = {split: ShardWriter(tmp, split, dtype, shard_tokens) for split in ("train", "val")}
        docs_per_split = {"train": 0, "val": 0}
        chars_per_split = {"train": 0, "val": 0}
        total_bytes = sum(s["bytes"] for s in stats)
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="encode", disable=not progress)
        pass2_stats = [sources_mod.new_stats() for _ in resolved]
        pieces: list[tuple[str, str]] = []

        def flush():
            encoded = tok.encode_batch([text for _, text in pieces])
            for (split, text), ids in zip(pieces, encoded):
                writers[split].write(ids + [tok.eot_id])
                docs_per_split[split] += 1
                chars_per_split[split] += len(text)
            pieces.clear()

        index = 0
        for source, stat in zip(resolved, pass2_stats):
            before = 0
            for text in source.documents(stat):
                bar.update(stat["bytes"] - before)
                before = stat["bytes"]
                if not text:
                    continue
                tok.check_encodable(text)
                if split_each and val_fraction > 0:
                    cut = int(len(text) * (1.0 - val_fraction))
                    pieces.extend(p for p in (("train", text[:cut]), ("val", text[cut:])) if p[1])
                else:
                    pieces.append(("val" if index in val_docs else "train", text))
                index += 1
                if len(pieces) >= ENCODE_BATCH_DOCS:
                    flush()
        flush()
        bar.close()
        files = {split: writer.close() for split, writer in writers.items()}
        if writers["train"].tokens == 0:
            raise LMForgeError("the train split is empty; lower --val-fraction or add text")
        tok.save(tmp / "tokenizer.json")
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
            "dtype": dtype.name,
            "seed": seed,
            "val_fraction": val_fraction,
            "split_rule": "tail of each document" if split_each else "whole documents",
            "splits": {
                split: {
                    "tokens": writers[split].tokens,
                    "documents": docs_per_split[split],
                    "characters": chars_per_split[split],
                    "shards": files[split],
                }
                for split in ("train", "val")
            },
            "sources": [
                {
                    "name": source.name,
                    "bytes": stat["bytes"],
                    "documents": stat["documents"],
                    "empty_documents": stat.get("empty", 0),
                    "replaced_bytes": stat["replaced_bytes"],
                    "sha256": stat["sha256"].hexdigest() if source.builtin is None else None,
                }
                for source, stat in zip(resolved, stats)
            ],
            "cleaning": {"invalid_utf8_bytes_replaced": sum(s["replaced_bytes"] for s in stats)},
            "seconds": round(time.time() - started, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{int(time.time())}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def summary(meta: dict, out: str | Path) -> str:
    """A few human lines: what was read, what the tokenizer is, how many tokens each split holds."""
    tok = meta["tokenizer"]
    lines = [f"data dir: {out}"]
    for source in meta["sources"]:
        line = f"  source {source['name']}: {source['documents']} documents, {source['bytes']:,} bytes"
        if source["replaced_bytes"]:
            line += f", {source['replaced_bytes']:,} invalid UTF-8 bytes replaced by U+FFFD"
        if source["empty_documents"]:
            line += f", {source['empty_documents']} empty documents skipped"
        lines.append(line)
    lines.append(f"  tokenizer: {tok['kind']}, vocab {tok['vocab_size']:,}, stored as {meta['dtype']}")
    for split, info in meta["splits"].items():
        lines.append(
            f"  {split}: {info['tokens']:,} tokens, {info['documents']} documents, {len(info['shards'])} shard(s)"
        )
    lines.append(f"  split: {meta['split_rule']}, val fraction {meta['val_fraction']}, seed {meta['seed']}")
    return "\n".join(lines)


def load_meta(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    if not path.is_file():
        raise LMForgeError(f"{data_dir} is not a data dir (no meta.json); create one with lmforge prepare")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LMForgeError(f"cannot read {path} ({exc}); prepare the data dir again") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise LMForgeError(f"{data_dir} has data format {meta.get('format_version')}; prepare it again")
    return meta
