"""Search an index by a CT, by a stored id or by a region; write the hits as CSV and as a PNG contact sheet.

A scan never finds itself: the stored id, or the stored scan made from the query's file, is left out of the hits.

- a CT file (NIfTI / NRRD / DICOM folder): preprocessed and embedded exactly as :class:`~ctfm.retrieval.extract.Extractor`
  stores scans, searched in a scan index;
- a stored id: its stored scan embedding, searched in a scan index (the scan itself left out of its hits);
- a region of a CT: a box ``[x0, y0, z0, x1, y1, z1]`` in world RAS mm, or a label mask (a label map on the CT,
  with the label value); one patch of the index's patch size centred on the region is embedded and searched in
  a patch index, so each hit is a place (scan, patch centre in mm).

Outputs, each written atomically: ``<output_dir>/<query name>_hits.csv`` (rank, score, id, source[, patch,
x_mm, y_mm, z_mm]) and ``<query name>_hits.png`` (the query's and each hit's axial, coronal and sagittal planes,
through the region / patch centre when there is one).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.data import MetaTensor

from ctfm.ct_io import read_ct
from ctfm.datalist import output_stem
from ctfm.embedding import PatchEmbeddingInferer, encoder_patch_size
from ctfm.embedding_store import EmbeddingStore
from ctfm.errors import CTFMError
from ctfm.files import atomic_path
from ctfm.networks.backbone import size_divisor
from ctfm.networks.encoder import SIZE_DIVISOR
from ctfm.preview import render_contact_sheet
from ctfm.retrieval.extract import embed_crop, embed_volume
from ctfm.retrieval.index import RetrievalIndex

__all__ = ["crop_at", "region_centre_mm", "run_query", "world_to_voxel"]

logger = logging.getLogger("ctfm.retrieval")


def world_to_voxel(point_mm: Sequence[float], affine) -> np.ndarray:
    """``(3,)`` voxel coordinates (float) of world RAS ``point_mm`` on the grid of ``affine`` (4x4)."""
    return np.linalg.solve(np.asarray(affine, float), np.r_[np.asarray(point_mm, float), 1.0])[:3]


def region_centre_mm(ct_path: str | os.PathLike, box_mm: Sequence[float] | None = None, mask: str | os.PathLike | None = None,
                     label: int | None = None) -> np.ndarray:
    """World RAS mm of a region's centre: a box's centre, or the centroid of ``mask == label`` (``mask > 0`` when
    ``label`` is None). The mask is read with its own affine, so it need not share the CT's voxel order."""
    if (box_mm is None) == (mask is None):
        raise CTFMError(f"{ct_path}: a region query needs exactly one of query_box_mm and query_mask")
    if box_mm is not None:
        box = np.asarray(box_mm, float).reshape(-1)
        if box.shape != (6,):
            raise CTFMError(f"query_box_mm {list(box_mm)}: give [x0, y0, z0, x1, y1, z1] in RAS mm")
        return (box[:3] + box[3:]) / 2.0
    labels = _read_label_map(mask)
    voxels = np.argwhere((labels[0] == label) if label is not None else (labels[0] > 0))
    if not len(voxels):
        raise CTFMError(f"{mask}: no voxel has label {label}" if label is not None else f"{mask}: the mask is empty")
    affine = np.asarray(labels.affine, float)
    return voxels.mean(0) @ affine[:3, :3].T + affine[:3, 3]


def _read_label_map(path: str | os.PathLike) -> MetaTensor:
    from monai.transforms import LoadImage

    try:
        return LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    except Exception as err:
        raise CTFMError(f"{path}: unreadable label map ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})") from None


def crop_at(volume: torch.Tensor, centre_voxel: Sequence[float], patch_size: Sequence[int],
            divisor: Sequence[int] | int = SIZE_DIVISOR) -> torch.Tensor:
    """``(C, S, P, L)`` -> ``(1, C, *patch)``: the patch (each side rounded up to a multiple of the backbone's
    ``divisor``, :func:`ctfm.networks.size_divisor`) centred on ``centre_voxel``, shifted to lie inside the volume,
    padded with the volume's minimum where it is smaller."""
    patch = encoder_patch_size(patch_size, divisor)
    pad = [max(p - s, 0) for p, s in zip(patch, volume.shape[1:])]
    if any(pad):
        volume = torch.nn.functional.pad(volume, [v for d in reversed(pad) for v in (0, d)], value=float(volume.min()))
    starts = [int(np.clip(round(float(c) - p / 2), 0, s - p)) for c, p, s in zip(centre_voxel, patch, volume.shape[1:])]
    return torch.as_tensor(volume[(slice(None), *[slice(a, a + p) for a, p in zip(starts, patch)])]).unsqueeze(0)


