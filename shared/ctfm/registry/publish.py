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

import fcntl
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ctfm.errors import CTFMError
from ctfm.files import atomic_path, file_digest, sha256sum
from ctfm.registry.archive import large_file_entries, safe_relative, write_zip
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


def committed_copy(project: Path, paths: Sequence[str], dest: Path) -> bool:
    """Copy ``paths`` (relative to ``project``) as the checkout's HEAD commit holds them into ``dest``
    (``git archive``); False, copying nothing, when ``project`` is not a git checkout. Uncommitted changes there
    are left out, with a warning naming them: a published version is what its commit holds.

    Raises:
        CTFMError: git failed.
    """
    if not (project / ".git").exists() or shutil.which("git") is None:
        return False
    git = ["git", "-C", str(project)]
    done = subprocess.run([*git, "archive", "--format=tar", "HEAD", "--", *paths], capture_output=True)
    if done.returncode != 0:
        raise CTFMError(f"{project}: git archive HEAD failed ({done.stderr.decode(errors='replace').strip()[:200]})")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        tar.extractall(dest, filter="data")
    dirty = subprocess.run([*git, "status", "--porcelain", "--", *paths], capture_output=True, text=True).stdout.split("\n")
    dirty = [line[3:] for line in dirty if line.strip()]
    if dirty:
        logger.warning("%s: publishing %s as committed; %d uncommitted change(s) left out (%s)", project,
                       ", ".join(paths), len(dirty), ", ".join(dirty[:5]) + (" ..." if len(dirty) > 5 else ""))
    return True


def _fixed_modes(folder: Path) -> None:
    """0755 for folders and executables, 0644 for other files: the wheel records modes, umask must not matter."""
    for path in [folder, *folder.rglob("*")]:
        executable = path.is_dir() or path.stat().st_mode & 0o100
        path.chmod(0o755 if executable else 0o644)


