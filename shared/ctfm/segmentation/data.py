"""Segmentation training data in three layouts, as ``[{"image": ct, "label": label map}]`` plus class names.

Layouts (``layout`` of :func:`load_segmentation_data`):

- ``"totalseg"``: TotalSegmentator's dataset, a root folder of subjects ``<subject>/ct.nii.gz`` +
  ``<subject>/segmentations/<class name>.nii.gz`` (one binary mask per class). The masks are merged into one
  uint8 label map with TotalSegmentator's label ids (:func:`merge_subject`), written once to a cache folder and
  reused while it is newer than every mask.
- ``"nifti"``: multi-label NIfTI pairs, from a datalist JSON (a list, or MONAI's decathlon layout with a
  ``"training"`` section and optionally ``"labels": {"1": "spleen", ...}``), a folder holding such a
  ``dataset.json`` (the shipped sample folder), or an in-memory list. Label ids
  are TotalSegmentator's unless the JSON names its own.
- ``"msd"``: a Medical Segmentation Decathlon ``dataset.json``. ``labels`` picks the task's label ids to keep
  (e.g. ``[2]`` for Task07_Pancreas' tumour only); they are renumbered 1, 2, ... in the order given and every
  other id becomes background (:class:`RemapLabelsd`).

``fraction`` or ``num_subjects`` keeps a seeded random subset of the subjects (label-efficiency runs). Pairs
whose image and label grids differ are refused up front, from the file headers, with one line naming both
files; :class:`AlignLabeld` checks again on the loaded volumes (or, for references written by another tool,
resamples the label onto the image grid by world coordinates).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, ResampleToMatch
from monai.utils import ImageMetaKey

from ctfm.errors import CTFMError
from ctfm.files import atomic_path

__all__ = [
    "AFFINE_TOLERANCE_MM",
    "CT_NAME",
    "LAYOUTS",
    "MASK_FOLDER",
    "AlignLabeld",
    "RemapLabelsd",
    "SegmentationData",
    "check_pair",
    "find_subjects",
    "load_segmentation_data",
    "merge_subject",
    "sample_evaluation_data",
    "sample_training_data",
    "select_subjects",
]

logger = logging.getLogger("ctfm.segmentation")

LAYOUTS = ("totalseg", "nifti", "msd")
CT_NAME = "ct.nii.gz"
MASK_FOLDER = "segmentations"
#: Affines of an image and its label may differ by this much (mm) and still count as the same grid.
AFFINE_TOLERANCE_MM = 1e-3


@dataclass
class SegmentationData:
    """A training list and what its label ids mean.

    ``items``: ``[{"image": path, "label": path, ...}]``; ``class_names``: label id (1..) -> name, background
    excluded; ``label_mapping``: source id -> training id for :class:`RemapLabelsd`, ``None`` when ids are kept.
    """

    items: list[dict]
    class_names: dict[int, str]
    label_mapping: dict[int, int] | None = None
    layout: str = "nifti"
    source: str = ""
    excluded: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Network output channels: the highest label id + 1 (background is channel 0)."""
        return max(self.class_names, default=0) + 1


