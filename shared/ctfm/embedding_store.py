"""A resumable store of per-scan embeddings: the cache the triage probe reads and the retrieval bundle builds on.

Layout: one folder per encoder + preprocessing (its *fingerprint*), one safetensors file per scan::

    <root>/<fingerprint>/<safe id>.safetensors    # tensor "embedding" (D,) float32; metadata: id, source, fingerprint

Why one file per scan rather than one Parquet table: each row is written atomically (temporary file, then rename),
so a killed run never leaves a half-written row and a rerun skips exactly the scans already done; processes
(torchrun ranks) write disjoint files without coordination; and any reader opens a row with ``safetensors`` alone.
:meth:`EmbeddingStore.matrix` gathers rows into one ``(N, D)`` array.

The fingerprint hashes what makes embeddings comparable (the weights' digest, the encoder's arguments and the
preprocessing), so rows of another encoder or recipe are never reused by mistake.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ctfm.errors import CTFMError, error_line
from ctfm.files import atomic_path

__all__ = ["EmbeddingStore", "ExtractionReport", "extract_embeddings", "fingerprint"]

logger = logging.getLogger("ctfm.embedding_store")


def fingerprint(description: Mapping) -> str:
    """16 hex digits of the sha256 of ``description`` (JSON, sorted keys): weights digest, encoder, preprocessing."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class EmbeddingStore:
    """Per-scan embeddings of one encoder + preprocessing under ``root/<fingerprint>/``.

    Args:
        root: the store's folder (created on the first write).
        description: what the embeddings depend on; hashed into the fingerprint and kept in ``store.json``.
    """

    def __init__(self, root: str | os.PathLike, description: Mapping):
        self.description = dict(description)
        self.fingerprint = fingerprint(self.description)
        self.folder = Path(root) / self.fingerprint

    def path_of(self, case_id: str) -> Path:
        """The row file of ``case_id``: its readable part plus a hash, so distinct ids never share a file."""
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", str(case_id)).strip("._")[:80] or "scan"
        return self.folder / f"{readable}-{hashlib.sha1(str(case_id).encode()).hexdigest()[:8]}.safetensors"

    def has(self, case_id: str) -> bool:
        return self.path_of(case_id).is_file()

    def put(self, case_id: str, embedding: torch.Tensor, source: str) -> Path:
        """Write the row of ``case_id`` atomically: ``embedding`` ``(D,)``, stored as float32."""
        vector = torch.as_tensor(embedding).detach().float().cpu().reshape(-1).contiguous()
        if not torch.isfinite(vector).all():
            raise CTFMError(f"{source}: the embedding holds NaN or Inf; not stored")
        if not (self.folder / "store.json").is_file():
            with atomic_path(self.folder / "store.json") as tmp:
                tmp.write_text(json.dumps({"fingerprint": self.fingerprint, **self.description}, indent=2, default=str))
        path = self.path_of(case_id)
        meta = {"id": str(case_id), "source": str(source), "fingerprint": self.fingerprint}
        with atomic_path(path) as tmp:
            save_file({"embedding": vector}, str(tmp), metadata=meta)
        return path

    def get(self, case_id: str) -> np.ndarray:
        """``(D,)`` float32 embedding of ``case_id``."""
        path = self.path_of(case_id)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                vector = f.get_tensor("embedding")
        except FileNotFoundError:
            raise CTFMError(f"{path}: no stored embedding for {case_id!r}") from None
        except Exception as err:
            raise CTFMError(f"{path}: unreadable stored embedding ({type(err).__name__}); delete it and rerun") from None
        if meta.get("id") != str(case_id) or meta.get("fingerprint") != self.fingerprint:
            raise CTFMError(f"{path}: stored for {meta.get('id')!r} / {meta.get('fingerprint')!r}, not {case_id!r} / {self.fingerprint}")
        return vector.numpy()

    def matrix(self, case_ids: Sequence[str]) -> np.ndarray:
        """``(N, D)`` float32 embeddings of ``case_ids``, in that order."""
        if not case_ids:
            raise CTFMError(f"{self.folder}: no case ids asked for")
        return np.stack([self.get(i) for i in case_ids])

    def ids(self) -> list[str]:
        """Every stored id (read from the rows' metadata), sorted."""
        found = []
        for path in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                found.append((f.metadata() or {}).get("id", path.stem))
        return sorted(found)


@dataclass
class ExtractionReport:
    """What :func:`extract_embeddings` did: ids embedded now, ids already stored, and ``{id: one-line error}``."""

    embedded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return f"{len(self.embedded)} embedded, {len(self.skipped)} already stored, {len(self.failed)} failed"


@torch.no_grad()
def extract_embeddings(
    store: EmbeddingStore,
    items: Iterable[Mapping],
    transform: Callable[[dict], Mapping],
    embed: Callable[[torch.Tensor], torch.Tensor],
    image_key: str = "image",
    id_key: str = "id",
    device: torch.device | str = "cpu",
    stop_on_error: bool = False,
) -> ExtractionReport:
    """Embed every item not yet in ``store``: ``transform(item)[image_key]`` ``(C, *spatial)`` -> ``embed`` on a
    batch of one -> ``(1, D)``.

    A scan that fails (unreadable, not a CT, ...) is reported with its one-line error and the run goes on, unless
    ``stop_on_error``; rows already stored are skipped, so a rerun after a kill resumes. Progress on a tqdm bar.
    """
    report = ExtractionReport()
    items = list(items)
    for item in tqdm(items, desc=f"embeddings {store.fingerprint}", unit="scan"):
        case_id = str(item.get(id_key) or item[image_key])
        if store.has(case_id):
            report.skipped.append(case_id)
            continue
        try:
            image = torch.as_tensor(transform(dict(item))[image_key])
            vector = embed(image.unsqueeze(0).to(device))
            store.put(case_id, vector[0], str(item[image_key]))
        except (CTFMError, OSError, ValueError, RuntimeError) as err:
            if stop_on_error:
                raise
            report.failed[case_id] = error_line(err)
            logger.error("%s", report.failed[case_id])
            continue
        report.embedded.append(case_id)
    logger.info("%s: %s", store.folder, report.summary())
    return report
