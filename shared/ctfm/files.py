"""Atomic output: a reader never sees a half-written file or folder, and a failed writer leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _current_umask()
_FILE_MODE = 0o666 & ~_UMASK


@contextmanager
def atomic_path(target: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it onto ``target``, on error delete it.

    The temporary sits in the same folder so the final ``os.replace`` is atomic on POSIX. An existing
    ``target`` folder is replaced only once the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    out = tmp if is_dir else tmp / target.name
    try:
        yield out
        if is_dir:
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
            for path in [tmp, *tmp.rglob("*")]:  # as mkdir() and open() would have made them, not mkdtemp's 0700
                os.chmod(path, _FILE_MODE | (0o111 & ~_UMASK) if path.is_dir() else _FILE_MODE)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.chmod(out, _FILE_MODE)  # as a plain open() would have made it, not mkstemp's 0600
            os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256sum(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()
