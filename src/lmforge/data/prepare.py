"""`lmforge prepare`: sources -> cleaned documents -> tokenizer -> train/val token shards + meta.json.

One streaming pass does the work: the main process reads the sources and cuts them into batches of documents
(a huge document travels as pieces), `--workers` processes clean, hash and encode each batch, and the main
process appends the results, in order, to a temporary token stream plus one small record per document (hash,
token count, character count, status). Nothing holds more than a few batches, whatever the corpus size.
Before that pass, a char tokenizer needs one scan for its alphabet and a BPE tokenizer trains on a bounded
sample from the start of the corpus (`--tokenizer-sample-bytes`, 0 for all of it).

After the pass, the records decide what is kept: exact duplicates of an earlier document (same hash of the
cleaned text) are dropped by sorting the hashes (in partitions, so memory stays bounded), then the kept
documents are split into train and val, and their tokens are copied from the stream into fixed-size shards,
each document followed by the end-of-text token. The split is by document: with 10 or more kept documents, a
seeded random choice of round(val_fraction * documents) whole documents goes to val; with fewer (one big file,
say), the last val_fraction of every document's tokens goes to val, which for a single file is the classic
"last 10%" split.

The data dir is built under a temporary name beside the target (`.NAME.PID.XXXX.tmp`) and renamed into place
at the end, so an interrupted or failed prepare never leaves a directory that looks complete; the next prepare
of the same target removes what a killed one left behind. Work is cut into batches by a rule that depends only
on the input, and results are consumed in order, so the shards and meta.json are byte-identical for any
number of workers and on every rerun.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.data import sources as sources_mod
from lmforge.data.clean import STEPS, CleanConfig, Cleaner, step_names
from lmforge.data.shards import DEFAULT_SHARD_TOKENS, ShardWriter, token_dtype
from lmforge.data.sources import ABORT, LAST, WHOLE, ReadOptions, Source, SourceStats
from lmforge.data.tokenizer import EOT, Tokenizer, bpe_tokenizer, char_tokenizer_from_chars
from lmforge.errors import LMForgeError

FORMAT_VERSION = 1
MIN_DOCS_FOR_DOCUMENT_SPLIT = 10
DEFAULT_SAMPLE_BYTES = 100_000_000
BATCH_CHARS = 1 << 19  # a batch closes at this many characters or BATCH_DOCS documents, whichever comes first
BATCH_DOCS = 1024
COPY_TOKENS = 1 << 23  # tokens moved from the stream to the shards at a time
RECORD_CHUNK = 1 << 20  # records scanned at a time after the pass
DEDUP_PARTITION = 1 << 22  # hashes sorted at a time when looking for duplicates

RECORD = np.dtype([("hash", "<u8"), ("tokens", "<i8"), ("chars", "<i8"), ("status", "u1")])
KEEP, EMPTY, TOO_SHORT, TOO_LONG, INVALID, UNREADABLE, DUPLICATE = range(7)
STATUS = {
    "empty": EMPTY,
    "too_short": TOO_SHORT,
    "too_long": TOO_LONG,
    "invalid_utf8": INVALID,
    "unreadable_file": UNREADABLE,
}
REASONS = {code: name for name, code in STATUS.items()} | {DUPLICATE: "duplicate"}


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
    clean: CleanConfig | None = None,
    text_field: str = "text",
    on_invalid: str = "replace",
    on_error: str = "error",
    stdin_format: str = "text",
    workers: int = 1,
    tokenizer_sample_bytes: int | None = None,
    stdin=None,
) -> dict:
    """Prepare a data dir from sources; return its meta.json contents plus a "run" entry (time, workers).

    tokenizer is char, bpe, or the path of a tokenizer.json, a folder holding one, or a SentencePiece .model.
    clean chooses the cleaning rules and filters (CleanConfig(); CleanConfig.off() for none). workers > 1 encodes
    in that many processes (0: one per CPU); the output is the same for any value.
    """
    started = time.time()
    if not sources:
        raise LMForgeError("no SOURCE given; name a text file, a folder, a glob, or a named corpus such as pydocs")
    if not 0.0 <= val_fraction < 1.0:
        raise LMForgeError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    if workers < 0:
        raise LMForgeError(f"--workers must be 0 (one per CPU) or more, not {workers}")
    workers = workers or os.cpu_count() or 1
    if tokenizer_sample_bytes is None:
        tokenizer_sample_bytes = DEFAULT_SAMPLE_BYTES
    if tokenizer_sample_bytes < 0:
        raise LMForgeError(f"--tokenizer-sample-bytes must be >= 0 (0 means all), not {tokenizer_sample_bytes}")
    if sources.count("-") > 1:
        raise LMForgeError("standard input (-) can be given only once")
    clean = clean or CleanConfig()
    options = ReadOptions(text_field=text_field, on_invalid=on_invalid, on_error=on_error, stdin_format=stdin_format)
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise LMForgeError(f"{out} already exists; choose another --out or pass --overwrite")
    if tokenizer not in ("char", "bpe"):
        _check_tokenizer_path(tokenizer)
    resolved = [sources_mod.resolve(spec, input) for spec in sources]
    if out.exists():
        _check_replaceable(out, resolved)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the data dir gets the usual permissions
        for source in resolved:
            if source.kind == "stdin":
                spooled = sources_mod.spool_stdin(tmp / "stdin.spool", stdin)
                source.files = [(spooled, "jsonl" if stdin_format == "jsonl" else "text")]
        cleaner = Cleaner(clean)
        tok, tokenizer_info = _build_tokenizer(
            tokenizer, vocab_size, tokenizer_sample_bytes, resolved, options, cleaner, workers, progress
        )
        stats = [source.new_stats() for source in resolved]
        collector = _Collector(tmp, token_dtype(tok.vocab_size), stats, cleaner)
        total = _total_size(resolved)
        _run(resolved, stats, options, _WorkState(tok, clean, "encode"), workers, collector, progress, total, "encode")
        collector.close()
        meta = _finish(tmp, collector, stats, tok, clean, val_fraction, seed, shard_tokens, progress)
        meta["tokenizer"].update(tokenizer_info)
        meta = _order_meta(meta, clean, options, stats)
        tok.save(tmp / "tokenizer.json")
        if tok.eot_token != EOT:  # tell transformers (and Tokenizer.load) which token ends a document
            config = {"eos_token": tok.eot_token, "tokenizer_class": "PreTrainedTokenizerFast"}
            (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name in ("tokens.tmp", "records.tmp", "stdin.spool"):
            (tmp / name).unlink(missing_ok=True)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.time() - started
    read = sum(s.bytes for s in stats)
    return {**meta, "run": {"seconds": round(elapsed, 3), "workers": workers, "bytes_per_second": read / elapsed}}


def _check_tokenizer_path(tokenizer: str) -> None:
    path = Path(tokenizer)
    if not path.exists():
        raise LMForgeError(
            f"--tokenizer must be char, bpe, or a tokenizer.json, a folder with one, or a SentencePiece .model; "
            f"{tokenizer} is none"
        )


def _total_size(resolved: list[Source]) -> int | None:
    sizes = [source.size() for source in resolved]
    return None if any(size is None for size in sizes) else sum(sizes)


# ---------------------------------------------------------------------------------------------------- tokenizer


def _build_tokenizer(kind, vocab_size, sample_bytes, resolved, options, cleaner, workers, progress):
    """The tokenizer, and what meta.json says about where it came from."""
    if kind == "char":
        alphabet = _Alphabet()
        stats = [source.new_stats() for source in resolved]
        state = _WorkState(None, cleaner.config, "chars")
        _run(resolved, stats, options, state, workers, alphabet, progress, _total_size(resolved), "scan")
        return char_tokenizer_from_chars(alphabet.chars), {"source": "characters of the corpus"}
    if kind == "bpe":
        sample = _Sample(resolved, options, cleaner, sample_bytes)
        tok = bpe_tokenizer(sample.texts(), vocab_size)
        sample.raise_error()
        if sample.documents == 0:
            raise LMForgeError(_empty_message(sample.stats))
        return tok, {"source": "trained", "sample_bytes": sample.bytes, "sample_documents": sample.documents}
    return Tokenizer.load(kind), {"source": str(kind)}


class _Sample:
    """Cleaned, filtered, deduplicated documents from the start of the corpus, up to a byte budget, to train on.

    The tokenizers trainer pulls these from Rust; an error raised while reading is kept and raised afterwards,
    so it reaches the user as the same one-line message as in the main pass.
    """

    def __init__(self, resolved, options, cleaner: Cleaner, budget: int):
        self.resolved, self.options, self.cleaner, self.budget = resolved, options, cleaner, budget
        self.stats = [source.new_stats() for source in resolved]
        self.bytes = self.documents = 0
        self.error: LMForgeError | None = None

    def texts(self) -> Iterator[str]:
        seen: set[bytes] = set()
        edits: dict = {}
        try:
            for source, stats in zip(self.resolved, self.stats):
                for text, part in source.documents(self.options, stats):
                    if part == ABORT:
                        continue
                    cleaned, _ = self.cleaner.clean(text, edits)
                    if part == WHOLE and self.cleaner.status(cleaned) is not None:
                        continue
                    if not cleaned:
                        continue
                    data = cleaned.encode("utf-8")
                    if self.cleaner.config.dedup and part == WHOLE:
                        digest = hashlib.blake2b(data, digest_size=16).digest()
                        if digest in seen:
                            continue
                        seen.add(digest)
                    self.documents += 1
                    self.bytes += len(data)
                    yield cleaned
                    if self.budget and self.bytes >= self.budget:
                        return
        except LMForgeError as exc:
            self.error = exc

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


# -------------------------------------------------------------------------------------------------- the workers


class _WorkState:
    """What a worker needs: the tokenizer (as JSON, to cross process boundaries), the cleaner, the mode."""

    def __init__(self, tok: Tokenizer | None, clean: CleanConfig, mode: str):
        self.tok_json = tok.to_str() if tok is not None else None
        self.kind = tok.kind if tok is not None else None
        self.eot = tok.eot_token if tok is not None else None
        self.clean, self.mode = clean, mode
        self.tok, self.cleaner = tok, None

    def __getstate__(self):
        return {**self.__dict__, "tok": None, "cleaner": None}

    def ready(self) -> _WorkState:
        if self.cleaner is None:
            self.cleaner = Cleaner(self.clean)
            if self.tok is None and self.tok_json is not None:
                self.tok = Tokenizer.from_str(self.tok_json, self.kind, self.eot)
            if self.tok is not None:
                self.dtype = token_dtype(self.tok.vocab_size)
                self.unk_id = self.tok.unk_id
                self.special = np.zeros(self.tok.vocab_size, dtype=bool)
                self.special[sorted(self.tok.forbidden_ids)] = True
                self.encode = getattr(self.tok.hf, "encode_batch_fast", self.tok.hf.encode_batch)
        return self


_STATE: _WorkState | None = None


def _init_worker(state: _WorkState) -> None:
    global _STATE
    _STATE = state.ready()


def _work_in_worker(batch):
    return _work(_STATE, batch)


def _work(state: _WorkState, batch) -> dict:
    """Clean, filter, hash and encode one batch of (text, part) entries; the result goes back in order."""
    _, texts, parts = batch
    cleaner, n = state.cleaner, len(texts)
    status = np.zeros(n, dtype=np.uint8)
    chars = np.zeros(n, dtype=np.int64)
    steps = np.zeros(n, dtype=np.uint8)
    blank = np.zeros(n, dtype=bool)
    hashes = np.zeros(n, dtype=np.uint64)
    edits: dict = {}
    chosen: list[int] = []
    cleaned_texts: list[str] = []
    dedup = state.clean.dedup
    for i, (text, part) in enumerate(zip(texts, parts)):
        cleaned, steps[i] = cleaner.clean(text, edits)
        chars[i] = len(cleaned)
        if part == WHOLE:
            reason = cleaner.status(cleaned)
            if reason is not None:
                status[i] = STATUS[reason]
                continue
        else:
            blank[i] = not cleaned or cleaned.isspace()
        if dedup and state.mode == "encode":
            digest = hashlib.blake2b(cleaned.encode("utf-8"), digest_size=8).digest()
            hashes[i] = int.from_bytes(digest, "little")
        chosen.append(i)
        cleaned_texts.append(cleaned)
    result = {"status": status, "chars": chars, "steps": steps, "blank": blank, "hashes": hashes, "edits": edits}
    if state.mode == "chars":
        result["chars_seen"] = set().union(*cleaned_texts) if cleaned_texts else set()
        return result
    lengths = np.zeros(n, dtype=np.int64)
    ids = [e.ids for e in state.encode(cleaned_texts, add_special_tokens=False)] if cleaned_texts else []
    for i, row in zip(chosen, ids):
        lengths[i] = len(row)
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=state.dtype, count=int(lengths.sum()))
    if len(tokens) and state.special[tokens].any():
        # A tokenizer whose model vocabulary holds a special token's text (a word-level one, say) turned raw
        # text into a special id: encode those documents again with that text spelled out character by character.
        for j, row in enumerate(ids):
            if state.special[np.asarray(row, dtype=np.int64)].any():
                ids[j] = state.tok.encode_literal(cleaned_texts[j])
                lengths[chosen[j]] = len(ids[j])
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=state.dtype, count=int(lengths.sum()))
    if state.unk_id is not None:
        result["unknown_tokens"] = int(np.count_nonzero(tokens == state.unk_id))
    result["tokens"], result["lengths"] = tokens, lengths
    return result


@contextlib.contextmanager
def _serial_tokenizers_in_children():
    """Forked workers must not use the parent's tokenizers thread pool; with this set they encode serially
    (one process per core) and the library prints no warning about the fork."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _batches(resolved: list[Source], stats: list[SourceStats], options: ReadOptions):
    """Batches of (source index, texts, parts), cut by a rule that depends only on the input; an abort of a
    pieced document travels as ("abort", source index, reason) between the batches, in order."""
    for index, (source, stat) in enumerate(zip(resolved, stats)):
        texts: list[str] = []
        parts: list[int] = []
        size = 0
        for text, part in source.documents(options, stat):
            if part == ABORT:
                if texts:
                    yield index, texts, parts
                    texts, parts, size = [], [], 0
                yield "abort", index, text
                continue
            texts.append(text)
            parts.append(part)
            size += len(text)
            if size >= BATCH_CHARS or len(texts) >= BATCH_DOCS:
                yield index, texts, parts
                texts, parts, size = [], [], 0
        if texts:
            yield index, texts, parts


