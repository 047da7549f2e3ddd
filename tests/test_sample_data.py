"""ctfm.sample_data: the packaged TotalSegmentator samples are intact, documented and re-creatable."""

import io
import os
import shutil
import subprocess
import sys
import tarfile

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Orientation

from ctfm import sample_data
from ctfm.ct_io import read_ct
from ctfm.errors import CTFMError
from ctfm.sample_data import (
    SAMPLES,
    extract_samples,
    sample_dir,
    sample_path,
    total_class_map,
    totalseg_classes,
    verify,
)


def test_installed_samples_match_sha256sums():
    listed = (sample_dir() / "SHA256SUMS").read_text().splitlines()
    assert verify() == len(listed) == 147  # 5 NIfTI + 20 DICOM + 117 masks + licence, classes, codes, dataset, SOURCE.md
    assert all(line.split("  ")[1] != "SHA256SUMS" for line in listed)


def test_verify_names_changed_missing_and_unlisted_files(tmp_path):
    copy = tmp_path / "samples"
    shutil.copytree(sample_dir(), copy)
    (copy / "example_seg_fast" / "liver.nii.gz").write_bytes(b"changed")
    (copy / "example_ct_dicom" / sorted(os.listdir(copy / "example_ct_dicom"))[0]).unlink()
    (copy / "extra.txt").write_text("stray")
    with pytest.raises(CTFMError) as info:
        verify(copy)
    message = str(info.value)
    assert message.startswith(f"{copy}: 3 files fail SHA256SUMS")
    assert "liver.nii.gz (changed)" in message and "(missing)" in message and "extra.txt (not listed)" in message


def test_sample_paths_and_unknown_names():
    for name in SAMPLES:
        assert sample_path(name).exists()
    assert sample_path("example_seg_fast/liver.nii.gz").is_file()
    assert len(list(sample_path("example_ct_dicom").iterdir())) == 20
    for bad in ("nope.nii.gz", "../errors.py", "example_seg_fast/../../errors.py", "SHA256SUMS"):
        with pytest.raises(CTFMError, match="no such sample; available: example_ct.nii.gz, example_ct_dicom"):
            sample_path(bad)


def test_totalseg_classes():
    classes = totalseg_classes()
    assert sorted(classes) == list(range(1, 118))
    assert classes[1] == "spleen" and classes[5] == "liver" and classes[52] == "aorta"
    assert classes[117] == "costal_cartilages"
    masks = {p.name.removesuffix(".nii.gz") for p in sample_path("example_seg_fast").iterdir()}
    assert masks == set(classes.values())


def test_source_md_documents_origin_and_caveats():
    source = (sample_dir() / "SOURCE.md").read_text()
    assert sample_data.SDIST_SHA256["2.18.0"] in source and "Apache-2.0" in source
    assert "not ground truth" in source and "NOT updated after the" in source and "dcm2niix" in source
    for name in SAMPLES:
        assert f"totalsegmentator-2.18.0/tests/reference_files/{name}" in source


def test_example_ct_sm_is_slices_82_to_112_with_the_uncropped_affine():
    ct, small = nib.load(sample_path("example_ct.nii.gz")), nib.load(sample_path("example_ct_sm.nii.gz"))
    np.testing.assert_array_equal(np.asarray(small.dataobj), np.asarray(ct.dataobj)[:, :, 82:112])
    np.testing.assert_allclose(small.affine, ct.affine)
    assert nib.load(sample_path("example_seg.nii.gz")).shape == small.shape


def test_force_split_labels_cover_the_whole_example_ct_and_match_the_crop_labels():
    ct, labels = nib.load(sample_path("example_ct.nii.gz")), nib.load(sample_path("example_seg_fast_force_split.nii.gz"))
    assert labels.shape == ct.shape
    np.testing.assert_allclose(labels.affine, ct.affine)
    full, crop = np.asarray(labels.dataobj), np.asarray(nib.load(sample_path("example_seg.nii.gz")).dataobj)
    assert full[:, :, :82].any()  # labels beyond the 30 slices that example_seg covers
    overlap = (full[:, :, 82:112] > 0) | (crop > 0)
    assert (full[:, :, 82:112] == crop)[overlap].mean() > 0.9  # the fast model mostly agrees with the full one


def test_dicom_segmentation_lines_up_only_in_a_common_orientation():
    ras = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
    ct, seg = read_ct(sample_path("example_ct_dicom")), read_ct(sample_path("example_seg_dicom.nii.gz"))
    ct_ras, seg_ras = ras(ct), ras(seg)
    np.testing.assert_allclose(ct_ras.affine.numpy(), seg_ras.affine.numpy(), atol=1e-3)
    liver, spleen = 5, 1
    assert 60 < ct_ras[seg_ras == liver].mean() < 120  # contrast-enhanced liver
    assert 50 < ct_ras[seg_ras == spleen].mean() < 120
    assert ct[seg == liver].mean() < 0  # the raw arrays differ by a flip of the y axis


# ---- extraction from an sdist, offline: a fake sdist with the same layout ----

CLASS_MAP_SOURCE = """
class_map = {
    "total_v1": {1: "spleen", 2: "kidney"},
    "total": {1: "spleen", 2: "kidney_right", 5: "liver"},
}
class_map["total_v3"] = class_map["total"].copy()
"""


