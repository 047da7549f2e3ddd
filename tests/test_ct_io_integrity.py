"""ctfm.ct_io input integrity: every bad input is refused from its header (or payload) before the voxels are read.

One test per kind of damage: a .nii.gz whose gzip CRC fails or that is cut short, a NIfTI without geometry, a
header declaring more voxels than a CT may have, a DICOM series with two series / gaps / duplicates / a cut
file, an integer CT without its rescale intercept, and voxel types ITK cannot read as HU. Each builds a small
bad input under ``tmp_path`` and expects a one-line ``CTInputError`` ``<path>: <problem>``.
"""

import gzip
import shutil
import struct
import subprocess
import sys
import textwrap
import time

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from ctfm.ct_io import MAX_VOXELS, CTInputError, ct_from_memory, read_ct
from ctfm.phantom import body_phantom, head_phantom, write_phantom_nifti
from ctfm.sample_data import sample_path

DICOM_SERIES = sample_path("example_ct_dicom")


def refused(path, *problems):
    """Read ``path``, expect a one-line CTInputError naming it and every one of ``problems``; return the message."""
    with pytest.raises(CTInputError) as info:
        read_ct(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and ".cxx" not in message and ".hxx" not in message, message
    for problem in problems:
        assert problem in message, message
    return message


def phantom_nifti(path, dtype=np.float32, offset=0.0, scaled=True):
    """The small body phantom (air -1000 HU, 40x36x24 voxels of 8 mm) as a NIfTI of ``dtype`` (+ ``offset``)."""
    image = body_phantom(shape=(40, 36, 24), spacing=(8.0, 8.0, 8.0), seed=1).image
    voxels = image if dtype == np.float32 else (image + offset).round().astype(dtype)
    nifti = nib.Nifti1Image(voxels, np.diag([8.0, 8, 8, 1]))
    if not scaled:
        nifti.header.set_slope_inter(1.0, 0.0)
    nib.save(nifti, path)
    return path


def header_only_nifti(path, shape, dtype=np.int16):
    """A NIfTI that is only its 348-byte header (+ 4 extension bytes), gzipped when ``path`` ends in .gz."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_zooms((1.0,) * len(shape))
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    block = header.binaryblock + b"\0" * 4
    path.write_bytes(gzip.compress(block, mtime=0) if path.name.endswith(".gz") else block)
    return path


# ---- 1. gzip damage and short payloads ----


def test_gzip_stream_with_flipped_bytes_is_refused(tmp_path):
    path = phantom_nifti(tmp_path / "flipped.nii.gz")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = bytes(b ^ 0xFF for b in data[middle : middle + 2000])
    path.write_bytes(bytes(data))
    refused(path, "unreadable or corrupt image", "gzip data damaged")


def test_gzip_crc_mismatch_is_refused(tmp_path):
    """Only the CRC-32 in the trailer differs: the deflate stream itself decodes, the check must still fail."""
    path = phantom_nifti(tmp_path / "crc.nii.gz")
    data = bytearray(path.read_bytes())
    data[-8:-4] = struct.pack("<I", struct.unpack("<I", data[-8:-4])[0] ^ 1)
    path.write_bytes(bytes(data))
    refused(path, "gzip data damaged: CRC-32 check failed")


def test_truncated_gzip_nifti_is_refused(tmp_path):
    path = phantom_nifti(tmp_path / "cut.nii.gz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(path, "unreadable or corrupt image", "compressed stream ends early")


def test_gzip_nifti_whose_payload_is_shorter_than_its_header_says_is_refused(tmp_path):
    path = header_only_nifti(tmp_path / "short.nii.gz", (20, 20, 20))  # a valid gzip: CRC and length fine
    refused(path, "truncated: the header declares 20x20x20 int16 voxels, 16000 bytes", "holds 0")


# ---- 2. NIfTI geometry ----


def with_pixdim(path, pixdim_x, qform_code=0, sform_code=0):
    """Patch an uncompressed NIfTI's pixdim[1] and qform/sform codes in place (nibabel would 'fix' pixdim 0)."""
    data = bytearray(path.read_bytes())
    data[80:84] = struct.pack("<f", pixdim_x)
    data[252:256] = struct.pack("<hh", qform_code, sform_code)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("pixdim_x", [0.0, -1.0, float("nan")])
def test_nifti_without_voxel_size_or_qform_sform_is_refused(tmp_path, pixdim_x):
    path = with_pixdim(phantom_nifti(tmp_path / "nogeom.nii"), pixdim_x)
    refused(path, "missing geometry", "no qform/sform")


def test_nifti_with_sform_but_zero_pixdim_is_refused(tmp_path):
    """ITK would silently read 1 mm spacing here whatever the sform says."""
    path = with_pixdim(phantom_nifti(tmp_path / "zero.nii"), 0.0, sform_code=2)
    refused(path, "broken geometry", "pixdim")


# ---- 3. declared voxel count, from the header alone ----


def test_1000_cubed_header_is_refused_quickly(tmp_path):
    path = header_only_nifti(tmp_path / "big.nii.gz", (1000, 1000, 1000))
    assert path.stat().st_size < 200
    start = time.perf_counter()
    refused(path, "1000x1000x1000")
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("suffix", [".nii", ".mha", ".nrrd"])
def test_20000_cubed_header_is_refused_in_our_words(tmp_path, suffix):
    path = tmp_path / f"huge{suffix}"
    if suffix == ".nii":
        header_only_nifti(path, (20000, 20000, 20000))
    elif suffix == ".mha":
        path.write_text(
            "ObjectType = Image\nNDims = 3\nBinaryData = True\nDimSize = 20000 20000 20000\n"
            "ElementSpacing = 1 1 1\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
        )
    else:
        path.write_text(
            "NRRD0004\ntype: short\ndimension: 3\nsizes: 20000 20000 20000\nspacings: 1 1 1\n"
            "endian: little\nencoding: raw\n\n"
        )
    refused(path, "header declares 20000x20000x20000 voxels", f"MAX_VOXELS = {MAX_VOXELS:.3g}")


def test_metaimage_shorter_than_its_header_is_refused_before_itk_allocates(tmp_path):
    path = tmp_path / "big.mha"
    path.write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nDimSize = 1000 1000 1000\n"
        "ElementSpacing = 1 1 1\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    refused(path, "truncated: the header declares 2000000000 bytes of voxels")


def test_cli_refuses_1000_cubed_header_fast_and_small(tmp_path):
    """``python -m ctfm.ct_io`` on the ~80-byte header: exit 1, one ``error:`` line, < 1 GB peak RSS (its time,
    mostly importing torch and MONAI, depends on the machine: no test asserts it)."""
    path = header_only_nifti(tmp_path / "big.nii.gz", (1000, 1000, 1000))
    # A fresh parent so that RUSAGE_CHILDREN sees only this one child.
    probe = textwrap.dedent(f"""
        import resource, subprocess, sys, time
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "ctfm.ct_io", {str(path)!r}], capture_output=True, text=True)
        print(r.returncode, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        sys.stderr.write(r.stderr)
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    returncode, _seconds, max_rss_kb = result.stdout.split()
    assert int(returncode) == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and "1000x1000x1000" in lines[0], lines
    assert int(max_rss_kb) < 1024 * 1024  # KB on Linux: under 1 GB (a 1000^3 read would need 2 GB + 4 GB)


# ---- 4. DICOM series ----


def copy_series(folder, files=None, prefix="", **changes):
    """Copy sample slices (all, or those named) into ``folder`` with DICOM fields changed; return the copies."""
    folder.mkdir(exist_ok=True)
    copies = []
    for source in files or sorted(DICOM_SERIES.iterdir()):
        target = folder / f"{prefix}{source.name}"
        if changes:
            ds = pydicom.dcmread(source)
            for keyword, value in changes.items():
                setattr(ds, keyword, value)
            ds.save_as(target)
        else:
            shutil.copyfile(source, target)
        copies.append(target)
    return copies


def slices_by_position():
    """The sample series' files, lowest slice (ImagePositionPatient z, mm) first."""
    def z(f):
        return float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])

    return sorted(DICOM_SERIES.iterdir(), key=z)


