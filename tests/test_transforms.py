"""CT-FM preprocessing: orientation, spacing, foreground crop, air padding, HU scaling, windows, inversion."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from ctfm.phantom import BODY_LABELS, body_phantom, head_phantom
from ctfm.transforms import FMCT_HEAD_WINDOWS, HEAD_CT_WINDOWS, CTFMPreprocessd, HUWindowsd, ScaleHUd


def as_dict(phantom) -> dict:
    affine = torch.as_tensor(phantom.affine)
    return {
        "image": MetaTensor(torch.as_tensor(phantom.image)[None], affine=affine),
        "label": MetaTensor(torch.as_tensor(phantom.labels)[None].float(), affine=affine),
    }


def test_scale_hu_clips_and_maps_to_unit_range():
    hu = torch.tensor([[-3000.0, -1024.0, 512.0, 2048.0, 5000.0]])
    torch.testing.assert_close(ScaleHUd("image")({"image": hu})["image"], torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))


def test_preprocessing_orients_spl_resamples_crops_and_pads_with_air():
    phantom = body_phantom(shape=(48, 40, 20), spacing=(6.0, 6.0, 8.0), seed=1)
    out = CTFMPreprocessd("image", label_keys="label", spacing=(4.0, 3.0, 3.0), min_size=(64, 32, 16))(as_dict(phantom))
    image, label = out["image"], out["label"]
    assert image.shape == label.shape
    # SPL: voxel axes 0, 1, 2 run towards superior (+z in RAS), posterior (-y) and left (-x)
    rotation = image.affine[:3, :3].numpy()
    assert np.argmax(np.abs(rotation[:, 0])) == 2 and rotation[2, 0] > 0
    assert np.argmax(np.abs(rotation[:, 1])) == 1 and rotation[1, 1] < 0
    assert np.argmax(np.abs(rotation[:, 2])) == 0 and rotation[0, 2] < 0
    np.testing.assert_allclose(np.linalg.norm(rotation, axis=0), [4.0, 3.0, 3.0], rtol=1e-5)
    assert image.shape[1] >= 64  # padded along S to the minimum size, with air (0 after scaling)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert float(image[0, 0].max()) == pytest.approx(0.0, abs=1e-6)  # first S slice is padding
    assert set(torch.unique(label).tolist()) <= {0.0, *map(float, BODY_LABELS.values()), *map(float, range(27, 51))}
    liver = image[label == BODY_LABELS["liver"]].mean() * 3072 - 1024
    assert 20 < float(liver) < 100  # the liver keeps its ~60 HU through resampling and scaling


def test_preprocessing_without_resampling_keeps_spacing():
    phantom = body_phantom(shape=(32, 32, 16), spacing=(5.0, 5.0, 5.0), seed=0)
    out = CTFMPreprocessd("image", spacing=None, crop_foreground=False)(as_dict(phantom))
    assert out["image"].shape == (1, 16, 32, 32)
    np.testing.assert_allclose(np.linalg.norm(out["image"].affine[:3, :3].numpy(), axis=0), [5.0, 5.0, 5.0])


def test_label_maps_back_to_original_space_exactly():
    phantom = body_phantom(shape=(40, 36, 18), spacing=(5.0, 5.0, 6.0), seed=2)
    preprocess = CTFMPreprocessd("image", label_keys="label", spacing=None, min_size=(32, 48, 48))
    out = preprocess(as_dict(phantom))
    out["pred"] = out["label"].clone()
    back = Invertd("pred", transform=preprocess, orig_keys="label", nearest_interp=True)(out)["pred"]
    assert back.shape == (1, 40, 36, 18)
    np.testing.assert_array_equal(back[0].numpy(), phantom.labels.astype(np.float32))


def test_fmct_head_ct_preprocessing_is_ras_at_1_mm_with_three_window_channels():
    """ctfm_pretrain's recipe_fmct.json: FM-CT's orientation, spacing and windows through the same transform."""
    phantom = head_phantom(shape=(32, 32, 24), spacing=(6.0, 6.0, 6.0), seed=0)
    out = CTFMPreprocessd("image", spacing=(2.0, 2.0, 2.0), windows=FMCT_HEAD_WINDOWS, orientation="RAS")(as_dict(phantom))["image"]
    # RAS: voxel axes 0, 1, 2 run towards +x, +y, +z of the RAS world (as the SPL test above reads its axes)
    np.testing.assert_allclose(out.affine[:3, :3].numpy(), np.diag([2.0, 2.0, 2.0]), atol=1e-5)
    assert out.shape[0] == 3 and float(out.min()) >= 0 and float(out.max()) <= 1
    spl = CTFMPreprocessd("image", spacing=(2.0, 2.0, 2.0), windows=FMCT_HEAD_WINDOWS)(as_dict(phantom))["image"]
    assert sorted(spl.shape[1:]) == sorted(out.shape[1:]) and tuple(spl.shape[1:]) != tuple(out.shape[1:])  # same voxels, other axes


def test_head_ct_windows_stack_as_channels():
    phantom = head_phantom(shape=(32, 32, 24), spacing=(6.0, 6.0, 6.0), seed=0, bleed=True)
    out = CTFMPreprocessd("image", spacing=None, windows=HEAD_CT_WINDOWS)(as_dict(phantom))["image"]
    assert out.shape[0] == 4 and float(out.min()) >= 0 and float(out.max()) <= 1
    hu = torch.tensor([[[[40.0]]]])
    blood, subdural, stroke, bone = HUWindowsd("image")({"image": hu})["image"].flatten().tolist()
    assert blood == pytest.approx(0.5) and subdural == pytest.approx(165 / 300) and stroke == 1.0
    assert bone == pytest.approx(940 / 3000)
    with pytest.raises(ValueError, match="high > low"):
        HUWindowsd("image", windows=[(80, 0)])
