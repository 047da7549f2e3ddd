"""A PNG to check a segmentation at a glance: axial, coronal and sagittal planes with the labels overlaid, or
a reference and a prediction in two rows over the same planes.

The planes pass through the centre of mass of all labelled voxels (of the reference when comparing; the volume
centre when nothing is labelled). The CT is shown in a soft-tissue window (level 40 HU, width 400 HU) in
radiological convention (patient's right on the viewer's left, anterior up in the axial plane, superior up
elsewhere), at true aspect ratio from the voxel spacing. Every label id always gets the same colour; a legend
names the largest structures in view.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ctfm.files import atomic_path

__all__ = [
    "LEGEND_ENTRIES",
    "OVERLAY_ALPHA",
    "SOFT_TISSUE_WINDOW",
    "label_colours",
    "render_comparison",
    "render_contact_sheet",
    "render_preview",
    "render_saliency",
    "to_lps",
    "write_embedding_map",
]

SOFT_TISSUE_WINDOW = (-160.0, 240.0)
OVERLAY_ALPHA = 0.45
LEGEND_ENTRIES = 14


def label_colours(num_labels: int = 256) -> np.ndarray:
    """``(num_labels, 3)`` RGB in [0, 1], fixed per label id: hues spaced by the golden ratio; id 0 is black."""
    colours = np.zeros((num_labels, 3))
    for label in range(1, num_labels):
        hue = (label * 0.618033988749895) % 1.0
        lightness = 0.5 + 0.12 * ((label % 3) - 1)
        colours[label] = colorsys.hls_to_rgb(hue, lightness, 0.85)
    return colours


def to_lps(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder and flip ``(X, Y, Z)`` voxel axes so that they run towards patient Left, Posterior, Superior.

    Returns ``(volume view, spacing in mm per new axis)``; ``affine`` maps voxels to RAS mm (MONAI/NIfTI).
    """
    import nibabel as nib

    affine = np.asarray(affine, float)
    ornt = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(("L", "P", "S"))
    transform = nib.orientations.ornt_transform(ornt, target)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    new_spacing = np.empty(3)
    for axis, (new_axis, _) in enumerate(transform):
        new_spacing[int(new_axis)] = spacing[axis]
    return nib.orientations.apply_orientation(volume, transform), new_spacing


def lps_index(point_mm: Sequence[float], affine: np.ndarray, shape: Sequence[int]) -> tuple[int, int, int]:
    """The voxel of the :func:`to_lps` view of a ``shape`` volume nearest to world (RAS) ``point_mm``, clamped
    into the volume."""
    import nibabel as nib

    affine = np.asarray(affine, float)
    ijk = np.linalg.solve(affine, np.r_[np.asarray(point_mm, float), 1.0])[:3]
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(("L", "P", "S")))
    out = [0, 0, 0]
    for axis, (new_axis, flip) in enumerate(transform):
        i = int(np.clip(round(float(ijk[axis])), 0, shape[axis] - 1))
        out[int(new_axis)] = i if flip > 0 else shape[axis] - 1 - i
    return tuple(out)