def _run(resolved, stats, options, state: _WorkState, workers: int, sink, progress: bool, total, desc: str):
    """Feed every batch through _work (here or in a pool of workers) and hand the results, in order, to sink."""
    pool = None
    if workers > 1:  # fork before the progress bar starts its thread
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with _serial_tokenizers_in_children():
            pool = context.Pool(workers, initializer=_init_worker, initargs=(state,))
    else:
        state.ready()
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, disable=not progress)
    started, shown, documents = time.time(), 0, 0

    def handle(batch, result):
        nonlocal shown, documents
        if batch[0] == "abort":
            sink.abort(batch[1], batch[2])
            return
        sink.add(batch[0], batch[2], result)
        documents += sum(1 for part in batch[2] if part in (WHOLE, LAST))
        read = sum(s.bytes for s in stats)
        bar.update(read - shown)
        shown = read
        bar.set_postfix_str(f"{documents / max(time.time() - started, 1e-9):,.0f} docs/s", refresh=False)

    try:
        pending: deque = deque()
        for batch in _batches(resolved, stats, options):
            if pool is None:
                handle(batch, None if batch[0] == "abort" else _work(state, batch))
                continue
            pending.append((batch, None if batch[0] == "abort" else pool.apply_async(_work_in_worker, (batch,))))
            while len(pending) > 2 * workers + 2:  # a bounded number of batches in flight
                done, future = pending.popleft()
                handle(done, future.get() if future is not None else None)
        while pending:
            done, future = pending.popleft()
            handle(done, future.get() if future is not None else None)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()


