"""Per-finding classification on a backbone of the zoo (``ctfm_triage``): ``(B, C, D, H, W) -> (B, num_classes)`` logits.

Two heads on the backbone's pooled embedding (``embedding_dim``: ``init_filters * 16`` for CT-FM's encoder,
``hidden_size`` for FM-CT's ViT):

- ``"mlp"``: CT-FM's triage head, ``Linear(D, 256) -> ReLU -> Linear(256, num_classes)``;
- ``"linear"``: ``Linear(D, num_classes)``, the head a linear probe fits.

One logit per finding (multi-label, trained with BCE on logits). The backbone keeps its own state-dict keys under
``encoder.``, so every encoder weight of the table initialises it (:func:`ctfm.weights.init_encoder`); an input of
several channels (HU windows as channels) adapts a one-channel stem (:func:`~ctfm.networks.encoder.adapt_input_conv`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ctfm.networks.backbone import build_encoder

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
    """Backbone + classification head.

    Args:
        num_classes: findings, one logit each.
        encoder: the backbone's description (:func:`~ctfm.networks.build_encoder`), e.g. ``{"init_filters": 8,
            "in_channels": 1}`` for CT-FM's encoder or ``{"model_type": "ctfm_vit", "in_channels": 3, ...}`` for
            FM-CT's ViT; ``None``: CT-FM's published encoder.
        head: ``"mlp"`` (CT-FM) or ``"linear"``.
        hidden_features: width of the MLP head's hidden layer.

    Input ``(B, in_channels, D, H, W)``, spatial sizes multiples of the backbone's ``size_divisor`` (16 for CT-FM's
    encoder, the patch size for the ViT); output ``(B, num_classes)`` logits.
    """

    __jit_unused_properties__ = ["config", "size_divisor"]

    def __init__(self, num_classes: int, encoder: Mapping | None = None, head: str = "mlp", hidden_features: int = 256):
        super().__init__()
        self.encoder = build_encoder(encoder)
        self.head = classification_head(head, self.encoder.embedding_dim, int(num_classes), int(hidden_features))
        self.num_classes = int(num_classes)
        self.head_kind = head
        self.hidden_features = int(hidden_features)

    @property
    def config(self) -> dict:
        """The backbone's description and the head's arguments, flat (written as ``config.json`` of a Hugging Face
        folder)."""
        return {
            **self.encoder.config,
            "num_classes": self.num_classes,
            "head": self.head_kind,
            "hidden_features": self.hidden_features,
        }

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """The backbone's: input sides must be multiples of these (per axis)."""
        return self.encoder.size_divisor

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, embedding_dim)``: the pooled embedding the head reads."""
        return self.encoder.embed(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.embed(x))
