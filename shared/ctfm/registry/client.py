"""Read a registry: list its bundles, download one safely, verify all of it.

:func:`download` trusts nothing it fetches before checking it. The zip is fetched with the index's size as the
limit and its sha256 compared with the index before it is opened; its members are checked
(:func:`ctfm.registry.archive.check_members`: no absolute path, ``..``, symlink or zip bomb) before a byte is
unpacked; it is unpacked into a temporary folder next to the target, the large files the registry hosts are
fetched into it with their size and sha256 checked (none may replace a file of the zip; large files it does not
host are reported with the command that fetches them), the folder is flushed to disk and only then renamed onto
``<bundle_dir>/<name>`` (:func:`ctfm.files.atomic_path`). On any failure the temporary folder, and any folder the
call created for ``bundle_dir``, is removed: nothing is left behind. An existing ``<bundle_dir>/<name>`` is never overwritten, in part or whole (it may
hold a user's outputs): the same version already there is reported and kept, another refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ctfm.download import copy_to, join
from ctfm.errors import CTFMError
from ctfm.files import atomic_path, file_digest, remove_stale_temporaries
from ctfm.registry.archive import MAX_UNPACKED_BYTES, check_members, extract_bundle
from ctfm.registry.index import PACKAGES, SIMPLE, read_index, select, version_of

__all__ = ["MARKER", "Downloaded", "default_bundle_dir", "download", "list_bundles", "verify"]

logger = logging.getLogger("ctfm.registry")

#: Written into a downloaded bundle: which registry entry it is (hidden: never packed again).
MARKER = ".registry.json"


@dataclass(frozen=True)
class Downloaded:
    """Where the bundle is, its version, and the large files it lists that the registry does not host."""

    path: Path
    version: str
    not_fetched: tuple[str, ...] = ()
    already_there: bool = False


def default_bundle_dir() -> Path:
    """Where ``monai.bundle download`` puts bundles by default: ``<torch hub dir>/bundle``."""
    import torch

    return Path(torch.hub.get_dir()) / "bundle"


def list_bundles(registry: str | os.PathLike) -> dict[str, list[dict]]:
    """``{name: [entries, highest version last]}`` of a registry."""
    by_name: dict[str, list[dict]] = {}
    for entry in read_index(registry).values():
        by_name.setdefault(entry["name"], []).append(entry)
    return {name: sorted(entries, key=version_of) for name, entries in sorted(by_name.items())}


def _fetch_checked(url: str, target: Path, sha256: str, size: int | None, what: str, consequence: str = "") -> None:
    copied = copy_to(url, target, max_bytes=size)
    if size is not None and copied.size != size:
        raise CTFMError(f"{url}: {copied.size} bytes, the index says {size}: truncated or replaced {what}{consequence}")
    if copied.sha256 != str(sha256).lower():
        raise CTFMError(f"{url}: sha256 {copied.sha256} differs from the index's {sha256}: tampered or damaged {what}{consequence}")


def _marker(registry: str) -> str:
    """The registry as the marker records it: a folder as an absolute path, a URL without credentials."""
    if "://" not in registry:
        return str(Path(registry).resolve())
    parts = urllib.parse.urlsplit(registry)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def _there(target: Path) -> dict:
    try:
        return json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def download(
    name: str,
    registry: str | os.PathLike,
    bundle_dir: str | os.PathLike | None = None,
    version: str | None = None,
    max_bytes: int = MAX_UNPACKED_BYTES,
) -> Downloaded:
    """Download bundle ``name`` (default: its highest version) from ``registry`` into ``bundle_dir/name``.

    Raises:
        CTFMError: one line: no such bundle or version, a download error, a size or sha256 that differs from the
        index, an unsafe archive, an existing folder of another version. Nothing is left in ``bundle_dir``.
    """
    registry = str(registry)
    entry = select(read_index(registry), name, version)
    bundle_dir = Path(bundle_dir) if bundle_dir is not None else default_bundle_dir()
    target = bundle_dir / name

    def existing() -> Downloaded:
        there = _there(target)
        if there.get("sha256") == entry["sha256"]:
            logger.info("%s: version %s is there already", target, entry["version"])
            return Downloaded(target, str(entry["version"]), already_there=True)
        what = f"version {there['version']}" if there.get("version") else "not from this registry"
        raise CTFMError(f"{target}: exists ({what}); remove it or choose another --bundle_dir to download version {entry['version']}")

    if target.exists() or target.is_symlink():
        return existing()
    made = [p for p in [bundle_dir, *bundle_dir.parents] if not p.exists()]
    bundle_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(bundle_dir)
    url = join(registry, entry["source"])
    not_fetched = []
    try:
        with atomic_path(target, is_dir=True, replace=False) as unpacked:
            archive = unpacked / f".{name}.download.zip"
            _fetch_checked(url, archive, entry["sha256"], entry["size"], "bundle zip", "; nothing unpacked")
            extract_bundle(archive, name, unpacked, max_bytes=max_bytes, source=url)
            archive.unlink()
            try:
                meta = json.loads((unpacked / "configs" / "metadata.json").read_text())
            except (OSError, ValueError) as err:
                raise CTFMError(f"{url}: no readable configs/metadata.json ({err})") from None
            if str(meta.get("version")) != str(entry["version"]):
                raise CTFMError(f"{url}: holds version {meta.get('version')}, the index says {entry['version']}")
            budget = max_bytes - sum(p.stat().st_size for p in unpacked.rglob("*") if p.is_file())
            for large in entry.get("large_files", []):
                rel = PurePosixPath(large["path"])  # read_index checked it stays inside
                if not large.get("hosted"):
                    not_fetched.append(rel.as_posix())
                    continue
                path = unpacked.joinpath(*rel.parts)
                if path.exists() or rel.parts[0].startswith(".") or any(p.is_file() for p in path.parents):
                    raise CTFMError(f"{url}: large file {rel} would replace a file of the bundle zip")
                budget -= large["size"]
                if budget < 0:
                    raise CTFMError(f"{url}: with its large files the bundle exceeds {max_bytes} bytes")
                path.parent.mkdir(parents=True, exist_ok=True)
                _fetch_checked(join(registry, large["source"]), path, large["sha256"], large["size"], f"large file {rel}")
            (unpacked / MARKER).write_text(json.dumps({"name": name, "version": entry["version"], "sha256": entry["sha256"],
                                                       "registry": _marker(registry)}, indent=2) + "\n")
    except FileExistsError:  # another download finished first
        return existing()
    except BaseException:
        for folder in made:  # folders this call created, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    if not_fetched:
        logger.warning("%s: %d large file(s) the registry does not host (%s); fetch them with `python -m monai.bundle "
                       "download_large_files --bundle_path %s` (needs their URLs)", target, len(not_fetched),
                       ", ".join(not_fetched), target)
    return Downloaded(target, str(entry["version"]), tuple(not_fetched))


def verify(registry: str | os.PathLike, max_bytes: int = MAX_UNPACKED_BYTES) -> list[str]:
    """Every problem of a registry, one line each: each zip's size, sha256, MD5 checksum and members, the metadata
    version inside it, each hosted large file, each wheel against the PEP 503 page's ``#sha256=``, and each
    bundle's ``ctfm`` pin against the wheels served. An empty list: all is well."""
    import re

    registry = str(registry)
    problems = []
    try:
        index = read_index(registry)
    except CTFMError as err:
        return [str(err)]
    wheels: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            page = work / "simple.html"
            copy_to(join(registry, f"{SIMPLE}/ctfm/index.html"), page, max_bytes=1 << 20)
            wheels = dict(re.findall(r'href="[^"#]*/([^/"#]+\.whl)#sha256=([0-9a-f]{64})"', page.read_text()))
        except CTFMError as err:
            problems.append(str(err))
        for wheel, digest in sorted(wheels.items()):
            try:
                _fetch_checked(join(registry, f"{PACKAGES}/{wheel}"), work / wheel, digest, None, "wheel")
            except CTFMError as err:
                problems.append(str(err))
            (work / wheel).unlink(missing_ok=True)
        served = {w.split("-")[1] for w in wheels}
        for key, entry in sorted(index.items()):
            url = join(registry, entry["source"])
            archive = work / "bundle.zip"
            try:
                _fetch_checked(url, archive, entry["sha256"], entry["size"], "bundle zip")
                md5 = file_digest(archive, "md5")
                if entry.get("checksum") and entry["checksum"] != md5:
                    problems.append(f"{url}: MD5 {md5} differs from the index's checksum {entry['checksum']}")
                with zipfile.ZipFile(archive) as z:
                    try:
                        check_members(z, entry["name"], archive.stat().st_size, max_bytes)
                    except CTFMError as err:
                        raise CTFMError(f"{url}: {err}") from None
                    meta = json.loads(z.read(f"{entry['name']}/configs/metadata.json"))
                if str(meta.get("version")) != str(entry["version"]):
                    problems.append(f"{url}: holds version {meta.get('version')}, the index says {entry['version']}")
                pin = str((meta.get("required_packages_version") or {}).get("ctfm", ""))
                if pin not in served:
                    problems.append(f"{url}: requires ctfm {pin or '(none)'}, which the registry's simple index does not serve")
            except (CTFMError, zipfile.BadZipFile, KeyError, json.JSONDecodeError) as err:
                problems.append(str(err) if isinstance(err, CTFMError) else f"{url}: {err}")
            for large in (f for f in entry.get("large_files", []) if f.get("hosted")):
                try:
                    _fetch_checked(join(registry, large["source"]), work / "large", large["sha256"], large.get("size"), "large file")
                except CTFMError as err:
                    problems.append(str(err))
    return problems