class _Alphabet:
    """The sink of the char tokenizer's scan: every character of the kept text."""

    def __init__(self):
        self.chars: set[str] = set()

    def add(self, source: int, parts: list[int], result: dict) -> None:
        self.chars.update(result["chars_seen"])

    def abort(self, source: int, reason: str) -> None:
        pass


# ------------------------------------------------------------------------------------------------ the collector


class _Collector:
    """Appends results in order: tokens to tokens.tmp, one RECORD per encoded document to records.tmp.

    Documents dropped in a worker (empty, too short or long) leave only counts. A document that came in pieces
    gets its record when its last piece arrives; if it turns out to be dropped, its tokens stay in the stream
    and its record's status says to skip them.
    """

    def __init__(self, tmp: Path, dtype: np.dtype, stats: list[SourceStats], cleaner: Cleaner):
        self.tmp, self.dtype, self.stats, self.cleaner = tmp, dtype, stats, cleaner
        self.tokens = open(tmp / "tokens.tmp", "wb")  # noqa: SIM115 - closed in close()
        self.records = open(tmp / "records.tmp", "wb")  # noqa: SIM115
        self.n_records = 0
        self.records_per_source = [0] * len(stats)
        self.changed = [Counter() for _ in stats]  # documents each rule changed
        self.edits = [Counter() for _ in stats]
        self.unknown_tokens = 0
        self.piece: dict | None = None

    def add(self, source: int, parts: list[int], result: dict) -> None:
        stats, changed = self.stats[source], self.changed[source]
        self.edits[source].update(result["edits"])
        self.unknown_tokens += result.get("unknown_tokens", 0)
        rows = []
        for i, part in enumerate(parts):
            status, length, chars = int(result["status"][i]), int(result["lengths"][i]), int(result["chars"][i])
            if part == WHOLE:
                changed.update(step_names(int(result["steps"][i])))
                if status != KEEP:
                    stats.drop(REASONS[status])
                    continue
                rows.append((int(result["hashes"][i]), length, chars, KEEP))
                continue
            piece = self.piece or {"hash": hashlib.blake2b(digest_size=8), "tokens": 0, "chars": 0, "steps": 0}
            piece["blank"] = piece.get("blank", True) and bool(result["blank"][i])
            piece["hash"].update(int(result["hashes"][i]).to_bytes(8, "little"))
            piece["tokens"] += length
            piece["chars"] += chars
            piece["steps"] |= int(result["steps"][i])
            self.piece = piece
            if part == LAST:
                rows.append(self._finish_piece(source))
        self.tokens.write(result["tokens"].tobytes())
        self._append(source, rows)

    def abort(self, source: int, reason: str) -> None:
        """The document being pieced is dropped (the reader counted why); its tokens are skipped later."""
        if self.piece is not None:
            self.piece["status"] = STATUS[reason]
            self._append(source, [self._finish_piece(source)])

    def _finish_piece(self, source: int) -> tuple:
        piece, self.piece = self.piece, None
        self.changed[source].update(step_names(piece["steps"]))
        status = piece.get("status")
        if status is None:
            reason = "empty" if piece["blank"] else self.cleaner.length_status(piece["chars"])
            status = STATUS[reason] if reason else KEEP
            if reason:
                self.stats[source].drop(reason)
        digest = int.from_bytes(piece["hash"].digest(), "little")
        return digest, piece["tokens"], piece["chars"], status

    def _append(self, source: int, rows: list[tuple]) -> None:
        if rows:
            np.array(rows, dtype=RECORD).tofile(self.records)
            self.n_records += len(rows)
            self.records_per_source[source] += len(rows)

    def close(self) -> None:
        self.tokens.close()
        self.records.close()


