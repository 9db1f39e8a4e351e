"""Readers: turn the SOURCE arguments of `lmforge prepare` into a stream of documents.

A SOURCE is a text file, a JSONL file (plain, .gz or .zst), a Parquet file, a folder (searched recursively for
those), a glob, a Hugging Face dataset (`hf:NAME[:CONFIG][@SPLIT]`, or a folder written by `save_to_disk`),
`-` for standard input, or a named corpus (see corpora.py). A text file is one document; a JSONL line, a
Parquet row or a dataset row is one document, its text at `--text-field` (a dotted path for nested fields).

Readers stream: they hold one document at a time, and a document longer than `piece_chars` characters (a whole
book in one file, a 50 MB line) is handed on in pieces cut after a newline, or else before a single space
between two words, so that cleaning and byte-level BPE treat the pieces exactly as they would the whole. Each
reader counts what it read and what it skipped (binary files, malformed lines, missing fields, invalid UTF-8)
into its source's SourceStats, with the first few locations, so the summary can say what happened.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import json
import re
import shutil
import sys
import threading
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data import corpora
from lmforge.errors import LMForgeError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSED_SUFFIXES = (".gz", ".zst")
PIECE_CHARS = 1 << 16  # documents longer than this many characters travel in pieces
READ_BYTES = 1 << 20
SNIFF_BYTES = 8192
MAX_ERRORS_KEPT = 5
INVALID_POLICIES = ("replace", "skip", "error")
ERROR_POLICIES = ("skip", "error")

# How a reader hands on text: a whole document, a piece with more to come, the last piece, or an abort of the
# document being pieced (its text is then the reason, such as invalid_utf8, and the earlier pieces are dropped).
WHOLE, PIECE, LAST, ABORT = 0, 1, 2, 3


@dataclass
class ReadOptions:
    text_field: str = "text"
    on_invalid: str = "replace"  # invalid UTF-8: replace with U+FFFD and count, skip the document, or stop
    on_error: str = "error"  # malformed records and unreadable files: skip and count, or stop
    stdin_format: str = "text"  # text (one document) or jsonl
    piece_chars: int = 0  # 0: PIECE_CHARS

    def __post_init__(self):
        self.piece_chars = self.piece_chars or PIECE_CHARS
        if self.on_invalid not in INVALID_POLICIES:
            raise LMForgeError(f"--on-invalid must be one of {', '.join(INVALID_POLICIES)}, not {self.on_invalid!r}")
        if self.on_error not in ERROR_POLICIES:
            raise LMForgeError(f"--on-error must be one of {', '.join(ERROR_POLICIES)}, not {self.on_error!r}")
        if self.stdin_format not in ("text", "jsonl"):
            raise LMForgeError(f"--stdin-format must be text or jsonl, not {self.stdin_format!r}")
        if not self.text_field or any(not part for part in self.text_field.split(".")):
            raise LMForgeError(f"--text-field {self.text_field!r} is not a field name or dotted path such as a.b")

    @property
    def field_path(self) -> list[str]:
        return self.text_field.split(".")


@dataclass
class SourceStats:
    """What a reader did with one SOURCE: bytes and documents read, what it skipped and why, and where."""

    name: str
    kind: str
    files: int = 0
    bytes: int = 0
    read: int = 0  # documents read: text files, JSONL lines, rows
    replaced: int = 0  # invalid UTF-8 bytes (and lone surrogates from JSON escapes) replaced by U+FFFD
    dropped: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    sha256: object = field(default_factory=hashlib.sha256)
    hashed: bool = True  # False when the bytes cannot be hashed (a dataset from the hub)
    kept: int = 0  # filled in after deduplication, with the characters and tokens of the kept documents
    characters: int = 0
    tokens: int = 0

    def drop(self, reason: str, where: str | None = None, count_read: bool = False) -> None:
        self.dropped[reason] += 1
        if count_read:
            self.read += 1
        if where and len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(f"{where}: {reason.replace('_', ' ')}")


@dataclass
class Source:
    """One SOURCE argument, resolved: a name for reports and where its documents come from."""

    name: str
    kind: str  # files, hf, stdin, builtin
    files: list[tuple[Path, str]] = field(default_factory=list)  # (path, format) with format text/jsonl/parquet
    builtin: list[tuple[str, str]] | None = None  # (document name, text) for built-in corpora
    dataset: tuple[str, str | None, str | None] | None = None  # hf: (name or path, config, split)

    def size(self) -> int | None:
        """Bytes the reader will go through, for progress; None when unknown."""
        if self.builtin is not None:
            return sum(len(text.encode("utf-8")) for _, text in self.builtin)
        if self.kind == "hf":
            return None
        return sum(path.stat().st_size for path, _ in self.files)

    def new_stats(self) -> SourceStats:
        return SourceStats(self.name, self.kind, hashed=self.kind != "hf")

    def documents(self, options: ReadOptions, stats: SourceStats) -> Iterator[tuple[str, int]]:
        """(text, part) pairs, part being WHOLE, PIECE, LAST or ABORT (see above)."""
        if self.builtin is not None:
            for _, text in self.builtin:
                data = text.encode("utf-8")
                stats.bytes += len(data)
                stats.sha256.update(data)
                stats.read += 1
                yield from split_pieces(text, options.piece_chars)
            return
        if self.kind == "hf":
            yield from _dataset_documents(self.dataset, options, stats)
            return
        for path, fmt in self.files:
            stats.files += 1
            if fmt == "parquet":
                yield from _parquet_documents(path, options, stats)
            elif fmt == "jsonl":
                yield from _jsonl_documents(path, options, stats)
            else:
                yield from _text_documents(path, options, stats)


# ---------------------------------------------------------------------------------------------------- resolving


def resolve(spec: str, local_copy: str | None = None) -> Source:
    """Resolve one SOURCE argument, or raise with what was wrong and what is accepted."""
    if spec == "pydocs":
        return Source(spec, "builtin", builtin=corpora.pydocs_documents())
    if spec in corpora.REMOTE:
        return Source(spec, "files", files=[(corpora.remote_corpus_path(spec, local_copy), "text")])
    if spec == "-":
        return Source("-", "stdin")
    if spec.startswith("hf:"):
        return Source(spec, "hf", dataset=parse_dataset_spec(spec))
    path = Path(spec)
    if path.is_file():
        return Source(spec, "files", files=[(path, file_format(path) or "text")])
    if path.is_dir():
        if is_saved_dataset(path):
            return Source(spec, "hf", dataset=(str(path), None, None))
        files = folder_files(path)
        if not files:
            raise LMForgeError(
                f"folder {spec} has no .txt, .md, .jsonl(.gz/.zst) or .parquet files; point to a folder of text"
            )
        return Source(spec, "files", files=files)
    if any(ch in spec for ch in "*?["):
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not paths:
            raise LMForgeError(f"glob {spec!r} matches no files; check the pattern")
        return Source(spec, "files", files=[(p, file_format(p) or "text") for p in paths])
    if path.exists():
        raise LMForgeError(f"source {spec} is neither a regular file nor a folder")
    raise LMForgeError(
        f"source {spec!r} not found; give a text, JSONL or Parquet file, a folder, a glob, hf:NAME, - for stdin, "
        f"or a named corpus ({', '.join(corpora.NAMES)})"
    )


def file_format(path: Path) -> str | None:
    """text, jsonl or parquet from the file name (compression suffixes looked through); None if unknown."""
    name = _uncompressed_name(path)
    if name.endswith(".parquet") and name == path.name.lower():
        return "parquet"
    if name.endswith(JSONL_SUFFIXES + (".json",)):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def folder_files(folder: Path) -> list[tuple[Path, str]]:
    """The readable files under folder, in sorted path order.

    Hidden files and folders are skipped, and so are .json files, which in a folder are more often settings than
    data (name a .json file of JSON lines explicitly to read it).
    """
    found = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts) or not path.is_file():
            continue
        fmt = file_format(path)
        if fmt and not _uncompressed_name(path).endswith(".json"):
            found.append((path, fmt))
    return found


def _uncompressed_name(path: Path) -> str:
    name = path.name.lower()
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def parse_dataset_spec(spec: str) -> tuple[str, str | None, str | None]:
    """hf:NAME[:CONFIG][@SPLIT] -> (NAME, CONFIG, SPLIT)."""
    rest, at, split = spec[len("hf:") :].partition("@")
    name, colon, config = rest.partition(":")
    if not name or (at and not split) or (colon and not config):
        raise LMForgeError(f"{spec!r} is not hf:NAME[:CONFIG][@SPLIT]; for example hf:wikitext:wikitext-2-raw-v1@train")
    return name, config or None, split or None


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def spool_stdin(dest: Path, stream=None) -> Path:
    """Copy standard input to dest so it can be read more than once (tokenizer sample, then encoding)."""
    stream = stream if stream is not None else sys.stdin.buffer
    with open(dest, "wb") as out:
        shutil.copyfileobj(stream, out, READ_BYTES)
    return dest


# ----------------------------------------------------------------------------------------------------- decoding


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode data as UTF-8, replacing each invalid byte sequence by U+FFFD; return the text and bytes replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    with _replace_lock:
        _replaced[0] = 0
        text = data.decode("utf-8", errors="lmforge-count-replace")
        return text, _replaced[0]


_replaced = [0]
_replace_lock = threading.Lock()


def _count_and_replace(exc: UnicodeError) -> tuple[str, int]:
    if isinstance(exc, UnicodeDecodeError):
        _replaced[0] += exc.end - exc.start
        return "\ufffd", exc.end
    raise exc


codecs.register_error("lmforge-count-replace", _count_and_replace)

_SURROGATE = re.compile("[\ud800-\udfff]")


def _decode_policy(data: bytes, options: ReadOptions, stats: SourceStats, where: str) -> str | None:
    """Decode per --on-invalid: the text, or None when the document is to be skipped."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if options.on_invalid == "error":
            raise LMForgeError(
                f"{where}: invalid UTF-8 at byte {exc.start}; fix the file or pass --on-invalid replace or skip"
            ) from None
        if options.on_invalid == "skip":
            stats.drop("invalid_utf8", where)
            return None
    text, replaced = decode_utf8(data)
    stats.replaced += replaced
    return text