def test_sample_series_has_empty_uids():
    ds = pydicom.dcmread(next(DICOM_SERIES.iterdir()), stop_before_pixels=True)
    assert ds.SeriesInstanceUID == "" and ds.StudyInstanceUID == ""


@pytest.mark.parametrize("changes, field", [
    ({"PixelSpacing": [0.8, 0.8]}, "PixelSpacing"),
    ({"ImageOrientationPatient": [1, 0, 0, 0, 0, -1]}, "ImageOrientationPatient"),
    ({"SeriesDescription": "Lung 1.0", "SeriesNumber": 5}, "SeriesNumber, SeriesDescription"),
])
def test_two_anonymised_series_are_told_apart_by_geometry(tmp_path, changes, field):
    six = slices_by_position()[:6]
    folder = tmp_path / "two"
    copy_series(folder, six)
    copy_series(folder, six, prefix="b_", **changes)
    refused(folder, "folder holds 2 DICOM series", field)


def test_two_anonymised_acquisitions_on_the_same_positions_are_two_series(tmp_path):
    six = slices_by_position()[:6]
    folder = tmp_path / "two"
    copy_series(folder, six)
    copy_series(folder, six, prefix="b_", AcquisitionNumber=15)
    refused(folder, "folder holds 2 DICOM series", "AcquisitionNumber 14, 15")


