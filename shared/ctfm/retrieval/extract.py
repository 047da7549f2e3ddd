"""A datalist of CTs to an embedding store: one row per scan, resumable, sharded across torchrun ranks.

Each row (:class:`~ctfm.embedding_store.EmbeddingStore`) holds the scan embedding ``(D,)``, and with
``keep_patches`` the patch embeddings ``(P, D)`` with each patch's centre in world mm (RAS, the CT's own frame),
plus the preprocessed grid's shape and spacing and the source's shape. The scan embedding pools the patch
embeddings of a sliding window (:func:`ctfm.embedding.sliding_patch_embeddings`): ``"min"`` (element-wise minimum,
CT-FM's 3D-MIR recipe: 24x128x128 patches, overlap 0.625, at (3, 1, 1) mm SPL) or ``"mean"``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai.data import MetaTensor

from ctfm.datalist import output_stem
from ctfm.embedding import PATCH_SIZE, PATCH_STARTS, PatchEmbeddingInferer, pooled
from ctfm.embedding_store import EmbeddingStore, ExtractionReport, extract_embeddings
from ctfm.errors import CTFMError
from ctfm.files import atomic_path

__all__ = ["POOLINGS", "Extractor", "embed_crop", "embed_volume", "patch_centres_mm", "pool", "scan_ids"]

logger = logging.getLogger("ctfm.retrieval")

POOLINGS = ("min", "mean")


def pool(patch_embeddings: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(P, D) -> (D,)``: element-wise ``"min"`` (CT-FM's 3D-MIR recipe) or ``"mean"`` over patches."""
    if pooling == "min":
        return patch_embeddings.min(dim=0).values
    if pooling == "mean":
        return patch_embeddings.mean(dim=0)
    raise CTFMError(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")


def patch_centres_mm(starts: torch.Tensor, patch_size: Sequence[int], affine: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(P, 3)`` world (RAS) mm of each patch's centre: ``starts`` ``(P, 3)`` voxel corners on the grid of ``affine``."""
    centres = starts.double().numpy() + (np.asarray(patch_size, float) - 1.0) / 2.0
    affine = np.asarray(affine, float)
    return (centres @ affine[:3, :3].T + affine[:3, 3]).astype(np.float32)


def scan_ids(items: Sequence[Mapping], root: str | os.PathLike | None, image_key: str = "image") -> list[dict]:
    """``items`` with an ``id``: the input's path relative to ``root`` without its extension
    (:func:`ctfm.datalist.output_stem`), e.g. ``imagesTs/case_001``; two inputs with one id stop the run."""
    out, seen = [], {}
    for item in items:
        source = str(item[image_key])
        case_id = str(item.get("id") or output_stem(source, root))
        if case_id in seen and Path(seen[case_id]).resolve() != Path(source).resolve():
            raise CTFMError(f"{source}: its id {case_id!r} is also the id of {seen[case_id]}; give the inputs distinct names")
        seen[case_id] = source
        out.append({**item, "id": case_id})
    return out


class Extractor:
    """``extract.json``'s evaluator: embed every scan of ``data`` not yet in the store, then merge.

    Args:
        data: datalist items (``image``: a CT file or DICOM folder), e.g. ``@dataset.data``.
        transform: the preprocessing of one item (``image`` -> ``(C, S, P, L)`` MetaTensor on the network's grid).
        network: an encoder runtime whose output :func:`ctfm.embedding.pooled` turns into ``(B, D)``.
        inferer: the :class:`~ctfm.embedding.PatchEmbeddingInferer` (patch size, overlap, batch size).
        store: the :class:`~ctfm.embedding_store.EmbeddingStore` (:meth:`~ctfm.embedding_store.EmbeddingStore.of`).
        data_root: the folder ids are taken relative to (the bundle's ``dataset_dir``).
        pooling: ``"min"`` or ``"mean"`` (:func:`pool`).
        keep_patches: also store each patch's embedding and centre (needed for region queries).

    Under torchrun (``WORLD_SIZE`` > 1) each rank embeds a disjoint slice, then rank 0 merges the store
    (:meth:`~ctfm.embedding_store.EmbeddingStore.merge`) and writes ``failed.csv``; a scan that fails is reported in
    one line and the others go on, and the run then ends with an error naming how many failed (a rerun embeds
    only what is missing).
    """

    def __init__(
        self,
        data: Sequence[Mapping],
        transform: Callable,
        network: torch.nn.Module | Callable,
        inferer: PatchEmbeddingInferer,
        store: EmbeddingStore,
        data_root: str | os.PathLike | None = None,
        pooling: str = "min",
        keep_patches: bool = True,
        device: torch.device | str = "cpu",
    ):
        if pooling not in POOLINGS:
            raise CTFMError(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
        self.items = scan_ids(list(data), data_root)
        self.transform, self.network, self.inferer, self.store = transform, network, inferer, store
        self.pooling, self.keep_patches, self.device = pooling, bool(keep_patches), device

    @torch.no_grad()
    def row(self, image: MetaTensor) -> dict:
        """One scan ``(1, C, S, P, L)`` -> the store row: ``embedding`` ``(D,)``, [``patch_embeddings`` ``(P, D)``,
        ``patch_centres_mm`` ``(P, 3)``], ``info`` (grid shape and spacing, source shape)."""
        patches = self.inferer(image, self.network)
        meta = patches.meta
        affine = np.asarray(image.affine if isinstance(image, MetaTensor) else np.eye(4), float)
        embeddings = torch.as_tensor(patches).float()
        row = {
            "embedding": pool(embeddings, self.pooling),
            "info": {
                "shape": [int(s) for s in image.shape[2:]],
                "spacing_mm": [round(float(v), 4) for v in np.linalg.norm(affine[:3, :3], axis=0)],
                "source_shape": [int(s) for s in np.asarray(meta.get("spatial_shape", image.shape[2:])).reshape(-1)],
                "patches": int(len(embeddings)),
            },
        }
        if self.keep_patches:
            row["patch_embeddings"] = embeddings
            row["patch_centres_mm"] = torch.from_numpy(patch_centres_mm(meta[PATCH_STARTS], meta[PATCH_SIZE].tolist(), affine))
        return row

    def run(self) -> ExtractionReport:
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if distributed:
            from ctfm.engine import init_distributed

            # ranks meet at the end, each after its own slice: wait as long as the slowest takes (48 h)
            self.device = init_distributed(os.environ.get("CTFM_DDP_TIMEOUT_S") or 48 * 3600)
            if isinstance(self.network, torch.nn.Module):
                self.network = self.network.to(self.device)
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        report = extract_embeddings(self.store, self.items, self.transform, self.row, device=self.device, shard=(rank, world))
        failures = self.store.folder / f"failed-rank{rank}.json"
        with atomic_path(failures) as tmp:
            tmp.write_text(json.dumps(report.failed, indent=1))
        if distributed:
            dist.barrier()
        failed = {}
        if rank == 0:
            for r in range(world):
                path = self.store.folder / f"failed-rank{r}.json"
                failed.update(json.loads(path.read_text()))
                path.unlink()
            self._write_failures(failed)
            if self.store.ids():
                matrix, table = self.store.merge()
                logger.info("%s: %d scans (%s), merged into %s and %s", self.store.folder, len(self.store.ids()), report.summary(), matrix.name, table.name)
        if distributed:
            dist.barrier()  # every rank leaves together, after the merge
        if rank == 0 and failed:
            first = next(iter(failed.values()))
            raise CTFMError(f"{len(failed)} of {len(self.items)} scans could not be embedded (listed in "
                            f"{self.store.folder / 'failed.csv'}; first: {first})")
        return report

    def embeddings(self) -> dict[str, np.ndarray]:
        """Run (embedding only what is missing), then ``{id: (D,) scan embedding}`` of this extractor's items."""
        self.run()
        return {item["id"]: self.store.get(item["id"]) for item in self.items}

    def _write_failures(self, failed: Mapping[str, str]) -> None:
        import pandas as pd

        path = self.store.folder / "failed.csv"
        if not failed:
            path.unlink(missing_ok=True)
            return
        sources = {item["id"]: item["image"] for item in self.items}
        with atomic_path(path) as tmp:
            pd.DataFrame([{"id": k, "source": sources.get(k, ""), "error": v} for k, v in failed.items()]).to_csv(tmp, index=False)


def embed_volume(network: Callable, inferer: PatchEmbeddingInferer, image: MetaTensor, pooling: str) -> torch.Tensor:
    """``(1, C, S, P, L)`` -> ``(D,)`` scan embedding, exactly as :class:`Extractor` stores it."""
    return pool(torch.as_tensor(inferer(image, network)).float(), pooling)


def embed_crop(network: Callable, crop: torch.Tensor) -> torch.Tensor:
    """``(1, C, *patch)`` -> ``(D,)``: one patch's embedding (region queries, probing)."""
    with torch.no_grad():
        return pooled(network(crop)).float()[0].cpu()
