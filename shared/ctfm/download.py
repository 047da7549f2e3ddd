"""Copy one file from an ``http(s)://`` or ``file://`` URL or a local path, bounded in size and hashed on the way.

The one download path of the package: :mod:`ctfm.weights` fetches weights with it, :mod:`ctfm.registry` bundles,
wheels and large files. Nothing is trusted before it is checked: the caller passes the size limit (a zip-bomb or
a runaway server stops there) and compares the returned sha256 with the one it expects.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ctfm.errors import CTFMError

__all__ = ["Copied", "TIMEOUT_S", "copy_to", "is_url", "join"]

#: Seconds a connection may stay silent before the copy fails.
TIMEOUT_S = 60.0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Copied:
    """What :func:`copy_to` wrote: its sha256 (hex), its size in bytes, and the sha256 the server stated for it
    (Hugging Face's ``X-Linked-Etag`` for LFS files), if any."""

    sha256: str
    size: int
    served_sha256: str | None = None


def is_url(source: str | os.PathLike) -> bool:
    return "://" in str(source)


def join(base: str | os.PathLike, rel: str) -> str:
    """``rel`` (a ``/``-separated relative path) under a base URL or folder."""
    base = str(base)
    if not is_url(base):
        return str(Path(base) / rel)
    return urllib.parse.urljoin(base if base.endswith("/") else base + "/", rel)


def copy_to(source: str | os.PathLike, target: str | os.PathLike, max_bytes: int | None = None) -> Copied:
    """Copy ``source`` (URL or path) into the file ``target`` (which the caller makes atomic), hashing it.

    Raises:
        CTFMError: one line naming ``source``: missing, unreachable, an HTTP error, or more than ``max_bytes``.
    """
    source = str(source)
    served = None
    try:
        if is_url(source) and not source.startswith("file://"):
            with urllib.request.urlopen(source, timeout=TIMEOUT_S) as response:
                etag = (response.headers.get("X-Linked-Etag") or "").strip('"').lower()
                served = etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None
                return _stream(response, source, Path(target), max_bytes, served)
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path)) if is_url(source) else Path(source)
        if not path.is_file():
            raise CTFMError(f"{source}: no such file")
        with open(path, "rb") as stream:
            return _stream(stream, source, Path(target), max_bytes, served)
    except OSError as err:  # urllib's HTTPError / URLError are OSErrors
        raise CTFMError(f"{source}: download failed ({getattr(err, 'reason', None) or err})") from None
    except (http.client.HTTPException, ValueError) as err:  # a connection cut mid-body, a malformed URL
        raise CTFMError(f"{source}: download failed ({type(err).__name__}: {err})") from None


def _stream(stream, source: str, target: Path, max_bytes: int | None, served: str | None) -> Copied:
    digest, size = hashlib.sha256(), 0
    with open(target, "wb") as out:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise CTFMError(f"{source}: larger than the {max_bytes} bytes expected")
            digest.update(chunk)
            out.write(chunk)
    return Copied(digest.hexdigest(), size, served)
