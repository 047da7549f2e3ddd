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
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    InvertibleTransform,
    MapTransform,
    Orientationd,
    Resized,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

__all__ = [
    "AIR_HU",
    "AXIS_LABELS",
    "CTFM_SPACING_MM",
    "CheckHeadCTd",
    "FMCT_HEAD_WINDOWS",
    "HEAD_CT_WINDOWS",
    "HU_MAX",
    "HU_MIN",
    "ORIENTATION",
    "CTFMPreprocessd",
    "HUWindowsd",
    "HeadCTGridd",
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
#: FM-CT's head-CT windows, level/width 40/80 (brain), 80/200 (subdural), 600/2800 (bone), as (low, high) HU.
FMCT_HEAD_WINDOWS = ((0.0, 80.0), (-20.0, 180.0), (-800.0, 2000.0))


class ScaleHUd(ScaleIntensityRanged):
    """Clip HU to ``[hu_min, hu_max]`` and scale linearly to [0, 1] (CT-FM: [-1024, 2048])."""

    def __init__(self, keys: KeysCollection, hu_min: float = HU_MIN, hu_max: float = HU_MAX, allow_missing_keys=False):
        super().__init__(keys, a_min=hu_min, a_max=hu_max, b_min=0.0, b_max=1.0, clip=True, allow_missing_keys=allow_missing_keys)


class HUWindowsd(MapTransform):
    """Scale one HU channel into several windows, each clipped and scaled to [0, 1], stacked along an axis.

    ``stack="channel"`` (FM-CT): ``(1, S, P, L)`` -> ``(len(windows), S, P, L)``. ``stack="S"`` (CT-FM's head-CT
    triage): the windowed copies one after the other along the first spatial axis, ``(1, S, P, L)`` ->
    ``(1, len(windows) * S, P, L)``, so a one-channel encoder sees all windows.

    Args:
        windows: ``(low, high)`` HU pairs, e.g. :data:`HEAD_CT_WINDOWS` or :data:`FMCT_HEAD_WINDOWS`.
        stack: ``"channel"`` or ``"S"``.
    """

    STACK_DIMS = {"channel": 0, "S": 1}

    def __init__(
        self,
        keys: KeysCollection,
        windows: Sequence[Sequence[float]] = HEAD_CT_WINDOWS,
        stack: str = "channel",
        allow_missing_keys=False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.windows = [(float(lo), float(hi)) for lo, hi in windows]
        bad = [w for w in self.windows if not w[1] > w[0]]
        if bad:
            raise ValueError(f"HU windows need high > low, got {bad}")
        if stack not in self.STACK_DIMS:
            raise ValueError(f"stack {stack!r}: choose one of {', '.join(self.STACK_DIMS)}")
        self.dim = self.STACK_DIMS[stack]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            hu = d[key]
            if hu.shape[0] != 1:
                raise ValueError(f"HUWindowsd expects one HU channel for '{key}', got {hu.shape[0]}")
            d[key] = torch.cat([((hu - lo) / (hi - lo)).clamp(0.0, 1.0) for lo, hi in self.windows], dim=self.dim)
        return d


class CTFMPreprocessd(Compose):
    """CT-FM preprocessing for an image already loaded as ``(1, X, Y, Z)`` HU, with optional label keys.

    Orientation (SPL) -> [resample to ``spacing`` mm] -> [crop to HU > 0 foreground] -> pad to ``min_size``
    voxels with -1024 HU (labels with 0) -> scale HU to [0, 1] (or stack ``windows``). Every step is
    invertible, so ``Invertd`` maps predictions back to the input's space.

    Args:
        keys: image key(s), HU.
        label_keys: label maps that follow the geometry (nearest-neighbour resampling, padded with 0).
        spacing: target spacing in mm in (S, P, L) order, or ``None`` to keep the data's spacing.
        crop_foreground: crop to the bounding box of voxels above 0 HU in the first image key.
        min_size: pad each spatial axis to at least this many voxels (e.g. the training crop size).
        windows: ``(low, high)`` HU windows to stack as channels instead of the single [-1024, 2048] scaling.
        orientation: axis codes in :data:`AXIS_LABELS`' sense: CT-FM's ``"SPL"``; FM-CT's head CT ``"RAS"`` (with
            1 mm spacing and :data:`FMCT_HEAD_WINDOWS`).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        label_keys: KeysCollection = (),
        spacing: Sequence[float] | None = CTFM_SPACING_MM,
        crop_foreground: bool = True,
        min_size: Sequence[int] | None = None,
        windows: Sequence[Sequence[float]] | None = None,
        orientation: str = ORIENTATION,
    ):
        images = [keys] if isinstance(keys, str) else list(keys)
        labels = [label_keys] if isinstance(label_keys, str) else list(label_keys)
        both = images + labels
        steps = [Orientationd(both, axcodes=orientation, labels=AXIS_LABELS)]
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


class CheckHeadCTd(MapTransform):
    """Refuse a CT that is not of a head: one line naming the file, before any resampling.

    The body is the largest connected region above -300 HU (on a grid of about 2 mm); a head is narrower than
    ``max_width_mm`` from left to right (adult heads: 140-200 mm with the scalp; an abdomen or a chest: over
    300 mm). Input ``(1, X, Y, Z)`` HU with a voxel -> RAS ``affine``; returned unchanged.
    """

    def __init__(self, keys: KeysCollection = "image", max_width_mm: float = 260.0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.max_width_mm = float(max_width_mm)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        import numpy as np
        from scipy import ndimage

        from ctfm.errors import CTFMError

        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            affine = np.asarray(image.affine, float) if hasattr(image, "affine") else np.eye(4)
            source = image.meta.get("filename_or_obj", key) if hasattr(image, "meta") else key
            spacing = np.linalg.norm(affine[:3, :3], axis=0)
            step = np.maximum(np.round(2.0 / np.maximum(spacing, 1e-6)), 1).astype(int)
            body = np.asarray(image[0])[:: step[0], :: step[1], :: step[2]] > -300.0
            regions, count = ndimage.label(body)
            if count == 0:
                raise CTFMError(f"{source}: not a head CT: nothing above -300 HU")
            largest = regions == (int(np.argmax(ndimage.sum(body, regions, range(1, count + 1)))) + 1)
            index = np.argwhere(largest) * step
            width = float(np.ptp(index @ affine[0, :3])) + float(np.abs(affine[0, :3]) @ step)
            if width > self.max_width_mm:
                raise CTFMError(
                    f"{source}: not a head CT: the body is {width:.0f} mm wide from left to right; "
                    f"a head is under {self.max_width_mm:.0f} mm"
                )
        return d


class HeadCTGridd(Compose):
    """A head CT ``(1, X, Y, Z)`` HU onto a triage recipe's fixed grid, still in HU (windows come after).

    Not a head (:class:`CheckHeadCTd`) -> refused; orientation -> [resample to ``spacing`` mm] -> crop to the HU > 0 foreground (the head) -> ``spatial_size``:
    ``size_mode="crop"`` pads with air (-1024 HU) and centre-crops (CT-FM: SPL, (5, 2, 2) mm, 48 x 128 x 128);
    ``"resize"`` resamples the whole head to it (FM-CT: RAS, 1 mm, 96^3).

    Args:
        orientation: axis codes in :data:`AXIS_LABELS`' sense, e.g. ``"SPL"`` or ``"RAS"``.
        spacing: mm along the oriented axes, or ``None`` to keep the data's.
        spatial_size: output voxels per axis.
        size_mode: ``"crop"`` or ``"resize"``.
    """

    SIZE_MODES = ("crop", "resize")

    def __init__(
        self,
        keys: KeysCollection = "image",
        orientation: str = ORIENTATION,
        spacing: Sequence[float] | None = (5.0, 2.0, 2.0),
        spatial_size: Sequence[int] = (48, 128, 128),
        size_mode: str = "crop",
    ):
        if size_mode not in self.SIZE_MODES:
            raise ValueError(f"size_mode {size_mode!r}: choose one of {', '.join(self.SIZE_MODES)}")
        size = tuple(int(s) for s in spatial_size)
        steps = [CheckHeadCTd(keys), Orientationd(keys, axcodes=orientation, labels=AXIS_LABELS)]
        if spacing is not None:
            steps.append(Spacingd(keys, pixdim=tuple(spacing), mode="bilinear", padding_mode="border"))
        steps.append(CropForegroundd(keys, source_key=keys if isinstance(keys, str) else keys[0], allow_smaller=True))
        if size_mode == "crop":
            steps += [SpatialPadd(keys, spatial_size=size, value=AIR_HU), CenterSpatialCropd(keys, roi_size=size)]
        else:
            steps.append(Resized(keys, spatial_size=size, mode="trilinear", anti_aliasing=False))
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
