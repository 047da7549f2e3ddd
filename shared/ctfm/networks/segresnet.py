"""CT-FM's segmentation network: MONAI's ``SegResNetDS`` whose encoder is the shared :class:`CTFMEncoder`.

The encoder has the same definition and state-dict keys as MONAI's ``SegResEncoder``, so CT-FM's published
segmentation checkpoints (``ct_fm_segresnet``, ``whole_body_segmentation``) and every encoder layout of
:mod:`ctfm.checkpoint` load without key surgery. No weights are read here: :func:`ctfm.weights.init_encoder`
initialises ``.encoder`` from a pre-trained encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import SegResNetDS

from ctfm.networks.encoder import CTFM_BLOCKS_DOWN, CTFM_INIT_FILTERS, CTFMEncoder

__all__ = ["TOTALSEG_NUM_CLASSES", "CTFMSegResNetDS"]

#: TotalSegmentator v2: 117 structures + background.
TOTALSEG_NUM_CLASSES = 118


class CTFMSegResNetDS(SegResNetDS):
    """``SegResNetDS`` on the CT-FM encoder: ``(B, in_channels, S, P, L)`` in [0, 1] -> class logits.

    Args:
        init_filters: channels of the first level (CT-FM: 32; the shipped demo: 8).
        in_channels: input channels (1 for a CT scaled from [-1024, 2048] HU to [0, 1]).
        out_channels: classes including background (TotalSegmentator v2: 118).
        dsdepth: decoder levels with a deep-supervision head (CT-FM: 4). In ``train()`` the forward returns
            ``dsdepth`` logit maps ``(B, out_channels, ...)``, full resolution first, each halving the previous;
            in ``eval()`` only the first.
        blocks_down: residual blocks per encoder level (CT-FM: ``(1, 2, 2, 4, 4)``).
        upsample_mode: decoder upsampling (MONAI's default ``"deconv"``, as CT-FM).

    Spatial input sizes must be multiples of 16 (four stride-2 levels).
    """

    __jit_unused_properties__ = ["config"]

    def __init__(
        self,
        init_filters: int = CTFM_INIT_FILTERS,
        in_channels: int = 1,
        out_channels: int = TOTALSEG_NUM_CLASSES,
        dsdepth: int = 4,
        blocks_down: Sequence[int] = CTFM_BLOCKS_DOWN,
        upsample_mode: str = "deconv",
    ):
        super().__init__(
            spatial_dims=3,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=out_channels,
            blocks_down=tuple(blocks_down),
            dsdepth=dsdepth,
            upsample_mode=upsample_mode,
        )
        self.encoder = CTFMEncoder(init_filters=init_filters, in_channels=in_channels, blocks_down=blocks_down)
        self.upsample_mode = str(upsample_mode)

    @property
    def config(self) -> dict:
        """The constructor arguments, in the layout of CT-FM's ``whole_body_segmentation`` ``config.json``."""
        return {
            "blocks_down": list(self.encoder.blocks_down),
            "dsdepth": self.dsdepth,
            "in_channels": self.encoder.in_channels,
            "init_filters": self.encoder.init_filters,
            "out_channels": self.out_channels,
            "spatial_dims": 3,
            "upsample_mode": self.upsample_mode,
        }