def add_file(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def fake_sdist(path, extra=()):
    root = "totalsegmentator-2.18.0"
    reference = f"{root}/tests/reference_files"
    with tarfile.open(path, "w:gz") as tar:
        add_file(tar, f"{root}/LICENSE", b"Apache License 2.0\n")
        add_file(tar, f"{root}/totalsegmentator/map_to_binary.py", CLASS_MAP_SOURCE.encode())
        add_file(tar, f"{root}/totalsegmentator/resources/totalsegmentator_snomed_mapping.csv", b"Structure\nspleen\n")
        add_file(tar, f"{root}/setup.py", b"# not wanted\n")
        for name in ("example_ct.nii.gz", "example_ct_sm.nii.gz", "example_seg.nii.gz",
                     "example_seg_fast_force_split.nii.gz", "example_seg_dicom.nii.gz"):
            add_file(tar, f"{reference}/{name}", name.encode())
        add_file(tar, f"{reference}/example_mr_sm.nii.gz", b"not wanted")
        add_file(tar, f"{reference}/example_ct_dicom/CT.1", b"dicom 1")
        add_file(tar, f"{reference}/example_ct_dicom/CT.2", b"dicom 2")
        add_file(tar, f"{reference}/example_seg_fast/liver.nii.gz", b"liver mask")
        add_file(tar, f"{reference}/example_seg_fast/statistics.json", b"{}")
        for member in extra:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return path


def test_extract_samples_from_an_sdist(tmp_path):
    dest = extract_samples(fake_sdist(tmp_path / "sdist.tar.gz"), tmp_path / "samples")
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == [
        "LICENSE.TotalSegmentator", "SHA256SUMS", "SOURCE.md", "dataset.json",
        "example_ct.nii.gz", "example_ct_dicom/CT.1", "example_ct_dicom/CT.2", "example_ct_sm.nii.gz",
        "example_seg.nii.gz", "example_seg_dicom.nii.gz", "example_seg_fast/liver.nii.gz",
        "example_seg_fast_force_split.nii.gz", "totalseg_classes.json", "totalsegmentator_snomed_mapping.csv",
    ]  # fmt: skip
    assert (dest / "example_ct_dicom" / "CT.2").read_bytes() == b"dicom 2"
    assert (dest / "totalseg_classes.json").read_text().count(":") == 3
    assert verify(dest) == len(files) - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples", "sdist.tar.gz"]  # no temporaries left


def test_total_class_map_is_parsed_not_imported():
    assert total_class_map(CLASS_MAP_SOURCE) == {1: "spleen", 2: "kidney_right", 5: "liver"}
    with pytest.raises(CTFMError, match="no literal class_map"):
        total_class_map("class_map = build()\n")


def member(name, size=1, kind=tarfile.REGTYPE, target=""):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = (size if kind == tarfile.REGTYPE else 0), kind, target
    return info


@pytest.mark.parametrize(
    "extra, problem",
    [
        ([member("../evil.txt")], "unsafe member names: ../evil.txt"),
        ([member("/etc/evil.txt")], "unsafe member names: /etc/evil.txt"),
        ([member("totalsegmentator-2.18.0/tests/reference_files/../../../evil")], "unsafe member names"),
        (
            [member("totalsegmentator-2.18.0/tests/reference_files/example_ct_dicom/CT.3", kind=tarfile.SYMTYPE,
                    target="/etc/passwd")],
            "not regular files",
        ),
    ],
)
def test_extract_samples_refuses_unsafe_archives(tmp_path, extra, problem):
    with pytest.raises(CTFMError, match=problem):
        extract_samples(fake_sdist(tmp_path / "sdist.tar.gz", extra), tmp_path / "samples")
    assert not (tmp_path / "samples").exists()


def test_extract_samples_refuses_an_unexpected_archive(tmp_path):
    sdist = tmp_path / "other.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        add_file(tar, "totalsegmentator-2.18.0/LICENSE", b"licence")
    with pytest.raises(CTFMError, match="members missing: .*example_ct.nii.gz"):
        extract_samples(sdist, tmp_path / "samples")


def test_cli_path_and_unknown_name():
    run = [sys.executable, "-m", "ctfm.sample_data"]
    found = subprocess.run([*run, "path", "example_ct.nii.gz"], capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.strip() == str(sample_path("example_ct.nii.gz"))
    unknown = subprocess.run([*run, "path", "nope"], capture_output=True, text=True)
    assert unknown.returncode == 1 and unknown.stderr.splitlines() == [
        f"error: nope: no such sample; available: {', '.join(sorted(SAMPLES))}"
    ]


@pytest.mark.skipif(os.environ.get("CTFM_NETWORK_TESTS") != "1", reason="needs PyPI; set CTFM_NETWORK_TESTS=1")
def test_fetch_recreates_the_installed_samples_byte_for_byte(tmp_path):
    dest = sample_data.fetch(tmp_path / "samples")
    assert (dest / "SHA256SUMS").read_bytes() == (sample_dir() / "SHA256SUMS").read_bytes()
    assert verify(dest) == verify()
