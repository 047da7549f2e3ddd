"""Every network of the zoo, built on the one CT-FM encoder; no file I/O here (weights: :mod:`ctfm.weights`).

- :mod:`ctfm.networks.encoder` -- :class:`CTFMEncoder` (five feature maps) and :class:`CTFMEmbeddingEncoder`
  (pooled embedding), one state-dict layout.
- :mod:`ctfm.networks.vit` -- :class:`CTFMViT`, FM-CT's 3D ViT backbone read like the encoder (dense maps, embedding).
- :mod:`ctfm.networks.backbone` -- which backbone a description (``config.json`` layout) names: :func:`build_encoder`.
- :mod:`ctfm.networks.contrastive` -- encoder + SimCLR projection head (``ctfm_pretrain``).
- :mod:`ctfm.networks.dino` -- student and EMA teacher with DINO heads, FM-CT's recipe (``ctfm_pretrain``).
- :mod:`ctfm.networks.segresnet` -- ``SegResNetDS`` on the encoder (``ctfm_segmentation``).
- :mod:`ctfm.networks.classifier` -- encoder + per-finding classification head (``ctfm_triage``).
"""

from ctfm.networks.backbone import BACKBONES, build_encoder, size_divisor
from ctfm.networks.classifier import CTFMClassifier
from ctfm.networks.contrastive import ContrastiveModel, ProjectionHead
from ctfm.networks.dino import DINOHead, DINOModel
from ctfm.networks.encoder import SIZE_DIVISOR, CTFMEmbeddingEncoder, CTFMEncoder, check_spatial_size
from ctfm.networks.segresnet import TOTALSEG_NUM_CLASSES, CTFMSegResNetDS
from ctfm.networks.vit import CTFMEmbeddingViT, CTFMViT

__all__ = [
    "BACKBONES",
    "SIZE_DIVISOR",
    "TOTALSEG_NUM_CLASSES",
    "CTFMClassifier",
    "CTFMEmbeddingEncoder",
    "CTFMEmbeddingViT",
    "CTFMEncoder",
    "CTFMSegResNetDS",
    "CTFMViT",
    "DINOHead",
    "DINOModel",
    "ContrastiveModel",
    "ProjectionHead",
    "build_encoder",
    "check_spatial_size",
    "size_divisor",
]