def load_segmentation_data(
    layout: str,
    source: str | os.PathLike | Sequence[Mapping],
    datalist: str | os.PathLike | Sequence | None = None,
    labels: Sequence[int] | None = None,
    fraction: float | None = None,
    num_subjects: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    section: str = "training",
) -> SegmentationData:
    """Build the training list of one of :data:`LAYOUTS`; see the module docstring.

    Args:
        layout: ``"totalseg"`` (``source`` = root folder of subjects), ``"nifti"`` (datalist JSON or a list of
            ``{"image", "label"}`` dicts) or ``"msd"`` (``source`` = ``dataset.json`` or its folder).
        source: where the data is, as above (a bundle's ``dataset_dir``).
        datalist: ``"nifti"`` only: what to read in ``source``, as :func:`ctfm.datalist.find_inputs` takes it (a
            JSON, a list of ``{"image", "label"}`` dicts); ``None`` reads ``source``'s ``dataset.json``.
        labels: MSD only: the dataset.json label ids to keep, in the order they get ids 1, 2, ...
        fraction: keep this fraction (0, 1] of the subjects, at least one.
        num_subjects: keep this many subjects.
        seed: seed of the subset choice.
        cache_dir: ``"totalseg"`` only: where merged label maps are cached (default ``<root>/.ctfm_labels``).
        section: the datalist / dataset.json section to read.

    Raises:
        CTFMError: unknown layout, missing or malformed source, image/label grid mismatch, bad subset request.
    """
    if layout not in LAYOUTS:
        raise CTFMError(f"{source}: unknown data layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if labels is not None and layout != "msd":
        raise CTFMError(f"{source}: 'labels' picks MSD task labels; it does not apply to the {layout!r} layout")
    if layout == "totalseg":
        subjects = select_subjects(find_subjects(source), fraction, num_subjects, seed)
        class_names = _totalseg_classes()
        cache = Path(cache_dir) if cache_dir is not None else Path(source) / ".ctfm_labels"
        items = [{"image": str(s / CT_NAME), "label": str(merge_subject(s, cache, class_names))} for s in subjects]
        data = SegmentationData(items, class_names, None, layout, str(source))
    elif layout == "nifti":
        items, class_names = _nifti_items(source, datalist, section)
        data = SegmentationData(select_subjects(items, fraction, num_subjects, seed), class_names, None, layout, str(source))
    else:
        items, class_names, mapping = _msd_items(source, labels, section)
        data = SegmentationData(select_subjects(items, fraction, num_subjects, seed), class_names, mapping, layout, str(source))
    for item in data.items:
        check_pair(item["image"], item["label"])
    logger.info("%s layout %s: %d subjects, %d classes", data.layout, data.source, len(data.items), len(data.class_names))
    return data


def sample_training_data() -> list[dict]:
    """The shipped training pair: the whole ``example_ct.nii.gz`` (abdomen and pelvis, 112 slices of 3 mm) and
    TotalSegmentator's labels for all of it, ``example_seg_fast_force_split.nii.gz`` (61 structures), as a
    ``"nifti"`` layout list: the ``training`` section of the sample folder's ``dataset.json``, which the bundle's
    default ``dataset_dir`` reads."""
    from ctfm.datalist import find_inputs
    from ctfm.sample_data import sample_dir

    return find_inputs(sample_dir(), section="training")


def sample_evaluation_data() -> list[dict]:
    """The held-out sample pair: the ``example_ct_dicom`` series (a CT no shipped network trained on) and
    TotalSegmentator's labels for it, ``example_seg_dicom.nii.gz``. That NIfTI was written by dcm2niix, whose
    voxel order differs from ITK's read of the series (y flipped); its affine is right, so evaluate it with
    ``AlignLabeld(mode="world")``."""
    from ctfm.sample_data import sample_path

    return [{"image": str(sample_path("example_ct_dicom")), "label": str(sample_path("example_seg_dicom.nii.gz"))}]


def find_subjects(root: str | os.PathLike) -> list[Path]:
    """Subject folders under a TotalSegmentator root: those holding ``ct.nii.gz`` and ``segmentations/``.

    ``root`` may also be one subject folder. Returns sorted paths.
    """
    root = Path(root)
    if not root.is_dir():
        raise CTFMError(f"{root}: no such TotalSegmentator dataset folder")
    if _is_subject(root):
        return [root]
    subjects = sorted(p for p in root.iterdir() if p.is_dir() and _is_subject(p))
    if not subjects:
        raise CTFMError(f"{root}: no subject folder with {CT_NAME} and {MASK_FOLDER}/ (TotalSegmentator layout)")
    return subjects


def merge_subject(
    subject: str | os.PathLike, cache_dir: str | os.PathLike, class_names: Mapping[int, str] | None = None
) -> Path:
    """One uint8 label map from a subject's per-class masks, cached; returns the cached NIfTI's path.

    Voxels in several masks take the highest label id. The cache file ``<cache_dir>/<subject>-<hash>.nii.gz``
    (hash of the subject's absolute path) is rebuilt only when a mask is newer than it or the mask folder
    changed; it is written atomically with the CT's affine.

    Raises:
        CTFMError: a mask whose grid differs from the CT (naming both files), or no mask of a known class.
    """
    subject = Path(subject).resolve()
    class_names = class_names or _totalseg_classes()
    ids = {name: label for label, name in class_names.items()}
    masks_dir, ct = subject / MASK_FOLDER, subject / CT_NAME
    masks = sorted(masks_dir.glob("*.nii.gz"))
    known = [m for m in masks if m.name[: -len(".nii.gz")] in ids]
    unknown = sorted(m.name for m in masks if m not in known)
    if unknown:
        logger.warning("%s: %d masks name no class and are ignored (first: %s)", masks_dir, len(unknown), unknown[0])
    if not known:
        raise CTFMError(f"{masks_dir}: no mask named after a class (expected e.g. {next(iter(ids))}.nii.gz)")
    digest = hashlib.sha1(str(subject).encode()).hexdigest()[:8]
    cached = Path(cache_dir) / f"{subject.name}-{digest}.nii.gz"
    newest = max([masks_dir.stat().st_mtime] + [m.stat().st_mtime for m in known])
    if cached.is_file() and cached.stat().st_mtime > newest:
        return cached

    reference = nib.load(ct)
    merged = np.zeros(reference.shape, np.uint8)
    for mask_path in sorted(known, key=lambda m: ids[m.name[: -len(".nii.gz")]]):
        mask = nib.load(mask_path)
        _check_same_grid(ct, reference, mask_path, mask)
        merged[np.asanyarray(mask.dataobj) > 0] = ids[mask_path.name[: -len(".nii.gz")]]
    image = nib.Nifti1Image(merged, reference.affine)
    image.set_qform(reference.affine, code=1)
    image.set_sform(reference.affine, code=1)
    with atomic_path(cached) as tmp:
        nib.save(image, tmp)
    logger.info("merged %d masks of %s into %s", len(known), subject, cached)
    return cached


def select_subjects(items: Sequence, fraction: float | None = None, num_subjects: int | None = None, seed: int = 0) -> list:
    """A seeded random subset of ``items`` in their original order: ``fraction`` of them or ``num_subjects``.

    With neither, all items. The same seed picks the same subjects, and a larger subset contains a smaller one
    (the choice is a prefix of one seeded permutation), so label-efficiency curves are nested.
    """
    items = list(items)
    if fraction is not None and num_subjects is not None:
        raise CTFMError("give either a fraction or a number of subjects, not both")
    if fraction is None and num_subjects is None:
        return items
    if fraction is not None:
        if not 0 < float(fraction) <= 1:
            raise CTFMError(f"subject fraction must be in (0, 1], got {fraction}")
        keep = max(1, round(float(fraction) * len(items)))
    else:
        keep = int(num_subjects)
        if not 1 <= keep <= len(items):
            raise CTFMError(f"cannot keep {num_subjects} subjects out of {len(items)}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:keep])]


def check_pair(image_path: str | os.PathLike, label_path: str | os.PathLike) -> None:
    """Refuse an image/label pair whose NIfTI headers disagree on shape or affine (headers only, no voxels).

    Files other than NIfTI (e.g. a DICOM series image) are left to :class:`AlignLabeld`.
    """
    image_path, label_path = Path(image_path), Path(label_path)
    for path in (image_path, label_path):
        if not path.exists():
            raise CTFMError(f"{path}: no such file")
    if not all(p.name.endswith((".nii", ".nii.gz")) for p in (image_path, label_path)):
        return
    try:
        image, label = nib.load(image_path), nib.load(label_path)
    except Exception as err:
        raise CTFMError(f"{label_path}: unreadable NIfTI pair with {image_path} ({type(err).__name__}: {err})") from None
    _check_same_grid(image_path, image, label_path, label)


class RemapLabelsd(MapTransform):
    """Renumber label ids: ``mapping`` source id -> new id; ids not in ``mapping`` become 0 (background).

    ``mapping=None`` leaves labels unchanged (so a config can always include the step). With ``num_classes``, a
    label map holding an id outside ``0 .. num_classes - 1`` (after renumbering), or a fractional one, is refused
    with one line naming its file, before it reaches a loss that would fail with an index error.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mapping: Mapping[int, int] | None = None,
        num_classes: int | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.mapping = None if mapping is None else {int(k): int(v) for k, v in mapping.items()}
        self.num_classes = None if num_classes is None else int(num_classes)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if self.mapping is not None:
                out = torch.zeros_like(label)
                for src, dst in self.mapping.items():
                    out[label == src] = dst
                label = d[key] = out
            if self.num_classes is not None:
                self._check_range(label)
        return d

    def _check_range(self, label: torch.Tensor) -> None:
        values = torch.unique(torch.as_tensor(label))
        bad = [v for v in values.tolist() if v != int(v) or not 0 <= v < self.num_classes]
        if bad:
            shown = ", ".join(f"{v:g}" for v in bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise CTFMError(f"{_name(label)}: label values {shown} outside the {self.num_classes} classes 0..{self.num_classes - 1}")


class AlignLabeld(MapTransform):
    """Make sure each label map lies on its image's voxel grid, right after loading.

    Args:
        keys: label keys (``(1, X, Y, Z)`` MetaTensors).
        image_key: the image they belong to.
        mode: ``"strict"`` -- the grids must be the same (shape, and affine within 1e-3 mm), else a one-line
            :class:`~ctfm.errors.CTFMError` naming both files (training data); ``"world"`` -- resample the label
            onto the image grid by world coordinates, nearest neighbour (a reference written by another tool,
            e.g. dcm2niix's y-flipped NIfTI of a DICOM series that ITK reads in LPS order).
    """

    def __init__(self, keys: KeysCollection = "label", image_key: str = "image", mode: str = "strict", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if mode not in ("strict", "world"):
            raise ValueError(f"AlignLabeld mode must be 'strict' or 'world', got {mode!r}")
        self.image_key = image_key
        self.mode = mode

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image = d[self.image_key]
        for key in self.key_iterator(d):
            label = d[key]
            same_shape = tuple(label.shape[1:]) == tuple(image.shape[1:])
            same_affine = same_shape and np.allclose(
                np.asarray(label.affine, float), np.asarray(image.affine, float), atol=AFFINE_TOLERANCE_MM
            )
            if same_affine:
                continue
            if self.mode == "strict":
                what = "shape" if not same_shape else "affine (voxel-to-world mapping)"
                raise CTFMError(
                    f"{_name(label)}: label {what} {_grid(label)} differs from image {_name(image)} {_grid(image)}"
                )
            aligned = ResampleToMatch(mode="nearest", padding_mode="zeros")(label, image)
            if not bool((aligned > 0).any()) and bool((label > 0).any()):
                raise CTFMError(f"{_name(label)}: label does not overlap image {_name(image)} in world coordinates")
            d[key] = MetaTensor(aligned.as_tensor().round(), meta=image.meta)
        return d


def _nifti_items(source, datalist, section: str) -> tuple[list[dict], dict[int, str]]:
    from ctfm.datalist import find_inputs

    if isinstance(source, (list, tuple)):  # an in-memory datalist
        source, datalist = ".", list(source)
    items = find_inputs(source, datalist, section=section)
    listing = Path(source) / datalist if isinstance(datalist, (str, os.PathLike)) else Path(source)
    listing = listing / "dataset.json" if listing.is_dir() else listing
    names = _json_labels(listing) if listing.suffix == ".json" and listing.is_file() else None
    missing = [i for i in items if "label" not in i]
    if missing:
        raise CTFMError(f"{source}: entry without a 'label' key: {missing[0]}")
    return items, names or _totalseg_classes()


def _msd_items(source, labels: Sequence[int] | None, section: str) -> tuple[list[dict], dict[int, str], dict[int, int] | None]:
    path = Path(source)
    path = path / "dataset.json" if path.is_dir() else path
    if not path.is_file():
        raise CTFMError(f"{path}: no such MSD dataset.json")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CTFMError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    task_labels = {int(k): str(v) for k, v in (content.get("labels") or {}).items() if int(k) != 0}
    if not task_labels:
        raise CTFMError(f"{path}: no 'labels' besides background (not an MSD dataset.json?)")
    if labels is None:
        class_names, mapping = dict(sorted(task_labels.items())), None
    else:
        unknown = [int(k) for k in labels if int(k) not in task_labels]
        if unknown or not labels:
            raise CTFMError(f"{path}: task labels {list(labels)} not among the dataset's {sorted(task_labels)}")
        mapping = {int(k): i + 1 for i, k in enumerate(labels)}
        class_names = {i + 1: task_labels[int(k)] for i, k in enumerate(labels)}
    entries = content.get(section)
    if not isinstance(entries, list) or not entries:
        raise CTFMError(f"{path}: no non-empty '{section}' list")
    items = []
    for entry in entries:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise CTFMError(f"{path}: '{section}' entry without image and label: {entry}")
        item = {k: str((path.parent / v).resolve()) if isinstance(v, str) else v for k, v in entry.items()}
        items.append(item)
    return items, class_names, mapping


def _json_labels(path: Path) -> dict[int, str] | None:
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    labels = content.get("labels") if isinstance(content, dict) else None
    if not labels:
        return None
    return {int(k): str(v) for k, v in labels.items() if int(k) != 0}


def _totalseg_classes() -> dict[int, str]:
    from ctfm.sample_data import totalseg_classes

    return totalseg_classes()


def _is_subject(folder: Path) -> bool:
    return (folder / CT_NAME).is_file() and (folder / MASK_FOLDER).is_dir()


def _check_same_grid(image_path, image, label_path, label) -> None:
    if tuple(label.shape) != tuple(image.shape):
        raise CTFMError(
            f"{label_path}: label shape {'x'.join(map(str, label.shape))} differs from image {image_path} "
            f"shape {'x'.join(map(str, image.shape))}"
        )
    if not np.allclose(label.affine, image.affine, atol=AFFINE_TOLERANCE_MM):
        raise CTFMError(f"{label_path}: label affine differs from image {image_path} (not the same voxel grid)")


def _name(image) -> str:
    meta = getattr(image, "meta", {}) or {}
    return str(meta.get(ImageMetaKey.FILENAME_OR_OBJ, "<in memory>"))


def _grid(image) -> str:
    spacing = np.linalg.norm(np.asarray(image.affine, float)[:3, :3], axis=0)
    return f"{'x'.join(map(str, image.shape[1:]))} @ {'x'.join(f'{s:.3g}' for s in spacing)} mm"
