"""Check that a bundle has what MONAI, MONAI Label, MONAI Deploy and the model zoo expect.

    python ci/verify_bundle.py bundles/ctfm_pretrain [bundles/...]

Checks: required files; ``metadata.json`` against the local schema (``ci/meta_schema.json``; MONAI's
``verify_metadata`` needs the schema URL, unreachable here); ``version`` listed in ``changelog``; ``image`` in
and ``pred`` out in ``network_data_format``; every config file parses (override files merged onto their base
config), every ``@id`` reference resolves and ``network_def`` instantiates; ``large_files.yml`` entries carry a
URL and a ``hash_val`` key (empty only where no digest could be recorded; MONAI then skips the check).
Prints one line per problem and exits 1 if there is any.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import yaml
from monai.bundle import ConfigParser

SCHEMA = Path(__file__).with_name("meta_schema.json")
REQUIRED_FILES = ("configs/metadata.json", "configs/logging.conf", "docs/README.md", "LICENSE", "large_files.yml")
#: An override config (no ``bundle_root`` of its own) is checked merged onto this base config.
OVERRIDE_BASES = {"multi_gpu_train": "train", "evaluate": "train", "multi_gpu_evaluate": "train"}
_REFERENCE = re.compile(r"@([\w#]+)")


def config_files(bundle: Path) -> list[Path]:
    return sorted(p for p in (bundle / "configs").iterdir() if p.suffix in (".json", ".yaml", ".yml") and p.stem != "metadata")


def base_of(config: Path) -> str:
    stem = config.stem
    return OVERRIDE_BASES.get(stem) or ("inference" if stem.startswith("inference_") else "train")


def check_metadata(bundle: Path) -> list[str]:
    path = bundle / "configs" / "metadata.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [f"{path}: unreadable ({err})"]
    problems = [f"{path}: {e.json_path}: {e.message}" for e in jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).iter_errors(meta)]
    if meta.get("version") not in meta.get("changelog", {}):
        problems.append(f"{path}: version {meta.get('version')} is not in changelog")
    fmt = meta.get("network_data_format", {})
    if "image" not in fmt.get("inputs", {}):
        problems.append(f"{path}: network_data_format.inputs has no 'image'")
    if "pred" not in fmt.get("outputs", {}):
        problems.append(f"{path}: network_data_format.outputs has no 'pred'")
    if "ctfm" not in meta.get("required_packages_version", {}):
        problems.append(f"{path}: required_packages_version does not list ctfm, which the configs import")
    return problems


def check_config(bundle: Path, config: Path) -> list[str]:
    parser = ConfigParser()
    try:
        content = ConfigParser.load_config_file(config)
        files = [config]
        if "bundle_root" not in content:
            base = next((p for p in config_files(bundle) if p.stem == base_of(config)), None)
            if base is None:
                return [f"{config}: override config without a '{base_of(config)}' base config"]
            files = [base, config]
        parser.read_config(files)
        parser["bundle_root"] = str(bundle)
        flat = json.dumps(parser.get())
        problems = []
        for ref in sorted(set(_REFERENCE.findall(flat))):
            if ref not in parser:
                problems.append(f"{config}: reference @{ref} does not resolve")
        if not problems and "network_def" in parser:
            parser.get_parsed_content("network_def", instantiate=True)
        return problems
    except Exception as err:  # any parse or instantiation failure is a finding, not a crash
        return [f"{config}: does not parse ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"]


def check_large_files(bundle: Path) -> list[str]:
    path = bundle / "large_files.yml"
    if not path.is_file():
        return []
    entries = (yaml.safe_load(path.read_text()) or {}).get("large_files", [])
    return [
        f"{path}: entry {e.get('path', '?')} lacks {key}"
        for e in entries
        for key in ("path", "url", "hash_val", "hash_type")
        if key not in e or (key != "hash_val" and not e[key])
    ]


def verify(bundle: str | Path) -> list[str]:
    """Every problem found in one bundle, one line each (empty when the bundle is fine)."""
    bundle = Path(bundle)
    problems = [f"{bundle}: missing {name}" for name in REQUIRED_FILES if not (bundle / name).is_file()]
    if (bundle / "configs" / "metadata.json").is_file():
        problems += check_metadata(bundle)
    if (bundle / "configs").is_dir():
        for config in config_files(bundle):
            problems += check_config(bundle, config)
    return problems + check_large_files(bundle)


def main(argv: list[str]) -> int:
    bundles = argv or sorted(str(p) for p in Path("bundles").iterdir() if p.is_dir())
    problems = [p for b in bundles for p in verify(b)]
    for line in problems:
        print(line, file=sys.stderr)
    print(f"verified {len(bundles)} bundle(s): {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
