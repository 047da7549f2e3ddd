"""Which backbone a description names, and the one way to build it (timm's registry idea: architectures as data).

A backbone is described by the ``config.json`` of its Hugging Face folder, i.e. its :attr:`config`:

- no ``model_type``: CT-FM's encoder, :class:`~ctfm.networks.CTFMEncoder` (the layout CT-FM publishes), e.g.
  ``{"init_filters": 8}``; an empty description is CT-FM's published size;
- ``"model_type": "ctfm_vit"``: FM-CT's 3D ViT, :class:`~ctfm.networks.CTFMViT`.

The pre-training, triage and retrieval bundles name their backbone by such a description (the config id
``encoder``), so a bundle changes backbone with one override (``encoder_vit.json``; the pre-training bundle's
``train_dino_vit.json``), and :func:`ctfm.checkpoint.load_encoder` builds a folder's backbone
the same way. Every backbone reads alike: ``feature_maps(x)`` (dense maps, deepest last), ``embed(x)``
``(B, embedding_dim)``, ``config``, ``size_divisor`` (input sides must be multiples of it, per axis),
``stem_weight`` (the first layer's state-dict key, adapted to other input channels) and ``saliency_layer`` (the
module Grad-CAM reads).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ctfm.networks.encoder import SIZE_DIVISOR, CTFMEmbeddingEncoder, CTFMEncoder
from ctfm.networks.vit import VIT_MODEL_TYPE, CTFMEmbeddingViT, CTFMViT

__all__ = ["BACKBONES", "OUTPUTS", "build_encoder", "size_divisor"]

#: ``model_type`` -> (the class whose forward returns the dense maps, the class whose forward returns the embedding).
BACKBONES: dict[str | None, tuple[type[nn.Module], type[nn.Module]]] = {
    None: (CTFMEncoder, CTFMEmbeddingEncoder),
    VIT_MODEL_TYPE: (CTFMViT, CTFMEmbeddingViT),
}
#: What a built backbone's ``forward`` returns: its dense maps or its pooled embedding.
OUTPUTS = ("maps", "embedding")


def build_encoder(config: Mapping | None = None, output: str = "maps") -> nn.Module:
    """A new, randomly initialised backbone of the description ``config`` (see the module docstring).

    Args:
        config: the backbone's ``config.json`` layout; ``None`` or ``{}``: CT-FM's published encoder.
        output: ``"maps"`` (``forward`` returns the dense maps) or ``"embedding"`` (``(B, embedding_dim)``); the
            state-dict keys are the same.

    Raises:
        ValueError: an unknown ``model_type`` or ``output``; TypeError: an argument the backbone does not take.
    """
    arguments = dict(config or {})
    model_type = arguments.pop("model_type", None)
    if model_type not in BACKBONES:
        known = ", ".join(repr(k) for k in BACKBONES if k) + " or none (CT-FM's encoder)"
        raise ValueError(f"backbone model_type {model_type!r}: choose {known}")
    if output not in OUTPUTS:
        raise ValueError(f"backbone output {output!r}: choose one of {', '.join(OUTPUTS)}")
    return BACKBONES[model_type][OUTPUTS.index(output)](**arguments)


def size_divisor(network: object, spatial_dims: int = 3) -> tuple[int, ...]:
    """The per-axis multiples ``network``'s input sides must be: its ``size_divisor`` (a backbone's; an ONNX Runtime
    module's is that of the backbone it was exported from), else CT-FM's encoder's (16) for a runtime that does
    not say."""
    divisor = getattr(network, "size_divisor", None)
    return tuple(int(d) for d in divisor) if divisor is not None else (SIZE_DIVISOR,) * spatial_dims