def _fix_surrogates(text: str, options: ReadOptions, stats: SourceStats, where: str) -> str | None:
    """JSON escapes can smuggle in lone surrogates (\\ud800), which are not text; treat them as invalid UTF-8."""
    found = _SURROGATE.findall(text)
    if not found:
        return text
    if options.on_invalid == "error":
        raise LMForgeError(f"{where}: lone surrogate escape in a string; fix the line or pass --on-invalid replace")
    if options.on_invalid == "skip":
        stats.drop("invalid_utf8", where)
        return None
    stats.replaced += len(found)
    return _SURROGATE.sub("\ufffd", text)


# ------------------------------------------------------------------------------------------------------- pieces


def split_pieces(text: str, piece_chars: int) -> Iterator[tuple[str, int]]:
    """A whole document, or the pieces of one longer than piece_chars."""
    if len(text) <= piece_chars:
        yield text, WHOLE
        return
    while len(text) > piece_chars:
        cut = find_cut(text, piece_chars)
        yield text[:cut], PIECE
        text = text[cut:]
    yield text, LAST


def find_cut(text: str, limit: int) -> int:
    """Where to cut text at or before limit so that cleaning and tokenizing the two sides equal doing it whole.

    Best is just after a newline that visible text follows; next best is just before a single space between two
    visible characters. Failing both (a very long word, a line of CJK) the cut falls between two non-space
    characters that are not combining marks, which changes at most the token or two around it.
    """
    low = limit // 2
    i = text.rfind("\n", low, limit)
    while i >= low:
        if _solid(text[i + 1]):
            return i + 1
        i = text.rfind("\n", low, i)
    i = text.rfind(" ", low + 1, limit)
    while i > low:
        if _solid(text[i - 1]) and _solid(text[i + 1]):
            return i
        i = text.rfind(" ", low + 1, i)
    cut = limit
    while cut > low and (
        text[cut - 1].isspace() or text[cut].isspace() or unicodedata.combining(text[cut]) or _joins(text[cut])
    ):
        cut -= 1
    return cut if cut > low else limit