def run_query(
    index_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    network: Callable,
    transform: Callable,
    inferer: PatchEmbeddingInferer,
    pooling: str,
    store: EmbeddingStore,
    query_image: str | None = None,
    query_id: str | None = None,
    query_box_mm: Sequence[float] | None = None,
    query_mask: str | None = None,
    query_label: int | None = None,
    k: int = 5,
    device: torch.device | str = "cpu",
    contact_sheet: bool = True,
) -> pd.DataFrame:
    """Answer one query (see the module docstring) from the index in ``index_dir``; returns the hits table.

    ``query_image`` alone: a CT query; with ``query_box_mm`` or ``query_mask``: a region query; ``query_id``: a
    stored scan (``store`` holds its embedding). The index must be of the store's encoder and recipe.
    """
    index = RetrievalIndex(index_dir)
    if index.info.fingerprint != store.fingerprint:
        raise CTFMError(f"{index_dir}: indexes store {index.info.fingerprint}, not this encoder and recipe's {store.fingerprint}; "
                        "index the store this config extracts")
    region = query_box_mm is not None or query_mask is not None
    if sum(v is not None for v in (query_image, query_id)) != 1:
        raise CTFMError("a query needs exactly one of query_image (a CT, optionally with a region) and query_id")
    if region and query_image is None:
        raise CTFMError("a region query needs query_image: the CT the box or mask is in")
    wanted = "patch" if region else "scan"
    if index.info.level != wanted:
        raise CTFMError(f"{index_dir}: a {index.info.level} index; a {'region' if region else 'CT or id'} query needs a {wanted} index "
                        f"(index.json with --level {wanted})")
    centre_mm, exclude = None, ()
    if query_id is not None:
        vector, name, source = store.get(query_id), output_stem(query_id), store.row(query_id)["source"]
        exclude = (query_id,)
    else:
        name, source = output_stem(query_image), str(query_image)
        stored = index.rows.drop_duplicates("id")
        exclude = tuple(stored.loc[stored["source"].map(os.path.realpath) == os.path.realpath(source), "id"])
        image = transform({"image": str(query_image)})["image"]
        batch = image.unsqueeze(0).to(device)
        if region:
            centre_mm = region_centre_mm(query_image, query_box_mm, query_mask, query_label)
            crop = crop_at(image, world_to_voxel(centre_mm, image.affine), inferer.patch_size, size_divisor(network))
            vector = embed_crop(network, crop.to(device)).numpy()
            name += "_region"
        else:
            vector = embed_volume(network, inferer, batch, pooling).numpy()
    hits = index.search(vector[None], k, exclude)[0]
    out = Path(output_dir)
    with atomic_path(out / f"{name}_hits.csv") as tmp:
        hits.to_csv(tmp, index=False)
    if contact_sheet:
        _write_contact_sheet(out / f"{name}_hits.png", source, centre_mm, hits, index.info.metric)
    logger.info("%s: %d hits -> %s", source, len(hits), out / f"{name}_hits.csv")
    return hits


def _write_contact_sheet(path: Path, source: str, centre_mm, hits: pd.DataFrame, metric: str) -> None:
    query = read_ct(source)
    rows = [(f"query: {Path(source).name}", query[0].numpy(), query.affine.numpy(), centre_mm)]
    for hit in hits.itertuples():
        ct = read_ct(hit.source)
        centre = (hit.x_mm, hit.y_mm, hit.z_mm) if hasattr(hit, "x_mm") else None
        rows.append((f"#{hit.rank} {hit.id}\n{metric} {hit.score:.3f}", ct[0].numpy(), ct.affine.numpy(), centre))
    render_contact_sheet(rows, path, title=f"{Path(source).name}: top {len(hits)} ({metric})")
