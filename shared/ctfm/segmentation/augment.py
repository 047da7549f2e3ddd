"""Training augmentations for segmentation that MONAI lacks: contrast phases and short series.

Both act on preprocessed crops: images ``(C, S, P, L)`` already scaled by :class:`ctfm.transforms.ScaleHUd`
(HU ``[-1024, 2048]`` -> ``[0, 1]``) and label maps ``(1, S, P, L)`` on the same grid.

- :class:`RandLabelContrastd` gives every labelled structure its own random HU offset. Contrast agent raises
  organs by different amounts (in the portal venous phase the spleen gains more than the liver, vessels far
  more), so a network trained on one phase must not learn an organ from its absolute brightness.
- :class:`RandAxialSlabd` keeps a random run of axial slices and turns the rest into air. Series that cover a
  few centimetres (a liver series, a partial scan) reach the network padded with air above and below, which a
  network trained on crops of whole scans never saw.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

from ctfm.transforms import HU_MAX, HU_MIN

__all__ = ["RandAxialSlabd", "RandLabelContrastd"]


class RandLabelContrastd(RandomizableTransform, MapTransform):
    """Add an independent uniform HU offset to the voxels of each label present; background is unchanged.

    Args:
        keys: scaled CT image(s) ``(C, S, P, L)``, clipped back to [0, 1] after the shift.
        label_key: integer label map ``(1, S, P, L)`` on the image grid.
        offset_hu: ``(low, high)`` of the offset drawn per label, in HU.
        prob: probability that a sample is shifted at all.
        hu_min, hu_max: the HU range the image was scaled from (its ``[0, 1]``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        offset_hu: Sequence[float] = (-50.0, 150.0),
        prob: float = 0.5,
        hu_min: float = HU_MIN,
        hu_max: float = HU_MAX,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        low, high = (float(v) for v in offset_hu)
        if high < low:
            raise ValueError(f"offset_hu needs low <= high, got {offset_hu}")
        self.label_key = label_key
        self.offset = (low / (hu_max - hu_min), high / (hu_max - hu_min))  # in scaled units

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        label = torch.as_tensor(d[self.label_key]).long()
        ids = torch.unique(label)
        ids = ids[ids > 0]
        if ids.numel() == 0:
            return d
        lookup = torch.zeros(int(ids.max()) + 1)
        lookup[ids] = torch.as_tensor(self.R.uniform(*self.offset, size=ids.numel()), dtype=torch.float32)
        shift = lookup[label]
        for key in self.key_iterator(d):
            d[key] = (d[key] + shift.to(d[key].dtype)).clamp(0.0, 1.0)
        return d


class RandAxialSlabd(RandomizableTransform, MapTransform):
    """Keep ``depth`` consecutive axial slices (axis S, dim 1) at a random position; the rest becomes ``fill``.

    Args:
        keys: image and label keys, ``(C, S, P, L)`` each.
        depth: ``(low, high)`` number of slices kept, drawn uniformly (inclusive); clipped to the crop's depth.
        fill: value per key outside the slab: 0 for a scaled image (air, -1024 HU) and for a label (background).
        prob: probability that a sample is cut to a slab.
    """

    def __init__(
        self,
        keys: KeysCollection,
        depth: Sequence[int] = (8, 24),
        fill: float | Sequence[float] = 0.0,
        prob: float = 0.3,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.depth = (int(depth[0]), int(depth[1]))
        if not 1 <= self.depth[0] <= self.depth[1]:
            raise ValueError(f"depth needs 1 <= low <= high, got {depth}")
        fills = [fill] * len(self.keys) if isinstance(fill, (int, float)) else list(fill)
        if len(fills) != len(self.keys):
            raise ValueError(f"fill needs one value per key ({len(self.keys)}), got {fill}")
        self.fill = dict(zip(self.keys, (float(f) for f in fills)))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        slices = next(d[key].shape[1] for key in self.key_iterator(d))
        keep = min(int(self.R.randint(self.depth[0], self.depth[1] + 1)), slices)
        start = int(self.R.randint(0, slices - keep + 1))
        for key in self.key_iterator(d):
            out = torch.full_like(torch.as_tensor(d[key]), self.fill[key])
            out[:, start : start + keep] = d[key][:, start : start + keep]
            d[key] = out
        return d
