"""Build or update a registry folder from this repository: ``python -m ctfm.registry publish --out DIR [BUNDLE ...]``.

Per bundle: its reproducible zip (:mod:`ctfm.registry.archive`), the large files of its ``large_files.yml`` that
are present in the bundle folder (hosted under ``files/``; a present file whose sha256 differs from
``large_files.yml``'s ``hash_val`` is refused), an index entry (:mod:`ctfm.registry.index`) and its Hugging Face
model repo folder (:mod:`ctfm.registry.huggingface`). Once: the ``ctfm`` wheel the bundles require, built
reproducibly (``SOURCE_DATE_EPOCH``, from a clean copy of the sources) and listed in the PEP 503 pages.

Earlier versions stay. A version is immutable: publishing a bundle version (or a wheel) that the registry already
holds with other content is refused, and nothing is written (bump the version in ``metadata.json`` /
``pyproject.toml``); publishing identical content again changes nothing. A bundle whose
``required_packages_version`` pins a ``ctfm`` the registry will not serve is refused. Every file is written
atomically and the index last, so a reader never sees an entry whose files are not there yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from ctfm.errors import CTFMError
from ctfm.files import atomic_path, sha256sum
from ctfm.registry.archive import large_file_entries, write_zip
from ctfm.registry.huggingface import write_hf_folder
from ctfm.registry.index import (
    BUNDLES,
    FILES,
    INDEX,
    PACKAGES,
    entry_key,
    latest,
    read_index,
    write_index,
    write_simple_index,
)

__all__ = ["SOURCE_DATE_EPOCH", "build_wheel", "project_root", "publish"]

logger = logging.getLogger("ctfm.registry")

#: 2022-05-30 00:00:00 UTC, the date every bundle zip member carries: the wheel's members get it too.
SOURCE_DATE_EPOCH = "1653868800"
#: What the wheel is built from (the sources of ``pyproject.toml``'s package, its readme and licence).
_WHEEL_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "shared")


def project_root() -> Path:
    """The source checkout this ``ctfm`` is imported from (``pip install -e .``).

    Raises:
        CTFMError: ``ctfm`` is installed from a wheel: publishing needs the repository.
    """
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file() or not (root / "bundles").is_dir():
        raise CTFMError(f"{root}: not the zoo's source checkout; publish runs from a clone (pip install -e .)")
    return root


def build_wheel(project: Path, out_dir: Path) -> Path:
    """Build the ``ctfm`` wheel of ``project`` into ``out_dir``, byte for byte the same for the same sources.

    The sources are copied first (no ``__pycache__``, ``*.egg-info`` or hidden files), so nothing is written into
    the checkout and stray build folders cannot leak in.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*", "build")
        for name in _WHEEL_SOURCES:
            path = project / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=ignore)
            elif path.is_file():
                shutil.copy2(path, src / name)
        env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH, PIP_DISABLE_PIP_VERSION_CHECK="1")
        command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out_dir), str(src)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise CTFMError(f"{project / 'pyproject.toml'}: building the ctfm wheel failed ({last})")
    wheels = sorted(Path(out_dir).glob("ctfm-*.whl"))
    if len(wheels) != 1:
        raise CTFMError(f"{out_dir}: expected one ctfm wheel, found {len(wheels)}")
    return wheels[0]


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hosted_large_files(bundle: Path, key: str) -> list[dict]:
    """The index's ``large_files`` of ``bundle``: hosted where present in the folder (hash checked), else external."""
    files = []
    for entry in large_file_entries(bundle):
        rel = PurePosixPath(entry["path"]).as_posix()
        path = bundle / rel
        wanted = str(entry.get("hash_val") or "").lower() or None
        hash_type = str(entry.get("hash_type") or "sha256").lower()
        if path.is_file():
            digest = sha256sum(path)
            if wanted and hash_type == "sha256" and digest != wanted:
                raise CTFMError(f"{path}: sha256 {digest} differs from large_files.yml's {wanted}: not published")
            files.append({"path": rel, "hosted": True, "source": f"{FILES}/{key}/{rel}", "sha256": digest, "size": path.stat().st_size})
        else:
            files.append({"path": rel, "hosted": False, "source": entry.get("url"),
                          "sha256": wanted if hash_type == "sha256" else None, "size": None})
    return files


