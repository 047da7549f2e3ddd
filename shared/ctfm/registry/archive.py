"""A bundle as a zip: written reproducibly, read back only when it is safe.

**Packing** (:func:`write_zip`). Training by-products (checkpoints, TensorBoard runs, evaluation outputs,
TorchScript/ONNX/TensorRT exports, caches, embedding stores and indexes, hidden files) stay out; large files listed
in ``large_files.yml`` are left for the registry to host and fetch. A symlink anywhere in the bundle is refused (the
zip would otherwise carry the link target's content). The same files give the same zip byte for byte, whatever the
clone, its file times, umask or directory order (as the model zoo's ``compress_bundle`` does with
``touch -t 202205300000`` and ``zip -D -X -9``): every member has the timestamp 2022-05-30 00:00:00, mode 0644
(0755 if executable) from a Unix creator, no extra fields, deflate level 9; members are sorted by path, under one
top folder named after the bundle, with no directory entries. (Deflate output is fixed for a given zlib; a
different zlib build could compress differently.)

**Unpacking** (:func:`extract_bundle`). Before a byte is written, every member is checked: one top folder, the
bundle's name; no absolute path, no ``..``, no backslash or drive letter, no duplicate; only regular files and
folders (a symlink, device or FIFO member is refused); not encrypted; the unpacked size at most
:data:`MAX_RATIO` times the archive's and at most ``max_bytes`` (a zip bomb). At most :data:`MAX_MEMBERS` members; no file
that is also a folder; no two names that one case-insensitive filesystem would take for the same file. Members
are written into a fresh folder; ``zipfile`` stops each at its declared size and checks its CRC-32.
"""

from __future__ import annotations

import os
import shutil
import stat
import unicodedata
import zipfile
from pathlib import Path, PurePosixPath

from ctfm.errors import CTFMError

__all__ = [
    "EXCLUDED_PARTS",
    "EXCLUDED_SUFFIXES",
    "MAX_MEMBERS",
    "MAX_RATIO",
    "MAX_UNPACKED_BYTES",
    "ZIP_DATE_TIME",
    "bundle_files",
    "check_members",
    "check_symlinks",
    "extract_bundle",
    "large_file_entries",
    "path_problem",
    "safe_relative",
    "write_zip",
]

EXCLUDED_PARTS = {"checkpoints", "runs", "eval", "cache", "store", "index", "__pycache__", ".cache"}
#: exports built from the weights (git ignores ``bundles/*/models/*.{ts,onnx,engine,plan}``): a clone has none
EXCLUDED_SUFFIXES = {".engine", ".plan", ".onnx", ".ts", ".pyc"}
#: the model zoo's ``touch -t 202205300000``
ZIP_DATE_TIME = (2022, 5, 30, 0, 0, 0)
COMPRESSION = zipfile.ZIP_DEFLATED
COMPRESS_LEVEL = 9
_UNIX = 3  # ZipInfo.create_system: external_attr holds Unix mode bits
#: Largest unpacked / archive size ratio accepted. A bundle is mostly weights, which deflate barely shrinks
#: (ratio about 1.1); configs and docs reach 5-10. Deflate itself tops out near 1032.
MAX_RATIO = 100.0
#: Largest unpacked size accepted by default (bytes).
MAX_UNPACKED_BYTES = 8 << 30
#: Most members accepted (a bundle has tens; zero-byte members would pass the size checks).
MAX_MEMBERS = 10_000


def check_symlinks(bundle: Path) -> list[str]:
    """Every symlink (and anything that is neither file nor folder) under ``bundle``; links are not followed."""
    problems = [f"{bundle}: the bundle folder itself is a symlink"] if bundle.is_symlink() else []
    for root, dirs, files in os.walk(bundle):
        for name in sorted(dirs + files):
            path = Path(root, name)
            if path.is_symlink():
                problems.append(f"{path}: symlink inside the bundle (to {os.readlink(path)}); replace it with the file")
            elif not (path.is_file() or path.is_dir()):
                problems.append(f"{path}: neither a regular file nor a folder")
    return problems


def large_file_entries(bundle: Path) -> list[dict]:
    """The entries of ``bundle/large_files.yml`` (``path``, ``url``, ``hash_val``, ``hash_type``), or ``[]``."""
    import yaml

    path = Path(bundle) / "large_files.yml"
    entries = (yaml.safe_load(path.read_text()) or {}).get("large_files", []) if path.is_file() else []
    return [e for e in entries if isinstance(e, dict) and e.get("path")]


def bundle_files(bundle: Path) -> list[Path]:
    """The files to pack, sorted by their path inside the bundle.

    Raises:
        CTFMError: a symlink (or special file) in the bundle.
    """
    links = check_symlinks(bundle)
    if links:
        raise CTFMError("; ".join(links) + f"; {bundle}: not packaged (symlinks are refused)")
    large = {PurePosixPath(e["path"]).as_posix() for e in large_file_entries(bundle)}
    files = []
    for root, dirs, names in os.walk(bundle):
        rel_root = Path(root).relative_to(bundle)
        dirs[:] = [d for d in dirs if d not in EXCLUDED_PARTS and not d.startswith(".")]
        for name in names:
            path = Path(root, name)
            if name.startswith(".") or path.suffix in EXCLUDED_SUFFIXES or EXCLUDED_PARTS & set(rel_root.parts):
                continue
            if (rel_root / name).as_posix() in large:  # hosted and fetched by the registry, not packed
                continue
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(bundle).as_posix())


