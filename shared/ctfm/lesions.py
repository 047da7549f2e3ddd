"""Synthetic acute intracranial haemorrhage inserted into a head CT, with the answer known voxel by voxel.

Works on any non-contrast head CT in HU with a voxel -> RAS mm affine: the real InVesalius head
(:func:`ctfm.invesalius.read_inv3`) or :func:`ctfm.phantom.head_phantom`. Acute blood is 50-90 HU, brighter than
parenchyma (20-45 HU) and CSF (0-15 HU); each kind is drawn where it occurs:

* ``intraparenchymal`` (IPH): a smooth irregular blob -- a sphere whose radius is perturbed by a low-frequency
  random field -- inside the brain parenchyma. ``size_mm`` is the diameter of the unperturbed sphere.
* ``subdural`` (SDH): a crescent between the inner table of the skull and the brain over a cap of the convexity,
  thickest (``size_mm``) at the cap's centre and thinning to nothing at its rim; the cap's extent along the
  surface (:data:`SDH_EXTENT_MM`, 60-100 mm) is drawn from the ``rng``; without a centre, the cap centres on the
  lateral convexity above the cavity's centre, on a side drawn at random. It stays on one side of the midline, as
  the falx holds it.
* ``intraventricular`` (IVH): blood layering in the dependent part of the ventricles: in each lateral half of the
  ventricular system, the ventricle voxels up to ``size_mm`` above its most dependent point (posterior, the patient
  lying supine) are blood, which gives a flat blood-CSF level.

Lesion voxels (the returned mask) get ``spec.hu`` plus Gaussian noise of the image's own noise level (estimated
from brain voxels, see :func:`estimate_noise_std`); the voxels just outside take part of that value (partial
volume: the mask smoothed by a Gaussian of 0.6 voxel is the lesion value's weight there, about 0.1-0.4 on a flat
edge, never in the skull). The input image is never modified. Everything random comes from the
``numpy.random.Generator`` passed in, so a seed fixes the result exactly.

Masks (:func:`head_masks`) come from HU thresholds and morphology (scipy.ndimage), or from the phantom's labels:

1. skull: the largest 26-connected component of >= 300 HU (the scanner table, and bone not joined to the skull,
   fall away);
2. enclosure: from every voxel, rays in the 26 directions of the 3x3x3 neighbourhood (on a grid of about 2 mm);
   a voxel is enclosed when at least 80 % of them meet skull. This is true inside the head even behind a bone
   defect (the real CT has one, see below) or above the foramen magnum, and false in the scalp, face and neck,
   where a slice-by-slice hole filling would fail on the first gap in the skull;
3. cavity: the enclosed non-bone, non-air voxels (-30..300 HU), opened by 4 mm on the 2 mm grid (which cuts the
   orbits, nasal cavity and sinuses off at their narrow connections), the largest component grown back by the
   same amount inside them, its holes filled;
4. in the cavity, on the image smoothed by a Gaussian of one voxel (of cavity voxels only, at most 2.5 mm):
   parenchyma is 15..50 HU (components under 1 ml dropped), CSF 0..15 HU;
5. ventricles: the CSF at least 15 mm deep inside the cavity whose components (of at least 0.2 ml) lie in its
   central part, grown back by 5 mm inside the CSF.

On the real InVesalius CT (:mod:`ctfm.invesalius`) this gives a cavity of 1.49 l, parenchyma 1.24 l, CSF 125 ml,
ventricles 48 ml (the lateral and third ventricles; they include a CSF-density area under the bone defect that
joins the right frontal horn) and a noise level of about 6 HU, in about 4 s. That CT has a bone defect of about
25 x 45 mm in the right frontal bone with hypodense brain beneath it. On the phantom the HU masks match its labels
(Dice > 0.97 for skull, cavity and brain; about half of its small ventricles are found, at 3.5 mm voxels).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ctfm.errors import CTFMError

__all__ = [
    "BRAIN_HU",
    "CSF_HU",
    "LESION_KINDS",
    "LESION_RANGES",
    "SDH_EXTENT_MM",
    "SKULL_HU",
    "LesionSpec",
    "estimate_noise_std",
    "head_masks",
    "insert_lesion",
    "lesion_case",
    "random_lesion",
]

LESION_KINDS = ("intraparenchymal", "subdural", "intraventricular")

#: What :func:`random_lesion` draws from, uniformly, per kind: ``hu`` the lesion's mean HU; ``size_mm`` the IPH
#: diameter, the SDH's greatest thickness, the depth of the IVH layer.
LESION_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "intraparenchymal": {"hu": (60.0, 85.0), "size_mm": (10.0, 40.0)},
    "subdural": {"hu": (55.0, 80.0), "size_mm": (4.0, 15.0)},
    "intraventricular": {"hu": (50.0, 75.0), "size_mm": (4.0, 12.0)},
}
#: The SDH cap's diameter along the skull (mm), drawn by :func:`insert_lesion` from its ``rng``.
SDH_EXTENT_MM = (60.0, 100.0)

#: HU rules of :func:`head_masks`: bone at or above SKULL_HU; parenchyma and CSF (on the smoothed image) in these
#: closed / half-open ranges.
SKULL_HU = 300.0
BRAIN_HU = (15.0, 50.0)
CSF_HU = (0.0, 15.0)
#: Intracranial contents (raw HU) considered for the cavity: everything but air, fat and bone.
_CAVITY_HU = (-30.0, SKULL_HU)
#: A voxel is enclosed by the skull when at least this fraction of 26 rays from it (the 3x3x3 neighbourhood's
#: directions, on the coarse grid) meets skull: true inside the head, also behind a bone defect or near the
#: foramen magnum, false in the scalp, the face and the neck.
_ENCLOSED = 0.8
#: The thresholds apply to the image smoothed by a Gaussian of one voxel, at most _SMOOTH_MM (at least 0.7 voxel).
_SMOOTH_MM = 2.5
#: The coarse grid (mm) on which the enclosure, the cavity's opening and depths are computed.
_COARSE_MM = 2.0
_OPEN_CAVITY_MM = 4.0
_VENTRICLE_DEPTH_MM = 15.0
_VENTRICLE_GROW_MM = 5.0
_VENTRICLE_MIN_ML = 0.2
#: A ventricle component's centroid lies within this fraction of the cavity's half-extent from its centroid.
_VENTRICLE_CENTRAL = 0.5
_EDGE_SIGMA_VOXELS = 0.6
#: The direction of gravity in RAS for a supine patient: blood settles posteriorly.
_GRAVITY = np.array([0.0, -1.0, 0.0])
#: IPH blob: relative amplitude and correlation length (in radii) of the radius perturbation.
_BLOB_AMPLITUDE = 0.25
_BLOB_CORRELATION = 0.4
_PLACEMENT_TRIES = 20


@dataclass(frozen=True)
class LesionSpec:
    """One lesion: ``kind`` (one of :data:`LESION_KINDS`), mean ``hu``, ``size_mm`` and an optional centre.

    ``size_mm`` is the IPH diameter (10-40 mm in :data:`LESION_RANGES`), the SDH's greatest thickness (4-15 mm)
    or the IVH layer's depth above the ventricles' most dependent point (4-12 mm). ``centre_mm`` (RAS mm) places
    it: the IPH's centre; the SDH cap centres on the inner-table point nearest to it; IVH fills only the half
    (left or right) of the ventricles that holds it. ``None`` lets :func:`insert_lesion` pick a place at random.
    """

    kind: str
    hu: float
    size_mm: float
    centre_mm: tuple[float, float, float] | None = None

    def __post_init__(self):
        if self.kind not in LESION_KINDS:
            raise CTFMError(f"lesion kind {self.kind!r} is not one of {', '.join(LESION_KINDS)}")
        if not np.isfinite(self.hu) or not (np.isfinite(self.size_mm) and self.size_mm > 0):
            raise CTFMError(f"{self.kind} lesion: hu {self.hu} and size_mm {self.size_mm} must be finite, size > 0")
        if self.centre_mm is not None and (len(self.centre_mm) != 3 or not np.all(np.isfinite(self.centre_mm))):
            raise CTFMError(f"{self.kind} lesion: centre_mm {self.centre_mm} is not three finite mm")


def random_lesion(kind: str, rng: np.random.Generator, ranges: Mapping | None = None) -> LesionSpec:
    """A :class:`LesionSpec` of ``kind`` with HU and size drawn uniformly from ``ranges`` (kind -> {"hu": (lo, hi),
    "size_mm": (lo, hi)}; what is missing comes from :data:`LESION_RANGES`) and no centre (placed at insertion)."""
    if kind not in LESION_KINDS:
        raise CTFMError(f"lesion kind {kind!r} is not one of {', '.join(LESION_KINDS)}")
    drawn = _ranges(kind, ranges)
    return LesionSpec(kind, float(rng.uniform(*drawn["hu"])), float(rng.uniform(*drawn["size_mm"])), None)


def _ranges(kind: str, ranges: Mapping | None) -> dict[str, tuple[float, float]]:
    merged = dict(LESION_RANGES[kind])
    given = dict((ranges or {}).get(kind, {}))
    unknown = sorted(set(given) - set(merged))
    if unknown:
        raise CTFMError(f"{kind} lesion: unknown range names {unknown}; known: {', '.join(merged)}")
    merged.update(given)
    for name, (lo, hi) in merged.items():
        if not lo <= hi:
            raise CTFMError(f"{kind} lesion: range {name} ({lo}, {hi}) is empty")
    return merged


# --- masks -------------------------------------------------------------------------------------------------------


def head_masks(image_hu: np.ndarray, affine: np.ndarray, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Boolean masks ``skull``, ``cavity`` (inside the inner table), ``brain`` (parenchyma), ``csf`` (all CSF in the
    cavity) and ``ventricles`` (the central CSF), each of the image's shape.

    Without ``labels`` they come from HU and morphology (module docstring); with the labels of
    :func:`ctfm.phantom.head_phantom` (:data:`ctfm.phantom.HEAD_LABELS`) from those: skull 1, brain 2, ventricles
    (and CSF) 3, the cavity everything inside the skull.

    Raises:
        CTFMError: no skull or no intracranial cavity found (not a head CT, or not in HU).
    """
    image = np.asarray(image_hu, np.float32)
    if image.ndim != 3:
        raise CTFMError(f"head_masks: a 3-D image is needed, got shape {image.shape}")
    spacing = _spacing(affine)
    if labels is not None:
        return _label_masks(np.asarray(labels), image.shape)
    skull = _largest_component(image >= SKULL_HU)
    if not skull.any():
        raise CTFMError(f"head_masks: no bone (>= {SKULL_HU:g} HU) in the image; is it a head CT in HU?")
    grid = _Coarse(image.shape, spacing)
    enclosed = _enclosure(skull, grid) >= _ENCLOSED
    candidates = enclosed & ~skull & (image >= _CAVITY_HU[0]) & (image < _CAVITY_HU[1])
    # the opening runs on the coarse grid: only which component is the cavity is decided there
    coarse = grid.reduce(candidates, "all")
    core = _largest_component(_depth(coarse, grid.spacing) > _OPEN_CAVITY_MM)
    if core.sum() * np.prod(grid.spacing) < 50_000.0:  # 50 ml: less than any brain
        raise CTFMError("head_masks: no intracranial cavity inside the skull; is it a head CT in HU?")
    grown = _dilate(core, _OPEN_CAVITY_MM + grid.spacing.max(), grid.spacing) & grid.reduce(candidates, "any")
    cavity = _largest_component(grid.expand(grown) & candidates)
    cavity = ndi.binary_fill_holes(cavity) & ~skull
    smooth = _smooth_within(image, cavity, np.clip(_SMOOTH_MM / spacing, 0.7, 1.0))
    brain = cavity & (smooth >= BRAIN_HU[0]) & (smooth <= BRAIN_HU[1])
    brain = _drop_small(brain, 1000.0, spacing)
    csf = cavity & (smooth >= CSF_HU[0]) & (smooth < CSF_HU[1])
    return {
        "skull": skull,
        "cavity": cavity,
        "brain": brain,
        "csf": csf,
        "ventricles": _ventricles(csf, cavity, spacing),
    }


