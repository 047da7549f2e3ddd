"""faiss indexes of an embedding store: exact for small stores, HNSW above a size threshold, chosen automatically.

An index folder holds ``index.faiss``, ``index.json`` (kind, metric, level, count, dimension, the store's
fingerprint, build time, the sha256 of ``index.faiss``, checked before it is read) and ``rows.csv`` (one line per
indexed vector: the scan ``id`` and ``source``, and for a patch index the patch number and its centre in mm).

- ``metric="cosine"``: vectors L2-normalised, inner product; a hit's ``score`` is the cosine (higher is closer).
- ``metric="euclidean"``: squared L2 distance; ``score`` is the distance (lower is closer).
- ``level="scan"`` indexes scan embeddings (query by a CT or a stored id); ``level="patch"`` indexes every stored
  patch embedding (query by a region).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import safe_open
from safetensors.numpy import load_file

from ctfm.embedding_store import MERGED, EmbeddingStore
from ctfm.errors import CTFMError
from ctfm.files import atomic_path, sha256sum

__all__ = ["EXACT_BELOW", "KINDS", "METRICS", "IndexInfo", "RetrievalIndex", "build_index", "index_store"]

logger = logging.getLogger("ctfm.retrieval")

METRICS = ("cosine", "euclidean")
KINDS = ("auto", "flat", "hnsw")
#: ``kind="auto"`` searches exactly below this many vectors; at and above it, HNSW (see benchmarks/bench_retrieval.py:
#: one exact query over 20,000 512-d vectors takes about 2 ms on 2 cores, and grows linearly).
EXACT_BELOW = 20_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 96


@dataclass
class IndexInfo:
    """What ``index.json`` records."""

    kind: str
    metric: str
    level: str
    count: int
    dim: int
    fingerprint: str
    build_s: float
    ef_search: int | None = None
    sha256: str = ""

    def summary(self) -> str:
        chosen = f"HNSW (M {HNSW_M}, efSearch {self.ef_search})" if self.kind == "hnsw" else "exact (flat)"
        return f"{self.count} {self.level} embeddings of {self.dim} dims, {self.metric}, {chosen}, built in {self.build_s:.2f} s"


def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs each CPU-specific build it does not find
    try:
        import faiss
    except ImportError:
        raise CTFMError("faiss is not installed: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def prepare(vectors: np.ndarray, metric: str) -> np.ndarray:
    """``(N, D)`` float32, C-contiguous, L2-normalised for ``cosine``."""
    if metric not in METRICS:
        raise CTFMError(f"metric {metric!r}: choose one of {', '.join(METRICS)}")
    x = np.ascontiguousarray(np.asarray(vectors, np.float32))
    if x.ndim != 2 or not len(x):
        raise CTFMError(f"an index needs a non-empty (N, D) matrix, got shape {x.shape}")
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def build_index(vectors: np.ndarray, metric: str = "cosine", kind: str = "auto", ef_search: int = HNSW_EF_SEARCH):
    """A faiss index of ``vectors`` ``(N, D)``: ``"flat"`` (exact), ``"hnsw"`` or ``"auto"`` (flat below
    :data:`EXACT_BELOW` vectors, else HNSW). Returns ``(index, kind)``."""
    faiss = _faiss()
    if kind not in KINDS:
        raise CTFMError(f"index kind {kind!r}: choose one of {', '.join(KINDS)}")
    x = prepare(vectors, metric)
    kind = ("flat" if len(x) < EXACT_BELOW else "hnsw") if kind == "auto" else kind
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if kind == "flat":
        index = faiss.IndexFlat(x.shape[1], faiss_metric)
    else:
        index = faiss.IndexHNSWFlat(x.shape[1], HNSW_M, faiss_metric)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = int(ef_search)
    index.add(x)
    return index, kind


class RetrievalIndex:
    """An index folder read back: ``search(queries, k)`` -> hits table.

    Args:
        folder: written by :func:`index_store`; ``index.faiss``'s sha256 must equal the one ``index.json`` records.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self.info = IndexInfo(**json.loads((self.folder / "index.json").read_text()))
        except FileNotFoundError:
            raise CTFMError(f"{self.folder / 'index.json'}: no index here; run index.json (or python -m ctfm.retrieval index) first") from None
        except (ValueError, TypeError) as err:
            raise CTFMError(f"{self.folder / 'index.json'}: not an index description ({err})") from None
        path = self.folder / "index.faiss"
        if not path.is_file() or sha256sum(path) != self.info.sha256:
            raise CTFMError(f"{path}: missing or not the file index.json describes (sha256 differs); rebuild the index")
        self.rows = _read_table(self.folder / "rows.csv")
        if len(self.rows) != self.info.count:
            raise CTFMError(f"{self.folder / 'rows.csv'}: {len(self.rows)} rows for an index of {self.info.count}")
        self.index = _faiss().read_index(str(path))
        if self.info.kind == "hnsw":
            self.index.hnsw.efSearch = int(self.info.ef_search or HNSW_EF_SEARCH)

    def search(self, queries: np.ndarray, k: int = 5, exclude: Sequence[str] = ()) -> list[pd.DataFrame]:
        """Top-``k`` hits per query ``(Q, D)``: one table per query with ``rank``, ``score`` and the rows' columns.
        Rows whose ``id`` is in ``exclude`` (e.g. the query scan itself) are left out."""
        q = prepare(np.atleast_2d(queries), self.info.metric)
        if q.shape[1] != self.info.dim:
            raise CTFMError(f"{self.folder}: the index holds {self.info.dim}-dim embeddings, the query is {q.shape[1]}-dim (another encoder?)")
        extra = int((self.rows["id"].isin(list(exclude))).sum()) if exclude else 0
        scores, found = self.index.search(q, min(int(k) + extra, self.info.count))
        tables = []
        for s, f in zip(scores, found):
            hits = self.rows.iloc[f[f >= 0]].copy()
            hits.insert(0, "score", s[f >= 0].astype(float))
            if exclude:
                hits = hits[~hits["id"].isin(list(exclude))]
            hits = hits.head(int(k)).reset_index(drop=True)
            hits.insert(0, "rank", np.arange(1, len(hits) + 1))
            tables.append(hits)
        return tables


