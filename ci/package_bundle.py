"""Zip verified bundles for a model-zoo registry: ``dist/<bundle>_v<version>.zip``, reproducibly.

    python ci/package_bundle.py [bundles/NAME ...] [--out dist]

A bundle that fails ``verify_bundle`` is not packed. What goes into the zip, and why the same files give the same
zip byte for byte, is :mod:`ctfm.registry.archive`'s docstring. The zip's sha256 is printed. To publish the zips
with an index, the ``ctfm`` wheel and the hosted large files, use ``python -m ctfm.registry publish --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from verify_bundle import verify  # noqa: E402

from ctfm.errors import CTFMError  # noqa: E402
from ctfm.files import sha256sum  # noqa: E402
from ctfm.registry.archive import write_zip  # noqa: E402


def package(bundle: Path, out_dir: Path, check: bool = True) -> Path:
    """Verify ``bundle`` (unless ``check`` is False) and write its zip; return its path.

    Raises:
        SystemExit: the bundle fails verification, or holds a symlink.
    """
    bundle = Path(bundle)
    if check:
        problems = verify(bundle)
        if problems:
            raise SystemExit("\n".join(problems) + f"\n{bundle}: not packaged ({len(problems)} problem(s))")
    version = json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    try:
        return write_zip(bundle, Path(out_dir) / f"{bundle.name}_v{version}.zip")
    except CTFMError as err:
        raise SystemExit(str(err)) from None


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
