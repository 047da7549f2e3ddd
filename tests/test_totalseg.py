"""Segmentation data layouts: TotalSegmentator subjects (merge + cache), multi-label NIfTI, MSD; subsets; alignment."""

import json
import os
import shutil
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage

from ctfm.errors import CTFMError
from ctfm.sample_data import sample_path, totalseg_classes
from ctfm.segmentation.data import (
    AlignLabeld,
    RemapLabelsd,
    check_pair,
    load_segmentation_data,
    merge_subject,
    sample_evaluation_data,
    sample_training_data,
    select_subjects,
)


@pytest.fixture
def subject(tmp_path):
    """A TotalSegmentator subject folder: example_ct_sm as ct.nii.gz, the fast model's per-class masks."""
    folder = tmp_path / "data" / "s0001"
    shutil.copytree(sample_path("example_seg_fast"), folder / "segmentations")
    shutil.copy(sample_path("example_ct_sm.nii.gz"), folder / "ct.nii.gz")
    return folder


def test_merge_equals_totalsegmentators_own_label_map_and_is_cached(subject, tmp_path):
    cache = tmp_path / "cache"
    merged = merge_subject(subject, cache)
    labels = np.asanyarray(nib.load(merged).dataobj)
    expected = np.asanyarray(nib.load(sample_path("example_seg_fast.nii.gz")).dataobj) if _has_fast_map() else None
    assert labels.dtype == np.uint8 and labels.shape == (122, 101, 30)
    liver = np.asanyarray(nib.load(subject / "segmentations" / "liver.nii.gz").dataobj) > 0
    assert (labels[liver] == 5).all() and liver.sum() > 1000
    if expected is not None:
        assert np.array_equal(labels, expected)
    assert np.allclose(nib.load(merged).affine, nib.load(subject / "ct.nii.gz").affine)

    stamp = merged.stat().st_mtime_ns
    assert merge_subject(subject, cache) == merged and merged.stat().st_mtime_ns == stamp  # reused
    time.sleep(0.01)
    os.utime(subject / "segmentations" / "liver.nii.gz")  # a newer mask: rebuilt
    merge_subject(subject, cache)
    assert merged.stat().st_mtime_ns > stamp
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporaries left


def _has_fast_map() -> bool:
    try:
        sample_path("example_seg_fast.nii.gz")
        return True
    except CTFMError:
        return False


def test_mask_of_another_grid_is_refused_naming_both_files(subject, tmp_path):
    mask = subject / "segmentations" / "spleen.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), mask)
    with pytest.raises(CTFMError) as err:
        merge_subject(subject, tmp_path / "cache")
    message = str(err.value)
    assert "spleen.nii.gz" in message and "ct.nii.gz" in message and "\n" not in message
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_totalseg_layout_builds_pairs_with_all_classes(subject, tmp_path):
    data = load_segmentation_data("totalseg", subject.parent, cache_dir=tmp_path / "cache")
    assert len(data.items) == 1 and data.num_classes == 118 and data.class_names == totalseg_classes()
    assert data.items[0]["image"].endswith("ct.nii.gz") and data.items[0]["label"].startswith(str(tmp_path / "cache"))


def test_nifti_layout_reads_a_datalist_json_with_its_own_labels(tmp_path):
    datalist = tmp_path / "list.json"
    pair = {"image": str(sample_path("example_ct_sm.nii.gz")), "label": str(sample_path("example_seg.nii.gz"))}
    datalist.write_text(json.dumps({"labels": {"0": "background", "5": "liver"}, "training": [pair]}))
    data = load_segmentation_data("nifti", datalist)
    assert data.items == [pair] and data.class_names == {5: "liver"} and data.num_classes == 6


def test_msd_layout_picks_task_labels_and_renumbers(tmp_path):
    root = tmp_path / "Task07_Pancreas"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    label = np.zeros((8, 8, 4), np.uint8)
    label[2:4, 2:4, 1] = 1
    label[5:7, 5:7, 2] = 2
    for name in ("pancreas_001", "pancreas_002"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), affine), root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{name}.nii.gz")
    entries = [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in ("pancreas_001", "pancreas_002")]
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "pancreas", "2": "cancer"}, "training": entries}))

    data = load_segmentation_data("msd", root, labels=[2])
    assert data.class_names == {1: "cancer"} and data.label_mapping == {2: 1} and len(data.items) == 2
    remapped = RemapLabelsd("label", data.label_mapping)({"label": torch.as_tensor(label)[None]})["label"]
    assert set(torch.unique(remapped).tolist()) == {0, 1} and int(remapped.sum()) == 4
    everything = load_segmentation_data("msd", root / "dataset.json")
    assert everything.class_names == {1: "pancreas", 2: "cancer"} and everything.label_mapping is None
    with pytest.raises(CTFMError, match="task labels"):
        load_segmentation_data("msd", root, labels=[3])


