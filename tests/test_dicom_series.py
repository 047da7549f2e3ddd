"""ctfm.dicom_series: a CT volume written as a DICOM series reads back (ITK) to the same HU at the same places."""

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from ctfm.ct_io import check_ct_header, read_ct
from ctfm.dicom_series import write_ct_series
from ctfm.errors import CTFMError
from ctfm.phantom import head_phantom

SHAPE, SPACING = (32, 40, 24), (3.5, 3.0, 4.0)  # non-cubic: an axis or spacing mix-up shows


@pytest.fixture(scope="module")
def head():
    return head_phantom(shape=SHAPE, spacing=SPACING)


def flipped_x(image, affine):
    """The same volume stored with axis 0 running to the patient's left (a left-handed, LPS-like affine)."""
    flipped = affine.copy()
    flipped[:3, 0] = -affine[:3, 0]
    flipped[:3, 3] = affine[:3, :3] @ [image.shape[0] - 1, 0, 0] + affine[:3, 3]
    return image[::-1].copy(), flipped


def slices_along_x(image, affine):
    """Axes permuted to (Z, X, Y): the slice axis (closest to S) is voxel axis 0, not 2."""
    return np.transpose(image, (2, 0, 1)).copy(), affine[:, [2, 0, 1, 3]]


def to_ras(image, affine):
    """Voxels and affine reoriented to RAS (nibabel), so that volumes stored in other orders compare."""
    ornt = nib.orientations.io_orientation(affine)
    return (
        nib.orientations.apply_orientation(image, ornt),
        affine @ nib.orientations.inv_ornt_aff(ornt, image.shape),
    )


def corner_world_mm(affine, shape):
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return (corners @ np.asarray(affine).T)[:, :3]


@pytest.mark.parametrize("variant", ["as_is", "flipped_x", "slices_along_x"])
def test_series_reads_back_to_the_same_hu_at_the_same_world_positions(head, tmp_path, variant):
    image, affine = head.image, head.affine
    if variant == "flipped_x":
        image, affine = flipped_x(image, affine)
    elif variant == "slices_along_x":
        image, affine = slices_along_x(image, affine)
    folder = write_ct_series(image, affine, tmp_path / "series", seed=0)
    assert folder == tmp_path / "series"

    files = check_ct_header(folder)  # accepted: one CT series, evenly spaced slices
    assert len(files) == 24 and sorted(p.name for p in folder.iterdir())[:2] == ["slice_0000.dcm", "slice_0001.dcm"]
    back = read_ct(folder)
    assert back.shape[0] == 1

    want, want_affine = to_ras(image, affine)
    got, got_affine = to_ras(back[0].numpy(), back.affine.numpy())
    assert got.shape == want.shape == SHAPE
    np.testing.assert_allclose(got_affine, want_affine, atol=1e-3)
    np.testing.assert_allclose(
        corner_world_mm(got_affine, got.shape), corner_world_mm(want_affine, want.shape), atol=0.01
    )
    assert np.abs(got - want).max() <= 1.0  # rounded to whole HU
    # The phantom in RAS is the same whatever the variant.
    np.testing.assert_allclose(want_affine, head.affine)
    assert np.abs(got - head.image).max() <= 1.0


def test_as_is_series_keeps_the_voxel_order_and_affine(head, tmp_path):
    back = read_ct(write_ct_series(head.image, head.affine, tmp_path / "s"))
    np.testing.assert_allclose(back.affine.numpy(), head.affine, atol=1e-4)
    np.testing.assert_array_equal(back[0].numpy(), np.rint(head.image))


def test_dicom_header_fields(head, tmp_path):
    folder = write_ct_series(
        head.image, head.affine, tmp_path / "s", patient_id="P01", study_description="Head",
        series_description="Plain", series_number=3, seed=1,
    )
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"slice_{i:04d}.dcm" for i in range(SHAPE[2])]
    slices = [pydicom.dcmread(folder / n) for n in names]
    first = slices[0]
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert first.file_meta.MediaStorageSOPClassUID == first.SOPClassUID == CTImageStorage
    assert first.Modality == "CT" and first.PhotometricInterpretation == "MONOCHROME2"
    assert (first.BitsAllocated, first.BitsStored, first.PixelRepresentation) == (16, 16, 1)
    assert (float(first.RescaleIntercept), float(first.RescaleSlope)) == (0.0, 1.0)
    assert (first.PatientID, str(first.PatientName), first.StudyDescription, first.SeriesDescription) == (
        "P01", "P01", "Head", "Plain"
    )
    assert first.SeriesNumber == 3 and first.StudyDate == "20000101"
    # Rows run along Y (the phantom's axis 1), columns along X: cosines, spacing and pixel array agree.
    assert (first.Rows, first.Columns) == (SHAPE[1], SHAPE[0])
    assert [float(v) for v in first.PixelSpacing] == [SPACING[1], SPACING[0]]
    assert [float(v) for v in first.ImageOrientationPatient] == [-1, 0, 0, 0, -1, 0]  # RAS x/y in LPS
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == SPACING[2]
    np.testing.assert_array_equal(first.pixel_array, np.rint(head.image[:, :, 0]).T)
    # ImagePositionPatient: the LPS position of voxel (0, 0, k).
    for k, ds in enumerate(slices):
        ras = head.affine @ [0, 0, k, 1]
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], [-ras[0], -ras[1], ras[2]])
        assert ds.InstanceNumber == k + 1
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[name].value for ds in slices}) == 1
    uids = [ds.SOPInstanceUID for ds in slices]
    assert len(set(uids)) == len(uids)
    for uid in uids + [first.StudyInstanceUID, first.SeriesInstanceUID, first.FrameOfReferenceUID]:
        assert uid.is_valid
    assert len({first.StudyInstanceUID, first.SeriesInstanceUID, first.FrameOfReferenceUID, uids[0]}) == 4


