"""Label-guided contrast and short-series augmentations (ctfm.segmentation.augment)."""

import pytest
import torch

from ctfm.segmentation.augment import RandAxialSlabd, RandLabelContrastd
from ctfm.transforms import HU_MAX, HU_MIN

HU_RANGE = HU_MAX - HU_MIN


def sample(depth: int = 12) -> dict:
    """A scaled CT crop (1, depth, 8, 8) of soft tissue (40 HU) with labels 1, 2 and 5 and background."""
    image = torch.full((1, depth, 8, 8), (40.0 - HU_MIN) / HU_RANGE)
    label = torch.zeros(1, depth, 8, 8, dtype=torch.uint8)
    label[:, :, :3, :3], label[:, :, 4:, 4:], label[:, :, :2, 6:] = 1, 2, 5
    return {"image": image, "label": label}


def test_each_label_gets_one_offset_within_range_and_background_is_unchanged():
    data = sample()
    shift = RandLabelContrastd("image", offset_hu=(-50, 150), prob=1.0)
    shift.set_random_state(0)
    out = shift(data)
    delta_hu = (out["image"] - data["image"]) * HU_RANGE
    label = data["label"]
    assert torch.all(delta_hu[label == 0] == 0)
    offsets = []
    for i in (1, 2, 5):
        values = delta_hu[label == i]
        assert torch.allclose(values, values[0].expand_as(values), atol=1e-3), f"label {i} shifted unevenly"
        assert -50 - 1e-3 <= float(values[0]) <= 150 + 1e-3
        offsets.append(float(values[0]))
    assert len({round(o, 3) for o in offsets}) == 3, "labels must get independent offsets"


def test_contrast_shift_stays_in_the_scaled_range():
    data = sample()
    data["image"][:] = 0.999
    out = RandLabelContrastd("image", offset_hu=(100, 150), prob=1.0)(data)
    assert float(out["image"].max()) <= 1.0 and float(out["image"][data["label"] > 0].min()) == 1.0


def test_slab_keeps_consecutive_slices_and_blanks_the_rest():
    data = sample(depth=12)
    data["image"] += 0.1  # nothing is air before the cut
    cut = RandAxialSlabd(["image", "label"], depth=(4, 4), prob=1.0)
    cut.set_random_state(3)
    out = cut(data)
    kept = (out["image"][0] != 0).flatten(1).any(dim=1).nonzero().flatten().tolist()
    assert len(kept) == 4 and kept == list(range(kept[0], kept[0] + 4))
    assert torch.equal(out["image"][:, kept], data["image"][:, kept])
    assert torch.equal(out["label"][:, kept], data["label"][:, kept])
    others = [s for s in range(12) if s not in kept]
    assert torch.all(out["label"][:, others] == 0) and torch.all(out["image"][:, others] == 0)
    assert out["label"].dtype == data["label"].dtype


def test_slab_deeper_than_the_crop_keeps_everything():
    data = sample(depth=6)
    out = RandAxialSlabd(["image", "label"], depth=(10, 20), prob=1.0)(data)
    assert torch.equal(out["image"], data["image"]) and torch.equal(out["label"], data["label"])


def test_prob_zero_changes_nothing():
    data = sample()
    assert torch.equal(RandLabelContrastd("image", prob=0.0)(data)["image"], data["image"])
    out = RandAxialSlabd(["image", "label"], prob=0.0)(data)
    assert torch.equal(out["image"], data["image"]) and torch.equal(out["label"], data["label"])


@pytest.mark.parametrize(
    "make",
    [
        lambda: RandLabelContrastd("image", offset_hu=(100, -100)),
        lambda: RandAxialSlabd(["image", "label"], depth=(0, 4)),
        lambda: RandAxialSlabd(["image", "label"], depth=(8, 4)),
        lambda: RandAxialSlabd(["image", "label"], fill=[0.0]),
    ],
)
def test_bad_arguments_are_refused(make):
    with pytest.raises(ValueError):
        make()
