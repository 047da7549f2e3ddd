"""Anatomical clustering: organ-centred crops cut with a reference label map, embedded, scored and mapped.

Scores (:func:`cluster_scores`): NMI between k-means clusters (k = number of organs) and the organ labels,
silhouette of the organ labels in embedding space (cosine), and kNN accuracy (k = 5, cosine) predicting each
scan's crops from the other scans' (leave one scan out; leave one crop out when there is one scan). The 2-D map
(:func:`write_cluster_map`) is a t-SNE of the embeddings coloured by organ.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ctfm.files import atomic_path
from ctfm.networks.encoder import SIZE_DIVISOR
from ctfm.retrieval.query import crop_at

__all__ = ["cluster_scores", "organ_crops", "write_cluster_map"]


def organ_crops(image: torch.Tensor, label: torch.Tensor, names: Mapping[int, str], organs: Sequence[str] | None,
                crop_size: Sequence[int], per_organ: int, min_voxels: int, seed: int,
                divisor: Sequence[int] | int = SIZE_DIVISOR) -> list[tuple[torch.Tensor, str]]:
    """``per_organ`` crops ``(1, C, *crop)`` per organ, each centred on a seeded random voxel of that organ.

    Args:
        image: ``(C, S, P, L)`` preprocessed CT; ``label``: ``(1, S, P, L)`` label map on the same grid.
        names: label id -> organ name; ``organs``: the names to use (None: every labelled one).
        min_voxels: an organ with fewer voxels on this grid is skipped.
        divisor: the backbone's ``size_divisor``: crop sides are rounded up to its multiples (:func:`crop_at`).
    """
    rng = np.random.default_rng(seed)
    ids = {name: i for i, name in names.items()}
    wanted = [o for o in (organs or names.values()) if o in ids]
    lab = np.asarray(label[0])
    crops = []
    for organ in wanted:
        voxels = np.argwhere(lab == ids[organ])
        if len(voxels) < min_voxels:
            continue
        for centre in voxels[rng.choice(len(voxels), size=per_organ, replace=len(voxels) < per_organ)]:
            crops.append((crop_at(image, centre, crop_size, divisor), organ))
    return crops


def cluster_scores(x: np.ndarray, organs: Sequence[str], scans: Sequence[str], seed: int = 0) -> dict[str, float]:
    """NMI (k-means vs organ), silhouette (cosine) and kNN accuracy of ``x`` ``(N, D)``; see the module docstring."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score, silhouette_score
    from sklearn.neighbors import KNeighborsClassifier

    y, groups = np.asarray(organs), np.asarray(scans)
    z = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = len(set(y))
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z)
    correct, total = 0, 0
    for scan in sorted(set(groups)) if len(set(groups)) > 1 else [None]:
        test = groups == scan if scan is not None else np.ones(len(y), bool)
        train = ~test if scan is not None else np.ones(len(y), bool)
        known = np.isin(y[test], y[train])
        if not train.any() or not known.any():
            continue
        knn = KNeighborsClassifier(n_neighbors=min(5, int(train.sum()) - (scan is None)), metric="cosine")
        if scan is None:  # one scan: leave one crop out
            for i in range(len(y)):
                keep = np.arange(len(y)) != i
                correct += int(knn.fit(z[keep], y[keep]).predict(z[i : i + 1])[0] == y[i])
            total = len(y)
        else:
            predicted = knn.fit(z[train], y[train]).predict(z[test][known])
            correct += int((predicted == y[test][known]).sum())
            total += int(known.sum())
    return {
        "crops": int(len(y)),
        "organs": int(k),
        "nmi": float(normalized_mutual_info_score(y, clusters)),
        "silhouette": float(silhouette_score(z, y, metric="cosine")) if 1 < k < len(y) else float("nan"),
        "knn_accuracy": correct / total if total else float("nan"),
    }


def write_cluster_map(maps: Mapping[str, np.ndarray], organs: Sequence[str], scans: Sequence[str], path: str | os.PathLike,
                      scores: Mapping[str, Mapping[str, float]], seed: int = 0) -> Path:
    """One t-SNE panel per encoder (``maps``: name -> ``(N, D)``), points coloured by organ, marker by scan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    names = sorted(set(organs))
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(names), 2)))
    markers = dict(zip(sorted(set(scans)), "o^sDvP*X"))
    fig, axes = plt.subplots(1, len(maps), figsize=(6.2 * len(maps), 5.6), dpi=90, squeeze=False)
    for ax, (name, x) in zip(axes[0], maps.items()):
        z = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        xy = TSNE(n_components=2, perplexity=float(min(30, max(2, len(z) // 4))), init="pca", random_state=seed).fit_transform(z)
        for organ, colour in zip(names, colours):
            for scan, marker in markers.items():
                sel = (np.asarray(organs) == organ) & (np.asarray(scans) == scan)
                if sel.any():
                    ax.scatter(xy[sel, 0], xy[sel, 1], s=22, color=colour, marker=marker, label=organ if scan == next(iter(markers)) else None)
        s = scores[name]
        ax.set_title(f"{name}: NMI {s['nmi']:.2f}, silhouette {s['silhouette']:.2f}, kNN {s['knn_accuracy']:.2f}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("t-SNE of organ-centred crop embeddings (colour: organ; marker: scan "
                 + ", ".join(f"{m} {s}" for s, m in markers.items()) + ")", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
