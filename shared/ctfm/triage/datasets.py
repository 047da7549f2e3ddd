"""Head-CT triage datasets, each read from a local folder in its published layout, as one common case list.

Every reader returns a :class:`TriageDataset`: the findings it labels (in a fixed order) and one
:class:`TriageCase` per CT -- a unique ``id``, the ``patient`` it belongs to (splits are patient-level), the
absolute path of its ``image`` (a NIfTI / NRRD file or a folder holding exactly one DICOM series, as
:func:`ctfm.ct_io.read_ct` reads) and a 0.0 / 1.0 label for every finding. :meth:`TriageDataset.items` gives
MONAI's datalist, ``[{"image": path, "label": [floats in findings order], "id": id, "patient": patient}]``.

Layouts (``layout`` of :func:`read_triage_dataset`):

- ``"cq500"`` -- qure.ai's CQ500 (:func:`read_cq500`). ``<folder>/reads.csv`` has columns ``name``
  (``CQ500-CT-<N>``), ``Category``, and per reader ``R1``, ``R2``, ``R3`` one 0/1 column per finding,
  ``R<k>:ICH, R<k>:IPH, R<k>:IVH, R<k>:SDH, R<k>:EDH, R<k>:SAH, R<k>:BleedLocation-Left,
  R<k>:BleedLocation-Right, R<k>:ChronicBleed, R<k>:Fracture, R<k>:CalvarialFracture, R<k>:OtherFracture,
  R<k>:MassEffect, R<k>:MidlineShift``. Study ``CQ500-CT-<N>``'s images are the folder
  ``CQ500CT<N> CQ500CT<N>/Unknown Study/CT <description>/`` (one DICOM series per ``CT ...`` folder, e.g.
  ``CT 0.625mm``, ``CT PLAIN THIN``, ``CT 5mm``). A case's label is the readers' majority (at least 2 of 3) or
  any reader's (``reader_rule``); one series per study is picked (``series_rule``). Case id and patient are the
  study name (CQ500 has one study per patient).
- ``"rsna"`` -- the RSNA 2019 intracranial haemorrhage challenge (:func:`read_rsna`). ``<folder>/stage_2_train.csv``
  has the header ``ID,Label`` and one row ``ID_<image id>_<subtype>,<0|1>`` per slice and subtype
  (``epidural``, ``intraparenchymal``, ``intraventricular``, ``subarachnoid``, ``subdural``, ``any``); the
  slices are ``<folder>/stage_2_train/ID_<image id>.dcm``, all in one folder. Slices are grouped by the
  ``SeriesInstanceUID`` (``level="series"``) or ``StudyInstanceUID`` (``level="study"``) of their DICOM
  headers, a case's label is the maximum over its slices, its patient the ``PatientID``. Since a case's image
  must be a folder of one series, a folder of relative symlinks per series is written under a cache folder
  (default ``<folder>/.ctfm_series/``), together with an index of the headers read (``.headers.csv``) so that
  the 750 000 headers are read once, not on every call.
- ``"sinoct"`` -- SinoCT-style normal / abnormal labels (:func:`read_sinoct`): ``<folder>/labels.csv`` with
  columns ``image`` (a NIfTI file or a DICOM folder, relative to the csv), ``label`` (``0`` / ``1`` or
  ``normal`` / ``abnormal``) and optionally ``patient_id``; one finding, ``abnormal``.
- ``"csv"`` -- any CSV (:func:`read_csv_dataset`): an image column (paths relative to the csv's folder, or
  absolute) and one 0/1 column per finding: every other column except the patient and id columns, unless
  ``findings`` names them. Unless named, a column ``patient`` / ``patient_id`` / ``PatientID`` is the patient
  and a column ``id`` / ``case_id`` the case id.

Bad input raises :class:`ctfm.errors.CTFMError` with one line naming the file and the problem: a missing csv or
column, a label that is not 0/1, a label for an image that does not exist, an image (a CQ500 study in
``reads.csv``, an RSNA slice) without a label, a duplicate id, a finding the dataset does not label, an empty
dataset. A CQ500 study folder that ``reads.csv`` does not list is skipped (logged).

:func:`split_cases` makes a patient-level, stratified, seeded train / validation / test split, written to and
reloaded from a JSON file so that a run can be repeated; :func:`subset` keeps the cases of one part and
:func:`label_fraction` a stratified, nested subsample of them for label-efficiency runs.

Assumptions about published details (checked against nothing but the dataset descriptions):

- CQ500: the study folders ``CQ500CT<N> CQ500CT<N>`` sit directly in ``folder`` (as the published zip files
  unpack) or one level below it (one folder per zip file, e.g. ``CQ500-CT-<N>/CQ500CT<N> CQ500CT<N>/``); any
  folder below a study folder that directly holds DICOM files is one of its series (``Unknown Study`` is not
  required by name). ``Category`` is not read. A finding is any ``<finding>`` of a ``R<k>:<finding>`` column.
- RSNA: every file of ``stage_2_train/`` has rows in the csv and every row a file. Rows repeated with the same
  label are dropped with a log line (the published csv is reported to repeat some); repeated with different
  labels they are an error. A study of several series (the published data has one series per study) gets the
  series with the most slices as its image and the maximum over all its slices as its label (logged).
- SinoCT: the layout above is a convention of this package (``labels.csv`` next to the images), not a published
  file; ``label`` values are matched case-insensitively.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from ctfm.datalist import CT_SUFFIXES, is_dicom_file
from ctfm.errors import CTFMError
from ctfm.files import atomic_path

__all__ = [
    "CQ500_FINDINGS",
    "CQ500_READERS",
    "CSV_ID_COLUMNS",
    "CSV_PATIENT_COLUMNS",
    "LAYOUTS",
    "RSNA_FINDINGS",
    "SINOCT_FINDING",
    "SPLIT_PARTS",
    "TriageCase",
    "TriageDataset",
    "held_out_test_set",
    "label_fraction",
    "label_fraction_indices",
    "load_split",
    "read_cq500",
    "read_csv_dataset",
    "read_rsna",
    "read_sinoct",
    "read_triage_dataset",
    "split_cases",
    "subset",
]

logger = logging.getLogger("ctfm.triage.datasets")

#: CQ500's default findings: the intracranial haemorrhage subtypes, fracture, midline shift and mass effect.
CQ500_FINDINGS = ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "Fracture", "MidlineShift", "MassEffect")
#: The three radiologists of CQ500's ``reads.csv``.
CQ500_READERS = ("R1", "R2", "R3")
CQ500_READS = "reads.csv"
CQ500_READER_RULES = ("majority", "any")
#: ``series_rule`` keywords of :func:`read_cq500`; any other value is a regular expression.
CQ500_SERIES_KEYWORDS = ("thinnest", "thickest")

#: RSNA's subtypes, ``any`` first so that a split stratifies on "any haemorrhage" (the first finding).
RSNA_FINDINGS = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
RSNA_LABELS = "stage_2_train.csv"
RSNA_IMAGES = "stage_2_train"
RSNA_LEVELS = ("series", "study")
#: Default cache folder of RSNA's per-series symlink folders, inside the dataset folder.
RSNA_CACHE = ".ctfm_series"
#: The index of RSNA headers already read, inside the cache folder (hidden: series folders never start with ".").
RSNA_HEADER_INDEX = ".headers.csv"
#: Threads reading RSNA headers (file opening dominates on network disks).
HEADER_READ_THREADS = 8
#: Headers read per batch of threads (progress is logged every 10 batches).
HEADER_READ_CHUNK = 4096

#: Column names :func:`read_csv_dataset` takes as the patient id / case id column when none is named.
CSV_PATIENT_COLUMNS = ("patient", "patient_id", "PatientID")
CSV_ID_COLUMNS = ("id", "case_id")

SINOCT_LABELS = "labels.csv"
SINOCT_FINDING = "abnormal"

LAYOUTS = ("cq500", "rsna", "sinoct", "csv")
SPLIT_PARTS = ("train", "validation", "test")

_BINARY_VALUES = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0}
_SINOCT_WORDS = {"normal": 0.0, "abnormal": 1.0}
_CQ500_NAME = re.compile(r"^CQ500-CT-(\d+)$")
_CQ500_FOLDER = re.compile(r"^CQ500CT(\d+) CQ500CT\1$")
_READER_COLUMN = re.compile(r"^(R\d+):(.+)$")
_RSNA_ROW_ID = re.compile(r"^.+_[^_]+$")
_SAFE_FOLDER_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
_RSNA_HEADER_TAGS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")


# --------------------------------------------------------------------------------------------------------------
# The case list


@dataclass(frozen=True)
class TriageCase:
    """One CT and its labels.

    Attributes:
        id: unique case id within its dataset (study or series id, or the image path without suffix).
        patient: patient id; every case of one patient lands in the same split part.
        image: absolute path of a NIfTI / NRRD file or of a folder holding one DICOM series.
        labels: finding -> 0.0 (absent) / 1.0 (present), one entry per finding of the dataset.
    """

    id: str
    patient: str
    image: str
    labels: dict[str, float]


@dataclass(frozen=True)
class TriageDataset:
    """The cases of one dataset, every case labelled for every finding.

    Attributes:
        findings: finding names, in the order of :meth:`items`' ``label`` lists.
        cases: the cases, in the reader's order (the csv's for CQ500 / SinoCT / CSV, sorted ids for RSNA).
        source: the file or folder read, named in error messages (not compared).
    """

    findings: tuple[str, ...]
    cases: tuple[TriageCase, ...]
    source: str = field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "findings", tuple(self.findings))
        object.__setattr__(self, "cases", tuple(self.cases))
        where = self.source or "triage dataset"
        if len(set(self.findings)) != len(self.findings):
            raise CTFMError(f"{where}: findings {list(self.findings)} name one finding twice")
        seen = set()
        for case in self.cases:
            if case.id in seen:
                raise CTFMError(f"{where}: case id {case.id!r} occurs twice")
            seen.add(case.id)
            if set(case.labels) != set(self.findings):
                raise CTFMError(
                    f"{where}: case {case.id!r} is labelled for {sorted(case.labels)},"
                    f" not the findings {list(self.findings)}"
                )
            bad = [f for f, v in case.labels.items() if v not in (0.0, 1.0)]
            if bad:
                raise CTFMError(f"{where}: case {case.id!r} label {bad[0]} = {case.labels[bad[0]]!r} is not 0/1")

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def ids(self) -> list[str]:
        """The case ids, in case order."""
        return [case.id for case in self.cases]

    def label_array(self) -> np.ndarray:
        """Labels as a ``(cases, findings)`` float32 array of 0.0 / 1.0, columns in :attr:`findings` order."""
        return np.array([[case.labels[f] for f in self.findings] for case in self.cases], dtype=np.float32).reshape(
            len(self.cases), len(self.findings)
        )

    def items(self) -> list[dict]:
        """MONAI datalist: ``[{"image": path, "label": [float per finding], "id": id, "patient": patient}]``."""
        return [
            {
                "image": case.image,
                "label": [float(case.labels[f]) for f in self.findings],
                "id": case.id,
                "patient": case.patient,
            }
            for case in self.cases
        ]


# --------------------------------------------------------------------------------------------------------------
# CSV helpers


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    """``path`` as a table of stripped strings (no NaN: an empty cell is ``""``); refuses a missing or empty csv."""
    if not path.is_file():
        raise CTFMError(f"{path}: no such file ({what})")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise CTFMError(f"{path}: empty file ({what})") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CTFMError(f"{path}: not a readable CSV ({reason})") from None
    table.columns = [str(column).strip() for column in table.columns]
    table = table.apply(lambda column: column.str.strip())
    if table.empty:
        raise CTFMError(f"{path}: no rows, an empty dataset ({what})")
    return table.reset_index(drop=True)


def _require_columns(path: Path, table: pd.DataFrame, columns: Iterable[str], why: str = "") -> None:
    for column in columns:
        if column not in table.columns:
            reason = f" ({why})" if why else ""
            raise CTFMError(f"{path}: no column {column!r}{reason}; has {', '.join(map(repr, table.columns))}")


def _binary_values(
    path: Path, table: pd.DataFrame, column: str, ids: Sequence[str], words: Mapping[str, float] | None = None
) -> np.ndarray:
    """Column ``column`` as a float64 array of 0.0 / 1.0; the first other value is an error naming its row."""
    mapping = {**_BINARY_VALUES, **(words or {})}
    values = table[column].str.lower().map(mapping)
    bad = values.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        accepted = "/".join(["0", "1", *(words or {})])
        raise CTFMError(
            f"{path}: row {row + 1} ({ids[row]}): column {column!r} value {table[column].iloc[row]!r} is not {accepted}"
        )
    return values.to_numpy(dtype=np.float64)


def _non_empty_values(path: Path, table: pd.DataFrame, column: str, what: str) -> list[str]:
    values = table[column].tolist()
    empty = [row for row, value in enumerate(values) if not value]
    if empty:
        raise CTFMError(f"{path}: row {empty[0] + 1}: empty {what} in column {column!r}")
    return values


def _first_duplicate(values: Sequence[str]) -> tuple[str, int, int] | None:
    """The first value that occurs twice, with the 0-based positions of both occurrences, or ``None``."""
    first: dict[str, int] = {}
    for position, value in enumerate(values):
        if value in first:
            return value, first[value], position
        first[value] = position
    return None


def _refuse_duplicates(path: Path, values: Sequence[str], what: str) -> None:
    duplicate = _first_duplicate(values)
    if duplicate is not None:
        value, a, b = duplicate
        raise CTFMError(f"{path}: {what} {value!r} occurs twice (rows {a + 1} and {b + 1})")


def _pick_findings(
    path: Path, requested: str | Sequence[str] | None, default: Sequence[str], available: Sequence[str], what: str
) -> tuple[str, ...]:
    """The findings to read: ``requested`` (or ``default``), each of which ``available`` must hold."""
    findings = default if requested is None else requested
    findings = (findings,) if isinstance(findings, str) else tuple(str(f) for f in findings)
    if not findings:
        raise CTFMError(f"{path}: no findings to read ({what} has {', '.join(available) or 'none'})")
    duplicate = _first_duplicate(findings)
    if duplicate is not None:
        raise CTFMError(f"{path}: finding {duplicate[0]!r} requested twice")
    for finding in findings:
        if finding not in available:
            raise CTFMError(f"{path}: no finding {finding!r} in this {what} (has: {', '.join(available) or 'none'})")
    return findings


def _image_paths(path: Path, table: pd.DataFrame, column: str) -> list[str]:
    """Absolute image paths of ``column`` (relative ones are relative to the csv's folder); each must exist."""
    images = []
    for row, value in enumerate(_non_empty_values(path, table, column, "image path")):
        image = Path(os.path.abspath(Path(path.parent, value)))
        if not image.exists():
            raise CTFMError(f"{path}: row {row + 1}: image {value!r} does not exist ({image})")
        images.append(str(image))
    return images


def _id_from_image(value: str) -> str:
    """A case id from an image path as the csv writes it, normalised, without CT suffix: ``a/b.nii.gz`` -> ``a/b``."""
    normal = os.path.normpath(value).replace(os.sep, "/")
    for suffix in CT_SUFFIXES:
        if normal.lower().endswith(suffix):
            return normal[: -len(suffix)]
    return normal


# --------------------------------------------------------------------------------------------------------------
# CQ500


def read_cq500(
    folder: str | os.PathLike,
    findings: str | Sequence[str] | None = None,
    reader_rule: str = "majority",
    series_rule: str = "thinnest",
) -> TriageDataset:
    """CQ500 from its published layout: ``<folder>/reads.csv`` + ``<folder>/CQ500CT<N> CQ500CT<N>/``.

    Args:
        folder: the dataset folder (holding ``reads.csv`` and the study folders).
        findings: finding names (the ``<finding>`` of ``R1:<finding>``); default :data:`CQ500_FINDINGS`.
        reader_rule: ``"majority"`` (positive when at least 2 of the 3 readers say so) or ``"any"`` (one does).
        series_rule: which series of a study is its image: ``"thinnest"`` (smallest ``SliceThickness`` in mm, read
            from the header of the series' first DICOM file by name; ties go to the series with more files, then
            the name), ``"thickest"`` (largest, same ties), or else a regular expression searched for,
            case-insensitively, in the series folder names (e.g. ``"plain|thin"``), the thinnest match winning.
            A series whose header has no ``SliceThickness`` loses to every series that has one.

    Returns:
        One case per ``reads.csv`` row, in its order; id and patient are the study name, image the series folder.

    Raises:
        CTFMError: missing ``reads.csv``, column or finding; a vote that is not 0/1; a duplicate study; a study
            without image folder or without a DICOM series (matching ``series_rule``); no rows.
    """
    folder = Path(os.path.abspath(folder))
    reads_path = folder / CQ500_READS
    if reader_rule not in CQ500_READER_RULES:
        raise CTFMError(f"{reads_path}: reader_rule {reader_rule!r} is not one of {', '.join(CQ500_READER_RULES)}")
    series_pattern = None
    if series_rule not in CQ500_SERIES_KEYWORDS:
        try:
            series_pattern = re.compile(str(series_rule), re.IGNORECASE)
        except re.error as err:
            raise CTFMError(
                f"{folder}: series_rule {series_rule!r} is neither thinnest, thickest nor a regex ({err})"
            ) from None
    table = _read_csv(reads_path, "CQ500 reads.csv")
    _require_columns(reads_path, table, ["name"])
    available = list(dict.fromkeys(m.group(2) for c in table.columns if (m := _READER_COLUMN.match(c))))
    findings = _pick_findings(reads_path, findings, CQ500_FINDINGS, available, "CQ500 reads.csv")
    for finding in findings:
        _require_columns(
            reads_path,
            table,
            [f"{reader}:{finding}" for reader in CQ500_READERS],
            f"needed for finding {finding} with reader_rule {reader_rule}",
        )
    names = _non_empty_values(reads_path, table, "name", "study name")
    _refuse_duplicates(reads_path, names, "study")
    numbers = []
    for row, name in enumerate(names):
        match = _CQ500_NAME.match(name)
        if match is None:
            raise CTFMError(f"{reads_path}: row {row + 1}: name {name!r} is not of the form CQ500-CT-<N>")
        numbers.append(int(match.group(1)))
    # votes: (studies, readers, findings) of 0/1
    votes = np.stack(
        [
            np.stack([_binary_values(reads_path, table, f"{reader}:{f}", names) for f in findings], axis=-1)
            for reader in CQ500_READERS
        ],
        axis=1,
    )
    if reader_rule == "majority":
        labels = (votes.sum(axis=1) * 2 > len(CQ500_READERS)).astype(np.float64)
    else:
        labels = votes.max(axis=1)

    study_folders = _cq500_study_folders(folder)
    listed = set(numbers)
    skipped = sorted(n for n in study_folders if n not in listed)
    if skipped:
        logger.info(
            "%s: %d study folders not in %s skipped (e.g. CQ500CT%d)", folder, len(skipped), CQ500_READS, skipped[0]
        )
    cases = []
    for name, number, case_labels in zip(names, numbers, labels):
        study_folder = study_folders.get(number)
        if study_folder is None:
            raise CTFMError(
                f"{reads_path}: study {name} has no image folder 'CQ500CT{number} CQ500CT{number}' in {folder}"
            )
        series = _pick_cq500_series(study_folder, series_rule, series_pattern)
        cases.append(
            TriageCase(
                id=name,
                patient=name,
                image=str(series),
                labels={f: float(v) for f, v in zip(findings, case_labels)},
            )
        )
    logger.info(
        "%s: %d CQ500 studies, findings %s, reader_rule %s", folder, len(cases), ", ".join(findings), reader_rule
    )
    return TriageDataset(findings=findings, cases=tuple(cases), source=str(reads_path))


def _cq500_study_folders(folder: Path) -> dict[int, Path]:
    """Study number -> folder ``CQ500CT<N> CQ500CT<N>``, directly in ``folder`` or one level below it."""
    found: dict[int, Path] = {}

    def add(path: Path) -> bool:
        match = _CQ500_FOLDER.match(path.name)
        if match is None or not path.is_dir():
            return False
        number = int(match.group(1))
        if number in found:
            raise CTFMError(f"{folder}: study CQ500-CT-{number} has two image folders, {found[number]} and {path}")
        found[number] = path
        return True

    for child in sorted(folder.iterdir()):
        if child.name.startswith(".") or not child.is_dir() or add(child):
            continue
        try:
            grandchildren = sorted(child.iterdir())
        except OSError:
            continue
        for grandchild in grandchildren:
            if not grandchild.name.startswith("."):
                add(grandchild)
    return found


def _cq500_series(study_folder: Path) -> list[tuple[Path, int, Path]]:
    """``(series folder, file count, first DICOM file by name)`` for every folder below ``study_folder`` that
    directly holds DICOM files (one of its first 5 files by name is one)."""
    series = []
    for root, dirs, files in os.walk(study_folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files = sorted(f for f in files if not f.startswith("."))
        first = next((Path(root, f) for f in files[:5] if is_dicom_file(Path(root, f))), None)
        if first is not None:
            series.append((Path(root), len(files), first))
    return sorted(series)


def _slice_thickness_mm(path: Path) -> float | None:
    """``SliceThickness`` (mm) in the header of the DICOM file ``path``, or ``None`` when it has none."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SliceThickness"])
    except (InvalidDicomError, OSError, ValueError) as err:
        raise CTFMError(f"{path}: not a readable DICOM file ({err})") from None
    value = header.get("SliceThickness")
    try:
        thickness = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        thickness = None
    return thickness if thickness is not None and math.isfinite(thickness) and thickness > 0 else None


def _pick_cq500_series(study_folder: Path, series_rule: str, series_pattern: re.Pattern | None) -> Path:
    series = _cq500_series(study_folder)
    if not series:
        raise CTFMError(
            f"{study_folder}: no DICOM series folder (expected 'Unknown Study/CT <description>/' holding DICOM files)"
        )
    if series_pattern is not None:
        matching = [candidate for candidate in series if series_pattern.search(candidate[0].name)]
        if not matching:
            names = ", ".join(repr(path.name) for path, _, _ in series)
            raise CTFMError(f"{study_folder}: no series folder matches series_rule {series_rule!r} (has: {names})")
        series = matching
    if len(series) == 1:
        return series[0][0]
    sign = -1.0 if series_rule == "thickest" else 1.0

    def rank(candidate: tuple[Path, int, Path]):
        path, count, first = candidate
        thickness = _slice_thickness_mm(first)
        return (thickness is None, sign * (thickness or 0.0), -count, path.name)

    ranked = sorted(series, key=rank)
    logger.debug("%s: series %s picked by %s", study_folder, ranked[0][0].name, series_rule)
    return ranked[0][0]


# --------------------------------------------------------------------------------------------------------------
# RSNA 2019


def read_rsna(
    folder: str | os.PathLike,
    findings: str | Sequence[str] | None = None,
    level: str = "series",
    *,
    cache_dir: str | os.PathLike | None = None,
) -> TriageDataset:
    """RSNA 2019 intracranial haemorrhage: ``<folder>/stage_2_train.csv`` + ``<folder>/stage_2_train/ID_<id>.dcm``.

    Only DICOM headers are read (``PatientID``, ``StudyInstanceUID``, ``SeriesInstanceUID``; no pixel data), once:
    they are kept in ``<cache_dir>/.headers.csv`` and read again only for files whose size or mtime changed.

    Args:
        folder: the dataset folder.
        findings: subtypes to read; default :data:`RSNA_FINDINGS` (``any`` first).
        level: ``"series"`` (one case per ``SeriesInstanceUID``) or ``"study"`` (per ``StudyInstanceUID``); a
            case's label is the maximum of its slices' labels.
        cache_dir: where the per-series folders of symlinks (``<cache_dir>/<SeriesInstanceUID>/ID_<id>.dcm`` ->
            the slice, as a relative link) are written, each atomically and only when missing or different;
            default ``<folder>/.ctfm_series``. It must be writable.

    Returns:
        Cases sorted by id (the series or study UID); patient is the ``PatientID``, image the symlink folder.

    Raises:
        CTFMError: missing csv, column or finding; a malformed ``ID``; a label that is not 0/1; a repeated row with a
            different label; a row without a slice file or a slice without rows; an unreadable header or one
            without the UIDs; a series or study of two patients; an unwritable cache folder; no slices.
    """
    folder = Path(os.path.abspath(folder))
    labels_path = folder / RSNA_LABELS
    images_folder = folder / RSNA_IMAGES
    if level not in RSNA_LEVELS:
        raise CTFMError(f"{folder}: level {level!r} is not one of {', '.join(RSNA_LEVELS)}")
    cache = Path(os.path.abspath(cache_dir)) if cache_dir is not None else folder / RSNA_CACHE

    slice_labels, findings = _rsna_slice_labels(labels_path, findings)
    files = _rsna_slice_files(images_folder)
    unlabelled = sorted(set(files) - set(slice_labels.index))
    if unlabelled:
        raise CTFMError(
            f"{files[unlabelled[0]]}: slice has no row in {labels_path}"
            f" ({len(unlabelled)} slices of {images_folder} have none)"
        )
    missing = sorted(set(slice_labels.index) - set(files))
    if missing:
        raise CTFMError(
            f"{labels_path}: image {missing[0]!r} is labelled but"
            f" {images_folder / (missing[0] + '.dcm')} does not exist"
            f" ({len(missing)} labelled images have no file)"
        )
    headers = _rsna_headers(files, cache)
    slices = slice_labels.join(headers, how="inner")

    key = "series" if level == "series" else "study"
    patients_per_case = slices.groupby(key)["patient"].nunique()
    mixed = patients_per_case[patients_per_case > 1]
    if len(mixed):
        uid = mixed.index[0]
        rows = slices[slices[key] == uid].drop_duplicates("patient")
        examples = ", ".join(f"{files[image].name}: {p}" for image, p in zip(rows.index[:2], rows["patient"][:2]))
        raise CTFMError(f"{images_folder}: {level} {uid} holds slices of {mixed.iloc[0]} patients ({examples})")
    case_labels = slices.groupby(key)[list(findings)].max()
    case_patient = slices.groupby(key)["patient"].first()
    series_files = {uid: sorted(group.index) for uid, group in slices.groupby("series")}
    series_of_case: dict[str, str] = {}
    if level == "series":
        series_of_case = {uid: uid for uid in case_labels.index}
    else:
        several = 0
        for study, group in slices.groupby("study"):
            counts = group["series"].value_counts()
            if len(counts) > 1:
                several += 1
            # most slices, then the smallest UID
            series_of_case[study] = min(counts.index, key=lambda uid: (-counts[uid], uid))
        if several:
            logger.warning(
                "%s: %d studies hold several series; each gets the series with most slices as its image and the"
                " maximum over all its series' slices as its label",
                images_folder,
                several,
            )
    cases = []
    for uid in sorted(case_labels.index):
        series = series_of_case[uid]
        series_folder = cache / _folder_name(series)
        _ensure_link_folder(series_folder, [files[image] for image in series_files[series]])
        cases.append(
            TriageCase(
                id=str(uid),
                patient=str(case_patient[uid]),
                image=str(series_folder),
                labels={f: float(case_labels.at[uid, f]) for f in findings},
            )
        )
    if not cases:
        raise CTFMError(f"{images_folder}: no slices, an empty dataset")
    logger.info(
        "%s: %d RSNA %s cases from %d slices, findings %s", folder, len(cases), level, len(slices), ", ".join(findings)
    )
    return TriageDataset(findings=findings, cases=tuple(cases), source=str(labels_path))


def _rsna_slice_labels(labels_path: Path, findings: str | Sequence[str] | None) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Slice labels as a float64 table, index image id (``ID_<id>``), one column per requested subtype."""
    table = _read_csv(labels_path, "RSNA slice labels, header ID,Label")
    _require_columns(labels_path, table, ["ID", "Label"])
    row_ids = table["ID"]
    # vectorised regex replacements: str.extract runs per row in Python, ~10x slower on the 4.5 M published rows
    bad = ~row_ids.str.contains(_RSNA_ROW_ID.pattern, regex=True).to_numpy(dtype=bool)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise CTFMError(f"{labels_path}: row {row + 1}: ID {row_ids.iloc[row]!r} is not ID_<image id>_<subtype>")
    subtypes = row_ids.str.replace(r"^.*_", "", regex=True)
    available = subtypes.drop_duplicates().tolist()
    findings = _pick_findings(labels_path, findings, RSNA_FINDINGS, available, "RSNA csv")
    rows = pd.DataFrame(
        {
            "image": row_ids.str.replace(r"_[^_]*$", "", regex=True),
            "subtype": subtypes,
            "value": _binary_values(labels_path, table, "Label", row_ids),  # row_ids[i] is row i (RangeIndex)
        }
    )
    repeated = rows.duplicated(["image", "subtype"], keep=False).to_numpy()
    if repeated.any():
        repeats = rows[repeated]
        conflicting = repeats.groupby(["image", "subtype"])["value"].nunique()
        conflicting = conflicting[conflicting > 1]
        if len(conflicting):
            image, subtype = conflicting.index[0]
            positions = np.flatnonzero(((rows["image"] == image) & (rows["subtype"] == subtype)).to_numpy())
            raise CTFMError(
                f"{labels_path}: ID '{image}_{subtype}' occurs twice with different labels"
                f" (rows {positions[0] + 1} and {positions[1] + 1})"
            )
        logger.info(
            "%s: %d repeated rows with equal labels dropped",
            labels_path,
            int(repeated.sum()) - len(repeats.drop_duplicates(["image", "subtype"])),
        )
        rows = rows.drop_duplicates(["image", "subtype"])
    wide = rows.pivot(index="image", columns="subtype", values="value")
    for finding in findings:
        absent = wide[finding].isna().to_numpy()
        if absent.any():
            image = wide.index[int(np.flatnonzero(absent)[0])]
            raise CTFMError(
                f"{labels_path}: no row '{image}_{finding}' (image {image} has rows for other subtypes;"
                f" {int(absent.sum())} images lack {finding})"
            )
    return wide[list(findings)].astype(np.float64), findings


def _rsna_slice_files(images_folder: Path) -> dict[str, Path]:
    """Image id (the file name without ``.dcm``) -> slice file in ``images_folder``."""
    if not images_folder.is_dir():
        raise CTFMError(f"{images_folder}: no such folder (RSNA slices {RSNA_IMAGES}/ID_<id>.dcm expected)")
    files = {}
    with os.scandir(images_folder) as entries:
        for entry in entries:
            if entry.name.lower().endswith(".dcm") and not entry.name.startswith("."):
                files[entry.name[: -len(".dcm")]] = Path(entry.path)
    if not files:
        raise CTFMError(f"{images_folder}: no .dcm files, an empty dataset")
    return files


def _read_slice_header(path: Path) -> tuple[str, str, str]:
    """``(PatientID, StudyInstanceUID, SeriesInstanceUID)`` of one slice, from its header alone."""
    try:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_RSNA_HEADER_TAGS))
        except InvalidDicomError:  # no DICM preamble: read as raw data set
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_RSNA_HEADER_TAGS), force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise CTFMError(f"{path}: not a readable DICOM file ({err})") from None
    values = []
    for tag in _RSNA_HEADER_TAGS:
        value = str(header.get(tag, "") or "").strip()
        if not value:
            raise CTFMError(f"{path}: DICOM header has no {tag}")
        values.append(value)
    return values[0], values[1], values[2]


