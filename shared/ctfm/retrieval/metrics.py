"""Retrieval metrics over ranked relevance: P@k, AP@k, AP (whole ranking), recall@k, hit rate@k, and their means.

``relevance`` is a ``(Q, N)`` 0/1 array: row q says which of the N database items, in the order the search
ranked them for query q, share the query's target (3D-MIR's lesion flag or lesion group, an organ label).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["average_precision", "average_precision_at_k", "hit_rate_at_k", "precision_at_k", "rank_database", "recall_at_k", "summary"]


def rank_database(queries: np.ndarray, database: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """``(Q, N)`` database indices per query, nearest first: cosine similarity (descending) or Euclidean distance
    (ascending); ties keep database order (stable sort), so the result is the same on every machine."""
    q, x = np.asarray(queries, np.float64), np.asarray(database, np.float64)
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        keys = -(q @ x.T)
    elif metric == "euclidean":
        keys = (q * q).sum(1)[:, None] - 2 * q @ x.T + (x * x).sum(1)[None]
    else:
        raise ValueError(f"metric {metric!r}: choose 'cosine' or 'euclidean'")
    return np.argsort(keys, axis=1, kind="stable")


def precision_at_k(relevance: np.ndarray, k: int) -> np.ndarray:
    """``(Q,)``: relevant items in the top ``k``, divided by ``k`` (also when the database holds fewer than ``k``)."""
    return np.asarray(relevance, float)[:, :k].sum(axis=1) / k


def recall_at_k(relevance: np.ndarray, k: int) -> np.ndarray:
    """``(Q,)``: fraction of all relevant items found in the top ``k`` (NaN for a query with none)."""
    rel = np.asarray(relevance, float)
    total = rel.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, rel[:, :k].sum(axis=1) / total, np.nan)


def hit_rate_at_k(relevance: np.ndarray, k: int) -> np.ndarray:
    """``(Q,)``: 1 where the top ``k`` hold at least one relevant item (CT-FM's HR@k)."""
    return (np.asarray(relevance, float)[:, :k].sum(axis=1) > 0).astype(float)


def average_precision(relevance: np.ndarray) -> np.ndarray:
    """``(Q,)``: mean of P@i over the ranks i of the relevant items, over the whole ranking (NaN with none);
    the mean over queries is mAP."""
    rel = np.asarray(relevance, float)
    precision = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
    total = rel.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (precision * rel).sum(axis=1) / total, np.nan)


def average_precision_at_k(relevance: np.ndarray, k: int) -> np.ndarray:
    """``(Q,)``: AP@k = sum over i <= k of P@i * rel_i, divided by min(k, number relevant) (0 with none)."""
    rel = np.asarray(relevance, float)
    top = rel[:, :k]
    precision = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    denominator = np.minimum(k, rel.sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (precision * top).sum(axis=1) / denominator, 0.0)


def summary(relevance: np.ndarray, ks: Sequence[int] = (1, 3, 5, 10)) -> dict[str, float]:
    """Mean over queries of P@k, AP@k, recall@k and HR@k for each ``k``, and mAP (NaN-free queries)."""
    out = {"queries": int(len(relevance)), "mAP": float(np.nanmean(average_precision(relevance)))}
    for k in ks:
        out[f"P@{k}"] = float(precision_at_k(relevance, k).mean())
        out[f"AP@{k}"] = float(average_precision_at_k(relevance, k).mean())
        out[f"recall@{k}"] = float(np.nanmean(recall_at_k(relevance, k)))
        out[f"HR@{k}"] = float(hit_rate_at_k(relevance, k).mean())
    return out