# ------------------------------------------------------------------------------------------------------- finish


def _finish(tmp, collector: _Collector, stats, tok: Tokenizer, clean, val_fraction, seed, shard_tokens, progress):
    """Deduplicate, split and write the shards from the stream; return meta.json's splits, sources, tokenizer."""
    n, dtype = collector.n_records, collector.dtype
    records = _FileArray(tmp / "records.tmp", RECORD, n)
    if clean.dedup and n:
        _mark_duplicates(records)
    per_source = _tally_sources(records, collector.records_per_source)
    for stat, tally in zip(stats, per_source):
        if tally["duplicates"]:
            stat.dropped["duplicate"] += tally["duplicates"]
    kept = sum(t["kept"] for t in per_source)
    if kept == 0:
        raise LMForgeError(_empty_message(stats))
    tail = kept < MIN_DOCS_FOR_DOCUMENT_SPLIT
    val_ordinals = np.zeros(0, dtype=np.int64)
    if val_fraction > 0 and not tail:
        n_val = max(1, round(kept * val_fraction))
        val_ordinals = np.sort(np.random.default_rng(seed).choice(kept, size=n_val, replace=False))
    stream = _FileArray(tmp / "tokens.tmp", dtype, os.path.getsize(tmp / "tokens.tmp") // dtype.itemsize)
    writers = {split: ShardWriter(tmp, split, dtype, shard_tokens) for split in ("train", "val")}
    documents = {"train": 0, "val": 0}
    characters = {"train": 0, "val": 0}
    if tail:
        _copy_tails(records, stream, writers, documents, characters, tok, val_fraction)
    else:
        _copy_documents(records, stream, writers, documents, characters, tok.eot_id, val_ordinals)
    files = {split: writer.close() for split, writer in writers.items()}
    if writers["train"].tokens == 0:
        raise LMForgeError("the train split is empty; lower --val-fraction or add text")
    for stat, tally in zip(stats, per_source):
        stat.kept, stat.characters, stat.tokens = tally["kept"], tally["characters"], tally["tokens"]
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": {
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "eot_token": tok.eot_token,
            "unknown_tokens": collector.unknown_tokens,
        },
        "dtype": dtype.name,
        "seed": seed,
        "val_fraction": val_fraction,
        "split_rule": "tail of each document" if tail else "whole documents",
        "splits": {
            split: {
                "tokens": writers[split].tokens,
                "documents": documents[split],
                "characters": characters[split],
                "shards": files[split],
            }
            for split in ("train", "val")
        },
        "changed": [dict(c) for c in collector.changed],
        "edits": [dict(e) for e in collector.edits],
    }


