"""A resumable store of per-scan embeddings: the cache the triage probe reads and the retrieval bundle builds on.

Layout: one folder per encoder + preprocessing (its *fingerprint*), one safetensors file per scan::

    <root>/<fingerprint>/store.json               # what the fingerprint hashes
    <root>/<fingerprint>/<safe id>.safetensors    # tensor "embedding" (D,) float32 and optional extras, e.g.
                                                  # "patch_embeddings" (P, D), "patch_centres_mm" (P, 3);
                                                  # metadata: id, source, fingerprint, info (JSON: shape, spacing)
    <root>/<fingerprint>/embeddings.safetensors   # after merge(): "embedding" (N, D), rows in table.csv's order
    <root>/<fingerprint>/table.csv                # after merge(): one line per scan (pandas.read_csv opens it)

Why one file per scan rather than one Parquet table: each row is written atomically (temporary file, then rename),
so a killed run never leaves a half-written row and a rerun skips exactly the scans already done; processes
(torchrun ranks) write disjoint files without coordination; and any reader opens a row with ``safetensors`` alone
(a Parquet table would need pyarrow and a rewrite of the whole file per row, or a writer lock across ranks).
:meth:`EmbeddingStore.merge` is the one step after all ranks: the whole store as one ``(N, D)`` safetensors
matrix (memory-mapped by ``safetensors.safe_open``) plus ``table.csv``.

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

__all__ = ["EmbeddingStore", "ExtractionReport", "encoders_to_compare", "extract_embeddings", "fingerprint", "weights_id"]

logger = logging.getLogger("ctfm.embedding_store")

#: The merged matrix of a store (:meth:`EmbeddingStore.merge`), next to the rows.
MERGED = "embeddings.safetensors"


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

    @classmethod
    def of(cls, root: str | os.PathLike, weights: str, encoder: torch.nn.Module, recipe: Mapping) -> EmbeddingStore:
        """The store of ``encoder`` (named by ``weights``: a path, a table name or ``random-init seed S``, hashed by
        content where it is a file) and ``recipe`` (what the preprocessing and pooling are)."""
        return cls(root, {"weights": weights_id(str(weights)), "encoder": getattr(encoder, "config", {}), "recipe": dict(recipe)})

    @classmethod
    def open(cls, folder: str | os.PathLike) -> EmbeddingStore:
        """The store whose fingerprint folder is ``folder`` (it holds ``store.json``)."""
        folder = Path(folder)
        try:
            description = json.loads((folder / "store.json").read_text())
        except FileNotFoundError:
            raise CTFMError(f"{folder}: not an embedding store (no store.json); give the <store_dir>/<fingerprint> folder") from None
        except ValueError as err:
            raise CTFMError(f"{folder / 'store.json'}: not JSON ({err})") from None
        recorded = description.pop("fingerprint", None)
        store = cls(folder.parent, description)
        if store.fingerprint != recorded or store.folder.name != folder.name:
            raise CTFMError(f"{folder / 'store.json'}: describes fingerprint {store.fingerprint}, not {recorded} / {folder.name}")
        return store

    def path_of(self, case_id: str) -> Path:
        """The row file of ``case_id``: its readable part plus a hash, so distinct ids never share a file."""
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", str(case_id)).strip("._")[:80] or "scan"
        return self.folder / f"{readable}-{hashlib.sha1(str(case_id).encode()).hexdigest()[:8]}.safetensors"

    def has(self, case_id: str) -> bool:
        return self.path_of(case_id).is_file()

    def put(
        self,
        case_id: str,
        embedding: torch.Tensor,
        source: str,
        extras: Mapping[str, torch.Tensor] | None = None,
        info: Mapping | None = None,
    ) -> Path:
        """Write the row of ``case_id`` atomically: ``embedding`` ``(D,)`` as float32, ``extras`` (named tensors,
        e.g. patch embeddings) as given, ``info`` (JSON-able: shape, spacing, ...) in the metadata."""
        vector = torch.as_tensor(embedding).detach().float().cpu().reshape(-1).contiguous()
        tensors = {"embedding": vector, **{k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in (extras or {}).items()}}
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CTFMError(f"{source}: the {name.replace('_', ' ')} hold NaN or Inf; not stored")
        if not (self.folder / "store.json").is_file():
            with atomic_path(self.folder / "store.json") as tmp:
                tmp.write_text(json.dumps({"fingerprint": self.fingerprint, **self.description}, indent=2, default=str))
        path = self.path_of(case_id)
        meta = {"id": str(case_id), "source": str(source), "fingerprint": self.fingerprint, "info": json.dumps(dict(info or {}), default=str)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    def row(self, case_id: str, keys: Sequence[str] | None = None) -> dict:
        """The tensors ``keys`` (default: every one) of ``case_id``'s row (numpy) plus ``id``, ``source`` and ``info``
        (a dict)."""
        path = self.path_of(case_id)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k).numpy() for k in (f.keys() if keys is None else keys)}
        except FileNotFoundError:
            raise CTFMError(f"{path}: no stored embedding for {case_id!r}") from None
        except Exception as err:
            raise CTFMError(f"{path}: unreadable stored embedding ({type(err).__name__}); delete it and rerun") from None
        if meta.get("id") != str(case_id) or meta.get("fingerprint") != self.fingerprint:
            raise CTFMError(f"{path}: stored for {meta.get('id')!r} / {meta.get('fingerprint')!r}, not {case_id!r} / {self.fingerprint}")
        return {**tensors, "id": meta["id"], "source": meta.get("source", ""), "info": json.loads(meta.get("info") or "{}")}

    def get(self, case_id: str) -> np.ndarray:
        """``(D,)`` float32 embedding of ``case_id`` (its patch embeddings are not read)."""
        return self.row(case_id, ["embedding"])["embedding"]

    def matrix(self, case_ids: Sequence[str]) -> np.ndarray:
        """``(N, D)`` float32 embeddings of ``case_ids``, in that order."""
        if not case_ids:
            raise CTFMError(f"{self.folder}: no case ids asked for")
        return np.stack([self.get(i) for i in case_ids])

    def ids(self) -> list[str]:
        """Every stored id (read from the rows' metadata), sorted; the merged matrix is not a row."""
        found = []
        for path in sorted(self.folder.glob("*.safetensors")):
            if path.name == MERGED:
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    found.append((f.metadata() or {}).get("id", path.stem))
            except Exception as err:
                raise CTFMError(f"{path}: unreadable stored embedding ({type(err).__name__}); delete it and rerun") from None
        return sorted(found)

    def merge(self) -> tuple[Path, Path]:
        """Gather every row into ``embeddings.safetensors`` (``embedding`` ``(N, D)``, and ``patch_embeddings``
        ``(sum P, D)`` + ``patch_rows`` ``(sum P,)`` + ``patch_centres_mm`` where rows have them) and ``table.csv``
        (id, source, dim, n_patches, info columns), both atomically; returns their paths. Run once, after every
        rank has finished (:func:`ctfm.retrieval.extract.Extractor` does)."""
        import pandas as pd

        ids = self.ids()
        if not ids:
            raise CTFMError(f"{self.folder}: the store holds no embeddings to merge")
        rows, records = [self.row(i) for i in ids], []
        tensors = {"embedding": torch.from_numpy(np.stack([r["embedding"] for r in rows]))}
        with_patches = [r["id"] for r in rows if "patch_embeddings" in r]
        if with_patches and len(with_patches) != len(rows):
            raise CTFMError(f"{self.folder}: {len(with_patches)} of {len(rows)} rows hold patch embeddings; one store is one recipe "
                            "(keep_patches is part of it): delete the folder and extract again")
        if with_patches:
            tensors["patch_embeddings"] = torch.from_numpy(np.concatenate([r["patch_embeddings"] for r in rows]))
            tensors["patch_rows"] = torch.cat([torch.full((len(r["patch_embeddings"]),), n, dtype=torch.int64) for n, r in enumerate(rows)])
            tensors["patch_centres_mm"] = torch.from_numpy(np.concatenate([r["patch_centres_mm"] for r in rows]))
        for r in rows:
            info = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r["info"].items()}
            records.append({"id": r["id"], "source": r["source"], "dim": int(r["embedding"].shape[0]),
                            "n_patches": int(len(r.get("patch_embeddings", ()))), **info})
        matrix, table = self.folder / MERGED, self.folder / "table.csv"
        with atomic_path(matrix) as tmp:
            save_file(tensors, str(tmp), metadata={"fingerprint": self.fingerprint, "ids": json.dumps(ids)})
        with atomic_path(table) as tmp:
            pd.DataFrame.from_records(records).to_csv(tmp, index=False)
        return matrix, table


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
    shard: tuple[int, int] = (0, 1),
) -> ExtractionReport:
    """Embed every item not yet in ``store``: ``transform(item)[image_key]`` ``(C, *spatial)`` -> ``embed`` on a
    batch of one -> ``(1, D)``, or a dict ``{"embedding": (D,), "info": {...}, <extra name>: tensor, ...}``
    (stored by :meth:`EmbeddingStore.put`).

    A scan that fails (unreadable, not a CT, ...) is reported with its one-line error and the run goes on, unless
    ``stop_on_error``; rows already stored are skipped, so a rerun after a kill resumes. ``shard = (rank, world)``
    embeds only items ``rank, rank + world, ...`` (torchrun ranks take disjoint slices). Progress on a tqdm bar.
    """
    report = ExtractionReport()
    rank, world = shard
    items = list(items)[rank::world]
    for item in tqdm(items, desc=f"embeddings {store.fingerprint}" + (f" rank {rank}" if world > 1 else ""), unit="scan"):
        case_id = str(item.get(id_key) or item[image_key])
        if store.has(case_id):
            report.skipped.append(case_id)
            continue
        try:
            image = transform(dict(item))[image_key]
            out = embed(image.unsqueeze(0).to(device))
            if isinstance(out, Mapping):
                extras = {k: v for k, v in out.items() if k not in ("embedding", "info")}
                store.put(case_id, out["embedding"], str(item[image_key]), extras, out.get("info"))
            else:
                store.put(case_id, out[0], str(item[image_key]))
        except (CTFMError, OSError, ValueError, RuntimeError) as err:
            if stop_on_error:
                raise
            report.failed[case_id] = error_line(err)
            logger.error("%s", report.failed[case_id])
            continue
        report.embedded.append(case_id)
    logger.info("%s: %s", store.folder, report.summary())
    return report


def encoders_to_compare(
    build: Callable[[str | None], torch.nn.Module], weights: str | None, seed: int = 0
) -> dict[str, tuple[torch.nn.Module, str]]:
    """``{"pretrained": (encoder, weights name), "random": (encoder, "random-init seed S")}``: what pre-training
    bought is always measured against a random-init encoder of the same width. ``build(weights)`` returns an
    encoder; the random one is built under ``torch.manual_seed(seed)``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        random = build(None)
    encoders = {"random": (random, f"random-init seed {seed}")}
    if weights:
        encoders = {"pretrained": (build(weights), str(weights)), **encoders}
    return encoders


def weights_id(weights_name: str) -> str:
    """The weights' content digest where they are files on this machine, else their name (a random init): what a
    store's fingerprint names the encoder by."""
    from ctfm.export import weights_digest

    if weights_name.startswith("random-init"):
        return weights_name
    return weights_digest(weights_name) or weights_name