def render_contact_sheet(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, Sequence[float] | None]],
    path: str | os.PathLike,
    title: str | None = None,
    window: Sequence[float] = SOFT_TISSUE_WINDOW,
) -> Path:
    """Write a PNG with one row per CT, atomically: a retrieval query and its hits.

    Args:
        rows: ``(caption, ct (X, Y, Z) HU, affine voxel -> RAS mm, centre in RAS mm or None)``; each row shows the
            axial, coronal and sagittal planes through ``centre`` (a marked cross) or through the volume centre.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(10.5, 3.3 * len(rows)), dpi=80, facecolor="black", squeeze=False)
    for row_axes, (caption, ct, affine, centre_mm) in zip(axes, rows):
        volume, spacing = to_lps(np.asarray(ct, np.float32), affine)
        centre = lps_index(centre_mm, affine, np.shape(ct)) if centre_mm is not None else tuple(n // 2 for n in volume.shape)
        marks = [(centre[0], centre[1]), (centre[0], volume.shape[2] - 1 - centre[2]), (centre[1], volume.shape[2] - 1 - centre[2])]
        for ax, (cut, row_mm, col_mm, name), (mc, mr) in zip(row_axes, _views(centre, spacing), marks):
            plane = cut(volume)
            extent = (0, plane.shape[1] * col_mm, plane.shape[0] * row_mm, 0)
            ax.imshow(plane, cmap="gray", vmin=window[0], vmax=window[1], extent=extent, interpolation="bilinear")
            if centre_mm is not None:
                ax.plot([(mc + 0.5) * col_mm], [(mr + 0.5) * row_mm], marker="+", color="lime", markersize=14, mew=1.5)
            ax.set_title(name, color="white", fontsize=8)
            ax.set_axis_off()
        row_axes[0].text(-0.04, 0.5, caption, transform=row_axes[0].transAxes, color="white", fontsize=8,
                         rotation=90, ha="right", va="center")
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", facecolor=fig.get_facecolor())
    plt.close(fig)
    return Path(path)


def render_preview(
    ct: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    class_names: Mapping[int, str] | None = None,
    title: str | None = None,
    window: Sequence[float] = SOFT_TISSUE_WINDOW,
) -> Path:
    """Write the three-plane PNG of ``labels`` over ``ct``, atomically.

    Args:
        ct: ``(X, Y, Z)`` HU.
        labels: ``(X, Y, Z)`` integer label map on the same grid.
        affine: 4x4 voxel -> RAS mm of that grid.
        path: the PNG to write.
        class_names: label id -> name, for the legend.
        title: heading, e.g. the input file's name.
        window: (low, high) HU mapped to black..white.
    """
    return _render(ct, {"": labels}, affine, path, class_names, title, window)


def render_comparison(
    ct: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    class_names: Mapping[int, str] | None = None,
    title: str | None = None,
    window: Sequence[float] = SOFT_TISSUE_WINDOW,
) -> Path:
    """Write a PNG of ``reference`` (top row) and ``prediction`` (bottom row) over ``ct``, atomically.

    Both rows show the same three planes, through the centre of the reference's labels, and share one legend.
    Arguments as :func:`render_preview`; ``reference`` and ``prediction`` are ``(X, Y, Z)`` label maps on the
    CT's grid.
    """
    return _render(ct, {"reference": reference, "prediction": prediction}, affine, path, class_names, title, window)


def _render(ct, rows: Mapping[str, np.ndarray], affine, path, class_names, title, window) -> Path:
    """Rows of three planes (axial, coronal, sagittal), one row per label map in ``rows`` (name -> map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ct = np.asarray(ct)
    maps = {name: np.asarray(labels) for name, labels in rows.items()}
    if ct.ndim != 3 or any(labels.shape != ct.shape for labels in maps.values()):
        shapes = ", ".join(str(labels.shape) for labels in maps.values())
        raise ValueError(f"preview needs a CT and label maps of one 3-D shape, got {ct.shape} and {shapes}")
    ct, spacing = to_lps(ct, affine)
    maps = {name: to_lps(labels, affine)[0] for name, labels in maps.items()}
    i, j, k = _centre(next(iter(maps.values())))
    colours = label_colours(max(256, max(int(labels.max()) for labels in maps.values()) + 1))
    views = _views((i, j, k), spacing)
    widths = [cut(ct).shape[1] * col_mm for cut, _, col_mm, _ in views]
    heights = [cut(ct).shape[0] * row_mm for cut, row_mm, _, _ in views]
    scale = 4.2 / max(heights)  # inches per mm: tallest plane 4.2 in
    n_rows = len(maps)
    fig = plt.figure(
        figsize=(sum(widths) * scale + 3.2, n_rows * (max(heights) * scale + 0.45) + 0.45), dpi=110, facecolor="black"
    )
    grid = fig.add_gridspec(
        n_rows, 4, width_ratios=[*widths, 3.2 / scale], wspace=0.04, hspace=0.12, left=0.01, right=0.99,
        top=1 - 0.9 / fig.get_figheight(), bottom=0.02,
    )
    low, high = float(window[0]), float(window[1])
    for row, (row_name, labels) in enumerate(maps.items()):
        for column, (cut, row_mm, col_mm, view_name) in enumerate(views):
            ax = fig.add_subplot(grid[row, column])
            image, label = cut(ct), cut(labels)
            extent = (0, image.shape[1] * col_mm, image.shape[0] * row_mm, 0)
            ax.imshow(image, cmap="gray", vmin=low, vmax=high, extent=extent, interpolation="bilinear")
            rgba = np.zeros((*label.shape, 4))
            rgba[..., :3] = colours[label]
            rgba[..., 3] = np.where(label > 0, OVERLAY_ALPHA, 0.0)
            ax.imshow(rgba, extent=extent, interpolation="nearest")
            ax.set_title(f"{row_name}: {view_name}" if row_name else view_name, color="white", fontsize=9)
            ax.set_axis_off()
    legend_ax = fig.add_subplot(grid[:, 3])
    legend_ax.set_axis_off()
    every = np.concatenate([labels[labels > 0] for labels in maps.values()])
    present, counts = np.unique(every, return_counts=True)
    largest = [int(label) for label in present[np.argsort(-counts)][:LEGEND_ENTRIES]]
    names = class_names or {}
    handles = [Patch(color=colours[label], label=f"{label} {names.get(label, '')}".strip()) for label in sorted(largest)]
    if handles:
        more = len(present) - len(largest)
        legend = legend_ax.legend(
            handles=handles, loc="upper left", fontsize=8, frameon=False, labelcolor="white",
            title=f"{len(present)} labels" + (f" ({more} smaller not listed)" if more > 0 else ""),
        )
        legend.get_title().set_color("white")
        legend.get_title().set_fontsize(8)
    else:
        legend_ax.text(0, 1, "no labels", color="white", va="top", fontsize=9)
    centre_of = "the reference's labels" if n_rows > 1 else "the labels"
    fig.suptitle(
        (title + "  |  " if title else "") + f"window {low:.0f}..{high:.0f} HU, planes through the centre of {centre_of}",
        color="white", fontsize=10,
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", facecolor=fig.get_facecolor())
    plt.close(fig)
    return Path(path)


def _views(centre: Sequence[int], spacing: Sequence[float]) -> list:
    """The three planes through ``centre`` of an LPS volume: ``(cut, row mm, column mm, name)``, radiological view."""
    (i, j, k), (sx, sy, sz) = centre, spacing
    return [
        (lambda v: v[:, :, k].T, sy, sx, f"axial (S index {k})"),
        (lambda v: v[:, j, ::-1].T, sz, sx, f"coronal (P index {j})"),
        (lambda v: v[i, :, ::-1].T, sz, sy, f"sagittal (L index {i})"),
    ]


def render_saliency(
    image: np.ndarray,
    saliency: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    title: str | None = None,
    window: Sequence[float] = (0.0, 1.0),
) -> Path:
    """Write a PNG of ``saliency`` as a heat map over ``image``: the three planes through its maximum, atomically.

    Only the body is coloured and searched for the maximum (``image`` above ``window``'s low end): a map's values
    over air and padding say nothing about the anatomy.

    Args:
        image: ``(X, Y, Z)`` CT on the network's grid (e.g. the brain window in [0, 1]).
        saliency: ``(X, Y, Z)`` in [0, 1] on the same grid.
        affine: 4x4 voxel -> RAS mm of that grid.
        window: ``image`` values mapped to black..white.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if np.shape(image) != np.shape(saliency) or np.ndim(image) != 3:
        raise ValueError(f"saliency preview needs one 3-D shape, got {np.shape(image)} and {np.shape(saliency)}")
    image, spacing = to_lps(np.asarray(image, np.float32), affine)
    heat = to_lps(np.asarray(saliency, np.float32), affine)[0]
    inside = image > window[0]  # the body: air and padding are at the window's low end
    heat = heat * inside if inside.any() else heat
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), dpi=100, facecolor="black")
    for ax, (cut, row_mm, col_mm, name) in zip(axes, _views(peak, spacing)):
        extent = (0, cut(image).shape[1] * col_mm, cut(image).shape[0] * row_mm, 0)
        ax.imshow(cut(image), cmap="gray", vmin=window[0], vmax=window[1], extent=extent, interpolation="bilinear")
        rgba = plt.get_cmap("inferno")(cut(heat))
        rgba[..., 3] = 0.7 * cut(heat)  # transparent where the network does not look
        ax.imshow(rgba, extent=extent, interpolation="bilinear")
        ax.set_title(name, color="white", fontsize=9)
        ax.set_axis_off()
    shown = plt.cm.ScalarMappable(cmap="inferno", norm=plt.Normalize(0.0, 1.0))
    bar = fig.colorbar(shown, ax=axes, fraction=0.02, pad=0.01)
    bar.ax.tick_params(colors="white", labelsize=8)
    fig.suptitle((title + "  |  " if title else "") + "saliency (0..1) in the body, planes through its maximum", color="white", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", facecolor=fig.get_facecolor())
    plt.close(fig)
    return Path(path)


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    """Voxel index of the centre of mass of ``labels > 0``, or of the volume when nothing is labelled."""
    foreground = np.nonzero(labels > 0)
    if not foreground[0].size:
        return tuple(int(n // 2) for n in labels.shape)
    return tuple(int(round(float(axis.mean()))) for axis in foreground)


def write_embedding_map(volume: np.ndarray, embeddings: np.ndarray, starts: np.ndarray, patch_size: Sequence[int], path: Path) -> None:
    """PNG of two mid planes of ``volume`` (S, P, L) in [0, 1] with patches tinted by 3 principal components."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centred = embeddings - embeddings.mean(0)
    components = np.linalg.svd(centred, full_matrices=False)[2][:3] if len(embeddings) > 1 else np.eye(3, embeddings.shape[1])
    rgb = centred @ components.T
    rgb = (rgb - rgb.min(0)) / np.maximum(rgb.max(0) - rgb.min(0), 1e-8)
    rgb = np.pad(rgb, ((0, 0), (0, 3 - rgb.shape[1])))
    tint = np.zeros((*volume.shape, 3), dtype=np.float32)
    for (s, p, l), colour in zip(starts, rgb):
        tint[s : s + patch_size[0], p : p + patch_size[1], l : l + patch_size[2]] = colour
    mid_p, mid_l = volume.shape[1] // 2, volume.shape[2] // 2
    planes = {"sagittal (mid L)": (volume[:, :, mid_l], tint[:, :, mid_l]), "coronal (mid P)": (volume[:, mid_p, :], tint[:, mid_p, :])}
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, (title, (ct, colour)) in zip(axes, planes.items()):
        ax.imshow(ct[::-1], cmap="gray", vmin=0.25, vmax=0.45, aspect="auto")  # S up; soft-tissue window in [0, 1]
        ax.imshow(colour[::-1], alpha=0.35, aspect="auto")
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"{len(embeddings)} patch embeddings, coloured by their first 3 principal components")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
