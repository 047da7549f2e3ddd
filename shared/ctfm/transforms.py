"""CT-FM preprocessing as MONAI dictionary transforms, the same in every bundle.

CT-FM's recipe (``../shared/reference/ctfm.md`` section 2): orientation SPL (axis 0 runs superior to inferior,
then posterior, then left), optional resampling to (3, 1, 1) mm in (S, P, L) order, foreground crop on raw HU
(voxels above 0 HU), padding with air (-1024 HU), then HU clipped to [-1024, 2048] and scaled to [0, 1].
Head CT stacks several HU windows as channels instead of the single scaling.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CropForegroundd,
    InvertibleTransform,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

__all__ = [
    "AIR_HU",
    "AXIS_LABELS",
    "CTFM_SPACING_MM",
    "HEAD_CT_WINDOWS",
    "HU_MAX",
    "HU_MIN",
    "ORIENTATION",
    "CTFMPreprocessd",
    "HUWindowsd",
    "HideStringSiblingsd",
    "ScaleHUd",
    "inline_composes",
]

ORIENTATION = "SPL"
#: Axis letters in MONAI's classic sense (L-R, P-A, I-S), stated so that "SPL" keeps one meaning across versions.
AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
CTFM_SPACING_MM = (3.0, 1.0, 1.0)
HU_MIN, HU_MAX = -1024.0, 2048.0
AIR_HU = -1024.0
#: CT-FM head-CT triage windows as (low, high) HU: blood, subdural, stroke, bone.
HEAD_CT_WINDOWS = ((0.0, 80.0), (-125.0, 175.0), (28.0, 36.0), (-900.0, 2100.0))


class ScaleHUd(ScaleIntensityRanged):
    """Clip HU to ``[hu_min, hu_max]`` and scale linearly to [0, 1] (CT-FM: [-1024, 2048])."""

    def __init__(self, keys: KeysCollection, hu_min: float = HU_MIN, hu_max: float = HU_MAX, allow_missing_keys=False):
        super().__init__(keys, a_min=hu_min, a_max=hu_max, b_min=0.0, b_max=1.0, clip=True, allow_missing_keys=allow_missing_keys)


class HUWindowsd(MapTransform):
    """Stack HU windows as channels: ``(1, ...)`` HU -> ``(len(windows), ...)`` each clipped and scaled to [0, 1].

    Args:
        windows: ``(low, high)`` HU pairs, e.g. :data:`HEAD_CT_WINDOWS`.
    """

    def __init__(self, keys: KeysCollection, windows: Sequence[Sequence[float]] = HEAD_CT_WINDOWS, allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.windows = [(float(lo), float(hi)) for lo, hi in windows]
        bad = [w for w in self.windows if not w[1] > w[0]]
        if bad:
            raise ValueError(f"HU windows need high > low, got {bad}")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            hu = d[key]
            if hu.shape[0] != 1:
                raise ValueError(f"HUWindowsd expects one HU channel for '{key}', got {hu.shape[0]}")
            d[key] = torch.cat([((hu - lo) / (hi - lo)).clamp(0.0, 1.0) for lo, hi in self.windows], dim=0)
        return d


class CTFMPreprocessd(Compose):
    """CT-FM preprocessing for an image already loaded as ``(1, X, Y, Z)`` HU, with optional label keys.

    Orientation SPL -> [resample to ``spacing`` mm] -> [crop to HU > 0 foreground] -> pad to ``min_size``
    voxels with -1024 HU (labels with 0) -> scale HU to [0, 1] (or stack ``windows``). Every step is
    invertible, so ``Invertd`` maps predictions back to the input's space.

    Args:
        keys: image key(s), HU.
        label_keys: label maps that follow the geometry (nearest-neighbour resampling, padded with 0).
        spacing: target spacing in mm in (S, P, L) order, or ``None`` to keep the data's spacing.
        crop_foreground: crop to the bounding box of voxels above 0 HU in the first image key.
        min_size: pad each spatial axis to at least this many voxels (e.g. the training crop size).
        windows: ``(low, high)`` HU windows to stack as channels instead of the single [-1024, 2048] scaling.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        label_keys: KeysCollection = (),
        spacing: Sequence[float] | None = CTFM_SPACING_MM,
        crop_foreground: bool = True,
        min_size: Sequence[int] | None = None,
        windows: Sequence[Sequence[float]] | None = None,
    ):
        images = [keys] if isinstance(keys, str) else list(keys)
        labels = [label_keys] if isinstance(label_keys, str) else list(label_keys)
        both = images + labels
        steps = [Orientationd(both, axcodes=ORIENTATION, labels=AXIS_LABELS)]
        if spacing is not None:
            modes = ["bilinear"] * len(images) + ["nearest"] * len(labels)
            steps.append(Spacingd(both, pixdim=tuple(spacing), mode=modes, padding_mode="border"))
        if crop_foreground:
            steps.append(CropForegroundd(both, source_key=images[0], allow_smaller=True))
        if min_size is not None:
            steps.append(SpatialPadd(images, spatial_size=tuple(min_size), value=AIR_HU))
            if labels:
                steps.append(SpatialPadd(labels, spatial_size=tuple(min_size), value=0))
        steps.append(HUWindowsd(images, windows) if windows is not None else ScaleHUd(images))
        super().__init__(steps)


def inline_composes(transform: Callable) -> Compose:
    """A flat ``Compose`` with every nested ``Compose`` (subclasses such as ``CTFMPreprocessd`` included) inlined.

    ``CacheDataset`` caches up to the first ``Randomizable`` transform and MONAI counts every ``Compose`` as one,
    while ``Compose.flatten`` inlines only exact ``Compose`` instances: without this, a nested
    ``CTFMPreprocessd`` (orientation, resampling, cropping) and everything after it would run on every
    iteration instead of once.
    """
    steps = transform.transforms if isinstance(transform, Compose) else [transform]
    flat = []
    for step in steps:
        flat += inline_composes(step).transforms if isinstance(step, Compose) else [step]
    return Compose(flat)


class HideStringSiblingsd(InvertibleTransform, MapTransform):
    """Run ``transform`` with string entries named ``<key>_*`` (MONAI Label's ``image_path``) set aside.

    monai 1.6.1's ``Spacingd`` calls ``.update()`` on every ``<key>_*`` entry of a NIfTI input, which fails on
    MONAI Label's ``image_path`` string. Wrapping the preprocessing in this transform keeps a bundle with
    ``Spacingd`` usable from MONAI Label; inversion is delegated unchanged.
    """

    def __init__(self, keys: KeysCollection, transform: Callable):
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self.transform = transform

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        hidden = {
            k: d.pop(k)
            for k in list(d)
            if isinstance(k, str) and isinstance(d[k], (str, os.PathLike)) and any(k.startswith(f"{key}_") for key in self.keys)
        }
        out = dict(self.transform(d))
        out.update(hidden)
        return out

    def inverse(self, data: Mapping[Hashable, object]) -> dict:
        return self.transform.inverse(data)
