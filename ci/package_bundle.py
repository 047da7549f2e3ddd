"""Zip verified bundles for a model-zoo registry: ``dist/<bundle>_v<version>.zip``.

    python ci/package_bundle.py [bundles/NAME ...] [--out dist]

A bundle that fails ``verify_bundle`` is not packed. Training by-products (checkpoints, TensorBoard runs,
TensorRT engines, caches) stay out; large files listed in ``large_files.yml`` are left for the registry to fetch.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from verify_bundle import verify  # noqa: E402

from ctfm.files import atomic_path  # noqa: E402

EXCLUDED_PARTS = {"checkpoints", "runs", "eval", "__pycache__", ".cache"}
EXCLUDED_SUFFIXES = {".engine", ".plan", ".pyc"}


def bundle_files(bundle: Path) -> list[Path]:
    return sorted(
        p
        for p in bundle.rglob("*")
        if p.is_file()
        and not EXCLUDED_PARTS & set(p.relative_to(bundle).parts)
        and p.suffix not in EXCLUDED_SUFFIXES
        and not p.name.startswith(".")
    )


def package(bundle: Path, out_dir: Path) -> Path:
    """Verify ``bundle`` and write its zip (files under a top folder named after the bundle); return its path."""
    problems = verify(bundle)
    if problems:
        raise SystemExit("\n".join(problems) + f"\n{bundle}: not packaged ({len(problems)} problem(s))")
    version = json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    target = out_dir / f"{bundle.name}_v{version}.zip"
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in bundle_files(bundle):
            archive.write(path, Path(bundle.name) / path.relative_to(bundle))
    return target


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=Path("dist"))
    args = parser.parse_args(argv)
    bundles = args.bundles or sorted(p for p in Path("bundles").iterdir() if p.is_dir())
    for bundle in bundles:
        print(package(bundle, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