def _solid(ch: str) -> bool:
    """Visible text that cleaning keeps: not whitespace, and not a control or format character that cleaning
    could remove (which might turn the line it ends into a blank one that merges with its neighbours)."""
    return ch.isprintable() and not ch.isspace()


def _joins(ch: str) -> bool:
    """Characters that belong with the one before them: marks, variation selectors, joiners."""
    return unicodedata.category(ch) in ("Mn", "Mc", "Me", "Cf") or "\ufe00" <= ch <= "\ufe0f"


# -------------------------------------------------------------------------------------------------------- files


class _Counted(io.RawIOBase):
    """A raw file that adds every byte read to its source's byte count and sha256."""

    def __init__(self, raw, stats: SourceStats):
        self.raw, self.stats = raw, stats

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.stats.bytes += n
            self.stats.sha256.update(memoryview(buffer)[:n])
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _open(path: Path, stats: SourceStats):
    """A buffered binary stream of the file's content, decompressed by suffix, counting the bytes read."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed by the returned stream
    except OSError as exc:
        raise LMForgeError(f"cannot read {path}: {exc.strerror}; check that it exists and is readable") from exc
    counted = io.BufferedReader(_Counted(raw, stats), READ_BYTES)
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=counted, mode="rb")
    if name.endswith(".zst"):
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(counted, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, READ_BYTES)
    return counted


def _stream_errors() -> tuple[type[BaseException], ...]:
    """What a truncated or corrupt file raises while being read (the zstandard error only if it is installed)."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, gzip.BadGzipFile, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _unreadable(path: Path, exc: Exception, options: ReadOptions, stats: SourceStats, count_read: bool) -> None:
    """A file that breaks mid-read (truncated .gz, corrupt .zst): stop, or skip the rest of it per --on-error."""
    reason = str(exc) or type(exc).__name__
    if options.on_error == "error":
        raise LMForgeError(f"{path}: cannot read ({reason}); fix or remove the file, or pass --on-error skip")
    stats.drop("unreadable_file", str(path), count_read=count_read)