def _entry(bundle: Path, zip_path: Path, key: str, large_files: list[dict]) -> dict:
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    return {
        "checksum": _md5(zip_path),
        "source": f"{BUNDLES}/{zip_path.name}",
        "name": bundle.name,
        "version": meta["version"],
        "sha256": sha256sum(zip_path),
        "size": zip_path.stat().st_size,
        "display_name": meta.get("name", bundle.name),
        "task": meta.get("task", ""),
        "monai_version": meta.get("monai_version"),
        "pytorch_version": meta.get("pytorch_version"),
        "numpy_version": meta.get("numpy_version"),
        "required_packages_version": meta.get("required_packages_version", {}),
        "optional_packages": meta.get("optional_packages", {}),
        "large_files": large_files,
    }


def _same_or_new(target: Path, staged: Path, what: str) -> bool:
    """True if ``staged`` must be moved to ``target``; False if ``target`` holds the same bytes already.

    Raises:
        CTFMError: ``target`` holds other bytes (versions are immutable).
    """
    if not target.exists():
        return True
    if sha256sum(target) == sha256sum(staged):
        return False
    raise CTFMError(f"{target}: {what} is already published with other content; bump its version to publish a change")


def publish(
    out: str | os.PathLike,
    bundles: Sequence[str | os.PathLike] | None = None,
    check: Callable[[Path], list[str]] | None = None,
    project: str | os.PathLike | None = None,
) -> list[str]:
    """Publish ``bundles`` (default: every bundle of the repository) and the ``ctfm`` wheel into the registry
    folder ``out``; returns the index keys published (new or unchanged).

    Args:
        check: called with each bundle folder; a non-empty list of problems refuses the bundle (the command line
            passes ``ci/verify_bundle.verify``: MONAI's and the model zoo's checks).

    Raises:
        CTFMError: a check failed, a version already published with other content, a ``ctfm`` pin the registry
        does not serve, a large file whose hash differs; nothing is written then.
    """
    project = Path(project) if project is not None else project_root()
    out = Path(out)
    bundles = [Path(b) for b in bundles] if bundles else sorted(p.parent.parent for p in (project / "bundles").glob("*/configs/metadata.json"))
    out.mkdir(parents=True, exist_ok=True)
    index = read_index(out) if (out / INDEX).is_file() else {}
    moves: list[tuple[Path, Path]] = []
    with tempfile.TemporaryDirectory(prefix=".publish.", dir=out) as tmp:
        stage = Path(tmp)
        wheel = build_wheel(project, stage / "wheel")
        wheel_version = wheel.name.split("-")[1]
        if _same_or_new(out / PACKAGES / wheel.name, wheel, f"wheel {wheel.name}"):
            moves.append((wheel, out / PACKAGES / wheel.name))
        served = {p.name.split("-")[1] for p in (out / PACKAGES).glob("ctfm-*.whl")} | {wheel_version}
        published = []
        for bundle in bundles:
            bundle = bundle.resolve()
            if check is not None:
                problems = check(bundle)
                if problems:
                    raise CTFMError(f"{problems[0]} ({bundle.name}: {len(problems)} problem(s); not published)")
            meta = json.loads((bundle / "configs" / "metadata.json").read_text())
            pin = str((meta.get("required_packages_version") or {}).get("ctfm", ""))
            if pin not in served:
                raise CTFMError(f"{bundle / 'configs' / 'metadata.json'}: requires ctfm {pin or '(none)'}, but the registry "
                                f"serves ctfm {', '.join(sorted(served))}; pin the version in pyproject.toml")
            key = entry_key(bundle.name, meta["version"])
            zip_path = write_zip(bundle, stage / BUNDLES / f"{key}.zip")
            large_files = _hosted_large_files(bundle, key)
            entry = _entry(bundle, zip_path, key, large_files)
            if key in index and index[key]["sha256"] != entry["sha256"]:
                raise CTFMError(f"{out / index[key]['source']}: {key} is already published with other content; "
                                f"bump the version in {bundle / 'configs' / 'metadata.json'} to publish a change")
            if _same_or_new(out / entry["source"], zip_path, key):
                moves.append((zip_path, out / entry["source"]))
            for large in (f for f in large_files if f["hosted"]):
                staged = stage / large["source"]
                staged.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(bundle / large["path"], staged)
                if _same_or_new(out / large["source"], staged, f"{key}'s {large['path']}"):
                    moves.append((staged, out / large["source"]))
            index[key] = entry
            published.append(key)
        # every check passed: files into place, then the pages that list them, then the index
        for staged, target in moves:
            with atomic_path(target) as tmp_target:
                shutil.move(staged, tmp_target)
    write_simple_index(out)
    for name in sorted({index[k]["name"] for k in published}):
        newest = latest([e for e in index.values() if e["name"] == name])
        write_hf_folder(out / newest["source"], out, newest)
    write_index(out, index)
    for key in published:
        logger.info("published %s (sha256 %s)", key, index[key]["sha256"])
    return published
