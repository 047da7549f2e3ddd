"""Atomic output: a reader never sees a half-written file or folder, and a failed writer leaves nothing behind.

A writer that is killed (SIGKILL, power loss) cannot clean up after itself: it leaves its temporary
``.<name>.<pid>.<random>.tmp/`` folder (or, for a folder replaced mid-swap, ``.<name>.<pid>.old/``) next to the
target. :func:`remove_stale_temporaries` removes those at the next start.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["STALE_AFTER_S", "atomic_path", "file_digest", "remove_stale_temporaries", "sha256sum"]

logger = logging.getLogger("ctfm.files")

#: Seconds after which a leftover temporary is removed even if a live process has its PID (PIDs are reused).
STALE_AFTER_S = 3600.0

#: ``atomic_path``'s own temporaries: ``.<name>.<pid>.<mkdtemp's 8 chars>.tmp`` and ``.<name>.<pid>.old``,
#: plus ``.<name>.<8 chars>.tmp`` of the versions before the PID was part of the name.
_TEMPORARY = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)\.(?:[a-z0-9_]{8}\.tmp|old)|[a-z0-9_]{8}\.tmp)$")

#: Temporaries this process is writing right now (so that a PID reused by a container restart is told apart).
_ACTIVE: set[str] = set()


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _current_umask()
_FILE_MODE = 0o666 & ~_UMASK


def _fsync_path(path: Path) -> None:
    """``fsync`` a file or a folder (its entries); filesystems that refuse it for folders are let be."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # e.g. EINVAL for a folder on some network filesystems
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | os.PathLike, is_dir: bool = False, fsync: bool = True, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it onto ``target``, on error delete it.

    The temporary sits in the same folder so the final ``os.replace`` is atomic on POSIX. An existing
    ``target`` folder is replaced only once the new one is complete; with ``replace=False`` an existing
    ``target`` is never touched: :class:`FileExistsError` is raised instead (and the temporary removed). With ``fsync`` (default) the written file
    (for a folder: every file and subfolder in it) is flushed to disk before the rename and the parent folder
    after it, so that after a crash ``target`` is either the old or the complete new content, never an empty
    or truncated file. The temporary's name carries this process's PID (``.<name>.<pid>.<random>.tmp``) so
    that :func:`remove_stale_temporaries` can tell a dead writer's leftovers from a live writer's.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{pid}.", suffix=".tmp", dir=target.parent))
    _ACTIVE.add(str(tmp))
    out = tmp if is_dir else tmp / target.name
    try:
        yield out
        if is_dir:
            for path in [tmp, *tmp.rglob("*")]:  # as mkdir() and open() would have made them, not mkdtemp's 0700
                if not path.is_symlink():  # chmod follows links: it would change the files linked to
                    executable = path.is_dir() or path.stat().st_mode & stat.S_IXUSR
                    os.chmod(path, _FILE_MODE | (0o111 & ~_UMASK) if executable else _FILE_MODE)
            if fsync:
                for path in [*tmp.rglob("*"), tmp]:
                    if not path.is_symlink():
                        _fsync_path(path)
            old = None
            if not replace:
                _rename_new(tmp, target)
            elif target.exists():
                old = target.with_name(f".{target.name}.{pid}.old")
                _ACTIVE.add(str(old))
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
            if replace:
                os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
                _ACTIVE.discard(str(old))
        else:
            os.chmod(out, _FILE_MODE)  # as a plain open() would have made it, not mkstemp's 0600
            if fsync:
                _fsync_path(out)
            if replace:
                os.replace(out, target)
            else:
                _rename_new(out, target)
        if fsync:
            _fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _ACTIVE.discard(str(tmp))


def _rename_new(src: Path, target: Path) -> None:
    """Rename ``src`` onto ``target`` only if nothing is at ``target`` (checked by the rename itself)."""
    if src.is_dir():
        if target.exists() or target.is_symlink():
            raise FileExistsError(errno.EEXIST, "exists", str(target))
        try:
            os.rename(src, target)  # a non-empty folder at target (created meanwhile) makes this fail
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
            raise
    else:
        os.link(src, target)  # FileExistsError if target exists
        os.unlink(src)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def _newest_mtime(path: Path) -> float:
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [p.lstat().st_mtime for p in path.iterdir()]
    return max(times)


def remove_stale_temporaries(folder: str | os.PathLike, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the leftovers of interrupted :func:`atomic_path` writes in ``folder`` (not recursive).

    Only names of ``atomic_path``'s own pattern are touched. A leftover is stale when its writer's PID is not
    alive, when that PID is this process's but the temporary is not one this process is writing (a container
    restart reuses PIDs), or when it was last modified more than ``max_age_s`` seconds ago (a PID reused by
    an unrelated process). Names of the earlier pattern without a PID are stale after ``max_age_s`` only.
    A ``.<name>.<pid>.old`` folder (killed between the two renames of a folder swap) is moved back onto
    ``<name>`` if that is missing, else removed. A writer on another host is not seen: clean only from the
    host that writes (rank 0). Returns the paths removed or restored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time()
    me = os.getpid()
    handled = []
    for path in sorted(folder.iterdir()):
        m = _TEMPORARY.match(path.name)
        if m is None or str(path) in _ACTIVE:
            continue
        try:
            age = now - _newest_mtime(path)
        except FileNotFoundError:  # finished meanwhile
            continue
        pid = m.group("pid")
        if pid is None:
            stale = age > max_age_s
        else:
            stale = int(pid) == me or not _pid_alive(int(pid)) or age > max_age_s
        if not stale:
            continue
        target = folder / m.group("name")
        try:
            if path.name.endswith(".old") and not target.exists():
                os.replace(path, target)
                logger.warning("%s: restored from the interrupted replacement %s", target, path.name)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
                logger.info("removed stale temporary %s", path)
            else:
                path.unlink()
                logger.info("removed stale temporary %s", path)
        except FileNotFoundError:
            continue
        handled.append(path)
    return handled


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk_bytes: int = 1 << 20) -> str:
    """Hex digest of a file (any ``hashlib`` algorithm: ``sha256``, ``md5``, ``sha1``, ``sha512``), read in chunks."""
    digest = hashlib.new(algorithm, usedforsecurity=False) if algorithm == "md5" else hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256sum(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    return file_digest(path, "sha256", chunk_bytes)
