"""Occlusion saliency of an embedding: 1 - cosine(embedding, embedding with a block occluded), per location.

MONAI's ``OcclusionSensitivity`` slides the occluding block; the network it sees returns the cosine between
each occluded input's embedding and the unoccluded one, so its map is that cosine and the saliency is 1 - map
(high where hiding the tissue changes the embedding most).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from monai.visualize import OcclusionSensitivity

__all__ = ["occlusion_saliency"]


class _CosineToBase(torch.nn.Module):
    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], base: torch.Tensor):
        super().__init__()
        self.embed, self.base = embed, base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(self.embed(x), self.base[None], dim=1)[:, None]


@torch.no_grad()
def occlusion_saliency(embed: Callable[[torch.Tensor], torch.Tensor], patch: torch.Tensor, mask_size: Sequence[int] = (8, 16, 16),
                       n_batch: int = 8) -> torch.Tensor:
    """``patch`` ``(1, C, S, P, L)`` -> saliency ``(S, P, L)`` = 1 - cosine, occluded with the patch's mean value."""
    base = embed(patch)[0]
    occlusion = OcclusionSensitivity(_CosineToBase(embed, base), mask_size=tuple(int(m) for m in mask_size), n_batch=n_batch,
                                     overlap=0.0, mode="mean_patch", activate=False, verbose=False)
    with warnings.catch_warnings():  # MONAI's own indexing inside OcclusionSensitivity warns on torch >= 2.8
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence")
        cosine_map, _ = occlusion(patch)
    return (1.0 - cosine_map[0, 0]).clamp(min=0.0)