def test_seed_gives_byte_identical_files_and_no_seed_new_uids(head, tmp_path):
    def files(folder):
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    a = files(write_ct_series(head.image, head.affine, tmp_path / "a", seed=7))
    b = files(write_ct_series(head.image, head.affine, tmp_path / "b", seed=7))
    assert a == b
    c = files(write_ct_series(head.image, head.affine, tmp_path / "c", seed=8))
    assert a.keys() == c.keys() and all(a[n] != c[n] for n in a)

    def series_uid(folder):
        return pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID

    random = [series_uid(write_ct_series(head.image, head.affine, tmp_path / f"r{i}")) for i in range(2)]
    assert random[0] != random[1]
    # Same seed, other volume: another series (and its own frame of reference) in the same study.
    other = write_ct_series(head.image + 1, head.affine, tmp_path / "d", seed=7)
    first_a = pydicom.dcmread(tmp_path / "a" / "slice_0000.dcm", stop_before_pixels=True)
    first_d = pydicom.dcmread(other / "slice_0000.dcm", stop_before_pixels=True)
    assert first_a.StudyInstanceUID == first_d.StudyInstanceUID
    assert first_a.SeriesInstanceUID != first_d.SeriesInstanceUID


def test_hu_rounded_and_clipped_to_int16_and_folder_replaced(tmp_path):
    image = np.full((4, 5, 3), -1000.0, np.float32)
    image[1, 1, 1], image[2, 2, 1], image[3, 3, 2], image[0, 4, 0] = 40000.0, -40000.0, 10.6, -10.4
    affine = np.diag([0.5, 0.7, 2.0, 1.0])
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    write_ct_series(image, affine, folder)
    assert not (folder / "stale.txt").exists()
    back = read_ct(folder)[0].numpy()
    want = np.rint(image)
    want[1, 1, 1], want[2, 2, 1] = 32767, -32768
    np.testing.assert_array_equal(back, want)
    # Integer input is taken as is.
    write_ct_series(np.rint(want).astype(np.int32), affine, folder)
    np.testing.assert_array_equal(read_ct(folder)[0].numpy(), want)


def oblique(affine, degrees=30.0):
    t = np.radians(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rotation @ affine


@pytest.mark.parametrize(
    "image, affine, problem",
    [
        (np.zeros((4, 4)), np.eye(4), "2-D"),
        (np.zeros((1, 4, 4, 4)), np.eye(4), "4-D"),
        (np.zeros((4, 0, 4)), np.eye(4), "empty axis"),
        (np.full((4, 4, 4), np.nan), np.eye(4), "NaN or infinite"),
        (np.zeros((4, 4, 4), complex), np.eye(4), "not real-valued"),
        (np.zeros((4, 4, 4)), np.diag([1.0, 0.0, 1.0, 1.0]), "singular"),
        (np.zeros((4, 4, 4)), np.eye(3), "4x4"),
        (np.zeros((4, 4, 4)), np.diag([1.0, 1.0, np.inf, 1.0]), "NaN or infinite"),
        (np.zeros((4, 4, 4)), oblique(np.diag([1.0, 1.0, 2.0, 1.0])), "oblique"),
    ],
)
def test_bad_input_raises_one_line_naming_the_problem(tmp_path, image, affine, problem):
    with pytest.raises(CTFMError, match=problem) as info:
        write_ct_series(image, affine, tmp_path / "s")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "s").exists() and list(tmp_path.iterdir()) == []


def test_bad_fields_raise(tmp_path):
    image = np.zeros((4, 4, 4))
    with pytest.raises(CTFMError, match="patient_id"):
        write_ct_series(image, np.eye(4), tmp_path / "s", patient_id="x" * 65)
    with pytest.raises(CTFMError, match="series_number"):
        write_ct_series(image, np.eye(4), tmp_path / "s", series_number=-1)
    with pytest.raises(CTFMError, match="seed"):
        write_ct_series(image, np.eye(4), tmp_path / "s", seed="1")
