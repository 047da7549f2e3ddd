"""CT-FM's pre-training network: the shared encoder with a SimCLR projection head.

``ContrastiveModel(backbone)`` maps ``(B, C, D, H, W)`` crops to ``(B, out_features)`` projections; only the
backbone is kept after pre-training (see :class:`ctfm.engine.ExportEncoder`).
"""

from __future__ import annotations

import torch
from torch import nn

from ctfm.networks.encoder import CTFMEncoder

__all__ = ["ContrastiveModel", "ProjectionHead"]


class ProjectionHead(nn.Sequential):
    """SimCLR projection head of CT-FM pre-training: ``in -> hidden -> ReLU -> out``, no BatchNorm."""

    def __init__(self, in_features: int = 512, hidden_features: int = 256, out_features: int = 128):
        super().__init__(
            nn.Linear(in_features, hidden_features), nn.ReLU(inplace=True), nn.Linear(hidden_features, out_features)
        )


class ContrastiveModel(nn.Module):
    """Encoder + projection head, the module pre-training optimises: ``(B, C, D, H, W) -> (B, out_features)``."""

    def __init__(self, backbone: CTFMEncoder, projection_head: ProjectionHead | None = None):
        super().__init__()
        self.backbone = backbone
        self.projection_head = projection_head or ProjectionHead(backbone.embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone.embed(x))