def _rsna_headers(files: Mapping[str, Path], cache: Path) -> pd.DataFrame:
    """Table of ``patient``, ``study``, ``series`` per image id, from the header index where it is current."""
    index_path = cache / RSNA_HEADER_INDEX
    known: dict[str, tuple] = {}
    if index_path.is_file():
        try:
            index = pd.read_csv(index_path, dtype=str, keep_default_na=False)
            known = {
                row[0]: row[1:]
                for row in index[["image", "size", "mtime_ns", "patient", "study", "series"]].itertuples(index=False)
            }
        except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, ValueError) as err:
            logger.warning("%s: unreadable header index, reading every header again (%s)", index_path, err)
    rows, to_read = {}, []
    for image, path in files.items():
        stat = path.stat()
        size, mtime = str(stat.st_size), str(stat.st_mtime_ns)
        entry = known.get(image)
        if entry is not None and entry[0] == size and entry[1] == mtime:
            rows[image] = entry
        else:
            to_read.append((image, path, size, mtime))
    if to_read:
        logger.info("%s: reading %d DICOM headers (%d known)", cache, len(to_read), len(rows))
        # in chunks, so that an error stops the reading soon and 750 000 futures never wait at once
        with ThreadPoolExecutor(max_workers=HEADER_READ_THREADS) as pool:
            for start in range(0, len(to_read), HEADER_READ_CHUNK):
                chunk = to_read[start : start + HEADER_READ_CHUNK]
                for (image, _, size, mtime), header in zip(chunk, pool.map(_read_slice_header, [c[1] for c in chunk])):
                    rows[image] = (size, mtime, *header)
                if (start // HEADER_READ_CHUNK + 1) % 10 == 0:
                    logger.info("%s: %d of %d headers read", cache, start + len(chunk), len(to_read))
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["size", "mtime_ns", "patient", "study", "series"])
    table.index.name = "image"
    if to_read or len(known) != len(rows):
        try:
            with atomic_path(index_path) as tmp:
                table.reset_index().to_csv(tmp, index=False)
        except OSError as err:
            raise CTFMError(
                f"{cache}: cannot write the RSNA series cache ({err.strerror or err}); pass a writable cache_dir"
            ) from None
    return table[["patient", "study", "series"]]


