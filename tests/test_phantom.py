"""ctfm.phantom: deterministic per seed, labels where the organs are, HU as documented."""

import nibabel as nib
import numpy as np
import pytest

from ctfm.phantom import (
    BODY_HU,
    BODY_LABELS,
    HEAD_HU,
    HEAD_LABELS,
    VERTEBRA_C1_ID,
    VERTEBRA_L5_ID,
    body_phantom,
    head_phantom,
    write_phantom_nifti,
)
from ctfm.sample_data import totalseg_classes


@pytest.fixture(scope="module")
def body():
    return body_phantom(seed=0)


def mean_hu(phantom, label):
    return float(phantom.image[phantom.labels == label].mean())


def world_centroid(phantom, label):
    """Centre of a label in RAS mm."""
    ijk = np.argwhere(phantom.labels == label).mean(axis=0)
    return phantom.affine[:3, :3] @ ijk + phantom.affine[:3, 3]


@pytest.mark.parametrize("make", [body_phantom, lambda seed: head_phantom(seed=seed, bleed=True)])
def test_same_seed_same_phantom_other_seed_other_phantom(make):
    first, again, other = make(seed=5), make(seed=5), make(seed=6)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.labels, other.labels)
    assert not np.array_equal(first.image, other.image)


def test_body_types_shapes_and_affine(body):
    assert body.image.shape == body.labels.shape == (96, 96, 64)
    assert body.image.dtype == np.float32 and body.labels.dtype == np.uint8
    np.testing.assert_allclose(np.diag(body.affine), [4.0, 4.0, 5.0, 1.0])
    np.testing.assert_allclose(body.affine[:3, :3] @ (np.array([95, 95, 63]) / 2) + body.affine[:3, 3], 0.0)
    assert "".join(nib.orientations.aff2axcodes(body.affine)) == "RAS"


def test_body_labels_are_totalsegmentator_v2_ids(body):
    classes = totalseg_classes()
    for name, label in BODY_LABELS.items():
        assert classes[label] == name
    assert classes[VERTEBRA_L5_ID] == "vertebrae_L5" and classes[VERTEBRA_C1_ID] == "vertebrae_C1"
    present = set(np.unique(body.labels).tolist()) - {0}
    assert set(BODY_LABELS.values()) <= present
    vertebrae = sorted(present - set(BODY_LABELS.values()))
    assert vertebrae == list(range(VERTEBRA_L5_ID, VERTEBRA_L5_ID + len(vertebrae))) and len(vertebrae) >= 8
    heights = [world_centroid(body, label)[2] for label in vertebrae]
    assert heights == sorted(heights)  # L5 at the bottom, counting upwards


@pytest.mark.parametrize(
    "label, hu",
    [
        (BODY_LABELS["liver"], BODY_HU["liver"]),
        (BODY_LABELS["spleen"], BODY_HU["spleen"]),
        (BODY_LABELS["kidney_left"], BODY_HU["kidney"]),
        (BODY_LABELS["kidney_right"], BODY_HU["kidney"]),
        (BODY_LABELS["aorta"], BODY_HU["aorta"]),
        (BODY_LABELS["lung_upper_lobe_left"], BODY_HU["lung"]),
    ],
)
def test_body_mean_hu_inside_each_label(body, label, hu):
    assert mean_hu(body, label) == pytest.approx(hu, abs=2.0)


def test_body_noise_vertebrae_air_and_fat(body):
    liver = body.image[body.labels == BODY_LABELS["liver"]]
    assert 10.0 < liver.std() < 20.0
    for label in range(VERTEBRA_L5_ID, VERTEBRA_L5_ID + 8):
        assert 380.0 < mean_hu(body, label) < 720.0
    assert body.image[0, 0, 0] == pytest.approx(BODY_HU["air"], abs=100)
    clean = body_phantom(seed=0, noise_hu=0.0)
    assert set(np.unique(clean.image[clean.labels == 0]).tolist()) == {
        BODY_HU["air"], BODY_HU["fat"], BODY_HU["soft_tissue"]
    }
    contrast = body_phantom(seed=0, noise_hu=0.0, contrast=True)
    assert mean_hu(contrast, BODY_LABELS["aorta"]) == BODY_HU["aorta_contrast"]


def test_body_anatomy_on_the_right_sides(body):
    right, left = world_centroid(body, BODY_LABELS["kidney_right"]), world_centroid(body, BODY_LABELS["kidney_left"])
    assert right[0] > 0 > left[0]  # RAS: +x is the patient's right
    assert world_centroid(body, BODY_LABELS["liver"])[0] > 0 > world_centroid(body, BODY_LABELS["spleen"])[0]
    assert world_centroid(body, BODY_LABELS["lung_upper_lobe_right"])[2] > right[2]  # lungs above kidneys
    assert world_centroid(body, VERTEBRA_L5_ID)[1] < world_centroid(body, BODY_LABELS["aorta"])[1]  # spine behind


def test_body_anatomy_is_laid_out_in_mm(body):
    coarse = body_phantom(shape=(48, 48, 32), spacing=(8.0, 8.0, 10.0), seed=0)
    for label in (BODY_LABELS["liver"], BODY_LABELS["lung_upper_lobe_right"]):
        fine_ml = (body.labels == label).sum() * 4 * 4 * 5 / 1000
        coarse_ml = (coarse.labels == label).sum() * 8 * 8 * 10 / 1000
        assert coarse_ml == pytest.approx(fine_ml, rel=0.15)
        np.testing.assert_allclose(world_centroid(coarse, label), world_centroid(body, label), atol=6.0)


def test_head_labels_and_hu():
    head = head_phantom(seed=1, bleed=True)
    assert head.image.shape == head.labels.shape == (64, 64, 48)
    assert set(np.unique(head.labels).tolist()) == {0, *HEAD_LABELS.values()}
    assert mean_hu(head, HEAD_LABELS["skull"]) == pytest.approx(HEAD_HU["skull"], abs=3)
    assert mean_hu(head, HEAD_LABELS["ventricles"]) == pytest.approx(HEAD_HU["csf"], abs=5)
    assert HEAD_HU["white_matter"] - 2 < mean_hu(head, HEAD_LABELS["brain"]) < HEAD_HU["grey_matter"] + 2
    assert 58.0 < mean_hu(head, HEAD_LABELS["bleed"]) < 82.0
    bleed = world_centroid(head, HEAD_LABELS["bleed"])
    assert np.linalg.norm(bleed) < 80.0  # inside the brain

    no_bleed = head_phantom(seed=1)
    assert HEAD_LABELS["bleed"] not in no_bleed.labels
    np.testing.assert_array_equal(no_bleed.labels == HEAD_LABELS["skull"], head.labels == HEAD_LABELS["skull"])


def test_write_phantom_nifti_round_trip(tmp_path):
    phantom = head_phantom(shape=(20, 22, 18), spacing=(10.0, 10.0, 12.0), seed=2, bleed=True)
    image_path, label_path = tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz"
    write_phantom_nifti(image_path, label_path, phantom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "labels.nii.gz"]  # no temporaries left
    image, labels = nib.load(image_path), nib.load(label_path)
    np.testing.assert_array_equal(image.get_fdata(dtype=np.float32), phantom.image)
    np.testing.assert_array_equal(np.asanyarray(labels.dataobj), phantom.labels)
    assert labels.get_data_dtype() == np.uint8
    for nifti in (image, labels):
        np.testing.assert_allclose(nifti.affine, phantom.affine)
        assert nifti.header["qform_code"] == nifti.header["sform_code"] == 1