def build_wheel(project: Path, out_dir: Path) -> Path:
    """Build the ``ctfm`` wheel of ``project`` (its HEAD commit in a git checkout) into ``out_dir``, byte for byte
    the same for the same sources and setuptools.

    The sources are copied first (no ``__pycache__``, ``*.egg-info`` or hidden files; modes fixed), so nothing is
    written into the checkout and stray build folders cannot leak in; the build runs with ``SOURCE_DATE_EPOCH``
    and umask 022.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        present = [name for name in _WHEEL_SOURCES if (project / name).exists()]
        if not committed_copy(project, present, src):
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*", "build")
            for name in present:
                path = project / name
                if path.is_dir():
                    shutil.copytree(path, src / name, ignore=ignore)
                else:
                    shutil.copy2(path, src / name)
        _fixed_modes(src)
        env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH, PIP_DISABLE_PIP_VERSION_CHECK="1")
        command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out_dir), str(src)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, umask=0o022)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise CTFMError(f"{project / 'pyproject.toml'}: building the ctfm wheel failed ({last})")
    wheels = sorted(Path(out_dir).glob("ctfm-*.whl"))
    if len(wheels) != 1:
        raise CTFMError(f"{out_dir}: expected one ctfm wheel, found {len(wheels)}")
    return wheels[0]


def wheel_payload(wheel: Path) -> dict[str, str]:
    """``{file: "sha256=..."}`` of a wheel's ``RECORD``, its ``.dist-info`` left out: what the wheel installs,
    whatever tool version built it."""
    with zipfile.ZipFile(wheel) as archive:
        record = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
        rows = [line.split(",") for line in archive.read(record).decode().splitlines() if line]
    return {row[0]: row[1] for row in rows if ".dist-info/" not in row[0]}


def _hosted_large_files(bundle: Path, folder: Path, key: str) -> list[dict]:
    """The index's ``large_files`` of ``bundle``'s ``large_files.yml``: hosted where present in ``folder`` (the
    working bundle folder, where ``download_large_files`` puts them; hash checked), else external."""
    files = []
    for entry in large_file_entries(bundle):
        rel = safe_relative(entry["path"], str(bundle / "large_files.yml")).as_posix()
        path = folder / rel
        wanted = str(entry.get("hash_val") or "").lower() or None
        hash_type = str(entry.get("hash_type") or "sha256").lower()
        if path.is_file():
            if wanted and file_digest(path, hash_type) != wanted:
                raise CTFMError(f"{path}: {hash_type} {file_digest(path, hash_type)} differs from large_files.yml's "
                                f"{wanted}: not published")
            files.append({"path": rel, "hosted": True, "source": f"{FILES}/{key}/{rel}", "sha256": sha256sum(path),
                          "size": path.stat().st_size})
        else:
            files.append({"path": rel, "hosted": False, "source": entry.get("url"),
                          "sha256": wanted if hash_type == "sha256" else None, "size": None})
    return files


def _entry(bundle: Path, zip_path: Path, key: str, large_files: list[dict]) -> dict:
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    return {
        "checksum": file_digest(zip_path, "md5"),
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
    project = (Path(project) if project is not None else project_root()).resolve()
    out = Path(out)
    bundles = [Path(b) for b in bundles] if bundles else sorted(p.parent.parent for p in (project / "bundles").glob("*/configs/metadata.json"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".publish.lock", "w") as lock, tempfile.TemporaryDirectory(prefix=".publish.", dir=out) as tmp:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one publisher at a time: each reads, then rewrites the index
        index = read_index(out) if (out / INDEX).is_file() else {}
        stage = Path(tmp)
        published = _stage(project, [b.resolve() for b in bundles], out, index, stage, check)
        write_simple_index(out)
        for name in sorted({index[k]["name"] for k in published}):
            newest = latest([e for e in index.values() if e["name"] == name])
            write_hf_folder(out / newest["source"], out, newest)
        write_index(out, index)
    for key in published:
        logger.info("published %s (sha256 %s)", key, index[key]["sha256"])
    return published


def _stage(project: Path, bundles: list[Path], out: Path, index: dict, stage: Path, check) -> list[str]:
    """Build everything in ``stage`` and check it against ``out``; only when all passes, move the new files into
    ``out`` and add the entries to ``index``. Returns the keys published."""
    moves: list[tuple[Path, Path]] = []
    wheel = build_wheel(project, stage / "wheel")
    published_wheel = out / PACKAGES / wheel.name
    if published_wheel.exists() and wheel_payload(published_wheel) != wheel_payload(wheel):
        raise CTFMError(f"{published_wheel}: ctfm {wheel.name.split('-')[1]} is already published with other content; "
                        "bump the version in pyproject.toml to publish a change")
    if not published_wheel.exists():  # else the published wheel stays (same files, maybe another setuptools)
        moves.append((wheel, published_wheel))
    served = {p.name.split("-")[1] for p in (out / PACKAGES).glob("ctfm-*.whl")} | {wheel.name.split("-")[1]}
    entries = {}
    for bundle in bundles:
        if check is not None:
            problems = check(bundle)
            if problems:
                raise CTFMError(f"{problems[0]} ({bundle.name}: {len(problems)} problem(s); not published)")
        source = bundle
        if bundle.is_relative_to(project):  # the bundle as committed
            source = stage / "committed" / bundle.name
            if committed_copy(project, [bundle.relative_to(project).as_posix()], stage / "committed"):
                shutil.move(stage / "committed" / bundle.relative_to(project), source)
            else:
                source = bundle
        meta = json.loads((source / "configs" / "metadata.json").read_text())
        pin = str((meta.get("required_packages_version") or {}).get("ctfm", ""))
        if pin not in served:
            raise CTFMError(f"{bundle / 'configs' / 'metadata.json'}: requires ctfm {pin or '(none)'}, but the registry "
                            f"serves ctfm {', '.join(sorted(served))}; pin the version in pyproject.toml")
        key = entry_key(bundle.name, meta["version"])
        zip_path = write_zip(source, stage / BUNDLES / f"{key}.zip")
        large_files = _hosted_large_files(source, bundle, key)  # present in the working folder (never committed)
        entry = _entry(source, zip_path, key, large_files)
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
        entries[key] = entry
    # every check passed: files into place; the caller then writes the pages that list them, and the index last
    for staged, target in moves:
        with atomic_path(target) as tmp_target:
            shutil.move(staged, tmp_target)
    index.update(entries)
    return list(entries)