def _label_masks(labels: np.ndarray, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    from ctfm.phantom import HEAD_LABELS

    if labels.shape != shape:
        raise CTFMError(f"head_masks: labels of shape {labels.shape} for an image of shape {shape}")
    skull = labels == HEAD_LABELS["skull"]
    inside = np.isin(labels, [HEAD_LABELS[name] for name in ("brain", "ventricles", "bleed")])
    if not skull.any() or not inside.any():
        raise CTFMError("head_masks: the labels have no skull or no brain (not ctfm.phantom.HEAD_LABELS?)")
    ventricles = labels == HEAD_LABELS["ventricles"]
    cavity = ndi.binary_fill_holes(inside) & ~skull
    return {
        "skull": skull,
        "cavity": cavity,
        "brain": labels == HEAD_LABELS["brain"],
        "csf": ventricles.copy(),
        "ventricles": ventricles,
    }


def _enclosure(skull: np.ndarray, grid: _Coarse) -> np.ndarray:
    """For each voxel, the fraction of the 26 directions of the 3x3x3 neighbourhood along which a ray from it meets
    ``skull`` before leaving the image; on the coarse grid (a coarse voxel is bone if any of its fine voxels is), by
    doubling shifts (``log2(size)`` steps per direction)."""
    coarse = grid.reduce(skull, "any")
    directions = [d for d in itertools.product((-1, 0, 1), repeat=3) if any(d)]
    count = np.zeros(coarse.shape, np.uint8)
    for direction in directions:
        hit, step = coarse.copy(), 1
        while step < max(coarse.shape):  # hit[x]: bone at x + t * direction for some 0 <= t < 2 * step
            offset = [step * k for k in direction]
            if any(abs(k) >= n for k, n in zip(offset, coarse.shape)):
                break  # the shift leaves the image along some axis: nothing more to meet
            source = tuple(slice(max(0, k), n + min(0, k)) for k, n in zip(offset, coarse.shape))
            target = tuple(slice(max(0, -k), n + min(0, -k)) for k, n in zip(offset, coarse.shape))
            hit[target] |= hit[source].copy()
            step *= 2
        count += hit
    return grid.expand((count / len(directions)).astype(np.float32))


def _smooth_within(image: np.ndarray, mask: np.ndarray, sigma=1.0) -> np.ndarray:
    """Gaussian smoothing (``sigma`` voxels) that uses only the voxels of ``mask`` (normalised convolution), so
    that bone next to the brain does not brighten it; the image itself outside ``mask``."""
    box = _bounding_box(mask, margin=4)
    weight = mask[box].astype(np.float32)
    numerator = ndi.gaussian_filter(image[box] * weight, sigma)
    denominator = ndi.gaussian_filter(weight, sigma)
    smooth = image.copy()
    inside = mask[box]
    smooth[box][inside] = numerator[inside] / np.maximum(denominator[inside], 1e-6)
    return smooth


def _ventricles(csf: np.ndarray, cavity: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    deep = csf & (_coarse_depth(cavity, spacing) >= _VENTRICLE_DEPTH_MM)
    components, n = ndi.label(deep, np.ones((3, 3, 3)))
    if n == 0:
        return np.zeros_like(csf)
    idx = np.argwhere(cavity)
    centre = idx.mean(0)
    half = np.maximum((idx.max(0) - idx.min(0)) / 2.0, 1.0)
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    centroids = np.asarray(ndi.center_of_mass(deep, components, range(1, n + 1))).reshape(n, 3)
    keep = [
        i + 1
        for i in range(n)
        if sizes[i + 1] * np.prod(spacing) >= _VENTRICLE_MIN_ML * 1000.0
        and np.linalg.norm((centroids[i] - centre) / half) <= _VENTRICLE_CENTRAL
    ]
    seeds = np.isin(components, keep)
    if not seeds.any():
        return seeds
    steps = max(1, round(float(_VENTRICLE_GROW_MM / spacing.min())))
    return ndi.binary_dilation(seeds, iterations=steps, mask=csf)


# --- insertion ---------------------------------------------------------------------------------------------------


def estimate_noise_std(image_hu: np.ndarray, brain: np.ndarray) -> float:
    """The image noise's standard deviation (HU), from the brain voxels' deviation from their local mean.

    The residual of a Gaussian smoothing (one voxel, of brain voxels only) in the brain eroded by one voxel, as a
    robust standard deviation (1.4826 median absolute deviation), corrected for the part of white noise that the
    smoothing removes. Noise correlated between neighbouring voxels (a smooth reconstruction kernel) is
    underestimated somewhat.
    """
    core = ndi.binary_erosion(brain)
    if core.sum() < 50:
        core = brain
    if core.sum() < 10:
        raise CTFMError("estimate_noise_std: too few brain voxels to estimate the noise")
    box = _bounding_box(brain, margin=4)
    image = np.asarray(image_hu, np.float32)[box]
    residual = (image - _smooth_within(image, brain[box]))[core[box]]
    mad = np.median(np.abs(residual - np.median(residual)))
    delta = np.zeros((9, 9, 9))
    delta[4, 4, 4] = 1.0
    kept = float(np.sum((delta - ndi.gaussian_filter(delta, 1.0)) ** 2))  # residual variance per unit white noise
    return float(1.4826 * mad / np.sqrt(kept))


def insert_lesion(
    image_hu: np.ndarray,
    affine: np.ndarray,
    spec: LesionSpec,
    rng: np.random.Generator,
    masks: Mapping[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(new image float32, lesion mask bool)``: ``image_hu`` (not modified) with the lesion of ``spec`` drawn in.

    ``masks`` are :func:`head_masks`' (computed from the image when not given; pass the phantom's via
    ``head_masks(image, affine, labels)``, or the same masks for several lesions in one image).

    Raises:
        CTFMError: the lesion cannot be placed (no brain deep enough, no ventricles, a centre outside the head).
    """
    image = np.array(image_hu, dtype=np.float32, copy=True)
    affine = np.asarray(affine, float)
    if masks is None:
        masks = head_masks(image, affine)
    needed = ("skull", "cavity", "brain", "ventricles")
    missing = [name for name in needed if name not in masks]
    if missing:
        raise CTFMError(f"{spec.kind} lesion: the masks lack {', '.join(missing)} (see head_masks)")
    if any(np.shape(masks[name]) != image.shape for name in needed):
        raise CTFMError(f"{spec.kind} lesion: the masks are not of the image's shape {image.shape}")
    spacing = _spacing(affine)
    if spec.kind == "intraparenchymal":
        mask = _intraparenchymal(spec, rng, masks, affine, spacing)
    elif spec.kind == "subdural":
        mask = _subdural(spec, rng, masks, affine, spacing)
    else:
        mask = _intraventricular(spec, masks, affine)
    if not mask.any():
        raise CTFMError(f"{spec.kind} lesion: no voxel of it fits in this head (size {spec.size_mm:.1f} mm)")
    sigma = estimate_noise_std(image, masks["brain"]) if masks["brain"].sum() >= 10 else 0.0
    box = _bounding_box(mask, margin=3)
    weight = ndi.gaussian_filter(mask[box].astype(np.float32), _EDGE_SIGMA_VOXELS)
    weight[mask[box]] = 1.0  # the lesion's own voxels are blood; the rim outside takes part of it
    weight[~masks["cavity"][box]] = 0.0
    lesion = spec.hu + rng.normal(0.0, sigma, weight.shape).astype(np.float32)
    image[box] += weight * (lesion - image[box])
    return image, mask


def _intraparenchymal(spec, rng, masks, affine, spacing) -> np.ndarray:
    brain, cavity = masks["brain"], masks["cavity"]
    radius = spec.size_mm / 2.0
    region = brain & ~masks["ventricles"]
    if spec.centre_mm is not None:
        centres = [np.asarray(spec.centre_mm, float)]
    else:
        depth = _coarse_depth(cavity, spacing)
        allowed = region & (depth >= radius + 3.0)
        if not allowed.any():
            allowed = region & (depth >= radius / 2.0)
        if not allowed.any():
            raise CTFMError(
                f"intraparenchymal lesion: no brain {radius / 2:.0f} mm deep for a {spec.size_mm:.0f} mm blob"
            )
        candidates = np.argwhere(allowed)
        picks = candidates[rng.integers(0, len(candidates), _PLACEMENT_TRIES)]
        centres = list(_to_world(affine, picks))
    nominal = 4.0 / 3.0 * np.pi * radius**3
    best = None
    for centre in centres:
        mask = _blob(centre, radius, rng, affine, spacing, brain.shape) & region
        if best is None or mask.sum() > best.sum():
            best = mask
        if mask.sum() * np.prod(spacing) >= 0.5 * nominal:
            return mask
    return best


def _blob(centre, radius, rng, affine, spacing, shape) -> np.ndarray:
    """A sphere of ``radius`` mm at ``centre`` whose surface is pushed in and out by a smooth random field."""
    mask = np.zeros(shape, bool)
    centre_voxel = _to_voxel(affine, centre[None])[0]
    half = np.ceil(radius * (1.0 + 3 * _BLOB_AMPLITUDE) / spacing.min()) + 1
    lo = np.maximum(np.floor(centre_voxel - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre_voxel + half).astype(int) + 1, shape)
    if np.any(hi <= lo):
        raise CTFMError(f"intraparenchymal lesion: centre {np.round(centre, 1).tolist()} mm is outside the image")
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    distance = np.linalg.norm(_to_world(affine, grid.reshape(-1, 3)) - centre, axis=1).reshape(grid.shape[:3]) / radius
    field = ndi.gaussian_filter(rng.normal(size=grid.shape[:3]), _BLOB_CORRELATION * radius / spacing, mode="wrap")
    field = (field - field.mean()) / max(float(field.std()), 1e-6)
    blob = distance + _BLOB_AMPLITUDE * field <= 1.0
    blob |= distance <= 0.5 / max(radius / spacing.min(), 1.0)  # never empty: the centre voxel
    components, _ = ndi.label(blob)
    centre_label = components[tuple(np.clip(np.round(centre_voxel).astype(int) - lo, 0, np.array(blob.shape) - 1))]
    if centre_label:
        blob = components == centre_label
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = blob
    return mask


def _subdural(spec, rng, masks, affine, spacing) -> np.ndarray:
    skull, cavity = masks["skull"], masks["cavity"]
    inner = cavity & ndi.binary_dilation(skull, np.ones((3, 3, 3)))  # the cavity's layer on the inner table
    if not inner.any():
        raise CTFMError("subdural lesion: the cavity touches no skull")
    inner_world = _to_world(affine, np.argwhere(inner))
    centre_of_cavity = _to_world(affine, np.argwhere(cavity).mean(0)[None])[0]
    if spec.centre_mm is not None:
        target = np.asarray(spec.centre_mm, float)
        apex = inner_world[np.argmin(np.linalg.norm(inner_world - target, axis=1))]
    else:  # the lateral convexity, above the cavity's centre
        side = rng.choice([-1.0, 1.0])
        direction = np.array([side * rng.uniform(0.6, 1.0), rng.uniform(-0.6, 0.6), rng.uniform(0.0, 0.8)])
        offsets = inner_world - centre_of_cavity
        cosine = offsets @ direction / (np.linalg.norm(offsets, axis=1) * np.linalg.norm(direction) + 1e-9)
        apex = inner_world[np.argmax(cosine)]
    cap_radius = rng.uniform(*SDH_EXTENT_MM) / 2.0
    # everything happens within the cap's reach of the apex (a box: skull farther away cannot be nearest)
    apex_voxel = _to_voxel(affine, apex[None])[0]
    half = np.ceil((cap_radius + spec.size_mm) / spacing) + 2
    lo = np.maximum(np.floor(apex_voxel - half).astype(int), 0)
    hi = np.minimum(np.ceil(apex_voxel + half).astype(int) + 1, cavity.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    to_skull = ndi.distance_transform_edt(~skull[box], sampling=spacing) - spacing.min() / 2.0  # from its surface
    idx = np.argwhere(cavity[box])
    world = _to_world(affine, idx + lo)
    rho = np.linalg.norm(world - apex, axis=1) / cap_radius
    near = rho < 1.0
    if abs(apex[0] - centre_of_cavity[0]) > 10.0:  # the falx: one side of the midline only
        near &= np.sign(world[:, 0] - centre_of_cavity[0]) == np.sign(apex[0] - centre_of_cavity[0])
    idx, rho = idx[near], rho[near]
    thickness = spec.size_mm * np.sqrt(np.clip(1.0 - rho**2, 0.0, 1.0))  # a crescent: thickest at the apex
    idx = idx[to_skull[tuple(idx.T)] <= thickness]
    mask = np.zeros(cavity.shape, bool)
    mask[tuple((idx + lo).T)] = True
    return mask


def _intraventricular(spec, masks, affine) -> np.ndarray:
    ventricles = masks["ventricles"]
    if not ventricles.any():
        raise CTFMError("intraventricular lesion: no ventricles found in this head")
    idx = np.argwhere(ventricles)
    world = _to_world(affine, idx)
    midline = world[:, 0].mean()
    height = world @ -_GRAVITY  # larger is higher up, away from the dependent side
    mask = np.zeros(ventricles.shape, bool)
    sides = (-1.0, 1.0)
    if spec.centre_mm is not None:
        sides = (1.0 if spec.centre_mm[0] >= midline else -1.0,)
    for side in sides:
        half = (world[:, 0] >= midline) if side > 0 else (world[:, 0] < midline)
        if half.sum() == 0:
            continue
        bottom = np.percentile(height[half], 1.0)
        chosen = idx[half & (height <= bottom + spec.size_mm)]
        mask[tuple(chosen.T)] = True
    return mask


def lesion_case(
    image_hu: np.ndarray,
    affine: np.ndarray,
    kinds: Sequence[str],
    seed: int,
    masks: Mapping[str, np.ndarray] | None = None,
    ranges: Mapping | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """``(image, label map, findings)`` with one random lesion per entry of ``kinds`` (none for an empty sequence).

    The label map (uint8) is 0 where there is no lesion and 1 + the kind's index in :data:`LESION_KINDS` where
    there is (1 IPH, 2 SDH, 3 IVH; a later lesion overwrites an earlier one where they overlap). ``findings`` is
    ``{"haemorrhage": 0/1, "intraparenchymal": 0/1, "subdural": 0/1, "intraventricular": 0/1}`` as floats, from the
    label map. ``seed`` fixes everything; ``masks`` as in :func:`insert_lesion` (computed once if not given).
    """
    unknown = [kind for kind in kinds if kind not in LESION_KINDS]
    if unknown:
        raise CTFMError(f"lesion kinds {unknown} are not among {', '.join(LESION_KINDS)}")
    rng = np.random.default_rng(seed)
    image = np.array(image_hu, dtype=np.float32, copy=True)
    label_map = np.zeros(image.shape, np.uint8)
    if kinds and masks is None:
        masks = head_masks(image, affine)
    for kind in kinds:
        spec = random_lesion(kind, rng, ranges)
        image, mask = insert_lesion(image, affine, spec, rng, masks)
        label_map[mask] = 1 + LESION_KINDS.index(kind)
    present = set(np.unique(label_map).tolist())
    findings = {kind: float(1 + i in present) for i, kind in enumerate(LESION_KINDS)}
    return image, label_map, {"haemorrhage": float(max(findings.values())), **findings}


# --- geometry helpers --------------------------------------------------------------------------------------------


def _spacing(affine) -> np.ndarray:
    affine = np.asarray(affine, float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise CTFMError(f"a 4x4 finite affine is needed, got {affine.shape}")
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    if np.any(spacing <= 0):
        raise CTFMError("the affine has a zero voxel size")
    return spacing


def _to_world(affine, idx) -> np.ndarray:
    return np.asarray(idx, float) @ affine[:3, :3].T + affine[:3, 3]


def _to_voxel(affine, world) -> np.ndarray:
    return (np.asarray(world, float) - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, n = ndi.label(mask, np.ones((3, 3, 3)))
    if n == 0:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == sizes.argmax()


def _drop_small(mask: np.ndarray, min_mm3: float, spacing: np.ndarray) -> np.ndarray:
    components, n = ndi.label(mask, np.ones((3, 3, 3)))
    if n == 0:
        return mask
    sizes = np.bincount(components.ravel()) * np.prod(spacing)
    sizes[0] = 0
    return (sizes >= min_mm3)[components]


def _dilate(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask.copy()
    return ndi.distance_transform_edt(~mask, sampling=spacing) <= radius_mm


def _depth(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) of each voxel of ``mask`` to the nearest voxel outside it (outside the image included)."""
    padded = np.pad(mask, 1)
    return ndi.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]


def _coarse_depth(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """:func:`_depth` on the coarse grid (a coarse voxel is inside if all its fine voxels are): a lower bound,
    within one coarse voxel (about 2 mm), at a fraction of the cost."""
    grid = _Coarse(mask.shape, spacing)
    if np.all(grid.factor == 1):
        return _depth(mask, spacing)
    return grid.expand(_depth(grid.reduce(mask, "all"), grid.spacing).astype(np.float32)) * mask


class _Coarse:
    """A grid of blocks of about :data:`_COARSE_MM` over the image's voxels: block reductions, nearest expansion."""

    def __init__(self, shape: tuple[int, ...], spacing: np.ndarray):
        self.shape = tuple(shape)
        self.factor = np.maximum(1, np.round(_COARSE_MM / np.asarray(spacing))).astype(int)
        self.coarse_shape = tuple(-(-np.asarray(shape) // self.factor))
        self.spacing = np.asarray(spacing) * self.factor

    def reduce(self, mask: np.ndarray, how: str) -> np.ndarray:
        """A coarse voxel is True if ``any`` / ``all`` of its fine voxels inside the image are."""
        padded = np.full(np.asarray(self.coarse_shape) * self.factor, how == "all")
        padded[tuple(slice(0, n) for n in self.shape)] = mask
        blocks = padded.reshape([v for n, k in zip(self.coarse_shape, self.factor) for v in (n, k)])
        return blocks.any((1, 3, 5)) if how == "any" else blocks.all((1, 3, 5))

    def expand(self, coarse: np.ndarray) -> np.ndarray:
        for axis, k in enumerate(self.factor):
            coarse = coarse.repeat(k, axis)
        return coarse[tuple(slice(0, n) for n in self.shape)]


def _bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
