"""Lists of CTs for training and inference: a folder of CTs or a datalist JSON, both as ``[{"image": path}]``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ctfm.errors import CTFMError

CT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def is_dicom_file(path: Path) -> bool:
    """True for a Part-10 DICOM file (``DICM`` at byte 128) or a ``.dcm`` file."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def find_cts(folder: str | os.PathLike) -> list[str]:
    """CT volumes below ``folder``: image files by suffix, and each folder that holds DICOM files (one series).

    Returns sorted absolute paths.

    Raises:
        CTFMError: ``folder`` is missing or holds no CT.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CTFMError(f"{folder}: no such folder of CTs")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        images = [f for f in files if f.lower().endswith(CT_SUFFIXES) and not f.startswith(".")]
        found += [str(Path(root, f).resolve()) for f in images]
        if not images and any(is_dicom_file(Path(root, f)) for f in files[:5]):
            found.append(str(Path(root).resolve()))
    if not found:
        raise CTFMError(f"{folder}: holds no CT ({', '.join(CT_SUFFIXES)} files or DICOM series folders)")
    return sorted(found)


def load_datalist(source: str | os.PathLike, section: str = "training", key: str = "image") -> list[dict]:
    """``[{key: path, ...}]`` from one CT, a folder of CTs, or a datalist JSON (MONAI's decathlon layout or a list).

    Relative paths in a JSON are resolved against the JSON's folder; a missing listed file is an error here,
    not hours into a run.
    """
    source = Path(source)
    if source.is_dir():
        return [{key: path} for path in find_cts(source)]
    if source.name.lower().endswith(CT_SUFFIXES) and source.is_file():
        return [{key: str(source.resolve())}]
    if not source.is_file():
        raise CTFMError(f"{source}: no such datalist JSON or folder of CTs")
    try:
        content = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise CTFMError(f"{source}: not valid JSON ({err.msg} at line {err.lineno})") from None
    items = content.get(section) if isinstance(content, dict) else content
    if not isinstance(items, list) or not items:
        raise CTFMError(f"{source}: no non-empty list '{section}' of CTs")
    datalist = []
    for item in items:
        item = dict(item) if isinstance(item, dict) else {key: item}
        if key not in item:
            raise CTFMError(f"{source}: an entry has no '{key}' key: {item}")
        for k, v in item.items():
            if isinstance(v, str) and not Path(v).is_absolute() and (source.parent / v).exists():
                item[k] = str((source.parent / v).resolve())
        if not Path(item[key]).exists():
            raise CTFMError(f"{source}: listed CT {item[key]} does not exist")
        datalist.append(item)
    return datalist
