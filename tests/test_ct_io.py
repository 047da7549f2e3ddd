"""ctfm.ct_io: every supported format reads to (1, X, Y, Z) float32 HU; every kind of bad input is one CTInputError."""

import os
import shutil
import subprocess
import sys

import itk
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from monai.transforms import LoadImaged

from ctfm.ct_io import CTInputError, LoadCTd, ct_from_memory, describe, read_ct
from ctfm.errors import CTFMError
from ctfm.phantom import body_phantom, write_phantom_nifti
from ctfm.sample_data import sample_path

DICOM_SERIES = sample_path("example_ct_dicom")


def spacing_of(image: MetaTensor) -> np.ndarray:
    return np.linalg.norm(image.affine[:3, :3].numpy(), axis=0)


def test_reads_nifti_sample():
    path = sample_path("example_ct.nii.gz")
    image = read_ct(path)
    assert isinstance(image, MetaTensor)
    assert image.shape == (1, 122, 101, 112) and image.dtype == torch.float32
    np.testing.assert_allclose(image.affine.numpy(), nib.load(path).affine, atol=1e-4)
    np.testing.assert_array_equal(image[0].numpy(), nib.load(path).get_fdata().astype(np.float32))
    assert image.meta["filename_or_obj"] == str(path)


def test_reads_jpeg2000_dicom_series_in_hu():
    image = read_ct(DICOM_SERIES)
    assert image.shape == (1, 512, 512, 20) and image.dtype == torch.float32
    np.testing.assert_allclose(spacing_of(image), [0.9765625, 0.9765625, 2.0], rtol=1e-6)
    assert image.min() == -1024 and 1000 < image.max() < 3000  # air outside the scan circle; bone
    assert -100 < image[image > -500].median() < 100  # inside the body: mostly soft tissue
    # ITK reads DICOM in LPS voxel order: the RAS affine flips the first two axes.
    assert "".join(nib.orientations.aff2axcodes(image.affine.numpy())) == "LPS"
    assert "512x512x20 voxels" in describe(image) and "orientation LPS" in describe(image)

    # Known answer: the lowest slice equals pydicom's own decoding of the same file, rescaled to HU.
    slices = [pydicom.dcmread(f) for f in sorted(DICOM_SERIES.iterdir())]
    lowest = min(slices, key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = lowest.pixel_array * float(lowest.RescaleSlope) + float(lowest.RescaleIntercept)
    np.testing.assert_array_equal(image[0, :, :, 0].numpy(), hu.T.astype(np.float32))


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha", ".nii.gz"])
def test_phantom_round_trip(tmp_path, suffix):
    phantom = body_phantom(shape=(24, 20, 16), spacing=(8.0, 9.0, 10.0), seed=3)
    path = tmp_path / f"phantom{suffix}"
    if suffix == ".nii.gz":
        write_phantom_nifti(path, tmp_path / "labels.nii.gz", phantom)
    else:
        itk_image = itk.image_from_array(np.ascontiguousarray(phantom.image.transpose(2, 1, 0)))  # ITK wants (Z, Y, X)
        itk_image.SetSpacing(phantom.affine.diagonal()[:3].tolist())
        itk.imwrite(itk_image, str(path))
    image = read_ct(path)
    np.testing.assert_array_equal(image[0].numpy(), phantom.image)
    np.testing.assert_allclose(spacing_of(image), [8.0, 9.0, 10.0])
    if suffix == ".nii.gz":
        np.testing.assert_allclose(image.affine.numpy(), phantom.affine, atol=1e-5)


def test_accepts_4d_nifti_with_one_time_point(tmp_path):
    path = tmp_path / "one_frame.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8, 1), np.int16), np.eye(4)), path)
    assert read_ct(path).shape == (1, 6, 7, 8)


def test_load_ctd_behaves_like_load_imaged():
    path = sample_path("example_ct_sm.nii.gz")
    out = Compose([LoadCTd(keys="image")])({"image": str(path), "label": 3})
    assert set(out) == {"image", "label"}  # no image_meta_dict
    assert isinstance(out["image"], MetaTensor) and out["image"].shape == (1, 122, 101, 30)
    assert out["image"].meta["filename_or_obj"] == str(path)
    assert LoadCTd(keys=("image", "mask"), allow_missing_keys=True)({"image": path})["image"].shape[0] == 1


def test_load_ctd_is_found_as_the_loader_by_monai_label():
    """MONAI Label finds the loader with isinstance(t, LoadImaged) and asks it for meta dicts."""
    path = sample_path("example_ct_sm.nii.gz")
    loader = LoadCTd(keys="image")
    assert isinstance(loader, LoadImaged)
    loader._loader.image_only = False
    out = loader({"image": str(path)})
    assert out["image_meta_dict"]["filename_or_obj"] == str(path)
    assert tuple(out["image_meta_dict"]["spatial_shape"]) == (122, 101, 30)


def test_load_ctd_takes_a_volume_already_in_memory_as_monai_deploy_hands_it():
    """MONAI Deploy removes loaders named ``LoadImage*`` and passes an (X, Y, Z) MetaTensor."""
    read = read_ct(sample_path("example_ct_sm.nii.gz"))
    volume = MetaTensor(read[0].to(torch.int16), affine=read.affine, meta={"original_channel_dim": "no_channel"})
    out = LoadCTd(keys="image")({"image": volume})["image"]
    assert out.shape == read.shape and out.dtype == torch.float32
    assert torch.equal(out.as_tensor(), read.as_tensor())
    torch.testing.assert_close(out.affine, read.affine)
    assert torch.equal(ct_from_memory(read).as_tensor(), read.as_tensor())  # already channel-first: unchanged
    assert ct_from_memory(np.zeros((4, 5, 6), np.int16)).shape == (1, 4, 5, 6)


@pytest.mark.parametrize("volume, problem", [
    (np.zeros((4, 5)), "in-memory volume: 2-D array; expected one 3-D volume"),
    (np.zeros((2, 4, 5, 6)), "in-memory volume: 2 values per voxel"),
    (np.full((4, 5, 6), np.nan), "in-memory volume: image holds NaN or infinite values"),
])
def test_bad_volume_in_memory_is_one_line_ctinputerror(volume, problem):
    with pytest.raises(CTInputError, match=problem) as error:
        ct_from_memory(volume)
    assert "\n" not in str(error.value)


# ---- bad input: each builder makes a bad path under tmp_path and returns it with the expected problem ----


def save_nifti(path, array, zooms=(1.0, 1.0, 2.0)):
    nib.save(nib.Nifti1Image(array, np.diag([*zooms, 1.0])), path)
    return path


def write_metaimage(path, spacing):
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"ElementSpacing = {spacing}\nDimSize = 4 5 6\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + np.zeros(4 * 5 * 6, np.float32).tobytes())
    return path


def dicom_copy(folder, n_files=2, **changes):
    folder.mkdir()
    for source in sorted(DICOM_SERIES.iterdir())[:n_files]:
        ds = pydicom.dcmread(source)
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        ds.save_as(folder / source.name)
    return folder


def two_series(tmp_path):
    folder = dicom_copy(tmp_path / "two_series", n_files=4)
    first = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(first)
    return folder


def with_nan(tmp_path):
    array = np.zeros((6, 7, 8), np.float32)
    array[1, 2, 3] = np.nan
    return save_nifti(tmp_path / "nan.nii.gz", array)


def with_inf_mha(tmp_path):
    array = np.zeros((8, 7, 6), np.float32)
    array[1, 2, 3] = -np.inf
    path = tmp_path / "inf.mha"
    itk.imwrite(itk.image_from_array(array), str(path))
    return path


def truncated_nifti(tmp_path):
    path = save_nifti(tmp_path / "whole.nii", np.zeros((20, 20, 20), np.int16))
    cut = tmp_path / "truncated.nii"
    cut.write_bytes(path.read_bytes()[:2000])
    return cut


def empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def folder_without_dicom(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    return tmp_path / "notes"


def random_bytes(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    return path


def single_mr_file(tmp_path):
    return next(dicom_copy(tmp_path / "one", n_files=1, Modality="MR").iterdir())


BAD_INPUTS = {
    "missing": (lambda tmp: tmp / "nowhere.nii.gz", "no such file"),
    "empty folder": (empty_folder, "empty folder"),
    "folder without DICOM": (folder_without_dicom, "no DICOM"),
    "random bytes": (random_bytes, "unreadable or corrupt"),
    "truncated file": (truncated_nifti, "unreadable or corrupt"),
    "MR series": (lambda tmp: dicom_copy(tmp / "mr", Modality="MR"), "Modality is 'MR'"),
    "MR file": (single_mr_file, "Modality is 'MR'"),
    "two series": (two_series, "2 DICOM series"),
    "2-D image": (lambda tmp: save_nifti(tmp / "2d.nii.gz", np.zeros((6, 7), np.int16)), "not a 3-D volume"),
    "single slice": (lambda tmp: save_nifti(tmp / "slice.nii.gz", np.zeros((6, 7, 1), np.int16)), "not a 3-D"),
    "4-D image": (lambda tmp: save_nifti(tmp / "4d.nii.gz", np.zeros((6, 7, 8, 3), np.int16)), "3 values per voxel"),
    "NaN": (with_nan, "NaN or infinite"),
    "inf": (with_inf_mha, "NaN or infinite"),
    "tiny spacing": (lambda tmp: write_metaimage(tmp / "tiny.mha", "0.01 1 1"), "implausible voxel spacing"),
    "huge spacing": (
        lambda tmp: save_nifti(tmp / "huge.nii.gz", np.zeros((6, 7, 8), np.int16), (1.0, 1.0, 80.0)),
        "implausible voxel spacing",
    ),
    "zero spacing": (lambda tmp: write_metaimage(tmp / "zero.mha", "0 1 1"), "Zero-valued spacing"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_ctinputerror_naming_the_path(tmp_path, case):
    build, problem = BAD_INPUTS[case]
    path = build(tmp_path)
    with pytest.raises(CTInputError) as info:
        read_ct(path)
    message = str(info.value)
    assert isinstance(info.value, CTFMError)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


def test_cli_reports_bad_path_in_one_line(tmp_path):
    env = {**os.environ, "CTFM_TRACEBACK": "0"}
    bad = tmp_path / "missing.nii.gz"
    result = subprocess.run([sys.executable, "-m", "ctfm.ct_io", str(bad)], capture_output=True, text=True, env=env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: {bad}: no such file or folder"]
    assert result.stdout == ""


def test_cli_summarises_good_files_and_fails_on_any_bad_one(tmp_path):
    good = tmp_path / "ct.nii.gz"
    shutil.copy(sample_path("example_ct_sm.nii.gz"), good)
    bad = empty_folder(tmp_path)
    result = subprocess.run([sys.executable, "-m", "ctfm.ct_io", str(good), str(bad)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{good}: 122x101x30 voxels, spacing 3x3x3 mm, HU -1100..1207, orientation RAS"
    ]
    assert result.stderr.splitlines() == [f"error: {bad}: empty folder (expected a DICOM series)"]