def _folder_name(uid: str) -> str:
    """A folder name for a UID: the UID itself when it is a safe name, else ``uid_<sha1 prefix>``."""
    if _SAFE_FOLDER_NAME.match(uid) and len(uid) <= 200:
        return uid
    return "uid_" + hashlib.sha1(uid.encode()).hexdigest()[:20]


def _ensure_link_folder(target: Path, files: Sequence[Path]) -> None:
    """Make ``target`` a folder of relative symlinks, one per file of ``files``, unless it is one already."""
    wanted = {path.name: os.path.relpath(path, target) for path in files}
    try:
        if target.is_dir() and not target.is_symlink():
            with os.scandir(target) as entries:
                present = {entry.name: os.readlink(entry.path) if entry.is_symlink() else None for entry in entries}
            if present == wanted:
                return
    except OSError:
        pass
    try:
        _write_link_folder(target, wanted)
    except OSError as err:
        raise CTFMError(
            f"{target}: cannot write the RSNA series folder ({err.strerror or err}); pass a writable cache_dir"
        ) from None


def _write_link_folder(target: Path, links: Mapping[str, str]) -> None:
    """Write a folder of symlinks (name -> link text) onto ``target`` atomically."""
    with atomic_path(target, is_dir=True) as tmp:
        for name, link in links.items():
            os.symlink(link, tmp / name)


