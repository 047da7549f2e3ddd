"""The registry's index: ``model_info.json`` in the model zoo's shape, plus what it lacks; and its PEP 503 page.

A registry is a plain folder that any static HTTP server, cloud bucket or Hugging Face repo can host::

    model_info.json                          the index (below)
    bundles/<name>_v<version>.zip            every published version's reproducible zip (ctfm.registry.archive)
    files/<name>_v<version>/<path>           large_files.yml entries the registry hosts
    packages/ctfm-<version>-py3-none-any.whl the wheels the bundles require
    simple/index.html, simple/ctfm/index.html   PEP 503: pip install --extra-index-url URL/simple ctfm==X
    huggingface/<name>/                      the latest version as a Hugging Face model repo folder

``model_info.json`` maps ``"<name>_v<version>"`` to the model zoo's ``checksum`` (MD5 of the zip, as its
``models/model_info.json`` has) and ``source`` (the zip, relative to the registry's root so a copy of the folder
works anywhere; an absolute URL is accepted too), and adds ``name``, ``version``, ``sha256`` and ``size`` (bytes)
of the zip, ``monai_version``, ``pytorch_version``, ``numpy_version``, ``required_packages_version`` and
``optional_packages`` from the bundle's metadata, and ``large_files``: per entry ``path`` (inside the bundle),
``source`` (relative to the registry when ``hosted``, else the URL of ``large_files.yml``), ``sha256`` and ``size``
(``null`` where unknown). Keys are sorted and there are no timestamps: the same bundles give the same index.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from packaging.version import InvalidVersion, Version

from ctfm.download import copy_to, join
from ctfm.errors import CTFMError
from ctfm.files import atomic_path, sha256sum

__all__ = [
    "BUNDLES",
    "FILES",
    "HUGGINGFACE",
    "INDEX",
    "MAX_INDEX_BYTES",
    "PACKAGES",
    "SIMPLE",
    "entry_key",
    "latest",
    "normalise_project",
    "read_index",
    "registry_of",
    "select",
    "version_of",
    "write_index",
    "write_simple_index",
]

INDEX = "model_info.json"
BUNDLES = "bundles"
FILES = "files"
PACKAGES = "packages"
SIMPLE = "simple"
HUGGINGFACE = "huggingface"
#: Environment variable naming the registry when ``--registry`` is not given.
REGISTRY_ENV = "CTFM_REGISTRY"
MAX_INDEX_BYTES = 16 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def registry_of(registry: str | os.PathLike | None) -> str:
    """The registry URL or folder: ``registry``, else ``$CTFM_REGISTRY``.

    Raises:
        CTFMError: neither is set.
    """
    value = str(registry) if registry else os.environ.get(REGISTRY_ENV, "")
    if not value:
        raise CTFMError(f"no registry: pass --registry URL_OR_DIR or set {REGISTRY_ENV}")
    return value


def entry_key(name: str, version: str) -> str:
    """The model zoo's key of one bundle version: ``<name>_v<version>``."""
    return f"{name}_v{version}"


def read_index(registry: str | os.PathLike) -> dict[str, dict]:
    """The index of a registry (URL or folder), checked for shape.

    Raises:
        CTFMError: unreachable, not JSON, or entries without name, version, source, sha256 and size.
    """
    import tempfile

    source = join(registry, INDEX)
    with tempfile.TemporaryDirectory() as tmp:
        copy_to(source, Path(tmp) / INDEX, max_bytes=MAX_INDEX_BYTES)
        try:
            index = json.loads((Path(tmp) / INDEX).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CTFMError(f"{source}: not a registry index ({err})") from None
    if not isinstance(index, dict):
        raise CTFMError(f"{source}: not a registry index (a JSON object is expected)")
    for key, entry in index.items():
        problem = _entry_problem(key, entry)
        if problem:
            raise CTFMError(f"{source}: entry {key!r} {problem}")
    return index


def _entry_problem(key: str, entry) -> str | None:
    """What makes an index entry unusable or unsafe (its files must lie inside the registry), or None."""
    from ctfm.registry.archive import path_problem

    missing = [f for f in ("name", "version", "source", "sha256", "size") if not isinstance(entry, dict) or f not in entry]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(entry["name"])) or key != entry_key(entry["name"], entry["version"]):
        return f"names bundle {entry['name']!r} version {entry['version']!r}"
    if not _SHA256.fullmatch(str(entry["sha256"])) or not isinstance(entry["size"], int):
        return "has no sha256 hex digest or no size in bytes"
    if "://" in str(entry["source"]) or path_problem(str(entry["source"])):
        return f"has source {entry['source']!r}, not a path inside the registry"
    for large in entry.get("large_files", []):
        if not isinstance(large, dict) or not isinstance(large.get("path"), str) or path_problem(large["path"]):
            return f"has a large file {large!r} whose path is not inside the bundle"
        if large.get("hosted") and ("://" in str(large.get("source")) or path_problem(str(large.get("source")))
                                    or not _SHA256.fullmatch(str(large.get("sha256"))) or not isinstance(large.get("size"), int)):
            return f"hosts large file {large['path']!r} without a source inside the registry, a sha256 and a size"
    return None


