"""FM-CT's backbone, a 3D vision transformer (MONAI's ``ViT``), defined once for every bundle of the zoo.

FM-CT pre-trains a ViT-B on head CT: ``96^3`` input, patch 12 (``8^3 = 512`` tokens), hidden 768, 12 layers,
12 heads, MLP 3072 (:data:`FMCT_VIT`). :class:`CTFMViT` is MONAI's ``ViT`` (``classification=False``: no class
token) with the reading contract of :class:`~ctfm.networks.CTFMEncoder`, so that the pre-training recipes, the
export and the embedding code take either backbone:

- ``forward(x)`` / :meth:`~CTFMViT.feature_maps` return a one-element list: the patch tokens after the final
  LayerNorm laid out as a map ``(B, hidden_size, D / p, H / p, W / p)`` (the "deepest map");
- :meth:`~CTFMViT.embed` is the mean over patch tokens, ``(B, hidden_size)``;
- :attr:`~CTFMViT.size_divisor` is the patch size (input sides must be multiples of it), :attr:`~CTFMViT.stem_weight`
  the patch-embedding convolution (adapted to other input channels like the CNN's first convolution) and
  :attr:`~CTFMViT.saliency_layer` the token map (an identity module Grad-CAM hooks);
- :attr:`~CTFMViT.config` holds the constructor arguments plus ``model_type`` (:data:`VIT_MODEL_TYPE`), which
  :func:`ctfm.checkpoint.save_hf_folder` writes as ``config.json`` and :func:`ctfm.checkpoint.load_encoder`
  reads back to build a ViT.

Inputs of another size than ``img_size`` (multi-crop's local crops) are accepted when every side is a multiple
of the patch size: the learned position embeddings are resampled (trilinear) to that token grid; at ``img_size``
they are used as they are. State-dict keys are exactly MONAI's ``ViT`` keys. :class:`CTFMEmbeddingViT` is the same
network whose ``forward`` is the pooled embedding (as :class:`~ctfm.networks.CTFMEmbeddingEncoder` for the CNN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import ViT
from torch import nn

__all__ = ["FMCT_VIT", "VIT_MODEL_TYPE", "CTFMEmbeddingViT", "CTFMViT"]

#: ``config.json``'s ``model_type`` of a :class:`CTFMViT` folder (a CT-FM encoder folder has none).
VIT_MODEL_TYPE = "ctfm_vit"
#: FM-CT's ViT-B: the constructor arguments of the published architecture.
FMCT_VIT = {"img_size": (96, 96, 96), "patch_size": (12, 12, 12), "hidden_size": 768, "mlp_dim": 3072, "num_layers": 12,
            "num_heads": 12}


def _triple(v: Sequence[int] | int, spatial_dims: int) -> tuple[int, ...]:
    return tuple(int(s) for s in v) if isinstance(v, (list, tuple)) else (int(v),) * spatial_dims


class CTFMViT(ViT):
    """MONAI ``ViT`` read as a dense encoder (see the module docstring).

    Args:
        in_channels: input channels (1 for a CT in [0, 1]; 3 for FM-CT's three HU windows).
        img_size: input size the position embeddings are learned for (voxels, per axis); FM-CT 96^3.
        patch_size: patch (token) size in voxels, per axis; ``img_size`` must be a multiple of it. FM-CT 12.
        hidden_size, mlp_dim, num_layers, num_heads: transformer width, MLP width, depth, heads (FM-CT 768,
            3072, 12, 12); ``hidden_size`` must be divisible by ``num_heads``.
        spatial_dims: 3 for volumes.

    Input: ``(B, in_channels, D, H, W)``, each side a multiple of ``patch_size``.
    """

    #: State-dict key of the patch-embedding convolution, the one tensor whose shape depends on the input channels.
    stem_weight = "patch_embedding.patch_embeddings.weight"
    #: The module Grad-CAM reads: the token map ``(B, hidden_size, *grid)`` after the final LayerNorm.
    saliency_layer = "token_map"

    def __init__(
        self,
        in_channels: int = 1,
        img_size: Sequence[int] | int = FMCT_VIT["img_size"],
        patch_size: Sequence[int] | int = FMCT_VIT["patch_size"],
        hidden_size: int = FMCT_VIT["hidden_size"],
        mlp_dim: int = FMCT_VIT["mlp_dim"],
        num_layers: int = FMCT_VIT["num_layers"],
        num_heads: int = FMCT_VIT["num_heads"],
        spatial_dims: int = 3,
    ):
        img, patch = _triple(img_size, spatial_dims), _triple(patch_size, spatial_dims)
        bad = [(i, p) for i, p in zip(img, patch) if i % p]
        if bad:
            raise ValueError(f"ViT img_size {img} must be a multiple of patch_size {patch}")
        super().__init__(in_channels=in_channels, img_size=img, patch_size=patch, hidden_size=hidden_size, mlp_dim=mlp_dim,
                         num_layers=num_layers, num_heads=num_heads, classification=False, spatial_dims=spatial_dims)
        self.in_channels, self.img_size, self.patch_size = int(in_channels), img, patch
        self.hidden_size, self.mlp_dim, self.num_layers, self.num_heads = int(hidden_size), int(mlp_dim), int(num_layers), int(num_heads)
        self.spatial_dims = int(spatial_dims)
        self.token_map = nn.Identity()  # no weights: a named place for hooks on the dense map

    @property
    def config(self) -> dict:
        """The constructor arguments and ``model_type``, the layout of the Hugging Face ``config.json``."""
        return {
            "model_type": VIT_MODEL_TYPE,
            "in_channels": self.in_channels,
            "img_size": list(self.img_size),
            "patch_size": list(self.patch_size),
            "hidden_size": self.hidden_size,
            "mlp_dim": self.mlp_dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "spatial_dims": self.spatial_dims,
        }

    @property
    def embedding_dim(self) -> int:
        """Length of the pooled embedding: ``hidden_size`` (768 for FM-CT)."""
        return self.hidden_size

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """Input sides must be multiples of these (per axis): the patch size."""
        return self.patch_size

    def token_grid(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Tokens per axis for an input of ``spatial_shape`` voxels; raises ``ValueError`` unless divisible."""
        shape = tuple(int(s) for s in spatial_shape)
        if len(shape) != self.spatial_dims or any(s <= 0 or s % p for s, p in zip(shape, self.patch_size)):
            raise ValueError(f"ViT input spatial shape {shape} must be positive multiples of the patch size {self.patch_size}")
        return tuple(s // p for s, p in zip(shape, self.patch_size))

    def _position_embeddings(self, grid: tuple[int, ...]) -> torch.Tensor:
        pos = self.patch_embedding.position_embeddings  # (1, N, hidden) on the img_size grid
        own = tuple(i // p for i, p in zip(self.img_size, self.patch_size))
        if grid == own:
            return pos
        as_map = pos.transpose(1, 2).reshape(1, self.hidden_size, *own)
        mode = "trilinear" if self.spatial_dims == 3 else "bilinear"
        return F.interpolate(as_map, size=grid, mode=mode, align_corners=False).flatten(2).transpose(1, 2)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[(B, hidden_size, D / p, H / p, W / p)]``: the normalised patch tokens as one dense map."""
        grid = self.token_grid(x.shape[2:])
        tokens = self.patch_embedding.patch_embeddings(x).flatten(2).transpose(1, 2)  # (B, N, hidden)
        tokens = self.patch_embedding.dropout(tokens + self._position_embeddings(grid))
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return [self.token_map(tokens.transpose(1, 2).reshape(x.shape[0], self.hidden_size, *grid))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        return self.feature_maps(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``(B, hidden_size)``: the mean of the patch tokens."""
        return self.feature_maps(x)[-1].flatten(2).mean(-1)


class CTFMEmbeddingViT(CTFMViT):
    """:class:`CTFMViT` whose ``forward`` is :meth:`~CTFMViT.embed`: ``(B, C, D, H, W) -> (B, hidden_size)``; same
    arguments and state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.embed(x)