# --------------------------------------------------------------------------------------------------------------
# SinoCT-style and generic CSV


def read_sinoct(folder: str | os.PathLike, findings: str | Sequence[str] | None = None) -> TriageDataset:
    """SinoCT-style normal / abnormal labels: ``<folder>/labels.csv`` of ``image``, ``label`` [, ``patient_id``].

    Args:
        folder: the folder holding ``labels.csv`` (or the csv itself); images are relative to it.
        findings: only ``"abnormal"`` (the default) exists.

    Returns:
        One case per row; id is the image path as written, normalised, without its CT suffix; patient the
        ``patient_id`` (the id where the column is absent); one finding ``abnormal`` (``label`` 1 / ``abnormal``).

    Raises:
        CTFMError: missing csv or column; a label other than 0/1/normal/abnormal; a missing image; an empty
            ``patient_id``; a duplicate image; a finding other than ``abnormal``; no rows.
    """
    path = Path(os.path.abspath(folder))
    csv_path = path if path.is_file() else path / SINOCT_LABELS
    table = _read_csv(csv_path, "SinoCT-style labels, columns image,label[,patient_id]")
    _require_columns(csv_path, table, ["image", "label"])
    findings = _pick_findings(csv_path, findings, (SINOCT_FINDING,), (SINOCT_FINDING,), "SinoCT-style labels.csv")
    ids = [_id_from_image(value) for value in _non_empty_values(csv_path, table, "image", "image path")]
    _refuse_duplicates(csv_path, ids, "image")
    images = _image_paths(csv_path, table, "image")
    values = _binary_values(csv_path, table, "label", ids, words=_SINOCT_WORDS)
    patients = _non_empty_values(csv_path, table, "patient_id", "patient id") if "patient_id" in table.columns else ids
    cases = tuple(
        TriageCase(id=i, patient=p, image=image, labels={SINOCT_FINDING: float(v)})
        for i, p, image, v in zip(ids, patients, images, values)
    )
    logger.info("%s: %d SinoCT-style cases, %d abnormal", csv_path, len(cases), int(values.sum()))
    return TriageDataset(findings=findings, cases=cases, source=str(csv_path))


