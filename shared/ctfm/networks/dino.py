"""FM-CT's pre-training network: DINO self-distillation with iBOT-style masked image modelling, on any encoder.

:class:`DINOModel` holds a *student* (encoder + :class:`DINOHead`) and a *teacher*, a deep copy of the student that
gets no gradients: it follows the student as an exponential moving average
(:func:`ctfm.pretrain.ema.ema_update_`). The encoder is the shared :class:`~ctfm.networks.CTFMEncoder` or FM-CT's
:class:`~ctfm.networks.CTFMViT`; what is read of it is its list of dense maps, of which the deepest gives the crop
embedding (spatial mean) and the patch grid for masked image modelling (every position of that map a "patch":
stride 16 voxels for the CNN encoder, the patch size for the ViT). One head serves the crop embeddings and the patch
features (iBOT's shared head). Only the teacher's (or the student's) encoder is kept after pre-training
(:class:`ctfm.engine.ExportEncoder`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOBranch", "DINOHead", "DINOModel", "WeightNormLinear", "mask_input"]


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose weight is ``g * v / ||v||`` row by row (weight normalisation).

    ``fixed_norm=True`` (DINO's ``norm_last_layer``): ``g`` is 1 and not trained, so every row of :attr:`weight`
    has unit L2 norm. Input ``(..., in_features)`` -> ``(..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, fixed_norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fixed_norm)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``(out_features, in_features)``."""
        return self.weight_g * F.normalize(self.weight_v, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """DINO projection head: MLP ``in -> hidden -> GELU -> ... -> bottleneck``, L2 normalisation, then a
    weight-normalised linear layer onto ``num_prototypes`` logits.

    Args:
        in_features: the encoder's embedding length.
        num_prototypes: ``K``, the output logits (FM-CT: 65,536).
        hidden_features: MLP width (DINO: 2048).
        bottleneck_features: width before the last layer (DINO, FM-CT: 256).
        num_layers: linear layers of the MLP (>= 1; DINO: 3).
        norm_last_layer: fix the last layer's row norms at 1 (DINO's default).

    ``(..., in_features) -> (..., num_prototypes)``.
    """

    def __init__(self, in_features: int, num_prototypes: int = 65536, hidden_features: int = 2048, bottleneck_features: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError("DINOHead needs at least one MLP layer")
        widths = [in_features] + [hidden_features] * (num_layers - 1) + [bottleneck_features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_features, num_prototypes, fixed_norm=norm_last_layer)
        self.num_prototypes = int(num_prototypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, eps=1e-6))


class DINOBranch(nn.Module):
    """Encoder + head, one side of the distillation.

    ``forward(x, patches)``: ``x`` ``(B, C, D, H, W)`` -> ``(embedding (B, E), logits (B, K), patch_logits)``;
    ``patch_logits`` is ``(B, N, K)`` over the ``N`` positions of the deepest map (flattened in C order), or
    ``None`` when ``patches`` is false.
    """

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor, patches: bool = False):
        deepest = self.backbone.feature_maps(x)[-1]  # (B, E, g1, g2, g3)
        tokens = deepest.flatten(2).transpose(1, 2)  # (B, N, E)
        embedding = tokens.mean(1)
        logits = self.head(embedding)
        return embedding, logits, (self.head(tokens) if patches else None)


def mask_input(x: torch.Tensor, masks: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``x`` ``(B, C, D, H, W)`` with the voxels of masked patches set to ``fill``.

    ``masks``: ``(B, g1, g2, g3)`` bool on the patch grid; each position covers ``D / g1 x H / g2 x W / g3`` voxels
    (the sizes must divide).
    """
    size = tuple(int(s) for s in x.shape[2:])
    grid = tuple(int(g) for g in masks.shape[1:])
    if len(size) != len(grid) or any(s % g for s, g in zip(size, grid)):
        raise ValueError(f"mask grid {grid} does not divide the input size {size}")
    voxels = masks
    for axis, (s, g) in enumerate(zip(size, grid)):
        voxels = voxels.repeat_interleave(s // g, dim=axis + 1)
    return x.masked_fill(voxels.unsqueeze(1), fill)


class DINOModel(nn.Module):
    """Student and teacher for DINO + masked image modelling (see the module docstring).

    Args:
        backbone: the encoder (any module with ``feature_maps(x) -> list of (B, E, ...) maps`` and ``embedding_dim``).
        num_prototypes, hidden_features, bottleneck_features, num_layers: of the :class:`DINOHead`.
        mask_fill: the value masked input voxels take (inputs are in [0, 1]; 0 is air).

    ``forward(global_crops, local_crops=None, masks=None)``:

    - ``global_crops`` ``(2B, C, *G)``, crop-major (all scans' first global crop, then all second ones);
    - ``local_crops`` ``(LB, C, *L)`` crop-major, or ``None``;
    - ``masks`` ``(2B, *grid)`` bool on the deepest map's grid of the global crops, or ``None`` (no masked image
      modelling: no patch logits are computed).

    The student sees the masked global crops and the local crops, the teacher the unmasked global crops (without
    gradients). Returns a dict: ``student`` ``((2 + L) B, K)`` logits (globals first), ``teacher`` ``(2B, K)``,
    ``teacher_embedding`` ``(2B, E)``, and with ``masks`` also ``student_patches``, ``teacher_patches``
    ``(2B, N, K)`` and ``masks`` ``(2B, N)``.
    """

    def __init__(self, backbone: nn.Module, num_prototypes: int = 65536, hidden_features: int = 2048, bottleneck_features: int = 256,
                 num_layers: int = 3, mask_fill: float = 0.0):
        super().__init__()
        head = DINOHead(backbone.embedding_dim, num_prototypes, hidden_features, bottleneck_features, num_layers)
        self.student = DINOBranch(backbone, head)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.mask_fill = float(mask_fill)

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None, masks: torch.Tensor | None = None) -> dict:
        mim = masks is not None
        seen = mask_input(global_crops, masks, self.mask_fill) if mim else global_crops
        _, student, student_patches = self.student(seen, patches=mim)
        if local_crops is not None and local_crops.shape[0]:
            student = torch.cat([student, self.student(local_crops)[1]])
        with torch.no_grad():
            teacher_embedding, teacher, teacher_patches = self.teacher(global_crops, patches=mim)
        out = {"student": student, "teacher": teacher, "teacher_embedding": teacher_embedding}
        if mim:
            n = math.prod(masks.shape[1:])
            if student_patches.shape[1] != n:
                raise ValueError(f"mask grid {tuple(masks.shape[1:])} ({n} positions) is not the encoder's deepest map "
                                 f"({student_patches.shape[1]} positions): set the mask grid to the crop size / the map's stride")
            out |= {"student_patches": student_patches, "teacher_patches": teacher_patches, "masks": masks.flatten(1)}
        return out
