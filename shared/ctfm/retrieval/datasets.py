"""The retrieval benchmarks' layouts: 3D-MIR's label CSVs and splits, and OrganMNIST3D's ``.npz`` (MedMNIST).

- **3D-MIR** (github.com/abachaa/3D-MIR, ``Data/3DMIR_labels/<organ>_labels_and_captions.csv``): columns ``name``
  (an MSD file name such as ``liver_0.nii.gz``), ``organ``, ``max_tumor_size``, ``number_tumors``,
  ``lesion_group`` (-1 none, 1..3 by size) and ``cancer_flag`` (0/1, the "lesion flag"), then captions. Split
  files (``Data/Data_Splits/<organ>_full_{train,test}_split.csv``) have an unnamed index column and one column
  ``training`` or ``testing`` of file names. The images are the MSD volumes, found under an images folder.
- **OrganMNIST3D** (``organmnist3d.npz`` / ``organmnist3d_64.npz`` of the ``medmnist`` package): arrays
  ``{train,val,test}_images`` ``(N, S, S, S)`` uint8 with S 28 or 64, and ``{train,val,test}_labels`` ``(N, 1)``,
  11 organ classes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ctfm.errors import CTFMError

__all__ = ["MIR_COLUMNS", "MIR_TARGETS", "ORGANMNIST_SPLITS", "MIRCase", "read_3dmir", "read_organmnist3d"]

MIR_COLUMNS = ("name", "organ", "lesion_group", "cancer_flag")
#: 3D-MIR's two retrieval targets: our name -> its column.
MIR_TARGETS = {"lesion_flag": "cancer_flag", "lesion_group": "lesion_group"}
ORGANMNIST_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class MIRCase:
    """One 3D-MIR volume: ``id`` (file name), ``image`` (its path), ``organ``, ``lesion_flag``, ``lesion_group``,
    ``role`` (``"database"`` = training split, ``"query"`` = test split)."""

    id: str
    image: str
    organ: str
    lesion_flag: int
    lesion_group: int
    role: str


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise CTFMError(f"{path}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CTFMError(f"{path}: not a readable CSV ({str(err).splitlines()[0][:120]})") from None


def read_3dmir(labels: Sequence[str | os.PathLike] | str | os.PathLike, images_dir: str | os.PathLike,
               splits: Sequence[str | os.PathLike] | None = None) -> list[MIRCase]:
    """Every labelled case whose image exists under ``images_dir`` (searched recursively by file name).

    ``splits``: 3D-MIR split files; a case in a ``testing`` file is a query, in a ``training`` file part of the
    database; without splits every case is both (leave-one-out). A label file without the 3D-MIR columns, a
    non-integer flag, a case named twice, or a labelled case whose image is missing stops with one line."""
    files = [labels] if isinstance(labels, (str, os.PathLike)) else list(labels)
    root = Path(images_dir)
    if not root.is_dir():
        raise CTFMError(f"{root}: no such images folder (the MSD volumes 3D-MIR labels)")
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.name.startswith("._"):
            found.setdefault(path.name, path)
    roles = {}
    for split in splits or ():
        table = _read_csv(Path(split))
        column = next((c for c in ("testing", "training") if c in table.columns), None)
        if column is None:
            raise CTFMError(f"{split}: a 3D-MIR split file needs a 'training' or 'testing' column, found {list(table.columns)}")
        for name in table[column].astype(str):
            roles[name] = "query" if column == "testing" else "database"
    cases, seen = [], set()
    for file in files:
        table = _read_csv(Path(file))
        missing = [c for c in MIR_COLUMNS if c not in table.columns]
        if missing:
            raise CTFMError(f"{file}: not a 3D-MIR label file: no column {', '.join(missing)}")
        for line, row in enumerate(table.itertuples(index=False), start=2):
            name = str(row.name)
            try:
                flag, group = int(row.cancer_flag), int(row.lesion_group)
            except (TypeError, ValueError):
                raise CTFMError(f"{file}: line {line} ({name}): cancer_flag and lesion_group must be integers") from None
            if flag not in (0, 1):
                raise CTFMError(f"{file}: line {line} ({name}): cancer_flag is {flag}, not 0 or 1")
            if name in seen:
                raise CTFMError(f"{file}: line {line}: {name} is labelled twice")
            seen.add(name)
            if splits and name not in roles:
                continue
            if name not in found:
                raise CTFMError(f"{file}: line {line}: no image {name} under {root}")
            cases.append(MIRCase(name, str(found[name]), str(row.organ), flag, group, roles.get(name, "both")))
    if not cases:
        raise CTFMError(f"{', '.join(map(str, files))}: no 3D-MIR case {'in the splits ' if splits else ''}to evaluate")
    return cases


def read_organmnist3d(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images (N, 1, S, S, S) float32 in [0, 1], labels (N,) int64)}`` from a MedMNIST ``.npz``."""
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CTFMError(f"{path}: no such file") from None
    except (OSError, ValueError) as err:
        raise CTFMError(f"{path}: not a readable .npz ({str(err).splitlines()[0][:120]})") from None
    out = {}
    with archive:
        for split in ORGANMNIST_SPLITS:
            keys = (f"{split}_images", f"{split}_labels")
            if not all(k in archive.files for k in keys):
                raise CTFMError(f"{path}: not an OrganMNIST3D file: no {' / '.join(keys)} (found {', '.join(sorted(archive.files))})")
            images, labels = archive[keys[0]], archive[keys[1]]
            if images.ndim != 4 or len(set(images.shape[1:])) != 1 or images.shape[1] not in (28, 64):
                raise CTFMError(f"{path}: {keys[0]} has shape {images.shape}, not (N, 28|64, 28|64, 28|64)")
            if images.dtype != np.uint8:
                raise CTFMError(f"{path}: {keys[0]} is {images.dtype}, not uint8")
            labels = np.asarray(labels).reshape(len(labels), -1)
            if labels.shape != (len(images), 1) or not np.issubdtype(labels.dtype, np.integer):
                raise CTFMError(f"{path}: {keys[1]} has shape {labels.shape} / {labels.dtype}, not ({len(images)}, 1) integers")
            out[split] = (images[:, None].astype(np.float32) / 255.0, labels[:, 0].astype(np.int64))
    return out