def read_csv_dataset(
    csv_path: str | os.PathLike,
    image_column: str = "image",
    findings: str | Sequence[str] | None = None,
    patient_column: str | None = None,
    id_column: str | None = None,
) -> TriageDataset:
    """Any CSV of image paths and 0/1 finding columns.

    Args:
        csv_path: the csv; relative image paths are relative to its folder.
        image_column: the column of image paths (NIfTI / NRRD files or DICOM series folders).
        findings: the finding columns, in this order; default every column except the image, patient and id ones.
        patient_column: the patient id column; default the first of :data:`CSV_PATIENT_COLUMNS` the csv has,
            else each case is its own patient.
        id_column: the case id column; default the first of :data:`CSV_ID_COLUMNS` the csv has, else the image
            path as written, normalised, without its CT suffix.

    Raises:
        CTFMError: missing csv or column; no finding column; a value that is not 0/1; a missing image; an empty
            or duplicate id; an empty patient id; no rows.
    """
    csv_path = Path(os.path.abspath(csv_path))
    table = _read_csv(csv_path, "CSV labels")
    if patient_column is None:
        patient_column = next((c for c in CSV_PATIENT_COLUMNS if c in table.columns), None)
    if id_column is None:
        id_column = next((c for c in CSV_ID_COLUMNS if c in table.columns), None)
    special = [c for c in (image_column, patient_column, id_column) if c is not None]
    _require_columns(csv_path, table, special)
    available = [c for c in table.columns if c not in special]
    findings = _pick_findings(csv_path, findings, available, available, "CSV")
    if id_column is not None:
        ids = _non_empty_values(csv_path, table, id_column, "case id")
    else:
        ids = [_id_from_image(value) for value in _non_empty_values(csv_path, table, image_column, "image path")]
    _refuse_duplicates(csv_path, ids, "case id" if id_column is not None else "image")
    images = _image_paths(csv_path, table, image_column)
    patients = _non_empty_values(csv_path, table, patient_column, "patient id") if patient_column else ids
    values = np.stack([_binary_values(csv_path, table, f, ids) for f in findings], axis=-1)
    cases = tuple(
        TriageCase(id=i, patient=p, image=image, labels={f: float(v) for f, v in zip(findings, row)})
        for i, p, image, row in zip(ids, patients, images, values)
    )
    logger.info("%s: %d cases, findings %s", csv_path, len(cases), ", ".join(findings))
    return TriageDataset(findings=findings, cases=cases, source=str(csv_path))


