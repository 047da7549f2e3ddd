"""``python -m ctfm.registry publish | list | download | verify`` (see :mod:`ctfm.registry`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ctfm.errors import CTFMError, install_excepthook

__all__ = ["main"]


def _verify_bundle_check():
    """``ci/verify_bundle.verify`` of the checkout (MONAI's and the model zoo's checks), or None outside one."""
    from ctfm.registry.publish import project_root

    ci = project_root() / "ci"
    if not (ci / "verify_bundle.py").is_file():
        return None
    sys.path.insert(0, str(ci))
    from verify_bundle import verify

    return verify


def main(argv: Sequence[str] | None = None) -> int:
    install_excepthook()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m ctfm.registry", description="The zoo's model registry.")
    commands = parser.add_subparsers(dest="command", required=True)
    publish = commands.add_parser("publish", help="build or update a registry folder from this repository")
    publish.add_argument("--out", required=True, type=Path, help="the registry folder")
    publish.add_argument("bundles", nargs="*", type=Path, help="bundle folders (default: every bundle of the repository)")
    publish.add_argument("--no_check", action="store_true", help="skip ci/verify_bundle.py's checks (they take a minute)")
    for name, help_ in (("list", "bundles and versions"), ("verify", "check every file against the index")):
        sub = commands.add_parser(name, help=help_)
        sub.add_argument("--registry", help="URL or folder (default: $CTFM_REGISTRY)")
    get = commands.add_parser("download", help="fetch, check and unpack one bundle")
    get.add_argument("name")
    get.add_argument("--version", default=None, help="default: the highest")
    get.add_argument("--registry", help="URL or folder (default: $CTFM_REGISTRY)")
    get.add_argument("--bundle_dir", type=Path, default=None, help="default: monai.bundle download's <torch hub>/bundle")
    args = parser.parse_args(argv)

    from ctfm.registry import client
    from ctfm.registry.index import registry_of

    if args.command == "publish":
        from ctfm.registry.publish import publish as publish_

        check = None if args.no_check else _verify_bundle_check()
        for key in publish_(args.out, args.bundles or None, check=check):
            print(key)
    elif args.command == "list":
        for name, entries in client.list_bundles(registry_of(args.registry)).items():
            newest = entries[-1]
            versions = ", ".join(str(e["version"]) for e in entries)
            print(f"{name}\t{versions}\t{newest['size']} bytes\tsha256 {newest['sha256'][:16]}\t{newest.get('display_name', '')}")
    elif args.command == "download":
        done = client.download(args.name, registry_of(args.registry), args.bundle_dir, args.version)
        print(done.path)
    else:
        problems = client.verify(registry_of(args.registry))
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            raise CTFMError(f"{registry_of(args.registry)}: {len(problems)} problem(s)")
        print(f"{registry_of(args.registry)}: every zip, large file and wheel matches the index")
    return 0


if __name__ == "__main__":
    sys.exit(main())
