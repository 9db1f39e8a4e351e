"""Named corpora: text a user can train on by name.

`pydocs` is built in: the reference documentation that every CPython install ships in `pydoc_data`, one
document per topic, so the demo needs no network. `tinyshakespeare` is downloaded once from its public
address into a cache folder and checked against its sha256; offline, point LMFORGE_TINYSHAKESPEARE (or
`prepare --input`) at a local copy.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.files import sha256_file


@dataclass(frozen=True)
class RemoteCorpus:
    name: str
    url: str
    sha256: str
    filename: str
    env_var: str


REMOTE = {
    "tinyshakespeare": RemoteCorpus(
        name="tinyshakespeare",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare.txt",
        env_var="LMFORGE_TINYSHAKESPEARE",
    ),
}
NAMES = ("pydocs", *REMOTE)


def cache_dir() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def pydocs_documents() -> list[tuple[str, str]]:
    """(topic name, text) for every topic of the Python reference shipped with the interpreter."""
    from pydoc_data.topics import topics

    return [(f"pydocs:{name}", topics[name]) for name in sorted(topics)]


def fetch(url: str, sha256: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download url to dest unless a file with the right checksum is already there.

    The bytes go to a temporary file beside dest and are renamed into place only after the checksum matches,
    so an interrupted or corrupted download never leaves a file that looks valid.
    """
    if dest.exists() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != sha256:
            raise LMForgeError(
                f"download of {url} has sha256 {digest.hexdigest()}, expected {sha256}; the file is not kept"
            )
        os.replace(tmp, dest)
        return dest
    except OSError as exc:
        raise LMForgeError(f"cannot download {url} ({exc}); download it by hand and point to the local copy") from exc
    finally:
        tmp.unlink(missing_ok=True)


def remote_corpus_path(name: str, local: str | None = None) -> Path:
    """The local file for a remote corpus: an explicit copy, the env var's, the cache, or a fresh download."""
    corpus = REMOTE[name]
    local = local or os.environ.get(corpus.env_var)
    if local:
        path = Path(local)
        if not path.is_file():
            raise LMForgeError(f"local copy of {name} not found at {path}; check the path")
        if sha256_file(path) != corpus.sha256:
            raise LMForgeError(f"{path} is not the {name} corpus (its sha256 differs); give the original file")
        return path
    try:
        return fetch(corpus.url, corpus.sha256, cache_dir() / corpus.filename)
    except LMForgeError as exc:
        raise LMForgeError(f"{exc}; offline, set {corpus.env_var}=/path/to/{corpus.filename}") from exc