def version_of(entry: Mapping) -> Version:
    try:
        return Version(str(entry["version"]))
    except InvalidVersion:
        return Version("0")


def select(index: Mapping[str, dict], name: str, version: str | None = None) -> dict:
    """The entry of ``name`` at ``version`` (default: the highest version).

    Raises:
        CTFMError: no such bundle or version (the message lists what there is).
    """
    entries = [e for e in index.values() if e["name"] == name]
    if not entries:
        raise CTFMError(f"{name}: no such bundle in the registry; it has {', '.join(sorted({e['name'] for e in index.values()})) or 'none'}")
    if version is None:
        return latest(entries)
    for entry in entries:
        if str(entry["version"]) == str(version):
            return entry
    raise CTFMError(f"{name}: no version {version} in the registry; it has {', '.join(sorted(str(e['version']) for e in entries))}")


def latest(entries) -> dict:
    """The entry of the highest version (PEP 440 order)."""
    return max(entries, key=version_of)


def write_index(folder: Path, index: Mapping[str, dict]) -> Path:
    """Write ``folder/model_info.json`` atomically, keys sorted."""
    with atomic_path(Path(folder) / INDEX) as tmp:
        tmp.write_text(json.dumps(dict(sorted(index.items())), indent=2, sort_keys=True) + "\n")
    return Path(folder) / INDEX


def normalise_project(project: str) -> str:
    """PEP 503's normalised project name."""
    return re.sub(r"[-_.]+", "-", project).lower()


def write_simple_index(folder: Path) -> list[Path]:
    """PEP 503 pages for every wheel under ``folder/packages``: ``simple/index.html`` and ``simple/<project>/``.

    Each link carries the wheel's ``#sha256=`` (pip checks it) and its ``Requires-Python``. Returns the pages.
    """
    import zipfile

    folder = Path(folder)
    projects: dict[str, list[tuple[str, str, str]]] = {}
    for wheel in sorted((folder / PACKAGES).glob("*.whl")):
        project = normalise_project(wheel.name.split("-")[0])
        with zipfile.ZipFile(wheel) as archive:
            meta = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
            text = archive.read(meta).decode() if meta else ""
        requires = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Python:")), "")
        projects.setdefault(project, []).append((wheel.name, sha256sum(wheel), requires))
    pages = []

    def page(path: Path, title: str, links: list[str]) -> None:
        body = "\n".join(links)
        with atomic_path(path) as tmp:
            tmp.write_text(f'<!DOCTYPE html>\n<html>\n<head><meta name="pypi:repository-version" content="1.0">'
                           f"<title>{html.escape(title)}</title></head>\n<body>\n{body}\n</body>\n</html>\n")
        pages.append(path)

    page(folder / SIMPLE / "index.html", "Simple index",
         [f'<a href="{p}/">{p}</a><br/>' for p in sorted(projects)])
    for project, wheels in sorted(projects.items()):
        links = []
        for name, digest, requires in wheels:
            attr = f' data-requires-python="{html.escape(requires)}"' if requires else ""
            links.append(f'<a href="../../{PACKAGES}/{name}#sha256={digest}"{attr}>{name}</a><br/>')
        page(folder / SIMPLE / project / "index.html", f"Links for {project}", links)
    return pages