_READERS = {"cq500": read_cq500, "rsna": read_rsna, "sinoct": read_sinoct, "csv": read_csv_dataset}


def read_triage_dataset(
    layout: str, path: str | os.PathLike, findings: str | Sequence[str] | None = None, **options
) -> TriageDataset:
    """Read ``path`` in ``layout`` (one of :data:`LAYOUTS`); ``options`` go to that layout's reader.

    ``path`` is the dataset folder for ``cq500``, ``rsna`` and ``sinoct`` and the csv for ``csv``. Options:
    ``cq500``: ``reader_rule``, ``series_rule``; ``rsna``: ``level``, ``cache_dir``; ``csv``: ``image_column``,
    ``patient_column``, ``id_column``; ``sinoct``: none.

    Raises:
        CTFMError: an unknown layout or option, or whatever the reader refuses.
    """
    reader = _READERS.get(str(layout).lower())
    if reader is None:
        raise CTFMError(f"{path}: unknown triage dataset layout {layout!r} (one of {', '.join(LAYOUTS)})")
    accepted = list(inspect.signature(reader).parameters)[1:]
    accepted.remove("findings")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise CTFMError(
            f"{path}: layout {layout!r} takes no option {unknown[0]!r} (takes: {', '.join(accepted) or 'none'})"
        )
    return reader(path, findings=findings, **options)


# --------------------------------------------------------------------------------------------------------------
# Splits and subsets