def member_info(arcname: str, path: Path) -> zipfile.ZipInfo:
    """A ZipInfo that depends only on the member's name and whether the file is executable."""
    info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE_TIME)
    info.create_system = _UNIX
    info.compress_type = COMPRESSION
    mode = 0o755 if path.stat().st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH) else 0o644
    info.external_attr = (stat.S_IFREG | mode) << 16
    return info


def write_zip(bundle: Path, target: Path) -> Path:
    """Write ``bundle``'s files under a top folder named after it into ``target`` (atomically)."""
    from ctfm.files import atomic_path

    bundle = Path(bundle)
    files = bundle_files(bundle)
    with atomic_path(target) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=COMPRESSION, compresslevel=COMPRESS_LEVEL) as archive:
            for path in files:
                arcname = f"{bundle.name}/{path.relative_to(bundle).as_posix()}"
                archive.writestr(member_info(arcname, path), path.read_bytes(),
                                 compress_type=COMPRESSION, compresslevel=COMPRESS_LEVEL)
    return Path(target)


def path_problem(path: str) -> str | None:
    """Why ``path`` (``/``-separated, relative) could leave its folder or alias another file, or None if it is safe:
    absolute, a drive letter or backslash, NUL, ``..``, an empty or ``.`` part."""
    if not path or path.startswith("/") or "\\" in path or "\0" in path or (len(path) > 1 and path[1] == ":"):
        return "an absolute or non-POSIX path"
    if any(p in ("", ".", "..") for p in path.rstrip("/").split("/")):
        return "outside its folder ('..' or an empty part)"
    return None


def safe_relative(path: str, where: str) -> PurePosixPath:
    """``path`` as a relative path that stays inside its folder.

    Raises:
        CTFMError: ``<where>: path <path> is <problem>``.
    """
    problem = path_problem(str(path))
    if problem:
        raise CTFMError(f"{where}: path {str(path)!r} is {problem}")
    return PurePosixPath(str(path))


def _member_problem(info: zipfile.ZipInfo, top: str) -> str | None:
    name = info.filename
    problem = path_problem(name)
    if problem:
        return f"member {name!r} is {problem}"
    parts = PurePosixPath(name).parts
    if parts[0] != top or len(parts) < 2:
        return f"member {name!r} is not under the bundle folder {top}/"
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return f"member {name!r} is a symlink"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return f"member {name!r} is not a regular file (mode {oct(info.external_attr >> 16)})"
    if info.flag_bits & 0x1:
        return f"member {name!r} is encrypted"
    return None


def check_members(archive: zipfile.ZipFile, top: str, archive_bytes: int, max_bytes: int = MAX_UNPACKED_BYTES) -> int:
    """Check every member of ``archive`` (see the module docstring); return the unpacked size in bytes.

    Raises:
        CTFMError: the first problem, on one line (without the archive's name: the caller adds it).
    """
    infos = archive.infolist()
    if not infos:
        raise CTFMError("empty archive")
    if len(infos) > MAX_MEMBERS:
        raise CTFMError(f"more than {MAX_MEMBERS} members")
    seen, folders = set(), set()
    for info in infos:
        problem = _member_problem(info, top)
        if problem:
            raise CTFMError(problem)
        key = unicodedata.normalize("NFC", info.filename.rstrip("/")).casefold()  # one file on every filesystem
        if key in seen:
            raise CTFMError(f"member {info.filename!r} appears twice")
        seen.add(key)
        parents = PurePosixPath(key).parents
        folders.update(str(p) for p in list(parents)[:-1])
    clash = sorted(seen & folders - {unicodedata.normalize("NFC", i.filename.rstrip("/")).casefold() for i in infos if i.is_dir()})
    if clash:
        raise CTFMError(f"member {clash[0]!r} is both a file and a folder")
    unpacked = sum(i.file_size for i in infos)
    limit = min(max_bytes, MAX_RATIO * max(archive_bytes, 1))
    if unpacked > limit:
        raise CTFMError(f"unpacks to {unpacked} bytes from {archive_bytes} (more than {limit:.0f}): a zip bomb?")
    return unpacked


def extract_bundle(
    archive_path: Path, top: str, dest: Path, max_bytes: int = MAX_UNPACKED_BYTES, source: str | None = None
) -> list[Path]:
    """Unpack the checked ``archive_path`` into the empty folder ``dest`` (``top/`` stripped); return the files.

    Raises:
        CTFMError: ``<source>: <problem>`` (``source``: where the archive came from, default its path), from
        :func:`check_members` or while inflating (a member larger than declared, a CRC error, a corrupt archive).
        The caller removes ``dest`` on error.
    """
    archive_path = Path(archive_path)
    source = source or str(archive_path)
    try:
        with zipfile.ZipFile(archive_path) as archive:
            check_members(archive, top, archive_path.stat().st_size, max_bytes)
            written = []
            for info in archive.infolist():
                rel = PurePosixPath(info.filename).relative_to(top)
                target = dest.joinpath(*rel.parts)
                if info.is_dir() or stat.S_IFMT(info.external_attr >> 16) == stat.S_IFDIR:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "xb") as out:  # zipfile stops at the declared size
                    shutil.copyfileobj(src, out, length=1 << 20)
                if (info.external_attr >> 16) & 0o111:
                    target.chmod(0o755)
                written.append(target)
    except CTFMError as err:
        raise CTFMError(f"{source}: {err}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as err:
        raise CTFMError(f"{source}: not a readable zip ({err})") from None
    except OSError as err:
        raise CTFMError(f"{source}: cannot be unpacked ({err.strerror or err})") from None
    return written
