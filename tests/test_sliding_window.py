"""The label-map sliding window: MONAI's Gaussian-blended argmax, in a buffer one window deep."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose, Invertd, Orientationd, Spacingd

from ctfm.transforms import AXIS_LABELS
from ctfm.segmentation.inferer import LabelMapSlidingWindowInferer, _ring_parts, buffer_bytes, label_dtype


def small_network(num_classes: int = 13, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, num_classes, 3, padding=1)
    ).eval()


def monai_labels(x, network, roi, overlap, sw_batch_size=2):
    return SlidingWindowInferer(roi, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian")(x, network).argmax(1, keepdim=True)


@pytest.mark.parametrize(
    "shape, roi, overlap",
    [
        ((1, 1, 40, 30, 28), (16, 16, 16), 0.5),  # several rows of windows along S
        ((1, 1, 10, 50, 20), (16, 24, 24), 0.625),  # S and L smaller than the window: padded as MONAI pads
        ((2, 1, 37, 21, 33), (8, 16, 16), 0.25),  # a batch of two, uneven last window
        ((1, 1, 24, 24, 24), (16, 16, 16), 0.0),
    ],
)
def test_float32_labels_equal_argmax_of_monai(shape, roi, overlap):
    network = small_network()
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    labels = LabelMapSlidingWindowInferer(roi, overlap=overlap, sw_batch_size=2)(x, network)
    assert labels.shape == (shape[0], 1, *shape[2:]) and labels.dtype == torch.uint8
    assert torch.equal(labels.long(), monai_labels(x, network, roi, overlap))


@pytest.mark.parametrize("finalise_bytes", [1, 13 * 30 * 28 * 4 * 3])  # one row, three rows per temporary
def test_labels_finalised_in_small_blocks_equal_argmax_of_monai(monkeypatch, finalise_bytes):
    """Rows turned into labels a few at a time, across the ring buffer's wrap, give MONAI's labels."""
    monkeypatch.setattr("ctfm.segmentation.inferer.FINALISE_BYTES", finalise_bytes)
    network = small_network()
    x = torch.rand((1, 1, 40, 30, 28), generator=torch.Generator().manual_seed(2))
    labels = LabelMapSlidingWindowInferer((16, 16, 16), overlap=0.5, sw_batch_size=2)(x, network)
    assert torch.equal(labels.long(), monai_labels(x, network, (16, 16, 16), 0.5))


def test_half_precision_buffer_differs_only_at_near_ties():
    network = small_network()
    x = torch.rand(1, 1, 40, 30, 28, generator=torch.Generator().manual_seed(2))
    reference = monai_labels(x, network, (16, 16, 16), 0.5)
    scores = SlidingWindowInferer((16, 16, 16), overlap=0.5, mode="gaussian")(x, network)
    top2 = scores.topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1])[:, None]
    for dtype in ("float16", "bfloat16"):
        labels = LabelMapSlidingWindowInferer((16, 16, 16), overlap=0.5, buffer_dtype=dtype)(x, network).long()
        differ = labels != reference
        # a random network has many near-ties; every disagreement is one (fp16 ~3 digits, bf16 ~2)
        assert differ.float().mean() < 0.01
        assert margin[differ].max() < (0.01 if dtype == "float16" else 0.05) * scores.abs().max()


def test_buffer_depth_is_one_window_whatever_the_length():
    network = small_network(num_classes=5)
    shapes = []
    for length in (32, 96):
        inferer = LabelMapSlidingWindowInferer((8, 16, 16), overlap=0.5)
        inferer(torch.rand(1, 1, length, 20, 24), network)
        shapes.append(inferer.last_buffer_shape)
    assert shapes == [(5, 8, 20, 24)] * 2
    assert buffer_bytes(118, (32, 128, 128), (256, 256)) == 118 * 32 * 256 * 256 * 4


def test_deep_supervision_outputs_use_the_first_head():
    network = small_network(num_classes=4)
    x = torch.rand(1, 1, 20, 20, 20)
    inferer = LabelMapSlidingWindowInferer((16, 16, 16), overlap=0.25)
    assert torch.equal(inferer(x, lambda p: [network(p), network(p)[:, :, ::2]]), inferer(x, network))


def test_meta_data_travel_so_invertd_maps_labels_back():
    image = MetaTensor(torch.rand(1, 20, 18, 16), affine=torch.diag(torch.tensor([2.0, 1.5, 3.0, 1.0])))
    image.meta["filename_or_obj"] = "ct.nii.gz"
    preprocessing = Compose([Orientationd("image", axcodes="SPL", labels=AXIS_LABELS), Spacingd("image", pixdim=(3.0, 3.0, 3.0))])
    data = preprocessing({"image": image})
    batch = data["image"][None]
    labels = LabelMapSlidingWindowInferer((16, 16, 16), overlap=0.25)(batch, small_network(num_classes=3))
    assert isinstance(labels, MetaTensor) and labels.dtype == torch.uint8
    assert labels.meta["filename_or_obj"] == "ct.nii.gz"
    assert len(labels[0].applied_operations) == len(data["image"].applied_operations) == 2
    inverted = Invertd("pred", preprocessing, orig_keys="image", nearest_interp=True)({**data, "pred": labels[0]})
    assert inverted["pred"].shape == image.shape
    assert np.allclose(inverted["pred"].affine, image.affine)


def test_label_dtype_and_ring_parts():
    assert label_dtype(118) == torch.uint8 and label_dtype(300) == torch.int16
    assert _ring_parts(0, 8, 8) == [(slice(0, 8), slice(0, 8))]
    assert _ring_parts(12, 8, 8) == [(slice(4, 8), slice(0, 4)), (slice(0, 4), slice(4, 8))]


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="overlap"):
        LabelMapSlidingWindowInferer((16, 16, 16), overlap=1.0)
    with pytest.raises(ValueError, match="buffer_dtype"):
        LabelMapSlidingWindowInferer((16, 16, 16), buffer_dtype="int8")
    with pytest.raises(ValueError, match="inputs must be"):
        LabelMapSlidingWindowInferer((16, 16, 16))(torch.rand(1, 16, 16, 16), small_network())
