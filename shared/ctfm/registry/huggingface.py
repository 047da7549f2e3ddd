"""A published bundle as a Hugging Face model repo folder, laid out as MONAI hosts its bundles there (no upload).

MONAI's ``monai.bundle download --source huggingface_hub --repo OWNER/NAME [--version V]`` (and the
``monaihosting`` source, which tries ``MONAI/<name>`` on the Hub first) calls ``huggingface_hub.snapshot_download``
with ``revision=V`` into ``<bundle_dir>/<name>/``: the repo's root IS the bundle folder (``configs/``, ``models/``,
``docs/``, ``LICENSE``, ``large_files.yml``), and a version is a revision (a tag or branch named ``0.4.0``). So
the folder written here is the bundle's files as the zip holds them, the large files the registry hosts, a model
card ``README.md`` (YAML front matter with ``library_name: monai``, licence and tags, then the metadata's fields
and the bundle's ``docs/README.md``) and a ``.gitattributes`` sending weights through Git LFS. To host it::

    huggingface-cli upload OWNER/NAME REGISTRY/huggingface/NAME . && huggingface-cli tag OWNER/NAME VERSION

Hugging Face serves no checksum index: a download from there is checked by nothing but Git LFS's own sha256 (the
``X-Linked-Etag``); ``python -m ctfm.registry download`` from the registry folder checks the zip first.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from ctfm.files import atomic_path
from ctfm.registry.archive import extract_bundle

__all__ = ["LFS_PATTERNS", "model_card", "write_hf_folder"]

#: Files Git LFS stores (Hugging Face refuses plain git files over 10 MB).
LFS_PATTERNS = ("*.pt", "*.pth", "*.safetensors", "*.onnx", "*.ts", "*.bin", "*.nii.gz", "*.npz", "*.faiss")

_CARD_FIELDS = ("version", "task", "description", "authors", "copyright", "data_source", "data_type", "intended_use",
                "monai_version", "pytorch_version", "numpy_version")


def _licence(bundle: Path) -> str:
    first = (bundle / "LICENSE").read_text().splitlines()[0].strip().lower() if (bundle / "LICENSE").is_file() else ""
    return {"mit license": "mit", "apache license": "apache-2.0"}.get(first, "other")


def model_card(bundle: Path, name: str, meta: Mapping) -> str:
    """The ``README.md`` of bundle ``name``'s Hugging Face repo (its files in ``bundle``): front matter, the
    metadata's fields, then ``docs/README.md``."""
    tags = ["monai", "medical", "ct", "3d", "foundation-model", name]
    lines = ["---", "library_name: monai", f"license: {_licence(bundle)}", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += ["---", "", f"# {meta.get('name', name)}", "", f"MONAI bundle `{name}`, version {meta.get('version')}.", ""]
    lines += ["| field | value |", "|---|---|"]
    for field in _CARD_FIELDS:
        if field in meta:
            value = str(meta[field]).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {field} | {value} |")
    for group in ("required_packages_version", "optional_packages"):
        if meta.get(group):
            lines.append(f"| {group} | `{json.dumps(meta[group], sort_keys=True)}` |")
    if meta.get("eval_metrics"):
        lines.append(f"| eval_metrics | `{json.dumps(meta['eval_metrics'], sort_keys=True)}` |")
    refs = meta.get("references") or []
    if refs:
        lines += ["", "## References", ""] + [f"- {r}" for r in refs]
    docs = bundle / "docs" / "README.md"
    if docs.is_file():
        lines += ["", "## Bundle documentation (docs/README.md)", "", docs.read_text().strip()]
    return "\n".join(lines) + "\n"


def write_hf_folder(zip_path: Path, registry: Path, entry: Mapping) -> Path:
    """Write ``registry/huggingface/<name>/`` for the published version ``entry`` (its zip at ``zip_path``), atomically."""
    name = entry["name"]
    target = Path(registry) / "huggingface" / name
    with atomic_path(target, is_dir=True) as tmp:
        extract_bundle(Path(zip_path), name, tmp)
        for large in entry.get("large_files", []):
            if large.get("hosted"):
                path = tmp / large["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(registry) / large["source"], path)
        meta = json.loads((tmp / "configs" / "metadata.json").read_text())
        (tmp / "README.md").write_text(model_card(tmp, name, meta))
        (tmp / ".gitattributes").write_text("".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS))
    return target