def test_series_with_a_missing_slice_is_refused(tmp_path):
    ordered = slices_by_position()
    copy_series(tmp_path / "gap", ordered[:9] + ordered[10:])
    refused(tmp_path / "gap", "gap in the series", "1 slice(s) missing", ordered[8].name)


def test_series_with_a_duplicate_slice_is_refused(tmp_path):
    folder = tmp_path / "dup"
    copy_series(folder)
    shutil.copyfile(folder / slices_by_position()[5].name, folder / "copy.dcm")
    refused(folder, "duplicate slice position", "copy.dcm")


def test_series_with_uneven_spacing_is_refused(tmp_path):
    ordered = slices_by_position()
    folder = tmp_path / "uneven"
    copy_series(folder, ordered[:7] + ordered[8:])
    moved = ordered[7]
    position = [float(v) for v in pydicom.dcmread(moved, stop_before_pixels=True).ImagePositionPatient]
    copy_series(folder, [moved], ImagePositionPatient=[*position[:2], position[2] + 0.5])
    refused(folder, "uneven slice spacing", "where the others are 2 mm apart")


def test_series_with_a_truncated_slice_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "cut"
    copies = copy_series(folder)
    victim = copies[7]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    refused(folder, "truncated or corrupt DICOM file", str(victim))


# ---- 5. integer CTs without their rescale intercept ----


def test_uint16_nifti_stored_as_hu_plus_1024_is_refused(tmp_path):
    path = phantom_nifti(tmp_path / "shifted.nii.gz", np.uint16, offset=1024.0, scaled=False)
    refused(path, "air is not near -1000 HU", "rescale intercept (-1024")


def test_dicom_series_without_its_rescale_intercept_is_refused(tmp_path):
    folder = tmp_path / "nointercept"
    copy_series(folder, slices_by_position()[:3], RescaleIntercept=0)
    refused(folder, "no voxel below 0 HU", "air is not near -1000 HU")


@pytest.mark.parametrize("volume", [
    body_phantom(shape=(24, 20, 16), spacing=(8.0, 9.0, 10.0), seed=3).image,  # air -1000 HU
    head_phantom(shape=(24, 24, 20), spacing=(9.0, 9.0, 10.0), seed=2).image,  # air in the corners
    np.full((6, 7, 8), 40, np.int16),  # soft tissue only (a crop), no bone
    np.zeros((6, 7, 8), np.uint8),
])
def test_ct_like_volumes_keep_passing_the_hu_check(tmp_path, volume):
    path = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2, 2, 1])), path)
    np.testing.assert_array_equal(read_ct(path)[0].numpy(), volume.astype(np.float32))


# ---- 6. unsupported voxel types ----


@pytest.mark.parametrize("dtype, kind", [
    (np.int8, "int8"),
    (np.complex64, "complex64"),
    (np.int64, "int64"),
    (np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]), "RGB"),
])
def test_unsupported_nifti_voxel_types_are_refused_in_our_words(tmp_path, dtype, kind):
    path = tmp_path / f"{np.dtype(dtype).name}.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8), dtype), np.eye(4), dtype=dtype), path)
    refused(path, f"voxel type {kind}", "is not supported")


def test_unsupported_metaimage_voxel_type_is_refused(tmp_path):
    path = tmp_path / "int8.mha"
    path.write_bytes(
        b"ObjectType = Image\nNDims = 3\nBinaryData = True\nDimSize = 4 5 6\nElementSpacing = 1 1 1\n"
        b"ElementType = MET_CHAR\nElementDataFile = LOCAL\n" + bytes(4 * 5 * 6)
    )
    refused(path, "voxel type int8 is not supported")


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64, torch.int8])
def test_unsupported_voxel_types_in_memory_are_refused(dtype):
    with pytest.raises(CTInputError, match=f"in-memory volume: voxel type {str(dtype)[6:]} is not supported"):
        ct_from_memory(torch.zeros((4, 5, 6), dtype=dtype))


# ---- good inputs still read ----


def test_good_inputs_still_read(tmp_path):
    nifti = read_ct(sample_path("example_ct.nii.gz"))
    assert nifti.shape == (1, 122, 101, 112) and nifti.min() < -900
    series = read_ct(DICOM_SERIES)
    assert series.shape == (1, 512, 512, 20) and series.min() == -1024
    copy = tmp_path / "series"
    shutil.copytree(DICOM_SERIES, copy)
    assert torch.equal(read_ct(copy).as_tensor(), series.as_tensor())
    write_phantom_nifti(tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz", body_phantom((24, 20, 16), (8, 9, 10)))
    assert read_ct(tmp_path / "ct.nii.gz").shape == (1, 24, 20, 16)
    assert read_ct(tmp_path / "labels.nii.gz").max() > 0  # uint8 label maps are read with read_ct too
