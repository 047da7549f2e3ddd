"""DICOM SEG from a label map on the ITK grid of a DICOM series: segments, frames and UIDs read back."""

import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import LoadImage

from ctfm.ct_io import read_ct
from ctfm.segmentation.dicom_seg import read_series_headers, segment_description, write_dicom_seg
from ctfm.errors import CTFMError
from ctfm.sample_data import sample_path, totalseg_classes, totalseg_codes
from ctfm.segmentation.data import AlignLabeld

KEEP = (1, 5, 6, 52, 79)  # spleen, liver, stomach, aorta, spinal cord


@pytest.fixture(scope="module")
def series_and_labels():
    """The sample series as ITK reads it and TotalSegmentator's labels for it on that grid (5 classes kept)."""
    image = read_ct(sample_path("example_ct_dicom"))
    label = LoadImage(ensure_channel_first=True, image_only=True)(str(sample_path("example_seg_dicom.nii.gz")))
    label = AlignLabeld("label", mode="world")({"image": image, "label": label})["label"][0].numpy().astype(np.uint8)
    label[~np.isin(label, KEEP)] = 0
    return image, label


def test_seg_reads_back_with_one_segment_per_label_and_the_right_pixels(tmp_path, series_and_labels):
    import highdicom as hd

    image, labels = series_and_labels
    path = write_dicom_seg(tmp_path / "seg.dcm", labels, image.affine.numpy(), sample_path("example_ct_dicom"), totalseg_classes())
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and len(ds.SegmentSequence) == len(KEEP)
    assert [s.SegmentLabel for s in ds.SegmentSequence] == [totalseg_classes()[k] for k in KEEP]
    assert [s.TrackingID.split()[0] for s in ds.SegmentSequence] == [str(k) for k in KEEP]
    types = [(s.SegmentedPropertyTypeCodeSequence[0].CodeValue, s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning)
             for s in ds.SegmentSequence]  # fmt: skip
    assert types[:2] == [("78961009", "Spleen"), ("10200004", "Liver")]  # SNOMED CT, as TotalSegmentator codes them
    assert all(len(s.RecommendedDisplayCIELabValue) == 3 for s in ds.SegmentSequence)
    assert not list(tmp_path.glob(".*"))

    sources = read_series_headers(sample_path("example_ct_dicom"))
    seg = hd.seg.segread(path)
    uids = [str(s.SOPInstanceUID) for s in sources]
    numbers = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True, relabel=False)
    to_number = np.zeros(256, np.uint8)
    to_number[list(KEEP)] = np.arange(1, len(KEEP) + 1)
    # source slice i lies at z index k of the ITK grid; its rows run along Y, columns along X
    z_of = {float(s.ImagePositionPatient[2]): s for s in sources}
    for i, source in enumerate(sources):
        k = int(round((float(source.ImagePositionPatient[2]) - float(image.affine[2, 3])) / float(image.affine[2, 2])))
        assert np.array_equal(numbers[i], to_number[labels[:, :, k].T]), f"frame of slice {i}"
    assert len(z_of) == 20


def test_anonymised_series_gets_uids_for_the_references(series_and_labels):
    sources = read_series_headers(sample_path("example_ct_dicom"))
    raw = pydicom.dcmread(next(p for p in sample_path("example_ct_dicom").iterdir()), stop_before_pixels=True)
    assert not raw.SOPInstanceUID and not raw.SeriesInstanceUID  # the sample is anonymised this way
    assert all(s.SOPInstanceUID for s in sources) and len({s.SeriesInstanceUID for s in sources}) == 1
    assert read_series_headers(sample_path("example_ct_dicom"))[0].StudyInstanceUID == sources[0].StudyInstanceUID


def test_label_map_not_on_the_series_grid_is_refused(tmp_path, series_and_labels):
    image, labels = series_and_labels
    with pytest.raises(CTFMError, match="not a plane of the label map"):
        write_dicom_seg(tmp_path / "seg.dcm", labels[::2], image.affine.numpy(), sample_path("example_ct_dicom"), {})
    with pytest.raises(CTFMError, match="empty"):
        write_dicom_seg(tmp_path / "seg.dcm", np.zeros_like(labels), image.affine.numpy(), sample_path("example_ct_dicom"), {})
    assert not list(tmp_path.iterdir())
    assert torch.is_tensor(image)


def test_segment_coding_carries_laterality_regions_and_falls_back_for_other_names():
    from highdicom.sr import CodedConcept

    codes = totalseg_codes()
    assert set(totalseg_classes().values()) <= set(codes)  # every output class has its coding

    kidney = segment_description(1, "kidney_left", codes, algorithm_type="MANUAL")
    kidney_type = kidney.SegmentedPropertyTypeCodeSequence[0]
    assert (kidney_type.CodeValue, kidney_type.CodingSchemeDesignator) == ("64033007", "SCT")
    modifier = CodedConcept.from_dataset(kidney_type.SegmentedPropertyTypeModifierCodeSequence[0])
    assert (modifier.value, modifier.meaning) == ("7771000", "Left")

    cyst = segment_description(2, "kidney_cyst_right", codes, algorithm_type="MANUAL")
    region = cyst.AnatomicRegionSequence[0]
    assert region.CodeMeaning == "Kidney" and region.AnatomicRegionModifierSequence[0].CodeMeaning == "Right"
    assert cyst.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Morphologically Altered Structure"

    tumour = segment_description(3, "pancreas tumour", codes, algorithm_type="MANUAL")
    assert tumour.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Anatomical Structure"
    assert "RecommendedDisplayCIELabValue" not in tumour
