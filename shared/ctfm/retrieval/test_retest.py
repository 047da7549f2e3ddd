"""Test-retest: the same scan perturbed as a repeat acquisition would be, and the cosine between embeddings.

Perturbations of a preprocessed ``(C, S, P, L)`` volume in CT-FM's [0, 1] scaling (1 unit = 3072 HU):
``resampled`` (down to 80 % per axis and back: a coarser acquisition), ``shifted`` (translated by about
6 mm along each axis, the gap filled with air), ``rotated`` (3 degrees about the superior axis), ``noised``
(Gaussian noise of 10 HU). Real repeat pairs (e.g. RIDER) are given as file pairs by the user.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ctfm.transforms import HU_MAX, HU_MIN

__all__ = ["PERTURBATIONS", "perturb", "retest_cosines"]

PERTURBATIONS = ("resampled", "shifted", "rotated", "noised")


def perturb(volume: torch.Tensor, kind: str, spacing_mm: Sequence[float], seed: int = 0) -> torch.Tensor:
    """``(C, S, P, L)`` -> the same shape, perturbed as ``kind`` (see the module docstring)."""
    x = torch.as_tensor(volume).float()
    air = float(x.min())
    if kind == "resampled":
        small = [max(2, int(round(s * 0.8))) for s in x.shape[1:]]
        down = torch.nn.functional.interpolate(x[None], size=small, mode="trilinear", align_corners=False)
        return torch.nn.functional.interpolate(down, size=list(x.shape[1:]), mode="trilinear", align_corners=False)[0]
    if kind == "shifted":
        shift = [max(1, int(round(6.0 / float(s)))) for s in spacing_mm]
        out = torch.full_like(x, air)
        out[:, shift[0]:, shift[1]:, shift[2]:] = x[:, : x.shape[1] - shift[0], : x.shape[2] - shift[1], : x.shape[3] - shift[2]]
        return out
    if kind == "rotated":
        angle = math.radians(3.0)
        theta = torch.tensor([[1, 0, 0, 0], [0, math.cos(angle), -math.sin(angle), 0], [0, math.sin(angle), math.cos(angle), 0]], dtype=torch.float32)
        # affine_grid's axes are (L, P, S) = (x, y, z) of the (S, P, L) tensor: rotate in the P-L plane, about S
        theta = theta[[2, 1, 0]][:, [2, 1, 0, 3]]
        grid = torch.nn.functional.affine_grid(theta[None], [1, *x.shape], align_corners=False)
        return torch.nn.functional.grid_sample(x[None] - air, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0] + air
    if kind == "noised":
        generator = torch.Generator().manual_seed(seed)
        return x + torch.randn(x.shape, generator=generator) * (10.0 / (HU_MAX - HU_MIN))
    raise ValueError(f"perturbation {kind!r}: choose one of {', '.join(PERTURBATIONS)}")


def retest_cosines(embed_scan: Callable[[torch.Tensor], torch.Tensor], volume: torch.Tensor, spacing_mm: Sequence[float],
                   kinds: Sequence[str] = PERTURBATIONS, seed: int = 0) -> tuple[dict[str, float], torch.Tensor]:
    """``({kind: cosine(embedding of volume, embedding of perturbed volume)}, embedding of volume)``;
    ``embed_scan``: ``(C, S, P, L) -> (D,)``. Read the cosines against those between different scans (the
    probe reports both): an encoder whose embeddings all point one way is "stable" and useless."""
    base = embed_scan(volume)
    cosines = {k: float(torch.nn.functional.cosine_similarity(base, embed_scan(perturb(volume, k, spacing_mm, seed)), dim=0)) for k in kinds}
    return cosines, base