def _read_table(path: Path) -> pd.DataFrame:
    """A rows / table CSV with ids and sources kept as text (an id "001" stays "001")."""
    try:
        return pd.read_csv(path, keep_default_na=False, dtype={"id": str, "source": str})
    except FileNotFoundError:
        raise CTFMError(f"{path}: missing; rebuild it (extract.json merges the store, index.json writes the index)") from None


def index_store(store: EmbeddingStore, folder: str | os.PathLike, metric: str = "cosine", kind: str = "auto", level: str = "scan",
                ef_search: int = HNSW_EF_SEARCH) -> IndexInfo:
    """Index the merged matrix of ``store`` (:meth:`~ctfm.embedding_store.EmbeddingStore.merge`) into ``folder``,
    replacing what is there atomically (the folder is written whole, then renamed). Returns the description."""
    merged = store.folder / MERGED
    if not merged.is_file():
        raise CTFMError(f"{merged}: no merged store; run extract.json on the same encoder and recipe first")
    table = _read_table(store.folder / "table.csv")
    tensors = load_file(str(merged))
    with safe_open(str(merged), framework="np") as f:
        merged_ids = json.loads((f.metadata() or {}).get("ids", "[]"))
    if merged_ids != table["id"].tolist():
        raise CTFMError(f"{merged}: its rows are not those of {store.folder / 'table.csv'}; rerun extract.json to merge the store again")
    if level == "scan":
        vectors, rows = tensors["embedding"], table[["id", "source"]]
    elif level == "patch":
        if "patch_embeddings" not in tensors:
            raise CTFMError(f"{merged}: the store holds no patch embeddings; extract with keep_patches true for a patch index")
        vectors, owner = tensors["patch_embeddings"], tensors["patch_rows"]
        rows = table[["id", "source"]].iloc[owner].reset_index(drop=True)
        rows.insert(2, "patch", np.concatenate([np.arange(n) for n in np.bincount(owner, minlength=len(table))]))
        for axis, name in enumerate(("x_mm", "y_mm", "z_mm")):
            rows[name] = np.round(tensors["patch_centres_mm"][:, axis].astype(float), 2)
    else:
        raise CTFMError(f"index level {level!r}: choose 'scan' or 'patch'")
    started = time.perf_counter()
    index, chosen = build_index(vectors, metric, kind, ef_search)
    info = IndexInfo(chosen, metric, level, int(len(vectors)), int(vectors.shape[1]), store.fingerprint,
                     round(time.perf_counter() - started, 3), int(ef_search) if chosen == "hnsw" else None)
    with atomic_path(folder, is_dir=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        _faiss().write_index(index, str(tmp / "index.faiss"))
        info.sha256 = sha256sum(tmp / "index.faiss")
        rows.to_csv(tmp / "rows.csv", index=False)
        (tmp / "index.json").write_text(json.dumps(asdict(info), indent=2) + "\n")
    logger.info("%s: %s", folder, info.summary())
    return info
