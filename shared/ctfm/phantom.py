"""Seeded synthetic CT phantoms with known labels and intensities, for fast unit tests and known-answer checks.

Every phantom is a :class:`Phantom`: ``image`` float32 HU and ``labels`` uint8, both ``(X, Y, Z)``, and a 4x4
RAS ``affine`` in mm (diagonal: axis 0 runs towards the patient's right, axis 1 anterior, axis 2 superior; the
volume centre sits at world (0, 0, 0)). Anatomy is laid out in mm around the volume centre, so the same seed
gives the same anatomy at any spacing; a field of view smaller than the default crops it. A seed fixes shapes,
sizes, positions and noise exactly (``numpy.random.default_rng(seed)``).

Body labels are TotalSegmentator v2 ids (``class_map["total"]``, see ``ctfm.sample_data.totalseg_classes``):
each whole lung carries its upper-lobe id, and the vertebral bodies (cylinders, no posterior elements) are
named from the bottom of the volume upwards, the lowest being L5. Head labels are this module's own
(:data:`HEAD_LABELS`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import nibabel as nib
import numpy as np

from ctfm.files import atomic_path

__all__ = [
    "BLEED_HU_RANGE",
    "BODY_HU",
    "BODY_LABELS",
    "HEAD_HU",
    "HEAD_LABELS",
    "VERTEBRA_HU_RANGE",
    "Phantom",
    "body_phantom",
    "head_phantom",
    "write_phantom_nifti",
]

#: TotalSegmentator v2 ids of the body phantom's organs; vertebrae are VERTEBRA_L5_ID (L5) upwards to 50 (C1).
BODY_LABELS = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "liver": 5,
    "lung_upper_lobe_left": 10,  # the whole left lung
    "lung_upper_lobe_right": 12,  # the whole right lung
    "aorta": 52,
}
VERTEBRA_L5_ID, VERTEBRA_C1_ID = 27, 50
#: Mean HU of each body tissue before noise; each vertebral body gets its own value in VERTEBRA_HU_RANGE.
BODY_HU = {
    "air": -1000.0,
    "fat": -100.0,
    "soft_tissue": 40.0,
    "lung": -850.0,
    "liver": 60.0,
    "spleen": 50.0,
    "kidney": 30.0,
    "aorta": 40.0,
    "aorta_contrast": 200.0,
}
VERTEBRA_HU_RANGE = (400.0, 700.0)

#: Head phantom labels (0 is background, scalp included).
HEAD_LABELS = {"skull": 1, "brain": 2, "ventricles": 3, "bleed": 4}
#: Mean HU of each head tissue before noise; the bleed gets a value in BLEED_HU_RANGE.
HEAD_HU = {"air": -1000.0, "scalp": 30.0, "skull": 1000.0, "grey_matter": 40.0, "white_matter": 30.0, "csf": 5.0}
BLEED_HU_RANGE = (60.0, 80.0)


class Phantom(NamedTuple):
    """``image`` (X, Y, Z) float32 HU, ``labels`` (X, Y, Z) uint8, ``affine`` 4x4 float64 voxel -> RAS mm."""

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray


def body_phantom(
    shape: Sequence[int] = (96, 96, 64),
    spacing: Sequence[float] = (4.0, 4.0, 5.0),
    seed: int = 0,
    noise_hu: float = 15.0,
    contrast: bool = False,
) -> Phantom:
    """A torso: fat-rimmed soft tissue in air, lungs above, liver, spleen, kidneys, aorta, vertebral bodies.

    Args:
        shape: voxels along (X, Y, Z); the default with the default spacing covers 384 x 384 x 320 mm.
        spacing: voxel size along (X, Y, Z) in mm.
        seed: fixes sizes (about +-10 %), positions (about +-4 mm), vertebral HU and noise.
        noise_hu: standard deviation of the Gaussian noise added everywhere, in HU.
        contrast: arterial contrast: aorta at 200 HU instead of 40.
    """
    rng = np.random.default_rng(seed)
    grid = _Grid(shape, spacing)
    image = np.full(grid.shape, BODY_HU["air"], np.float32)
    labels = np.zeros(grid.shape, np.uint8)

    scale = rng.uniform(0.92, 1.08)
    body_semi = (165.0 * scale, 120.0 * scale)
    image[grid.elliptic_cylinder((0, 0), body_semi)] = BODY_HU["fat"]
    image[grid.elliptic_cylinder((0, 0), (body_semi[0] - 15, body_semi[1] - 15))] = BODY_HU["soft_tissue"]

    def organ(centre, semi_axes):
        centre = np.asarray(centre, float) * scale + rng.normal(0.0, 4.0, 3)
        return grid.ellipsoid(centre, np.asarray(semi_axes, float) * scale * rng.uniform(0.9, 1.1, 3))

    for side, name in ((1, "lung_upper_lobe_right"), (-1, "lung_upper_lobe_left")):
        _paint(image, labels, organ((85 * side, 0, 95), (60, 85, 75)), BODY_HU["lung"], BODY_LABELS[name])
    _paint(image, labels, organ((60, 10, 0), (80, 80, 60)), BODY_HU["liver"], BODY_LABELS["liver"])
    _paint(image, labels, organ((-95, -35, 10), (35, 50, 45)), BODY_HU["spleen"], BODY_LABELS["spleen"])
    for side, name in ((1, "kidney_right"), (-1, "kidney_left")):
        _paint(image, labels, organ((70 * side, -60, -55), (30, 35, 55)), BODY_HU["kidney"], BODY_LABELS[name])
    aorta_hu = BODY_HU["aorta_contrast"] if contrast else BODY_HU["aorta"]
    aorta_centre = np.array([-25.0, -35.0]) * scale + rng.normal(0.0, 4.0, 2)
    _paint(image, labels, grid.elliptic_cylinder(aorta_centre, (13.0 * scale,) * 2), aorta_hu, BODY_LABELS["aorta"])

    # Vertebral bodies: 26 mm cylinders with 6 mm discs (soft tissue), from the bottom of the volume upwards.
    pitch, height = 32.0 * scale, 26.0 * scale
    spine_centre = np.array([0.0, -70.0 * scale]) + rng.normal(0.0, 2.0, 2)
    spine = grid.elliptic_cylinder(spine_centre, (22.0 * scale,) * 2)
    bottom = grid.z.min() - rng.uniform(0.0, pitch)
    for label in range(VERTEBRA_L5_ID, VERTEBRA_C1_ID + 1):
        if bottom > grid.z.max():
            break
        body = spine & (grid.z >= bottom) & (grid.z < bottom + height)
        _paint(image, labels, body, rng.uniform(*VERTEBRA_HU_RANGE), label)
        bottom += pitch

    image += rng.normal(0.0, noise_hu, grid.shape).astype(np.float32)
    return Phantom(image, labels, grid.affine)


def head_phantom(
    shape: Sequence[int] = (64, 64, 48),
    spacing: Sequence[float] = (3.5, 3.5, 4.0),
    seed: int = 0,
    bleed: bool = False,
    noise_hu: float = 15.0,
) -> Phantom:
    """A non-contrast head CT: scalp, skull, grey/white matter, lateral ventricles, optionally a bleed.

    Labels are :data:`HEAD_LABELS`: 0 background (air and scalp), 1 skull, 2 brain (grey and white matter),
    3 ventricles (CSF), 4 bleed (a hyperdense 60-80 HU sphere of 8-15 mm radius inside the brain parenchyma).

    Args:
        shape: voxels along (X, Y, Z); the default with the default spacing covers 224 x 224 x 192 mm.
        spacing: voxel size along (X, Y, Z) in mm.
        seed: fixes head size (+-8 %), ventricle size, bleed position, size and HU, and noise.
        bleed: add the haemorrhage.
        noise_hu: standard deviation of the Gaussian noise added everywhere, in HU.
    """
    rng = np.random.default_rng(seed)
    grid = _Grid(shape, spacing)
    image = np.full(grid.shape, HEAD_HU["air"], np.float32)
    labels = np.zeros(grid.shape, np.uint8)

    head_semi = np.array([75.0, 95.0, 85.0]) * rng.uniform(0.92, 1.08)
    image[grid.ellipsoid((0, 0, 0), head_semi)] = HEAD_HU["scalp"]
    _paint(image, labels, grid.ellipsoid((0, 0, 0), head_semi - 5), HEAD_HU["skull"], HEAD_LABELS["skull"])
    brain_semi = head_semi - 12
    _paint(image, labels, grid.ellipsoid((0, 0, 0), brain_semi), HEAD_HU["grey_matter"], HEAD_LABELS["brain"])
    image[grid.ellipsoid((0, 0, 0), brain_semi - 4)] = HEAD_HU["white_matter"]
    ventricle_semi = np.array([6.0, 22.0, 10.0]) * rng.uniform(0.8, 1.3)
    for side in (1, -1):
        ventricle = grid.ellipsoid((10.0 * side, 5.0, 10.0), ventricle_semi)
        _paint(image, labels, ventricle, HEAD_HU["csf"], HEAD_LABELS["ventricles"])

    if bleed:
        direction = rng.normal(size=3)
        centre = direction / np.linalg.norm(direction) * brain_semi * rng.uniform(0.3, 0.6)
        sphere = grid.ellipsoid(centre, (rng.uniform(8.0, 15.0),) * 3)
        hu = rng.uniform(*BLEED_HU_RANGE)
        _paint(image, labels, sphere & (labels == HEAD_LABELS["brain"]), hu, HEAD_LABELS["bleed"])

    image += rng.normal(0.0, noise_hu, grid.shape).astype(np.float32)
    return Phantom(image, labels, grid.affine)


def write_phantom_nifti(image_path: str | os.PathLike, label_path: str | os.PathLike, phantom: Phantom) -> None:
    """Write ``phantom.image`` (float32 HU) and ``phantom.labels`` (uint8) as NIfTI, each file atomically.

    Both carry ``phantom.affine`` as qform and sform (scanner coordinates); a ``.gz`` suffix compresses.
    """
    for path, array in ((image_path, phantom.image), (label_path, phantom.labels)):
        nifti = nib.Nifti1Image(array, phantom.affine)
        nifti.set_qform(phantom.affine, code=1)
        nifti.set_sform(phantom.affine, code=1)
        with atomic_path(path) as tmp:
            nib.save(nifti, tmp)


class _Grid:
    """World coordinates (mm, RAS, centred on the volume) of every voxel centre, as broadcastable axes."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float]):
        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) != 3 or len(spacing) != 3:
            raise ValueError(f"phantoms are 3-D: got shape {shape} and spacing {spacing}")
        offsets = [-(n - 1) / 2 * s for n, s in zip(self.shape, spacing)]
        self.x, self.y, self.z = (
            (np.arange(n) * s + o).reshape([-1 if axis == i else 1 for axis in range(3)])
            for i, (n, s, o) in enumerate(zip(self.shape, spacing, offsets))
        )
        self.affine = np.diag([*map(float, spacing), 1.0])
        self.affine[:3, 3] = offsets

    def ellipsoid(self, centre: Sequence[float], semi_axes: Sequence[float]) -> np.ndarray:
        (cx, cy, cz), (a, b, c) = centre, semi_axes
        return ((self.x - cx) / a) ** 2 + ((self.y - cy) / b) ** 2 + ((self.z - cz) / c) ** 2 <= 1.0

    def elliptic_cylinder(self, centre: Sequence[float], semi_axes: Sequence[float]) -> np.ndarray:
        """Along the whole Z axis."""
        (cx, cy), (a, b) = centre, semi_axes
        inside = ((self.x - cx) / a) ** 2 + ((self.y - cy) / b) ** 2 <= 1.0
        return np.broadcast_to(inside, self.shape)


def _paint(image: np.ndarray, labels: np.ndarray, mask: np.ndarray, hu: float, label: int) -> None:
    image[mask] = hu
    labels[mask] = label
