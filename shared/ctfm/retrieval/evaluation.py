"""3D-MIR and OrganMNIST3D retrieval metrics for the shipped encoder and a random-init one (``evaluate.json``).

- 3D-MIR (CT-FM's recipe): scan embeddings from the store (sliding patches, element-wise min), cosine; queries are
  the test split, the database the training split, per organ; relevant = same lesion flag, or same lesion group.
  Without split files each case queries all others of its organ (leave-one-out).
- OrganMNIST3D (CT-FM's recipe): one embedding per volume (each side resized to a multiple of the backbone's
  size divisor: 16 for CT-FM's encoder), Euclidean;
  queries are the test split, the database the training split; relevant = same organ.

Writes ``<output_dir>/retrieval/metrics.csv`` (one row per encoder x benchmark x target [x organ]) and
``metrics.md``, and logs one summary line per row.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ctfm.embedding import encoder_patch_size, pooled
from ctfm.embedding_store import encoders_to_compare
from ctfm.errors import CTFMError
from ctfm.files import atomic_path
from ctfm.networks.backbone import size_divisor
from ctfm.retrieval.datasets import MIR_TARGETS, MIRCase, read_3dmir, read_organmnist3d
from ctfm.retrieval.metrics import rank_database, summary

__all__ = ["embed_arrays", "evaluate_3dmir", "evaluate_organmnist", "run_evaluation"]

logger = logging.getLogger("ctfm.retrieval")


def _relevance(order: np.ndarray, query_labels: np.ndarray, database_labels: np.ndarray) -> np.ndarray:
    return (database_labels[order] == query_labels[:, None]).astype(float)


def evaluate_3dmir(cases: Sequence[MIRCase], embeddings: Mapping[str, np.ndarray], ks: Sequence[int] = (1, 3, 5, 10)) -> list[dict]:
    """Metrics per organ and target (cosine); ``embeddings`` maps each case id to its ``(D,)`` scan embedding."""
    rows = []
    for organ in sorted({c.organ for c in cases}):
        of_organ = [c for c in cases if c.organ == organ]
        queries = [c for c in of_organ if c.role in ("query", "both")]
        database = [c for c in of_organ if c.role in ("database", "both")]
        if not queries or len(database) < 2:
            continue
        q = np.stack([embeddings[c.id] for c in queries])
        x = np.stack([embeddings[c.id] for c in database])
        order = rank_database(q, x, "cosine")
        if len({c.role for c in queries}) > 1:
            raise CTFMError(f"3D-MIR {organ}: some cases are in a split file and some in none; give splits for all or none")
        if queries[0].role == "both":  # leave-one-out: a case never retrieves itself
            db_index = {c.id: i for i, c in enumerate(database)}
            order = np.stack([o[o != db_index.get(c.id, -1)][: len(database) - 1] for o, c in zip(order, queries)])
        for target, column in MIR_TARGETS.items():
            value = (lambda c: c.lesion_flag) if column == "cancer_flag" else (lambda c: c.lesion_group)
            relevance = _relevance(order, np.array([value(c) for c in queries]), np.array([value(c) for c in database]))
            rows.append({"benchmark": "3D-MIR", "organ": organ, "target": target, "metric": "cosine", "database": len(database), **summary(relevance, ks)})
    return rows


def evaluate_organmnist(splits: Mapping[str, tuple[np.ndarray, np.ndarray]], embed: Callable[[np.ndarray], np.ndarray],
                        ks: Sequence[int] = (1, 3, 5, 10), query_split: str = "test", database_split: str = "train") -> list[dict]:
    """Metrics of the test split against the training split (Euclidean, relevant = same organ label)."""
    (xq, yq), (xd, yd) = splits[query_split], splits[database_split]
    order = rank_database(embed(xq), embed(xd), "euclidean")
    relevance = _relevance(order, yq, yd)
    return [{"benchmark": "OrganMNIST3D", "organ": "all", "target": "organ", "metric": "euclidean", "database": len(xd), **summary(relevance, ks)}]


@torch.no_grad()
def embed_arrays(network: Callable, images: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 16) -> np.ndarray:
    """``(N, 1, S, S, S)`` in [0, 1] -> ``(N, D)``; each side resized (trilinear) to the next multiple of the
    network's ``size_divisor`` (16 for CT-FM's encoder)."""
    size = encoder_patch_size(images.shape[2:], size_divisor(network, images.ndim - 2))
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).to(device)
        if tuple(x.shape[2:]) != size:
            x = torch.nn.functional.interpolate(x, size=size, mode="trilinear", align_corners=False)
        out.append(pooled(network(x)).float().cpu().numpy())
    return np.concatenate(out)


def run_evaluation(
    build_encoder: Callable[[str | None], torch.nn.Module],
    encoder_weights: str | None,
    extract_scans: Callable[[torch.nn.Module, str, Sequence[Mapping]], Mapping[str, np.ndarray]],
    output_dir: str | os.PathLike,
    mir_labels: Sequence[str] | None = None,
    mir_images_dir: str | None = None,
    mir_splits: Sequence[str] | None = None,
    organmnist_npz: str | None = None,
    ks: Sequence[int] = (1, 3, 5, 10),
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> pd.DataFrame:
    """Both benchmarks that are given, for the shipped (``encoder_weights``) and a random-init encoder.

    ``extract_scans(encoder, weights name, items) -> {id: (D,)}`` embeds 3D-MIR volumes through the store (the
    bundle passes :class:`~ctfm.retrieval.extract.Extractor` with the same recipe as ``extract.json``)."""
    if not mir_labels and not organmnist_npz:
        raise CTFMError("nothing to evaluate: give mir_labels + mir_images_dir (3D-MIR) and/or organmnist_npz (OrganMNIST3D)")
    cases = read_3dmir(mir_labels, mir_images_dir, mir_splits) if mir_labels else []
    organ_splits = read_organmnist3d(organmnist_npz) if organmnist_npz else None
    rows = []
    for name, (encoder, weights) in encoders_to_compare(build_encoder, encoder_weights, seed).items():
        encoder = encoder.to(device).eval()
        found = []
        if cases:
            embeddings = extract_scans(encoder, weights, [{"image": c.image, "id": c.id} for c in cases])
            found += evaluate_3dmir(cases, embeddings, ks)
        if organ_splits:
            found += evaluate_organmnist(organ_splits, lambda x: embed_arrays(encoder, x, device), ks)
        rows += [{"encoder": name, "weights": weights, **r} for r in found]
    table = pd.DataFrame(rows)
    out = Path(output_dir) / "retrieval"
    with atomic_path(out / "metrics.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out / "metrics.md") as tmp:
        tmp.write_text(_markdown(table))
    for r in rows:
        logger.info("%s %s %s (%s): P@3 %.3f, AP@3 %.3f, mAP %.3f, recall@10 %.3f, HR@3 %.3f over %d queries",
                    r["encoder"], r["benchmark"], r["target"], r["organ"], r["P@3"], r["AP@3"], r["mAP"], r["recall@10"], r["HR@3"], r["queries"])
    return table


def _markdown(table: pd.DataFrame) -> str:
    columns = ["encoder", "benchmark", "organ", "target", "queries", "database", "P@3", "AP@3", "mAP", "recall@10", "HR@3"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in table[columns].itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines) + "\n"
