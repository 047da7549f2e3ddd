"""The CT-FM encoder, defined once for every bundle of the zoo.

CT-FM's backbone is MONAI's ``SegResEncoder`` with ``blocks_down=(1, 2, 2, 4, 4)``: five levels of residual
blocks whose feature maps have ``init_filters * 2**i`` channels at stride ``2**i`` (i = 0..4). The published
model uses ``init_filters=32`` (77,760,992 parameters, 512-d embedding); a smaller width gives the same
architecture for CPU tests and demos. State-dict keys are exactly MONAI's, so published weights load without
any key surgery (see :mod:`ctfm.checkpoint`).

Two classes share those keys: :class:`CTFMEncoder`, whose forward returns the five maps (what ``SegResNetDS``
and the exporters consume), and :class:`CTFMEmbeddingEncoder`, whose forward returns the pooled embedding
(what a bundle declares as its network when its output is an embedding). Both script with TorchScript.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.segresnet_ds import SegResEncoder

__all__ = [
    "CTFM_BLOCKS_DOWN",
    "CTFM_INIT_FILTERS",
    "SIZE_DIVISOR",
    "STEM_WEIGHT",
    "CTFMEmbeddingEncoder",
    "CTFMEncoder",
    "adapt_input_conv",
    "check_spatial_size",
]

CTFM_BLOCKS_DOWN = (1, 2, 2, 4, 4)
CTFM_INIT_FILTERS = 32
#: Spatial sizes fed to the encoder must be multiples of this (four stride-2 downsamplings).
SIZE_DIVISOR = 2 ** (len(CTFM_BLOCKS_DOWN) - 1)
#: State-dict key of the encoder's first convolution, the one tensor whose shape depends on the input channels.
STEM_WEIGHT = "conv_init.weight"


class CTFMEncoder(SegResEncoder):
    """MONAI ``SegResEncoder`` with CT-FM's architecture and three ways to read it.

    Args:
        init_filters: channels of the first level; 32 is CT-FM's published size, 8 or 16 suit CPU demos.
        in_channels: input channels (1 for a CT in [0, 1]; more for stacked HU windows).
        spatial_dims: 3 for volumes.
        blocks_down: residual blocks per level; CT-FM uses ``(1, 2, 2, 4, 4)``.

    Input: ``(B, in_channels, D, H, W)`` with D, H, W divisible by :data:`SIZE_DIVISOR`.
    ``forward`` returns the five maps, shallow to deep (MONAI's contract, which ``SegResNetDS`` relies on).
    """

    __jit_unused_properties__ = ["config", "embedding_dim", "size_divisor"]
    #: State-dict key of the first convolution, adapted when the input channels differ (:func:`adapt_input_conv`).
    stem_weight = STEM_WEIGHT
    #: The module Grad-CAM reads: the blocks of the fourth of five levels (stride 8), before its downsampling (a
    #: ModuleDict level is never called itself, so hooks go on its blocks).
    saliency_layer = "layers.3.blocks"

    def __init__(
        self,
        init_filters: int = CTFM_INIT_FILTERS,
        in_channels: int = 1,
        spatial_dims: int = 3,
        blocks_down: Sequence[int] = CTFM_BLOCKS_DOWN,
    ):
        super().__init__(
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_channels,
            blocks_down=tuple(blocks_down),
        )

    @property
    def config(self) -> dict:
        """The constructor arguments, in the layout of CT-FM's Hugging Face ``config.json``."""
        return {
            "blocks_down": list(self.blocks_down),
            "in_channels": self.in_channels,
            "init_filters": self.init_filters,
            "spatial_dims": self.spatial_dims,
        }

    @property
    def embedding_dim(self) -> int:
        """Channels of the deepest map, i.e. the length of the pooled embedding (512 for CT-FM)."""
        return self.init_filters * 2 ** (len(self.blocks_down) - 1)

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """Input sides must be multiples of these (per axis): the deepest map's stride, ``2 ** (levels - 1)``
        (:data:`SIZE_DIVISOR`, 16, for CT-FM's five levels)."""
        return (2 ** (len(self.blocks_down) - 1),) * self.spatial_dims

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Dense maps, shallow to deep: ``init_filters * 2**i`` channels at stride ``2**i``."""
        if not torch.jit.is_scripting():
            check_spatial_size(x.shape[2:], self.size_divisor)
        return self._forward(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``(B, embedding_dim)``: global average of the deepest map."""
        return self.feature_maps(x)[-1].flatten(2).mean(-1)


class CTFMEmbeddingEncoder(CTFMEncoder):
    """:class:`CTFMEncoder` whose ``forward`` is :meth:`~CTFMEncoder.embed`: ``(B, C, D, H, W) -> (B, embedding_dim)``.

    Same arguments and state-dict keys as :class:`CTFMEncoder`, so every encoder checkpoint loads into it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.embed(x)


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first-convolution ``weight`` ``(out, c, *kernel)`` for ``in_channels`` inputs, keeping its response.

    ``c == 1`` to ``in_channels``: the kernel repeated on every channel and scaled by ``1 / in_channels``, so an
    input whose channels are all equal gives exactly the one-channel output (HU windows as channels on a CT-FM
    encoder pre-trained on one channel). ``in_channels == 1``: the sum over channels (the reverse). Otherwise the
    channels are repeated cyclically up to ``in_channels`` and scaled by ``c / in_channels``.
    """
    channels = weight.shape[1]
    if channels == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // channels)
    tiled = weight.repeat(1, repeats, *([1] * (weight.ndim - 2)))[:, :in_channels]
    return tiled * (channels / in_channels)


def check_spatial_size(spatial_shape: Sequence[int], divisor: Sequence[int] | int = SIZE_DIVISOR) -> None:
    """Raise ``ValueError`` unless every spatial size is a positive multiple of ``divisor`` (per axis or one for all;
    default :data:`SIZE_DIVISOR`)."""
    shape = tuple(int(s) for s in spatial_shape)
    divisors = (int(divisor),) * len(shape) if isinstance(divisor, int) else tuple(int(d) for d in divisor)
    if any(s <= 0 or s % d for s, d in zip(shape, divisors)):
        k = divisors[0] if len(set(divisors)) == 1 else list(divisors)
        raise ValueError(
            f"CT-FM encoder input spatial shape {shape} must be multiples of {k}; "
            f"pad or crop the volume first (e.g. DivisiblePadd(k={k}))"
        )