def test_subsets_are_seeded_nested_and_checked():
    items = list(range(20))
    assert select_subjects(items) == items
    quarter = select_subjects(items, fraction=0.25, seed=3)
    half = select_subjects(items, fraction=0.5, seed=3)
    assert len(quarter) == 5 and len(half) == 10 and set(quarter) <= set(half)
    assert quarter == sorted(quarter) and select_subjects(items, fraction=0.25, seed=3) == quarter
    assert select_subjects(items, num_subjects=5, seed=3) == quarter
    assert select_subjects(items, fraction=0.01) and len(select_subjects(items, fraction=0.01)) == 1
    for bad in ({"fraction": 0.5, "num_subjects": 2}, {"fraction": 1.5}, {"num_subjects": 21}):
        with pytest.raises(CTFMError):
            select_subjects(items, **bad)


def test_label_image_shape_mismatch_is_one_line_naming_both_files():
    with pytest.raises(CTFMError) as err:  # example_seg belongs to the 30-slice crop, not the full CT
        check_pair(sample_path("example_ct.nii.gz"), sample_path("example_seg.nii.gz"))
    message = str(err.value)
    assert "example_seg.nii.gz" in message and "example_ct.nii.gz" in message and "122x101x30" in message
    with pytest.raises(CTFMError, match="example_ct.nii.gz"):
        load_segmentation_data("nifti", [{"image": str(sample_path("example_ct.nii.gz")), "label": str(sample_path("example_seg.nii.gz"))}])


def test_align_strict_refuses_and_world_resamples_a_flipped_reference():
    image = MetaTensor(torch.zeros(1, 4, 5, 6), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    image.meta["filename_or_obj"] = "ct.nii.gz"
    label = torch.zeros(1, 4, 5, 6)
    label[0, 1, 0, 2] = 7
    flip = torch.diag(torch.tensor([2.0, -2.0, 2.0, 1.0]))
    flip[1, 3] = 8.0  # same world box, y axis reversed: voxel j of the flipped map is voxel 4 - j of the image
    flipped = MetaTensor(label.flip(2), affine=flip)
    flipped.meta["filename_or_obj"] = "seg.nii.gz"
    with pytest.raises(CTFMError, match="seg.nii.gz.*ct.nii.gz"):
        AlignLabeld("label", mode="strict")({"image": image, "label": flipped})
    aligned = AlignLabeld("label", mode="world")({"image": image, "label": flipped})["label"]
    assert aligned.shape == image.shape and torch.equal(aligned.as_tensor(), label)


def test_held_out_reference_lands_on_the_liver_of_the_dicom_series():
    """dcm2niix's y-flipped reference, aligned by world coordinates, puts 'liver' on liver-like HU."""
    from ctfm.ct_io import read_ct

    pair = sample_evaluation_data()[0]
    image = read_ct(pair["image"])
    label = LoadImage(ensure_channel_first=True, image_only=True)(pair["label"])
    aligned = AlignLabeld("label", mode="world")({"image": image, "label": label})["label"]
    liver = aligned[0] == 5
    hu = image[0][liver]
    assert liver.sum() > 50_000 and 60 < float(hu.mean()) < 120 and float(hu.std()) < 40
    unaligned = image[0][torch.as_tensor(np.asarray(label[0]) == 5)]  # same voxel indices, no alignment
    assert float(unaligned.std()) > 100  # the raw voxel order is not the image's


def test_training_pair_is_the_whole_sample_ct_on_its_own_grid():
    """The default training data: all 112 slices of example_ct with labels that pass the strict grid check."""
    from ctfm.ct_io import read_ct

    pair = sample_training_data()[0]
    image = read_ct(pair["image"])
    label = LoadImage(ensure_channel_first=True, image_only=True)(pair["label"])
    aligned = AlignLabeld("label", mode="strict")({"image": image, "label": label})["label"]
    assert aligned.shape == image.shape == (1, 122, 101, 112)
    present = {int(v) for v in torch.unique(aligned.as_tensor())}
    assert {1, 2, 3, 5} <= present and len(present) == 62  # spleen, kidneys, liver; 61 structures + background