def split_cases(
    dataset: TriageDataset,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    path: str | os.PathLike | None = None,
) -> dict[str, list[str]]:
    """A patient-level, stratified, seeded train / validation / test split of ``dataset``'s case ids.

    Patients (not cases) are shuffled by ``numpy.random.default_rng(seed)`` (from their sorted ids, so the split
    depends on the seed and the data alone) and dealt to the parts in ``fractions`` separately for the patients
    positive and negative for the first finding (a patient is positive when one of its cases is); each part
    with a non-zero fraction gets at least one patient of a group that has as many patients as such parts, so
    it gets positives where possible. Then, for each further finding, a part without positives swaps a patient
    of the same first-finding group for a positive one of a part that has two or more, where that takes no
    part's last positive of an earlier finding. Fractions are of patients, not cases.

    Args:
        dataset: the cases to split.
        fractions: (train, validation, test), each >= 0, summing to 1.
        seed: the shuffle's seed.
        path: a JSON file: written (atomically) with the split when it does not exist; when it exists, the split
            is loaded from it instead (:func:`load_split`) and checked against ``dataset``.

    Returns:
        ``{"train": [ids], "validation": [ids], "test": [ids]}``, ids in dataset order.

    Raises:
        CTFMError: bad fractions; an empty dataset; a split file that is unreadable, names an id not in
            ``dataset`` or puts one patient in two parts.
    """
    where = str(path) if path is not None else (dataset.source or "split_cases")
    if path is not None and Path(path).exists():
        split = load_split(path)
        _check_split(split, dataset, Path(path))
        logger.info("%s: split loaded (%s)", path, ", ".join(f"{k} {len(v)}" for k, v in split.items()))
        return split
    fractions = _check_fractions(fractions, where)
    if not dataset.cases:
        raise CTFMError(f"{where}: cannot split an empty dataset")
    patients = sorted({case.patient for case in dataset.cases})
    index_of = {patient: i for i, patient in enumerate(patients)}
    case_patient = np.array([index_of[case.patient] for case in dataset.cases])
    case_labels = dataset.label_array()
    # (patients, findings): positive when any case of the patient is
    patient_labels = np.zeros((len(patients), len(dataset.findings)), dtype=bool)
    np.logical_or.at(patient_labels, case_patient, case_labels > 0.5)
    order = np.random.default_rng(seed).permutation(len(patients))
    part_of = _deal_patients(order, patient_labels, fractions)
    _spread_positives(order, part_of, patient_labels, fractions)
    split = {name: [] for name in SPLIT_PARTS}
    for case, p in zip(dataset.cases, case_patient):
        split[SPLIT_PARTS[part_of[p]]].append(case.id)
    if path is not None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(split, indent=1) + "\n")
        logger.info("%s: split written", path)
    logger.info(
        "%s: split of %d patients with seed %d: %s",
        where,
        len(patients),
        seed,
        ", ".join(f"{k} {len(v)} cases" for k, v in split.items()),
    )
    return split


