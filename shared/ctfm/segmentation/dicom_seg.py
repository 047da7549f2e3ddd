"""DICOM SEG from a label map and the DICOM series it was computed from (highdicom, BINARY segmentation).

One segment per label present (background excluded), numbered 1, 2, ... in label order; its SegmentLabel is
the class name and its TrackingID ``"<label id> <class name>"`` keeps the network's label id. Segments of
TotalSegmentator structures are coded as TotalSegmentator codes them (``ctfm.sample_data.totalseg_codes``):
SNOMED CT category and type, laterality as a type modifier (``kidney_left``: Kidney, Left), an anatomic region
where the type alone is ambiguous (``liver_vessels``: Blood vessel in Liver), and its display colour, so
viewers name and colour them; any other class name (an MSD task's labels) is coded SNOMED CT "Anatomical
Structure".

The label map must lie on the voxel grid of the series as ITK reads it (``ctfm.ct_io.read_ct``), i.e. the
output of ``Invertd``. Each source slice is matched to its plane of the label map through its
ImagePositionPatient, so the file order of the series does not matter.

Anonymised series sometimes carry empty SOP / Study / Series Instance UIDs, which a SEG must reference. Then
the SOP Class / Instance UIDs are taken from the file meta header and missing Study / Series UIDs are derived
deterministically from the slices' SOP Instance UIDs (a warning says so).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from ctfm.errors import CTFMError
from ctfm.files import atomic_path
from ctfm.sample_data import totalseg_codes

__all__ = ["ALGORITHM_NAME", "build_dicom_seg", "read_series_headers", "segment_description", "write_dicom_seg"]

logger = logging.getLogger("ctfm.segmentation")

ALGORITHM_NAME = "ctfm_segmentation"
#: LPS (DICOM patient coordinates) <-> RAS (NIfTI / MONAI affines): flip x and y.
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_series_headers(folder: str | os.PathLike) -> list[pydicom.Dataset]:
    """The headers (no pixel data) of every DICOM file directly in ``folder``, with missing UIDs filled in."""
    folder = Path(folder)
    datasets = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            datasets.append(pydicom.dcmread(path, stop_before_pixels=True))
        except pydicom.errors.InvalidDicomError:
            continue
    if not datasets:
        raise CTFMError(f"{folder}: no DICOM files for the SEG's source series")
    _fill_missing_uids(folder, datasets)
    return datasets


def build_dicom_seg(
    labels: np.ndarray,
    affine: np.ndarray,
    series_folder: str | os.PathLike,
    class_names: Mapping[int, str],
    algorithm_version: str = "0.1.0",
    series_description: str = "CT-FM segmentation",
):
    """A ``highdicom.seg.Segmentation`` of ``labels`` referencing the series in ``series_folder``.

    Args:
        labels: ``(X, Y, Z)`` integer label map on the series' ITK voxel grid.
        affine: 4x4 voxel -> RAS mm of that grid.
        series_folder: the source DICOM series.
        class_names: label id -> name.
        algorithm_version: recorded in the algorithm identification.
        series_description: of the SEG series.

    Raises:
        CTFMError: a slice of the series that is not a plane of the label map, or no label present.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    series_folder = Path(series_folder)
    sources = read_series_headers(series_folder)
    labels = np.asarray(labels)
    frames = _frames_for(labels, np.asarray(affine, float), sources, series_folder)
    present = [int(v) for v in np.unique(labels) if v != 0]
    if not present:
        raise CTFMError(f"{series_folder}: the label map is empty; a DICOM SEG needs at least one segment")
    numbers = np.zeros(int(labels.max()) + 1, np.uint16)
    numbers[present] = np.arange(1, len(present) + 1)
    pixel_array = numbers[frames]  # (slices, rows, columns) of segment numbers, source order
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, version=algorithm_version, family=codes.DCM.ArtificialIntelligence
    )
    structure_codes = totalseg_codes()
    descriptions = [
        segment_description(
            number,
            class_names.get(label, f"label {label}"),
            structure_codes,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=generate_uid(entropy_srcs=[sources[0].SeriesInstanceUID, str(label)]),
            tracking_id=f"{label} {class_names.get(label, '')}".strip()[:64],
        )
        for number, label in enumerate(present, start=1)
    ]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=9000,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="CT foundation-model zoo",
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=algorithm_version,
        device_serial_number="0",
        series_description=series_description,
    )


