"""Where a triage network looks: Grad-CAM (MONAI's ``monai.visualize.GradCAM``) on the recipe's grid.

The CT-FM recipe stacks its HU windows along S (``(1, n * S, P, L)``): the map is folded back to ``(S, P, L)`` by
averaging the windows' segments. FM-CT's windows are channels: the map is already ``(S, P, L)``.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.visualize import GradCAM
from torch import nn

__all__ = ["fold_windows", "gradcam", "gradcam_layer"]


def gradcam_layer(network: nn.Module) -> str:
    """The module Grad-CAM reads in a classifier: its backbone's ``saliency_layer`` (CT-FM's encoder: the blocks of
    the fourth of five levels, stride 8; FM-CT's ViT: the token map after the final norm)."""
    return f"encoder.{network.encoder.saliency_layer}"


def fold_windows(volume: np.ndarray, n_windows: int) -> np.ndarray:
    """``(n * S, P, L)`` stacked along S -> ``(S, P, L)``: the mean of the ``n`` window segments."""
    if volume.shape[0] % n_windows:
        raise ValueError(f"{volume.shape[0]} slices do not split into {n_windows} stacked windows")
    return volume.reshape(n_windows, volume.shape[0] // n_windows, *volume.shape[1:]).mean(0)


def gradcam(network: nn.Module, image: torch.Tensor, class_index: int, layer: str | None = None) -> np.ndarray:
    """Grad-CAM of logit ``class_index`` for one input ``image`` ``(C, *spatial)``: ``(*spatial)`` in [0, 1]; ``layer``
    the module to read (default :func:`gradcam_layer`)."""
    was_training = network.training
    network.eval()
    device = next(network.parameters()).device
    try:
        with torch.enable_grad():
            cam = GradCAM(nn_module=network, target_layers=layer or gradcam_layer(network))
            heat = cam(torch.as_tensor(image)[None].float().to(device), class_idx=int(class_index))
    finally:
        network.train(was_training)
    return heat[0, 0].detach().cpu().numpy().astype(np.float32)