class _FileArray:
    """A flat array in a file, read a slice at a time with np.fromfile.

    Reading a whole memmap would map every page of the file into the process, where it counts as resident memory;
    reading slices keeps the footprint at one slice whatever the file's size.
    """

    def __init__(self, path: Path, dtype: np.dtype, length: int):
        self.path, self.dtype, self.length = path, np.dtype(dtype), int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, _ = key.indices(self.length)
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        return np.fromfile(self.path, dtype=self.dtype, count=stop - start, offset=start * self.dtype.itemsize)

    def chunks(self, size: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        stop = self.length if stop is None else stop
        for begin in range(start, stop, size):
            yield begin, self[begin : min(begin + size, stop)]

    def write(self, start: int, values: np.ndarray) -> None:
        with open(self.path, "r+b") as f:
            f.seek(start * self.dtype.itemsize)
            values.astype(self.dtype).tofile(f)


def _mark_duplicates(records: _FileArray) -> None:
    """Set DUPLICATE on every kept record whose hash an earlier kept record has; memory bounded by partitions."""
    partitions = max(1, math.ceil(len(records) / DEDUP_PARTITION))
    for p in range(partitions):
        chosen, hashes = [], []
        for start, chunk in records.chunks(RECORD_CHUNK):
            mask = chunk["status"] == KEEP
            if partitions > 1:
                mask &= chunk["hash"] % np.uint64(partitions) == np.uint64(p)
            chosen.append(np.flatnonzero(mask) + start)
            hashes.append(chunk["hash"][mask])
        index, hashed = np.concatenate(chosen), np.concatenate(hashes)
        order = np.argsort(hashed, kind="stable")  # equal hashes stay in document order: the first is kept
        ordered = hashed[order]
        repeat = np.zeros(len(index), dtype=bool)
        repeat[1:] = ordered[1:] == ordered[:-1]
        duplicates = np.sort(index[order[repeat]])
        if not len(duplicates):
            continue
        for start, chunk in records.chunks(RECORD_CHUNK):
            low, high = np.searchsorted(duplicates, [start, start + len(chunk)])
            if high > low:
                chunk["status"][duplicates[low:high] - start] = DUPLICATE
                records.write(start, chunk)


def _tally_sources(records: _FileArray, per_source: list[int]) -> list[dict]:
    starts = np.cumsum([0, *per_source])
    tallies = []
    for i in range(len(per_source)):
        kept = duplicates = characters = tokens = 0
        for _, chunk in records.chunks(RECORD_CHUNK, int(starts[i]), int(starts[i + 1])):
            keep = chunk["status"] == KEEP
            kept += int(keep.sum())
            duplicates += int((chunk["status"] == DUPLICATE).sum())
            characters += int(chunk["chars"][keep].sum())
            tokens += int(chunk["tokens"][keep].sum())
        tallies.append({"kept": kept, "duplicates": duplicates, "characters": characters, "tokens": tokens})
    return tallies


def _copy_documents(records, stream, writers, documents, characters, eot: int, val_ordinals: np.ndarray) -> None:
    """Whole documents to train or val, in corpus order, each followed by eot; COPY_TOKENS at a time."""
    n, start, offset, ordinal = len(records), 0, 0, 0
    while start < n:
        chunk = records[start : start + RECORD_CHUNK]
        take = max(1, int(np.searchsorted(np.cumsum(chunk["tokens"]), COPY_TOKENS, side="right")))
        chunk = chunk[:take]
        lengths = chunk["tokens"]
        keep = chunk["status"] == KEEP
        ordinals = ordinal + np.cumsum(keep) - 1
        in_val = keep & _member(ordinals, val_ordinals)
        span = int(lengths.sum())
        for split, chosen in (("train", keep & ~in_val), ("val", in_val)):
            if not chosen.any():
                continue
            documents[split] += int(chosen.sum())
            characters[split] += int(chunk["chars"][chosen].sum())
            if span > COPY_TOKENS:  # one document bigger than a copy: move it in slices
                for begin in range(offset, offset + span, COPY_TOKENS):
                    writers[split].write(stream[begin : min(begin + COPY_TOKENS, offset + span)])
                writers[split].write([eot])
                continue
            segment = stream[offset : offset + span]
            body = segment if chosen.all() else segment[np.repeat(chosen, lengths)]
            writers[split].write(np.insert(body, np.cumsum(lengths[chosen]), eot))
        offset += span
        ordinal += int(keep.sum())
        start += take


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values in sorted_set, elementwise, by binary search."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    where = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[where] == values


def _copy_tails(records, stream, writers, documents, characters, tok: Tokenizer, val_fraction: float) -> None:
    """Fewer than MIN_DOCS_FOR_DOCUMENT_SPLIT documents: the first (1 - val_fraction) of each one's tokens to
    train, the rest to val, each part followed by eot."""
    table = tok.char_lengths()
    offset = 0
    for record in (record for _, chunk in records.chunks(RECORD_CHUNK) for record in chunk):
        length = int(record["tokens"])
        if record["status"] == KEEP:
            cut = int(length * (1.0 - val_fraction))
            val_chars = _count_chars(tok, table, stream, offset + cut, offset + length)
            for split, begin, end, chars in (
                ("train", offset, offset + cut, int(record["chars"]) - val_chars),
                ("val", offset + cut, offset + length, val_chars),
            ):
                if end <= begin:
                    continue
                for piece in range(begin, end, COPY_TOKENS):
                    writers[split].write(stream[piece : min(piece + COPY_TOKENS, end)])
                writers[split].write([tok.eot_id])
                documents[split] += 1
                characters[split] += chars
        offset += length


def _count_chars(tok: Tokenizer, table: np.ndarray | None, stream, begin: int, end: int) -> int:
    """Characters that tokens [begin, end) of the stream stand for (by table, or by decoding when that is the
    only way; decoding in slices can miscount a character split across two slices)."""
    total = 0
    for piece in range(begin, end, COPY_TOKENS):
        ids = stream[piece : min(piece + COPY_TOKENS, end)]
        total += int(table[ids].sum()) if table is not None else len(tok.decode(ids.tolist()))
    return total


# --------------------------------------------------------------------------------------------------------- meta


def _order_meta(meta: dict, clean: CleanConfig, options: ReadOptions, stats: list[SourceStats]) -> dict:
    """meta.json in a readable order, with the per-source and total cleaning counts."""
    changed, edits = meta.pop("changed"), meta.pop("edits")
    sources = []
    for stat, changed_docs, edit_counts in zip(stats, changed, edits):
        sources.append(
            {
                "name": stat.name,
                "kind": stat.kind,
                "files": stat.files,
                "bytes": stat.bytes,
                "sha256": stat.sha256.hexdigest() if stat.hashed else None,
                "documents": stat.read,
                "kept": stat.kept,
                "dropped": dict(sorted(stat.dropped.items())),
                "replaced_bytes": stat.replaced,
                "changed_documents": {step: changed_docs[step] for step in STEPS if step in changed_docs},
                "edits": {step: edit_counts[step] for step in STEPS if step in edit_counts},
                "characters": stat.characters,
                "tokens": stat.tokens,
                "skipped_examples": stat.errors,
            }
        )
    dropped: Counter = Counter()
    for stat in stats:
        dropped.update(stat.dropped)
    total_changed: Counter = Counter()
    total_edits: Counter = Counter()
    for c, e in zip(changed, edits):
        total_changed.update(c)
        total_edits.update(e)
    cleaning = {
        "config": clean.to_dict(),
        "on_invalid": options.on_invalid,
        "on_error": options.on_error,
        "text_field": options.text_field,
        "documents_read": sum(s.read for s in stats),
        "documents_kept": sum(s.kept for s in stats),
        "dropped": dict(sorted(dropped.items())),
        "duplicates": dropped.get("duplicate", 0),
        "changed_documents": {step: total_changed[step] for step in STEPS if step in total_changed},
        "edits": {step: total_edits[step] for step in STEPS if step in total_edits},
        "invalid_utf8_bytes_replaced": sum(s.replaced for s in stats),
    }
    order = ["format_version", "tokenizer", "dtype", "seed", "val_fraction", "split_rule", "splits"]
    return {**{key: meta[key] for key in order}, "sources": sources, "cleaning": cleaning}


def _empty_message(stats: list[SourceStats]) -> str:
    parts = []
    for stat in stats:
        why = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in sorted(stat.dropped.items()))
        parts.append(f"{stat.name}: {stat.read} document(s) read" + (f", dropped: {why}" if why else ""))
    return f"the corpus is empty after reading and cleaning ({'; '.join(parts)}); check the sources and filters"