def segment_description(number: int, name: str, structure_codes: Mapping[str, Mapping[str, str]], **kwargs):
    """A ``highdicom.seg.SegmentDescription`` of structure ``name``, coded from its row of ``structure_codes``
    (:func:`ctfm.sample_data.totalseg_codes`) or as SNOMED CT "Anatomical Structure" when it has none.
    ``kwargs`` go to ``SegmentDescription`` (algorithm, tracking ids)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    row = structure_codes.get(name)
    if row is None:
        return hd.seg.SegmentDescription(
            number, name[:64], codes.SCT.AnatomicalStructure, codes.SCT.AnatomicalStructure, **kwargs
        )
    region = _code(row, "AnatomicRegionSequence")
    description = hd.seg.SegmentDescription(
        number,
        name[:64],
        _code(row, "SegmentedPropertyCategoryCodeSequence"),
        _code(row, "SegmentedPropertyTypeCodeSequence"),
        anatomic_regions=[region] if region else None,
        display_color=hd.color.CIELabColor.from_rgb(*(int(v) for v in row["DicomRGBColor"].split(","))),
        **kwargs,
    )
    # modifiers (laterality) live inside the item they modify; highdicom has no argument for them
    modifiers = {
        "SegmentedPropertyTypeModifierCodeSequence": description.SegmentedPropertyTypeCodeSequence,
        "AnatomicRegionModifierSequence": getattr(description, "AnatomicRegionSequence", None),
    }
    for sequence, parent in modifiers.items():
        if modifier := _code(row, sequence):
            setattr(parent[0], sequence, [modifier])
    return description


def _code(row: Mapping[str, str], sequence: str):
    """The ``CodedConcept`` in ``row``'s columns ``<sequence>.{CodeValue, CodingSchemeDesignator, CodeMeaning}``,
    or ``None`` when its value is empty."""
    from highdicom.sr import CodedConcept

    value = row.get(f"{sequence}.CodeValue", "").strip()
    if not value:
        return None
    return CodedConcept(value, row[f"{sequence}.CodingSchemeDesignator"].strip(), row[f"{sequence}.CodeMeaning"].strip())


def write_dicom_seg(path: str | os.PathLike, *args, **kwargs) -> Path:
    """:func:`build_dicom_seg` written to ``path``, atomically; returns ``path``."""
    seg = build_dicom_seg(*args, **kwargs)
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return Path(path)


def _frames_for(labels: np.ndarray, affine: np.ndarray, sources: list, folder: Path) -> np.ndarray:
    """``(len(sources), Rows, Columns)`` label planes, one per source slice in the sources' order."""
    to_voxel = np.linalg.inv(affine) @ _LPS_RAS
    planes = []
    for ds in sources:
        rows, cols = int(ds.Rows), int(ds.Columns)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        spacing = np.asarray(ds.PixelSpacing, float)  # (row spacing, column spacing)
        origin = np.append(np.asarray(ds.ImagePositionPatient, float), 1.0)
        # voxel index of the first pixel and of one step along a row (next column) and down a column (next row)
        first = to_voxel @ origin
        col_step = to_voxel[:3, :3] @ (iop[:3] * spacing[1])
        row_step = to_voxel[:3, :3] @ (iop[3:] * spacing[0])
        index = np.rint(first[:3]).astype(int)
        col_axis, row_axis = int(np.argmax(np.abs(col_step))), int(np.argmax(np.abs(row_step)))
        normal_axis = ({0, 1, 2} - {col_axis, row_axis}).pop() if col_axis != row_axis else -1
        exact = (
            normal_axis >= 0
            and np.allclose(np.abs(col_step[col_axis]), 1, atol=1e-3)
            and np.allclose(np.abs(row_step[row_axis]), 1, atol=1e-3)
            and np.allclose(first[:3], index, atol=1e-2)
            and labels.shape[col_axis] == cols
            and labels.shape[row_axis] == rows
            and 0 <= index[normal_axis] < labels.shape[normal_axis]
        )
        if not exact:
            raise CTFMError(
                f"{folder}: slice {ds.get('SOPInstanceUID', '?')} is not a plane of the label map's voxel grid "
                f"(label map {labels.shape}); write the label map on the series' own grid (Invertd)"
            )
        plane = np.take(labels, index[normal_axis], axis=normal_axis)  # 2-D, remaining axes in order
        kept = [a for a in range(3) if a != normal_axis]
        if kept.index(row_axis) != 0:
            plane = plane.T
        if col_step[col_axis] < 0:
            plane = plane[:, ::-1]
        if row_step[row_axis] < 0:
            plane = plane[::-1, :]
        planes.append(plane)
    return np.stack(planes)


def _fill_missing_uids(folder: Path, datasets: list[pydicom.Dataset]) -> None:
    filled = []
    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        for key, meta_key in (("SOPInstanceUID", "MediaStorageSOPInstanceUID"), ("SOPClassUID", "MediaStorageSOPClassUID")):
            if not ds.get(key) and meta is not None and meta.get(meta_key):
                setattr(ds, key, meta.get(meta_key))
                filled.append(key)
        if not ds.get("SOPInstanceUID"):
            raise CTFMError(f"{folder}: a slice has no SOP Instance UID in its header or file meta; cannot reference it")
    seed = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        values = {str(ds.get(key) or "") for ds in datasets}
        if values == {""}:
            uid = generate_uid(entropy_srcs=[key, *seed])
            for ds in datasets:
                setattr(ds, key, uid)
            filled.append(key)
        elif "" in values or len(values) > 1:
            raise CTFMError(f"{folder}: slices disagree on {key} (several series in one folder?)")
    if filled:
        logger.warning(
            "%s: series lacks %s (anonymised?); the SEG references UIDs taken from the file meta or derived "
            "from the slices", folder, ", ".join(sorted(set(filled))),
        )
