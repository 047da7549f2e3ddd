"""ctfm.datalist: dataset_dir + datalist as the model zoo writes them, and output names that never collide."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from ctfm.datalist import find_inputs, output_stem
from ctfm.errors import CTFMError
from ctfm.sample_data import sample_dir, sample_path
from ctfm.segmentation.outputs import WriteSegmentationd


def write_ct(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), value, np.int16), np.eye(4)), path)
    return path


def images(datalist):
    return [item["image"] for item in datalist]


def test_zoo_layouts(tmp_path):
    for name in ("a", "b"):
        write_ct(tmp_path / "imagesTs" / f"{name}.nii.gz")
        write_ct(tmp_path / "labelsTs" / f"{name}.nii.gz")  # never taken for a CT
    expected = [str(tmp_path / "imagesTs" / f"{n}.nii.gz") for n in ("a", "b")]
    assert images(find_inputs(tmp_path)) == expected  # imagesTs/ of the zoo's layout
    assert images(find_inputs(tmp_path, "imagesTs/*.nii.gz")) == expected  # the zoo's glob
    assert images(find_inputs(tmp_path, ["imagesTs/b.nii.gz"])) == expected[1:]  # a list, relative to dataset_dir
    assert images(find_inputs(tmp_path, str(tmp_path / "imagesTs" / "a.nii.gz"))) == expected[:1]  # one file
    (tmp_path / "dataset.json").write_text(json.dumps({"test": ["imagesTs/b.nii.gz"], "training": []}))
    assert images(find_inputs(tmp_path)) == expected[1:]  # MSD's dataset.json wins


def test_shipped_sample_folder_reads_as_an_msd_dataset():
    assert images(find_inputs(sample_dir())) == [str(sample_path("example_ct.nii.gz")), str(sample_path("example_ct_dicom"))]
    training = find_inputs(sample_dir(), section="training")
    assert training == [{"image": str(sample_path("example_ct.nii.gz")), "label": str(sample_path("example_seg_fast_force_split.nii.gz"))}]


@pytest.mark.parametrize(
    "datalist, message",
    [("imagesTs/*.nii.gz", "matches no file"), ("missing.nii.gz", "no such datalist JSON or folder"), ([], "empty datalist")],
)
def test_bad_datalists_are_one_line(tmp_path, datalist, message):
    with pytest.raises(CTFMError, match=message) as err:
        find_inputs(tmp_path, datalist)
    assert "\n" not in str(err.value)
    with pytest.raises(CTFMError, match="no such dataset_dir"):
        find_inputs(tmp_path / "nowhere")


def test_output_stems_keep_the_folders_under_the_root(tmp_path):
    assert output_stem(tmp_path / "s1" / "ct.nii.gz", tmp_path) == "s1/ct"
    assert output_stem(tmp_path / "series", tmp_path) == "series"  # a DICOM series folder
    assert output_stem(tmp_path / "s1" / "ct.nii.gz") == "ct"
    assert output_stem("/elsewhere/ct.nrrd", tmp_path) == "ct"
    assert output_stem(tmp_path / "ct.mha", tmp_path / "list.json") == "ct"  # a file as root: its folder


def label_map(source) -> MetaTensor:
    return MetaTensor(torch.ones(1, 4, 4, 4), affine=torch.eye(4), meta={"filename_or_obj": str(source)})


def test_two_inputs_with_one_file_name_get_two_outputs(tmp_path):
    """TotalSegmentator's layout: s1/ct.nii.gz and s2/ct.nii.gz."""
    sources = [write_ct(tmp_path / "data" / s / "ct.nii.gz") for s in ("s1", "s2")]
    writer = WriteSegmentationd(output_dir=tmp_path / "out", data_root_dir=tmp_path / "data", preview=False)
    for source in sources:
        writer({"pred": label_map(source)})
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.nii.gz")) == [
        "s1/ct_seg.nii.gz", "s2/ct_seg.nii.gz",
    ]


def test_an_output_of_another_input_is_never_overwritten(tmp_path):
    first, second = write_ct(tmp_path / "a" / "ct.nii.gz"), write_ct(tmp_path / "b" / "ct.nii.gz", 5)
    writer = WriteSegmentationd(output_dir=tmp_path / "out", preview=False)  # no data_root_dir: names only
    writer({"pred": label_map(first)})
    written = (tmp_path / "out" / "ct_seg.nii.gz").read_bytes()
    with pytest.raises(CTFMError, match="is the output of another input"):
        writer({"pred": label_map(second)})
    later_run = WriteSegmentationd(output_dir=tmp_path / "out", preview=False)
    with pytest.raises(CTFMError, match="is the output of another input"):
        later_run({"pred": label_map(second)})
    assert (tmp_path / "out" / "ct_seg.nii.gz").read_bytes() == written
    later_run({"pred": label_map(first)})  # the same input again: replaced
    (tmp_path / "out" / "foreign_seg.nii.gz").write_bytes(written[:10])
    with pytest.raises(CTFMError, match="does not say which input"):
        later_run({"pred": label_map(write_ct(tmp_path / "foreign.nii.gz"))})
