"""Small file helpers shared by data preparation, downloads and checkpoints."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from pathlib import Path

from lmforge.errors import LMForgeError


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks so large files need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write text beside path under a temporary name, then rename it into place: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def exclusive(directory: str | Path, what: str):
    """Hold an OS lock on directory/.lock while the block runs, or refuse at once, naming the holder's pid.

    The lock is the kernel's (flock): a process that dies, however, releases it, so no stale lock outlives a crash.
    The file stays empty (the holder is read from /proc/locks), so taking the lock changes no byte of the
    directory. On a file system without flock the block runs unlocked.
    """
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    try:
        with open(path, "a", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    yield  # no locks here (some network file systems): run as before
                    return
                raise LMForgeError(
                    f"{directory} is in use by another {what} (pid {lock_holder(path)}); wait for it to finish or "
                    "choose another --out"
                ) from None
            yield
    finally:
        if created and [p.name for p in directory.iterdir()] == [".lock"]:  # refused before writing anything
            path.unlink()
            directory.rmdir()


def lock_holder(path: Path) -> str:
    """The pid holding a flock on path, from /proc/locks (Linux); 'unknown' elsewhere."""
    inode = os.stat(path).st_ino
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            return fields[4]
    return "unknown"
