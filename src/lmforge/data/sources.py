"""Readers: turn the SOURCE arguments of `lmforge prepare` into documents.

A source is a text file, a folder (searched recursively for .txt and .md), a glob, or a named corpus
(see corpora.py). A file is one document; a named corpus says how it splits into documents. Bytes that are
not UTF-8 are replaced by U+FFFD and counted, so the summary can say how much was damaged.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data import corpora
from lmforge.errors import LMForgeError

TEXT_SUFFIXES = (".txt", ".md")


@dataclass
class Source:
    """One SOURCE argument, resolved: a name for reports and the documents' origins."""

    name: str
    files: list[Path] = field(default_factory=list)
    builtin: list[tuple[str, str]] | None = None  # (document name, text) for built-in corpora

    def documents(self, stats: dict) -> Iterator[str]:
        if self.builtin is not None:
            for _, text in self.builtin:
                stats["bytes"] += len(text.encode("utf-8"))
                yield text
            return
        for path in self.files:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise LMForgeError(f"cannot read {path}: {exc.strerror}; check its permissions") from exc
            stats["bytes"] += len(data)
            stats["sha256"].update(data)
            text, replaced = decode_utf8(data)
            stats["replaced_bytes"] += replaced
            yield text


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


def _count_and_replace(exc: UnicodeDecodeError) -> tuple[str, int]:
    _replaced[0] += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("lmforge-count-replace", _count_and_replace)


def resolve(spec: str, local_copy: str | None = None) -> Source:
    """Resolve one SOURCE argument, or raise with what was wrong and what is accepted."""
    if spec == "pydocs":
        return Source(spec, builtin=corpora.pydocs_documents())
    if spec in corpora.REMOTE:
        return Source(spec, files=[corpora.remote_corpus_path(spec, local_copy)])
    path = Path(spec)
    if path.is_file():
        return Source(spec, files=[path])
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise LMForgeError(f"folder {spec} has no .txt or .md files; point to a folder of text files")
        return Source(spec, files=files)
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise LMForgeError(f"glob {spec!r} matches no files; check the pattern")
        return Source(spec, files=files)
    if path.exists():
        raise LMForgeError(f"source {spec} is neither a regular file nor a folder")
    raise LMForgeError(
        f"source {spec!r} not found; give a text file, a folder, a glob, or a named corpus ({', '.join(corpora.NAMES)})"
    )


def new_stats() -> dict:
    return {"bytes": 0, "documents": 0, "replaced_bytes": 0, "sha256": hashlib.sha256()}
