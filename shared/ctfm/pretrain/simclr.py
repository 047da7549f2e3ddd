"""CT-FM's intra-sample contrastive pre-training (SimCLR within one scan).

Per scan, ``num_crops`` random crops; two augmented views of each. The anchor is view 0 of crop ``i``, its
positive view 1 of crop ``i``, and the negatives are both views of every other crop of the SAME scan: no
cross-scan negatives, hence no all-gather under DDP. These pieces plug into MONAI's ``SupervisedTrainer``:
:class:`IntraSampleViewsd` makes the views, :func:`prepare_views` flattens a batch for the network and
:class:`IntraSampleNTXentLoss` scores the projections.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    MapTransform,
    RandFlip,
    RandGaussianSmooth,
    RandHistogramShift,
    Randomizable,
    RandScaleCrop,
    RandSpatialCrop,
    Resize,
)
from monai.utils import convert_to_tensor
from torch import nn

__all__ = ["VIEW_KEYS", "IntraSampleNTXentLoss", "IntraSampleViewsd", "prepare_views", "view_augmentations"]

VIEW_KEYS = ("view0", "view1")


def view_augmentations() -> list:
    """CT-FM's augmentations of a view after its crop, new instances each call: flip along S-I (p=0.5), histogram
    shift with 5 control points (p=0.5), Gaussian smoothing (p=0.5). Channel-first tensors in [0, 1]."""
    return [RandFlip(prob=0.5, spatial_axis=0), RandHistogramShift(num_control_points=5, prob=0.5), RandGaussianSmooth(prob=0.5)]


class IntraSampleViewsd(Randomizable, MapTransform):
    """Cut ``num_crops`` random crops from one preprocessed scan and make two augmented views of each.

    Input ``d[key]``: ``(C, S, P, L)`` in [0, 1], at least ``crop_size`` on every axis (pad first).
    Output ``d["view0"]``, ``d["view1"]``: ``(num_crops, C, *crop_size)`` float32; ``d[key]`` is dropped to
    keep batches small.

    Views follow CT-FM: random resized crop (scale ``min_scale``..1 per axis, resized back, always), then
    :func:`view_augmentations` (flip along S-I, histogram shift, Gaussian smoothing, each p=0.5).
    """

    def __init__(self, keys: str = "image", num_crops: int = 15, crop_size: Sequence[int] = (32, 128, 128), min_scale: float = 0.33):
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError("IntraSampleViewsd takes one image key")
        self.num_crops = int(num_crops)
        self.crop_size = tuple(int(s) for s in crop_size)
        self.crop = RandSpatialCrop(self.crop_size, random_size=False)
        self.view = Compose(
            [
                RandScaleCrop(min_scale, max_roi_scale=1.0, random_size=True),
                Resize(self.crop_size, mode="trilinear"),
                *view_augmentations(),
            ]
        )

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.crop.set_random_state(state=self.R)
        self.view.set_random_state(state=self.R)
        return self

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image = convert_to_tensor(d.pop(self.keys[0]), dtype=torch.float32, track_meta=False)
        short = [(n, s) for n, s in zip(image.shape[1:], self.crop_size) if n < s]
        if short:
            raise ValueError(f"scan of shape {tuple(image.shape)} is smaller than crop {self.crop_size}; pad it first")
        views: list[list[torch.Tensor]] = [[], []]
        for _ in range(self.num_crops):
            crop = self.crop(image, lazy=False)
            for v in views:
                v.append(convert_to_tensor(self.view(crop), dtype=torch.float32, track_meta=False))
        d[VIEW_KEYS[0]], d[VIEW_KEYS[1]] = (torch.stack(v) for v in views)
        return d


def prepare_views(batchdata: dict, device=None, non_blocking: bool = False, **kwargs) -> tuple[torch.Tensor, None]:
    """``prepare_batch`` for ``SupervisedTrainer``: views ``(B, N, C, ...)`` x 2 -> ``(B * 2N, C, ...)``.

    Order is scan-major, then view, then crop, which :class:`IntraSampleNTXentLoss` relies on. There is no
    target: the loss is self-supervised.
    """
    views = torch.stack([torch.as_tensor(batchdata[k]) for k in VIEW_KEYS], dim=1)  # (B, 2, N, C, ...)
    return views.flatten(0, 2).to(device=device, non_blocking=non_blocking, **kwargs), None


class IntraSampleNTXentLoss(nn.Module):
    """NT-Xent over the crops of each scan separately.

    Args:
        num_crops: crops per scan ``N``; the input holds ``B * 2 * N`` projections ordered as
            :func:`prepare_views` makes them.
        temperature: softmax temperature (CT-FM: 0.1).

    For each scan, the ``2N`` projections are L2-normalised; each one's positive is the other view of its
    crop and its negatives are the remaining ``2N - 2`` projections; the loss is the mean cross-entropy over
    all ``2N`` anchors of all scans (both directions, as SimCLR). Lower bound 0, chance level ``log(2N - 1)``.
    """

    def __init__(self, num_crops: int, temperature: float = 0.1):
        super().__init__()
        self.num_crops = int(num_crops)
        self.temperature = float(temperature)

    def forward(self, projections: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        n = self.num_crops
        if projections.ndim != 2 or projections.shape[0] % (2 * n):
            raise ValueError(f"expected (B * 2 * {n}, D) projections, got {tuple(projections.shape)}")
        z = F.normalize(projections.float(), dim=1).view(-1, 2 * n, projections.shape[1])  # (B, 2N, D)
        logits = z @ z.transpose(1, 2) / self.temperature  # (B, 2N, 2N)
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        positive = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
        return F.cross_entropy(logits.flatten(0, 1), positive.repeat(z.shape[0]))