def _check_fractions(fractions: Sequence[float], where: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise CTFMError(f"{where}: split fractions {fractions!r} are not three numbers") from None
    if (
        len(values) != len(SPLIT_PARTS)
        or any(not math.isfinite(v) or v < 0 for v in values)
        or abs(sum(values) - 1) > 1e-6
    ):
        raise CTFMError(
            f"{where}: split fractions {fractions!r} are not three numbers >= 0 summing to 1 (train, validation, test)"
        )
    return values  # type: ignore[return-value]


def _allocate(count: int, fractions: Sequence[float]) -> list[int]:
    """Split ``count`` items into parts by ``fractions`` (largest remainders), each non-zero part >= 1 if possible."""
    quotas = [count * f for f in fractions]
    sizes = [math.floor(q) for q in quotas]
    for part in sorted(range(len(fractions)), key=lambda k: (-(quotas[k] - sizes[k]), k))[: count - sum(sizes)]:
        sizes[part] += 1
    active = [k for k, f in enumerate(fractions) if f > 0]
    if count >= len(active):
        for part in active:
            if sizes[part] == 0:
                donor = max(active, key=lambda k: (sizes[k], -k))
                sizes[donor] -= 1
                sizes[part] += 1
    return sizes


def _deal_patients(order: np.ndarray, patient_labels: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    """Part index per patient: the shuffled patients of each first-finding group dealt out by ``fractions``."""
    part_of = np.full(len(order), -1, dtype=int)
    first = patient_labels[:, 0] if patient_labels.shape[1] else np.zeros(len(order), dtype=bool)
    for positive in (True, False):
        members = [p for p in order if first[p] == positive]
        start = 0
        for part, size in enumerate(_allocate(len(members), fractions)):
            part_of[members[start : start + size]] = part
            start += size
    active = [k for k, f in enumerate(fractions) if f > 0]
    if len(order) >= len(active):  # every group smaller than the number of parts: fill empty parts
        for part in active:
            if not (part_of == part).any():
                sizes = {k: int((part_of == k).sum()) for k in active}
                donor = max(active, key=lambda k: (sizes[k], -k))
                moved = [p for p in order if part_of[p] == donor][-1]
                part_of[moved] = part
    return part_of


def _spread_positives(
    order: np.ndarray, part_of: np.ndarray, patient_labels: np.ndarray, fractions: Sequence[float]
) -> None:
    """Give each non-zero part a positive patient of every further finding by swaps within first-finding groups."""
    active = [k for k, f in enumerate(fractions) if f > 0]
    first = patient_labels[:, 0]
    rank = np.empty(len(order), dtype=int)
    rank[order] = np.arange(len(order))

    def positives(part: int) -> np.ndarray:
        return patient_labels[part_of == part].sum(axis=0)

    for finding in range(1, patient_labels.shape[1]):
        for needy in active:
            if positives(needy)[finding] > 0:
                continue
            donors = sorted((k for k in active if k != needy), key=lambda k: (-positives(k)[finding], k))
            swapped = False
            for donor in donors:
                if positives(donor)[finding] < 2:
                    break
                givers = sorted(np.flatnonzero((part_of == donor) & patient_labels[:, finding]), key=lambda p: rank[p])
                for giver in givers:
                    takers = sorted(
                        np.flatnonzero((part_of == needy) & (first == first[giver]) & ~patient_labels[:, finding]),
                        key=lambda p: rank[p],
                    )
                    for taker in takers:
                        before = {k: positives(k)[:finding] > 0 for k in (donor, needy)}
                        part_of[giver], part_of[taker] = needy, donor
                        if all((positives(k)[:finding] > 0)[before[k]].all() for k in (donor, needy)):
                            swapped = True
                            break
                        part_of[giver], part_of[taker] = donor, needy
                    if swapped:
                        break
                if swapped:
                    break


def load_split(path: str | os.PathLike) -> dict[str, list[str]]:
    """A split written by :func:`split_cases`: ``{"train": [ids], "validation": [ids], "test": [ids]}``.

    Raises:
        CTFMError: a missing or unreadable file, a part that is missing or not a list of ids, an unknown part, an
            id listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise CTFMError(f"{path}: no such split file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CTFMError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CTFMError(f"{path}: unreadable split file ({err})") from None
    if not isinstance(data, dict):
        raise CTFMError(f"{path}: not a split (a JSON object with {', '.join(SPLIT_PARTS)})")
    unknown = sorted(set(data) - set(SPLIT_PARTS))
    if unknown:
        raise CTFMError(f"{path}: unknown split part {unknown[0]!r} (parts: {', '.join(SPLIT_PARTS)})")
    split, part_of = {}, {}
    for part in SPLIT_PARTS:
        ids = data.get(part)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise CTFMError(f"{path}: part {part!r} is missing or not a list of case ids")
        for case_id in ids:
            if case_id in part_of:
                raise CTFMError(f"{path}: case {case_id!r} is listed in {part_of[case_id]} and {part}")
            part_of[case_id] = part
        split[part] = list(ids)
    return split


def _check_split(split: Mapping[str, list[str]], dataset: TriageDataset, path: Path) -> None:
    by_id = {case.id: case for case in dataset.cases}
    patient_part: dict[str, str] = {}
    for part, ids in split.items():
        for case_id in ids:
            case = by_id.get(case_id)
            if case is None:
                raise CTFMError(
                    f"{path}: case {case_id!r} ({part}) is not in the dataset"
                    f" ({len(by_id)} cases from {dataset.source or 'memory'}); delete the file to split again"
                )
            other = patient_part.setdefault(case.patient, part)
            if other != part:
                raise CTFMError(f"{path}: patient {case.patient!r} has cases in both {other} and {part}")
    unsplit = len(by_id) - sum(len(ids) for ids in split.values())
    if unsplit:
        logger.warning("%s: %d cases of the dataset are in no part of the split", path, unsplit)


def subset(dataset: TriageDataset, ids: Iterable[str]) -> TriageDataset:
    """The cases of ``dataset`` with these ids, in the order of ``ids`` (e.g. one part of :func:`split_cases`).

    Raises:
        CTFMError: an id that is not in ``dataset``, or one given twice.
    """
    ids = [ids] if isinstance(ids, str) else list(ids)
    by_id = {case.id: case for case in dataset.cases}
    where = dataset.source or "triage dataset"
    for case_id in ids:
        if case_id not in by_id:
            raise CTFMError(f"{where}: no case {case_id!r} (asked for by subset)")
    duplicate = _first_duplicate(ids)
    if duplicate is not None:
        raise CTFMError(f"{where}: case {duplicate[0]!r} asked for twice by subset")
    return TriageDataset(findings=dataset.findings, cases=tuple(by_id[i] for i in ids), source=dataset.source)


def held_out_test_set(
    dataset: TriageDataset, split: Mapping[str, Sequence[str]], test: TriageDataset | None = None
) -> TriageDataset:
    """The test set of a run: ``test`` (an external set, e.g. CQ500 after training on SinoCT) or, when it is
    ``None``, the split's own test part; either way refused if it shares a case, a patient or an image with the
    split's training or validation part (one line naming both).

    Raises:
        CTFMError: an overlap, or no test cases at all.
    """
    seen = [case for part in ("train", "validation") for case in subset(dataset, split.get(part, ())).cases]
    from_split = test is None
    test = subset(dataset, split.get("test", ())) if from_split else test
    where = test.source or dataset.source or "test set"
    if not test.cases:
        raise CTFMError(f"{where}: no test cases (give test_source, or a non-zero test fraction in split_fractions)")
    if not from_split:  # the split's own parts are disjoint by patient already
        for name, key in (("image", lambda c: os.path.realpath(c.image)), ("patient", lambda c: c.patient)):
            common = {key(c) for c in seen} & {key(c) for c in test.cases}
            if common:
                raise CTFMError(
                    f"{where}: {len(common)} {name}(s) of the test set are also in training or validation "
                    f"({dataset.source}), e.g. {sorted(common)[0]}: the test set must be held out"
                )
    return test


def label_fraction(dataset: TriageDataset, fraction: float, seed: int) -> TriageDataset:
    """A stratified, seeded subsample of ``fraction`` of the cases, for label-efficiency runs
    (:func:`label_fraction_indices` on the dataset's labels; cases keep dataset order).

    Raises:
        CTFMError: ``fraction`` not in (0, 1], or an empty dataset.
    """
    where = dataset.source or "triage dataset"
    indices = label_fraction_indices(dataset.label_array(), fraction, seed, where)
    if len(indices) == len(dataset.cases):
        return dataset
    kept = tuple(dataset.cases[i] for i in indices)
    logger.info("%s: label fraction %g with seed %d keeps %d of %d cases", where, fraction, seed, len(kept), len(dataset.cases))
    return TriageDataset(findings=dataset.findings, cases=kept, source=dataset.source)


def label_fraction_indices(labels: np.ndarray, fraction: float, seed: int, where: str = "labels") -> np.ndarray:
    """Sorted row indices of a stratified, seeded subsample of ``fraction`` of ``labels`` ``(N, F)`` (0 / 1).

    ``round(fraction * N)`` rows (at least 1) are kept, positives and negatives of the first finding in their
    proportion, plus -- first, so possibly more rows than the fraction -- one positive and one negative of every
    finding that has them. Rows are drawn in the order of one ``numpy.random.default_rng(seed)`` permutation, so
    for one seed a smaller fraction's rows are a subset of a larger one's (nested label-efficiency curves).

    Raises:
        CTFMError: ``fraction`` not in (0, 1], or no rows.
    """
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise CTFMError(f"{where}: label fraction {fraction!r} is not a number") from None
    if not 0 < fraction <= 1:
        raise CTFMError(f"{where}: label fraction {fraction} is not in (0, 1]")
    labels = np.asarray(labels) > 0.5
    count = len(labels)
    if count == 0:
        raise CTFMError(f"{where}: cannot subsample an empty dataset")
    if fraction == 1:
        return np.arange(count)
    order = np.random.default_rng(seed).permutation(count)
    chosen: list[int] = []
    for finding in range(labels.shape[1]):
        for wanted in (True, False):
            if any(labels[i, finding] == wanted for i in chosen):
                continue
            candidate = next((int(i) for i in order if labels[i, finding] == wanted), None)
            if candidate is not None:
                chosen.append(candidate)
    target = max(1, round(fraction * count))
    first = labels[:, 0] if labels.shape[1] else np.zeros(count, dtype=bool)
    target_positive = round(target * first.mean())
    wanted_count = {True: target_positive, False: target - target_positive}
    have = {True: sum(bool(first[i]) for i in chosen), False: sum(not first[i] for i in chosen)}
    chosen_set = set(chosen)
    for i in order:
        key = bool(first[i])
        if i not in chosen_set and have[key] < wanted_count[key]:
            chosen_set.add(int(i))
            have[key] += 1
    return np.array(sorted(chosen_set))