# ----------------------------------------------------------------------------------------------- the data dir


_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def _remove_stale(out: Path) -> None:
    """Remove temporary dirs a killed prepare of the same target left behind (their process is gone)."""
    for path in out.parent.glob(f".{_glob_escape(out.name)}.*"):
        match = _STALE.match(path.name)
        if match and match["name"] == out.name and path.is_dir() and not _alive(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(f".{out.name}.old-") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _check_replaceable(out: Path, resolved: list) -> None:
    """--overwrite replaces a data dir lmforge made, never the command's own input or a folder of other files."""
    target = out.resolve()
    for source in resolved:
        for path, _ in source.files:
            if path.resolve() == target or target in path.resolve().parents:
                raise LMForgeError(f"--out {out} is or holds the input {path}; write the data dir somewhere else")
    if not out.is_dir():
        raise LMForgeError(f"{out} is a file, not a data dir; choose another --out")
    if any(out.iterdir()) and not (out / "meta.json").is_file():
        raise LMForgeError(
            f"{out} is not a data dir made by lmforge prepare (it has no meta.json), and --overwrite replaces only "
            "those; choose another --out"
        )


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}-{int(time.time())}")
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


# ------------------------------------------------------------------------------------------------------ reports


def summary(meta: dict, out: str | Path) -> str:
    """Human lines: what was read and dropped per source, what cleaning changed, the tokenizer, the splits."""
    tok = meta["tokenizer"]
    lines = [f"data dir: {out}"]
    for source in meta["sources"]:
        line = (
            f"  source {source['name']}: {source['documents']:,} documents read, {source.get('kept', 0):,} kept, "
            f"{source['bytes']:,} bytes"
        )
        dropped = source.get("dropped") or {}
        if dropped:
            line += "; dropped " + ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in dropped.items())
        if source["replaced_bytes"]:
            line += f"; {source['replaced_bytes']:,} invalid UTF-8 bytes replaced by U+FFFD"
        lines.append(line)
        for example in source.get("skipped_examples", [])[:3]:
            lines.append(f"    skipped {example}")
    cleaning = meta.get("cleaning", {})
    if cleaning.get("changed_documents"):
        changed = ", ".join(f"{step} {n:,}" for step, n in cleaning["changed_documents"].items())
        lines.append(f"  cleaning changed documents: {changed}")
    separator = tok.get("eot_token", EOT)
    lines.append(
        f"  tokenizer: {tok['kind']}, vocab {tok['vocab_size']:,}, stored as {meta['dtype']}, "
        f"documents separated by {separator} (id {tok['eot_id']})"
    )
    if tok.get("unknown_tokens"):
        lines.append(f"  warning: {tok['unknown_tokens']:,} unknown tokens: the tokenizer cannot spell some text")
    for split, info in meta["splits"].items():
        lines.append(
            f"  {split}: {info['tokens']:,} tokens, {info['documents']:,} documents, "
            f"{info.get('characters', 0):,} characters, {len(info['shards'])} shard(s)"
        )
    lines.append(f"  split: {meta['split_rule']}, val fraction {meta['val_fraction']}, seed {meta['seed']}")
    run = meta.get("run")
    if run:
        lines.append(
            f"  time: {run['seconds']:.1f}s, {run['bytes_per_second'] / 1e6:.2f} MB/s with {run['workers']} worker(s)"
        )
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
