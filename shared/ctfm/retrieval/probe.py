"""Semantic probing (``probe.json``): clustering, semantic search, test-retest and occlusion saliency, each for the
shipped encoder and a random-init encoder of the same width, on CTs with reference label maps.

Writes under ``<output_dir>/probe/``: ``metrics.json`` (everything below, per encoder), ``clustering.csv`` +
``clustering_tsne.png``, ``semantic_search.csv``, ``test_retest.csv``, ``saliency_<encoder>.png`` and
``summary.md`` (one table, shipped vs random). Test-retest cosines come with the mean cosine between different
scans' embeddings, the level that stability must be read against.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ctfm.datalist import output_stem
from ctfm.embedding import PatchEmbeddingInferer, sliding_patch_embeddings
from ctfm.embedding_store import encoders_to_compare
from ctfm.errors import CTFMError
from ctfm.files import atomic_path
from ctfm.networks.backbone import size_divisor
from ctfm.preview import render_saliency
from ctfm.retrieval.clustering import cluster_scores, organ_crops, write_cluster_map
from ctfm.retrieval.extract import embed_crop, embed_volume
from ctfm.retrieval.occlusion import occlusion_saliency
from ctfm.retrieval.query import crop_at
from ctfm.retrieval.semantic_search import search_structure
from ctfm.retrieval.test_retest import PERTURBATIONS, retest_cosines

__all__ = ["run_probe"]

logger = logging.getLogger("ctfm.retrieval")


def run_probe(
    data: Sequence[Mapping],
    transform: Callable,
    build_encoder: Callable[[str | None], torch.nn.Module],
    encoder_weights: str | None,
    label_names: Mapping[int, str],
    output_dir: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    organs: Sequence[str] | None = None,
    crop_size: Sequence[int] = (32, 64, 64),
    crops_per_organ: int = 6,
    min_organ_voxels: int = 200,
    search_structures: Sequence[str] = ("heart",),
    search_overlap: float = 0.25,
    scan_patch_size: Sequence[int] = (32, 128, 128),
    scan_overlap: float = 0.0,
    pooling: str = "min",
    occlusion_mask: Sequence[int] = (8, 16, 16),
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict:
    """Run the four protocols (module docstring) for both encoders; returns ``metrics.json``'s content.

    Args:
        data: items with ``image`` (a CT) and ``label`` (its reference label map); ``transform`` preprocesses both
            onto one grid (``image`` ``(C, S, P, L)``, ``label`` ``(1, S, P, L)``).
        build_encoder: ``weights or None -> encoder`` (``None``: random init); ``label_names``: label id -> name.
        organs: the structures to crop for clustering (None: every labelled one).
        search_structures: semantic-search structures, CT-FM's ``heart`` by default; one absent from a scan's
            labels is skipped for that scan (and reported).
        scan_patch_size, scan_overlap, pooling: the scan embedding of test-retest (as ``extract.json``'s).
    """
    if len(data) < 1:
        raise CTFMError("probe.json needs at least one CT with a reference label map")
    scans = []
    for item in data:
        d = transform(dict(item))
        spacing = [float(v) for v in np.linalg.norm(np.asarray(d["image"].affine, float)[:3, :3], axis=0)]
        scans.append({"id": output_stem(item["image"], data_root), "image": d["image"], "label": d["label"], "spacing": spacing})
    ids = {name: int(i) for i, name in label_names.items()}
    out = Path(output_dir) / "probe"
    results: dict = {"scans": [s["id"] for s in scans], "encoders": {}}
    cluster_maps, cluster_rows, search_rows, retest_rows = {}, [], [], []
    encoders = encoders_to_compare(build_encoder, encoder_weights, seed)
    divisor = size_divisor(next(iter(encoders.values()))[0])  # one backbone: crops fit both encoders
    crops = [(crop, organ, s["id"]) for s in scans for crop, organ in
             organ_crops(s["image"], s["label"], label_names, organs, crop_size, crops_per_organ, min_organ_voxels, seed, divisor)]
    organ_of, scan_of = [c[1] for c in crops], [c[2] for c in crops]
    if len(set(organ_of)) < 2:
        raise CTFMError(f"clustering needs crops of at least two organs; found {sorted(set(organ_of))} (check organs and the label maps)")
    scan_inferer = PatchEmbeddingInferer(scan_patch_size, scan_overlap)
    for name, (encoder, weights) in encoders.items():
        embed = encoder.to(device).eval()

        # anatomical clustering
        x = np.stack([embed_crop(embed, crop.to(device)).numpy() for crop, _, _ in crops])
        scores = cluster_scores(x, organ_of, scan_of, seed)
        cluster_maps[name] = x
        cluster_rows.append({"encoder": name, "weights": weights, **scores})

        # semantic search: every ordered pair of distinct scans, every structure both have
        patches = {}
        hits = []
        for q in scans:
            for t in scans:
                if q is t:
                    continue
                for structure in search_structures:
                    sid = ids.get(structure)
                    if sid is None or not (q["label"] == sid).any() or not (t["label"] == sid).any():
                        continue
                    if t["id"] not in patches:
                        patches[t["id"]] = sliding_patch_embeddings(embed, t["image"].to(device), crop_size, search_overlap,
                                                                    divisor=divisor)
                    r = search_structure(embed, q["image"].to(device), q["label"], t["image"].to(device), t["label"], sid, crop_size,
                                         t["spacing"], search_overlap, patches[t["id"]], divisor)
                    hits.append(r["hit"])
                    search_rows.append({"encoder": name, "query": q["id"], "target": t["id"], "structure": structure, **r})
        absent = [s for s in search_structures if not any(r["structure"] == s for r in search_rows if r["encoder"] == name)]

        # test-retest on each scan's scan embedding
        def embed_scan(volume: torch.Tensor) -> torch.Tensor:
            return embed_volume(embed, scan_inferer, volume.unsqueeze(0).to(device), pooling)

        cosines, bases = {}, []
        for s in scans:
            c, base = retest_cosines(embed_scan, s["image"], s["spacing"], PERTURBATIONS, seed)
            retest_rows.append({"encoder": name, "scan": s["id"], **c})
            bases.append(base)
            for k, v in c.items():
                cosines.setdefault(k, []).append(v)
        between = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for i, a in enumerate(bases) for b in bases[i + 1 :]]
        cosines["different scans"] = between or [float("nan")]

        # occlusion saliency of the first scan's crop at the centre of its labelled body
        s = scans[0]
        centre = np.argwhere(np.asarray(s["label"][0]) > 0).mean(0)
        patch = crop_at(s["image"], centre, crop_size, divisor).to(device)
        saliency = occlusion_saliency(embed, patch, occlusion_mask).cpu().numpy()
        peak = float(saliency.max())
        shown = saliency / peak if peak > 0 else saliency
        affine = np.asarray(s["image"].affine, float)
        render_saliency(patch[0, 0].cpu().numpy(), shown, affine, out / f"saliency_{name}.png",
                        title=f"{name} encoder, {s['id']}: 1 - cosine when occluded (max {peak:.3g}, shown as 1)")

        results["encoders"][name] = {
            "weights": weights,
            "clustering": scores,
            "semantic_search": {"pairs": len(hits), "hit_rate": float(np.mean(hits)) if hits else None,
                                "structures_absent": absent},
            "test_retest_cosine": {k: float(np.mean(v)) for k, v in cosines.items()},
            "occlusion_max": peak,
        }
        logger.info("%s: clustering NMI %.3f, silhouette %.3f, kNN %.3f; semantic search %s; test-retest %s", name,
                    scores["nmi"], scores["silhouette"], scores["knn_accuracy"],
                    f"{np.mean(hits):.2f} over {len(hits)} searches" if hits else "no pair shares a structure",
                    ", ".join(f"{k} {np.mean(v):.4f}" for k, v in cosines.items()))
    write_cluster_map(cluster_maps, organ_of, scan_of, out / "clustering_tsne.png", {r["encoder"]: r for r in cluster_rows}, seed)
    for file, rows in (("clustering.csv", cluster_rows), ("semantic_search.csv", search_rows), ("test_retest.csv", retest_rows)):
        with atomic_path(out / file) as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(_summary(results))
    return results


def _summary(results: Mapping) -> str:
    names = list(results["encoders"])
    lines = ["| probe | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label, get):
        lines.append(f"| {label} | " + " | ".join(get(results["encoders"][n]) for n in names) + " |")

    row("clustering NMI (k-means vs organ)", lambda e: f"{e['clustering']['nmi']:.3f}")
    row("clustering silhouette (cosine)", lambda e: f"{e['clustering']['silhouette']:.3f}")
    row("kNN organ accuracy (leave one scan out)", lambda e: f"{e['clustering']['knn_accuracy']:.3f}")
    row("semantic search hit rate", lambda e: "n/a" if e["semantic_search"]["hit_rate"] is None
        else f"{e['semantic_search']['hit_rate']:.3f} ({e['semantic_search']['pairs']} searches)")
    for k in (*PERTURBATIONS, "different scans"):
        row(f"test-retest cosine, {k}", lambda e, k=k: f"{e['test_retest_cosine'][k]:.4f}")
    row("occlusion: max 1 - cosine", lambda e: f"{e['occlusion_max']:.4f}")
    return "\n".join(lines) + "\n"
