"""Semantic search (CT-FM's heart protocol): a query patch at a structure's centroid in one scan, searched by
sliding window in a target scan; a hit when the best-matching patch's centre lies inside the target's structure.

Both scans are on the same preprocessed grid spacing, so distances are in mm from the voxel spacing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ctfm.embedding import encoder_patch_size, sliding_patch_embeddings
from ctfm.networks.encoder import SIZE_DIVISOR
from ctfm.retrieval.extract import embed_crop
from ctfm.retrieval.query import crop_at

__all__ = ["search_structure"]


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(0)


def search_structure(
    embed: Callable[[torch.Tensor], torch.Tensor],
    query: torch.Tensor,
    query_label: torch.Tensor,
    target: torch.Tensor,
    target_label: torch.Tensor,
    structure: int,
    patch_size: Sequence[int],
    spacing_mm: Sequence[float],
    overlap: float = 0.25,
    target_patches: tuple[torch.Tensor, torch.Tensor] | None = None,
    divisor: Sequence[int] | int = SIZE_DIVISOR,
) -> dict:
    """Search ``query``'s patch at label ``structure``'s centroid in ``target``.

    Args:
        embed: ``(B, C, *patch) -> (B, D)``.
        query, target: ``(C, S, P, L)`` preprocessed CTs; ``query_label``, ``target_label``: ``(1, S, P, L)``.
        spacing_mm: the grid's spacing (S, P, L).
        target_patches: the target's ``(embeddings, starts)`` from :func:`~ctfm.embedding.sliding_patch_embeddings`
            when already computed (one sliding pass serves every structure).
        divisor: the backbone's ``size_divisor`` (:func:`ctfm.networks.size_divisor`): patch sides are rounded up to
            its multiples.

    Returns:
        ``hit`` (best patch centre inside the target structure), ``distance_mm`` (best patch centre to the target
        structure's centroid), ``cosine`` (best score), ``best_centre_voxel``.
    """
    q_mask, t_mask = np.asarray(query_label[0]) == structure, np.asarray(target_label[0]) == structure
    crop = crop_at(query, _centroid(q_mask), patch_size, divisor)
    vector = embed_crop(embed, crop)
    embeddings, starts = target_patches or sliding_patch_embeddings(embed, target, patch_size, overlap, divisor=divisor)
    patch = np.array(encoder_patch_size(patch_size, divisor))
    scores = torch.nn.functional.cosine_similarity(embeddings, vector[None], dim=1)
    best = int(torch.argmax(scores))
    centre = starts[best].numpy() + patch // 2
    inside = tuple(int(np.clip(c, 0, s - 1)) for c, s in zip(centre, t_mask.shape))
    distance = float(np.linalg.norm((centre - _centroid(t_mask)) * np.asarray(spacing_mm, float)))
    return {"hit": bool(t_mask[inside]), "distance_mm": round(distance, 1), "cosine": float(scores[best]), "best_centre_voxel": [int(c) for c in centre]}