def _sniff(head: bytes) -> tuple[str | None, bytes]:
    """The text encoding from a byte-order mark (None for binary data), and the head without a UTF-8 mark."""
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8", head[len(codecs.BOM_UTF8) :]
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32", head
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16", head
    if b"\x00" in head:
        return None, head
    return "utf-8", head


def _text_documents(path: Path, options: ReadOptions, stats: SourceStats) -> Iterator[tuple[str, int]]:
    """A text file as one document, read in chunks and handed on in pieces when it is long."""
    stats.read += 1
    where = str(path)
    with _open(path, stats) as f:
        try:
            head = f.read(SNIFF_BYTES)
            encoding, head = _sniff(head)
            if encoding is None:
                while f.read(READ_BYTES):  # still count and hash the bytes of the source
                    pass
                stats.drop("binary_file", where)
                return
            errors = "strict" if options.on_invalid != "replace" else "lmforge-count-replace"
            decoder = codecs.getincrementaldecoder(encoding)(errors=errors)
            pieced = False
            for text, part in _decode_stream(f, head, decoder, options, stats, where):
                pieced = pieced or part == PIECE
                yield text, part
        except _stream_errors() as exc:
            _unreadable(path, exc, options, stats, count_read=False)
            if pieced:
                yield "unreadable_file", ABORT


