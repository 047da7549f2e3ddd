"""Per-finding classification on the CT-FM encoder (``ctfm_triage``): ``(B, C, D, H, W) -> (B, num_classes)`` logits.

Two heads on the global average of the encoder's deepest map (``embedding_dim`` = ``init_filters * 16``):

- ``"mlp"``: CT-FM's triage head, ``Linear(D, 256) -> ReLU -> Linear(256, num_classes)``;
- ``"linear"``: ``Linear(D, num_classes)``, the head a linear probe fits.

One logit per finding (multi-label, trained with BCE on logits). The encoder keeps CT-FM's state-dict keys under
``encoder.``, so every encoder weight of the table initialises it (:func:`ctfm.weights.init_encoder`); an input of
several channels (HU windows as channels) adapts a one-channel stem (:func:`~ctfm.networks.encoder.adapt_input_conv`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ctfm.networks.encoder import CTFM_BLOCKS_DOWN, CTFM_INIT_FILTERS, CTFMEncoder

__all__ = ["HEADS", "CTFMClassifier", "classification_head"]

HEADS = ("mlp", "linear")


def classification_head(kind: str, in_features: int, num_classes: int, hidden_features: int = 256) -> nn.Sequential:
    """``(B, in_features) -> (B, num_classes)``: CT-FM's MLP head (``"mlp"``) or a single linear layer."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, hidden_features), nn.ReLU(inplace=True), nn.Linear(hidden_features, num_classes))
    if kind == "linear":
        return nn.Sequential(nn.Linear(in_features, num_classes))
    raise ValueError(f"head {kind!r}: choose one of {', '.join(HEADS)}")


class CTFMClassifier(nn.Module):
    """CT-FM encoder + classification head.

    Args:
        num_classes: findings, one logit each.
        init_filters, in_channels, spatial_dims, blocks_down: the encoder's (:class:`CTFMEncoder`).
        head: ``"mlp"`` (CT-FM) or ``"linear"``.
        hidden_features: width of the MLP head's hidden layer.

    Input ``(B, in_channels, D, H, W)``, spatial sizes multiples of 16; output ``(B, num_classes)`` logits.
    """

    __jit_unused_properties__ = ["config"]

    def __init__(
        self,
        num_classes: int,
        init_filters: int = CTFM_INIT_FILTERS,
        in_channels: int = 1,
        spatial_dims: int = 3,
        blocks_down: Sequence[int] = CTFM_BLOCKS_DOWN,
        head: str = "mlp",
        hidden_features: int = 256,
    ):
        super().__init__()
        self.encoder = CTFMEncoder(init_filters, in_channels, spatial_dims, blocks_down)
        self.head = classification_head(head, self.encoder.embedding_dim, int(num_classes), int(hidden_features))
        self.num_classes = int(num_classes)
        self.head_kind = head
        self.hidden_features = int(hidden_features)

    @property
    def config(self) -> dict:
        """The constructor arguments (written as ``config.json`` of a Hugging Face folder)."""
        return {
            **self.encoder.config,
            "num_classes": self.num_classes,
            "head": self.head_kind,
            "hidden_features": self.hidden_features,
        }

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, embedding_dim)``: the pooled embedding the head reads."""
        return self.encoder.embed(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.embed(x))
