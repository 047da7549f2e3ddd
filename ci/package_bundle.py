"""Zip verified bundles for a model-zoo registry: ``dist/<bundle>_v<version>.zip``, reproducibly.

    python ci/package_bundle.py [bundles/NAME ...] [--out dist]

A bundle that fails ``verify_bundle`` is not packed. Training by-products (checkpoints, TensorBoard runs,
evaluation outputs, TorchScript/ONNX/TensorRT exports, caches, embedding stores and indexes, hidden files) stay out; large files listed in
``large_files.yml`` are left for the registry to fetch. A symlink anywhere in the bundle is refused (the zip
would otherwise carry the link target's content).

The same files give the same zip byte for byte, whatever the clone, its file times, umask or directory order
(as the model zoo's ``compress_bundle`` does with ``touch -t 202205300000`` and ``zip -D -X -9``): every member
has the timestamp 2022-05-30 00:00:00, mode 0644 (0755 if executable) from a Unix creator, no extra fields,
deflate level 9; members are sorted by path, there are no directory entries. The zip's sha256 is printed.
(Deflate output is fixed for a given zlib; a different zlib build could compress differently.)
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from verify_bundle import check_symlinks, verify  # noqa: E402

from ctfm.files import sha256sum  # noqa: E402

EXCLUDED_PARTS = {"checkpoints", "runs", "eval", "cache", "store", "index", "__pycache__", ".cache"}
#: exports built from the weights (git ignores ``bundles/*/models/*.{ts,onnx,engine,plan}``): a clone has none
EXCLUDED_SUFFIXES = {".engine", ".plan", ".onnx", ".ts", ".pyc"}
#: the model zoo's ``touch -t 202205300000``
ZIP_DATE_TIME = (2022, 5, 30, 0, 0, 0)
COMPRESSION = zipfile.ZIP_DEFLATED
COMPRESS_LEVEL = 9
_UNIX = 3  # ZipInfo.create_system: external_attr holds Unix mode bits


def _large_files(bundle: Path) -> set[str]:
    """The paths ``large_files.yml`` lists, relative to the bundle."""
    import yaml

    path = bundle / "large_files.yml"
    entries = (yaml.safe_load(path.read_text()) or {}).get("large_files", []) if path.is_file() else []
    return {Path(e["path"]).as_posix() for e in entries if isinstance(e, dict) and e.get("path")}


def bundle_files(bundle: Path) -> list[Path]:
    """The files to pack, sorted by their path inside the bundle. SystemExit on any symlink in the bundle."""
    links = check_symlinks(bundle)
    if links:
        raise SystemExit("\n".join(links) + f"\n{bundle}: not packaged (symlinks are refused)")
    large = _large_files(bundle)
    files = []
    for root, dirs, names in os.walk(bundle):
        rel_root = Path(root).relative_to(bundle)
        dirs[:] = [d for d in dirs if d not in EXCLUDED_PARTS and not d.startswith(".")]
        for name in names:
            path = Path(root, name)
            if name.startswith(".") or path.suffix in EXCLUDED_SUFFIXES or EXCLUDED_PARTS & set(rel_root.parts):
                continue
            if (rel_root / name).as_posix() in large:  # fetched by the registry, not packed (e.g. after download_large_files)
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
    files = bundle_files(bundle)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=COMPRESSION, compresslevel=COMPRESS_LEVEL) as archive:
            for path in files:
                arcname = f"{bundle.name}/{path.relative_to(bundle).as_posix()}"
                archive.writestr(member_info(arcname, path), path.read_bytes(),
                                 compress_type=COMPRESSION, compresslevel=COMPRESS_LEVEL)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def package(bundle: Path, out_dir: Path, check: bool = True) -> Path:
    """Verify ``bundle`` (unless ``check`` is False) and write its zip; return its path."""
    bundle = Path(bundle)
    if check:
        problems = verify(bundle)
        if problems:
            raise SystemExit("\n".join(problems) + f"\n{bundle}: not packaged ({len(problems)} problem(s))")
    version = json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    return write_zip(bundle, Path(out_dir) / f"{bundle.name}_v{version}.zip")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=Path("dist"))
    args = parser.parse_args(argv)
    bundles = args.bundles or sorted(p for p in Path("bundles").iterdir() if p.is_dir())
    for bundle in bundles:
        target = package(bundle, args.out)
        print(f"{sha256sum(target)}  {target}")  # sha256sum's format: check with `sha256sum -c`
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