def _decode_stream(f, head: bytes, decoder, options: ReadOptions, stats: SourceStats, where: str):
    buffer, offset, pieced = "", 0, False
    data, final = head, False
    while True:
        try:
            text, replaced = _decode_chunk(decoder, data, final)
        except UnicodeDecodeError as exc:
            if options.on_invalid == "error":
                raise LMForgeError(
                    f"{where}: invalid UTF-8 at byte {offset + exc.start}; "
                    "fix the file or pass --on-invalid replace or skip"
                ) from None
            stats.drop("invalid_utf8", where)
            while f.read(READ_BYTES):
                pass
            if pieced:
                yield "invalid_utf8", ABORT
            return
        buffer += text
        stats.replaced += replaced
        offset += len(data)
        while len(buffer) > options.piece_chars and not final:
            cut = find_cut(buffer, options.piece_chars)
            yield buffer[:cut], PIECE
            buffer, pieced = buffer[cut:], True
        if final:
            break
        data = f.read(READ_BYTES)
        final = not data
    if not pieced:
        yield from split_pieces(buffer, options.piece_chars)
        return
    for text, part in split_pieces(buffer, options.piece_chars):
        yield text, LAST if part in (WHOLE, LAST) else PIECE


def _decode_chunk(decoder, data: bytes, final: bool) -> tuple[str, int]:
    with _replace_lock:
        _replaced[0] = 0
        return decoder.decode(data, final), _replaced[0]


def _dig(value, path: list[str]):
    for key in path:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    return value


def _fields_hint(record) -> str:
    if isinstance(record, dict):
        return f"the first record has {', '.join(map(str, list(record)[:10])) or 'no fields'}"
    return f"the first record is a JSON {type(record).__name__}, not an object"


def _jsonl_documents(path: Path, options: ReadOptions, stats: SourceStats) -> Iterator[tuple[str, int]]:
    """One document per line of a JSONL file: the string at --text-field of each JSON object."""
    field_path, found, missing, first = options.field_path, 0, 0, None
    with _open(path, stats) as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line or line.isspace():
                    continue
                stats.read += 1
                where = f"{path}:{lineno}"
                if lineno == 1 and line.startswith(codecs.BOM_UTF8):
                    line = line[len(codecs.BOM_UTF8) :]
                try:
                    record = json.loads(line)
                except UnicodeDecodeError:
                    decoded = _decode_policy(line, options, stats, where)
                    if decoded is None:
                        continue
                    try:
                        record = json.loads(decoded)
                    except ValueError as exc:
                        _malformed(exc, options, stats, where)
                        continue
                except ValueError as exc:
                    _malformed(exc, options, stats, where)
                    continue
                if first is None:
                    first = record
                text = _dig(record, field_path)
                if not isinstance(text, str):
                    stats.drop("missing_field", where)
                    missing += 1
                    continue
                if b"\\u" in line and (b"\\ud" in line.lower()):
                    text = _fix_surrogates(text, options, stats, where)
                    if text is None:
                        continue
                found += 1
                yield from split_pieces(text, options.piece_chars)
        except _stream_errors() as exc:
            _unreadable(path, exc, options, stats, count_read=True)
    if first is not None and not found and missing:
        raise LMForgeError(
            f"{path}: no record has a string field {options.text_field!r} ({_fields_hint(first)}); "
            "choose the field with --text-field"
        )


def _malformed(exc: ValueError, options: ReadOptions, stats: SourceStats, where: str) -> None:
    message = str(exc).split(":")[0] if isinstance(exc, json.JSONDecodeError) else str(exc)
    if options.on_error == "error":
        raise LMForgeError(f"{where}: malformed JSON ({message}); fix the line or pass --on-error skip")
    stats.drop("malformed_json", where)


def _parquet_documents(path: Path, options: ReadOptions, stats: SourceStats) -> Iterator[tuple[str, int]]:
    """One document per row of a Parquet file: the string (or UTF-8 bytes) at --text-field."""
    import pyarrow.parquet as pq

    size = path.stat().st_size
    try:  # pyarrow reads the file itself; hash its bytes as the source's here
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(READ_BYTES), b""):
                stats.sha256.update(block)
    except OSError as exc:
        raise LMForgeError(f"cannot read {path}: {exc.strerror}; check that it exists and is readable") from exc
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for files that are not Parquet
        if options.on_error == "error":
            raise LMForgeError(f"cannot read {path} as Parquet ({exc}); fix the file or pass --on-error skip") from exc
        stats.drop("unreadable_file", str(path), count_read=True)
        stats.bytes += size
        return
    column, rest = options.field_path[0], options.field_path[1:]
    names = parquet.schema_arrow.names
    if column not in names:
        raise LMForgeError(
            f"{path} has no column {column!r} (columns: {', '.join(names)}); choose one with --text-field"
        )
    total_rows, done_rows, counted = max(1, parquet.metadata.num_rows), 0, 0
    for batch in parquet.iter_batches(batch_size=1024, columns=[column]):
        for value in batch.column(0).to_pylist():
            done_rows += 1
            stats.read += 1
            text = _dig(value, rest)
            where = f"{path}:row {done_rows}"
            if isinstance(text, bytes):
                text = _decode_policy(text, options, stats, where)
                if text is None:
                    continue
            if not isinstance(text, str):
                stats.drop("missing_field", where)
                continue
            yield from split_pieces(text, options.piece_chars)
        now = size * done_rows // total_rows
        stats.bytes += now - counted
        counted = now
    stats.bytes += size - counted


def _dataset_documents(dataset, options: ReadOptions, stats: SourceStats) -> Iterator[tuple[str, int]]:
    """One document per row of a Hugging Face dataset (a save_to_disk folder, a local dataset, or the hub)."""
    name, config, split = dataset
    column, rest = options.field_path[0], options.field_path[1:]
    data = _load_dataset(name, config, split)
    names = getattr(data, "column_names", None)
    if names is not None and column not in names:
        raise LMForgeError(f"dataset {name} has no column {column!r} (columns: {', '.join(names)}); set --text-field")
    if hasattr(data, "iter"):
        rows = (value for batch in data.select_columns([column]).iter(batch_size=1000) for value in batch[column])
    else:
        rows = (row.get(column) for row in data)
    try:
        for index, value in enumerate(rows):
            stats.read += 1
            text = _dig(value, rest)
            if not isinstance(text, str):
                stats.drop("missing_field", f"{name}:row {index + 1}")
                continue
            stats.bytes += len(text.encode("utf-8"))
            yield from split_pieces(text, options.piece_chars)
    except LMForgeError:
        raise
    except Exception as exc:  # streaming datasets fail lazily, with the library's own exception types
        raise LMForgeError(f"reading dataset {name} failed ({exc}); check the dataset or use a local copy") from exc


def _load_dataset(name: str, config: str | None, split: str | None):
    try:
        import datasets
    except ImportError as exc:
        raise LMForgeError("reading Hugging Face datasets needs the datasets package: pip install datasets") from exc
    path = Path(name)
    try:
        if path.is_dir() and is_saved_dataset(path):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                split = split or "train"
                if split not in data:
                    raise LMForgeError(f"dataset {name} has no split {split!r} (splits: {', '.join(data)}); add @SPLIT")
                data = data[split]
            return data
        return datasets.load_dataset(name, config, split=split or "train", streaming=True)
    except LMForgeError:
        raise
    except Exception as exc:  # network, missing dataset, bad config: the library raises many types
        raise LMForgeError(
            f"cannot load dataset {name!r}{f' config {config}' if config else ''} ({str(exc).splitlines()[0]}); "
            "check the name, or download it and give the local folder"
        ) from exc
