"""Writing a CT volume as a DICOM CT series, one file per slice, so that demos and tests feed real DICOM.

:func:`write_ct_series` takes what :mod:`ctfm.phantom` and :func:`ctfm.invesalius.read_inv3` give, ``(X, Y, Z)``
Hounsfield units and a 4x4 voxel -> RAS mm affine (nibabel / MONAI convention), and writes a folder
``slice_0000.dcm, slice_0001.dcm, ...`` that :func:`ctfm.ct_io.read_ct` (ITK / GDCM) reads back to the same
voxels at the same world positions.

Geometry. DICOM patient coordinates are LPS: the RAS affine's first two rows change sign. The slice axis is the
voxel axis whose direction is closest to the world S axis; of the other two, the lower-numbered one runs along
each row of a slice (DICOM columns, ITK's first axis), the other down the rows. ``ImageOrientationPatient`` holds
the LPS directions of those two axes, ``PixelSpacing`` ``[spacing between rows, spacing between columns]``,
``ImagePositionPatient`` each slice's LPS position of voxel index 0 along both in-plane axes (the first pixel
transmitted). Slices are written in increasing voxel index along the slice axis (``InstanceNumber`` 1, 2, ...).
A reader sorts them along the slice normal (row x column direction): when the affine is left-handed (e.g. axis 0
running to the patient's left, as a DICOM series read by ITK is) that normal points against the slice axis and
the series reads back with the slice axis reversed, the same voxels at the same world positions. ITK reads a
series in (along-row, down-rows, slice) order, so a volume whose slice axis is not its last comes back with its
axes in that order; compare in world coordinates (or after ``Orientationd`` / nibabel reorientation). Affines must
be axis-aligned (each direction within :data:`AXIS_TOLERANCE` of a world axis, any permutation and signs);
oblique ones are refused.

Voxels are stored as signed 16-bit integers (``PixelRepresentation`` 1) holding HU directly:
``RescaleIntercept`` 0, ``RescaleSlope`` 1. HU are rounded to the nearest integer and clipped to -32768..32767.

UIDs come from :func:`pydicom.uid.generate_uid`: random, or with ``seed`` derived from the seed, the patient,
the study / series fields and a hash of the voxels and affine, so that the same call writes byte-identical files
and two different volumes written with the same seed still get different series. With a seed, the Study UID
depends on the seed, ``patient_id`` and ``study_description`` only, so series written with the same three share
one study. Study / series dates and times are fixed (:data:`STUDY_DATE`, :data:`STUDY_TIME`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from ctfm.errors import CTFMError
from ctfm.files import atomic_path

__all__ = ["AXIS_TOLERANCE", "STUDY_DATE", "STUDY_TIME", "write_ct_series"]

#: Largest off-axis component (of a unit direction vector) of a voxel axis still taken as axis-aligned
#: (about 0.06 degrees); affines read from float32 NIfTI headers carry ~1e-7.
AXIS_TOLERANCE = 1e-3
#: Fixed StudyDate / SeriesDate / ContentDate and StudyTime / SeriesTime / ContentTime of every series written.
STUDY_DATE, STUDY_TIME = "20000101", "120000"

_INT16_MIN, _INT16_MAX = -32768, 32767
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
#: Longest value of a LO (Long String) element: PatientID, StudyDescription, SeriesDescription.
_LO_MAX = 64


def write_ct_series(
    image_hu: np.ndarray,
    affine: np.ndarray,
    folder: str | os.PathLike,
    *,
    patient_id: str = "ANON",
    study_description: str = "",
    series_description: str = "",
    series_number: int = 1,
    seed: int | None = None,
) -> Path:
    """Write ``image_hu`` as one DICOM CT series in ``folder``, replacing it atomically.

    Args:
        image_hu: ``(X, Y, Z)`` Hounsfield units, float or integer.
        affine: 4x4 voxel index -> RAS mm, axis-aligned (any permutation / flips of the axes, positive spacings).
        folder: the series folder to write (created, or replaced as a whole once the new one is complete).
        patient_id: PatientID and PatientName.
        study_description, series_description: StudyDescription, SeriesDescription.
        series_number: SeriesNumber (>= 0).
        seed: makes the UIDs, hence the files, deterministic; ``None`` gives random UIDs.

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.

    Raises:
        CTFMError: (one line) not a 3-D real-valued array, an empty axis, NaN or infinite values; an affine that
            is not 4x4, not finite, singular or oblique; more than 65535 voxels along a slice's rows or columns;
            a text field too long or holding a backslash or control character.
    """
    image = np.asarray(image_hu)
    geometry = _Geometry(image, affine)
    texts = {"patient_id": patient_id, "study_description": study_description, "series_description": series_description}
    for name, value in texts.items():
        _check_text(name, value)
    if isinstance(series_number, bool) or not isinstance(series_number, (int, np.integer)) or series_number < 0:
        raise CTFMError(f"write_ct_series: series_number must be an integer >= 0, not {series_number!r}")

    uids = _Uids(seed, image, geometry.affine, patient_id, study_description, series_description, int(series_number))
    template = _series_dataset(geometry, uids, patient_id, study_description, series_description, int(series_number))
    count = image.shape[geometry.slice_axis]
    width = max(4, len(str(count - 1)))
    folder = Path(folder)
    with atomic_path(folder, is_dir=True) as tmp:
        for index in range(count):
            ds = _slice_dataset(template, geometry, uids, image, index)
            ds.save_as(tmp / f"slice_{index:0{width}d}.dcm", enforce_file_format=True)
    return folder


class _Geometry:
    """The series geometry of ``image`` / ``affine``: slice axis, in-plane axes, LPS directions and spacings."""

    def __init__(self, image: np.ndarray, affine: np.ndarray):
        if image.ndim != 3:
            raise CTFMError(
                f"write_ct_series: image is {image.ndim}-D {image.shape}; expected one 3-D volume (X, Y, Z)"
            )
        real = np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
        if image.dtype == bool or not real:
            raise CTFMError(f"write_ct_series: image of type {image.dtype} is not real-valued HU")
        if min(image.shape) < 1:
            raise CTFMError(f"write_ct_series: image {'x'.join(map(str, image.shape))} has an empty axis")
        if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
            raise CTFMError("write_ct_series: image holds NaN or infinite values")
        try:
            affine = np.array(affine, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise CTFMError(f"write_ct_series: affine is not a 4x4 array of numbers ({exc})") from exc
        if affine.shape != (4, 4):
            raise CTFMError(f"write_ct_series: affine has shape {affine.shape}; expected 4x4 (voxel -> RAS mm)")
        if not np.isfinite(affine).all():
            raise CTFMError("write_ct_series: affine holds NaN or infinite values")
        if not np.allclose(affine[3], [0.0, 0.0, 0.0, 1.0]):
            raise CTFMError(f"write_ct_series: affine's last row is {affine[3].tolist()}, not [0, 0, 0, 1]")
        linear = affine[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        if spacing.min() <= 0 or abs(np.linalg.det(linear)) <= 1e-12 * float(np.prod(spacing)):
            raise CTFMError(f"write_ct_series: affine is singular (voxel axes {linear.T.round(6).tolist()})")
        directions = _LPS_FROM_RAS @ linear / spacing  # unit LPS direction of each voxel axis, as columns
        world_axis = np.abs(directions).argmax(axis=0)
        off_axis = float(np.sort(np.abs(directions), axis=0)[:2].max())  # largest but the main component
        if len(set(world_axis.tolist())) != 3 or off_axis > AXIS_TOLERANCE:
            raise CTFMError(
                f"write_ct_series: oblique affine (voxel axis directions {directions.T.round(4).tolist()} in LPS); "
                f"only axis-aligned affines are written (off-axis components <= {AXIS_TOLERANCE})"
            )
        self.affine = affine
        self.shape = image.shape
        self.slice_axis = int(np.argmax(np.abs(directions[2])))  # closest to S (world axis 2, same in RAS and LPS)
        # Along each row (DICOM columns, ITK axis 0) and down the rows (DICOM rows, ITK axis 1).
        self.along_row, self.down_rows = (a for a in range(3) if a != self.slice_axis)
        if max(image.shape[self.along_row], image.shape[self.down_rows]) > 0xFFFF:
            raise CTFMError(
                f"write_ct_series: image {'x'.join(map(str, image.shape))} has more than 65535 voxels along a "
                "slice's rows or columns"
            )
        self.spacing = spacing
        self.directions = directions
        self.lps_origin = _LPS_FROM_RAS @ affine[:3, 3]
        self.orientation = [*directions[:, self.along_row], *directions[:, self.down_rows]]
        self.normal = np.cross(directions[:, self.along_row], directions[:, self.down_rows])

    def position(self, index: int) -> np.ndarray:
        """LPS position (mm) of the first pixel of slice ``index``."""
        return self.lps_origin + index * self.spacing[self.slice_axis] * self.directions[:, self.slice_axis]

    def pixels(self, image: np.ndarray, index: int) -> np.ndarray:
        """Slice ``index`` as DICOM's ``(Rows, Columns)`` int16 array, HU rounded and clipped."""
        plane = np.take(image, index, axis=self.slice_axis)  # (along_row, down_rows), in axis order
        plane = plane.T
        if np.issubdtype(plane.dtype, np.floating):
            plane = np.rint(plane.astype(np.float64))
        return np.clip(plane, _INT16_MIN, _INT16_MAX).astype("<i2", copy=False)


class _Uids:
    """Study, series, frame-of-reference and per-slice instance UIDs, random or derived from ``seed``."""

    def __init__(self, seed, image, affine, patient_id, study_description, series_description, series_number):
        if seed is None:
            self._study = self._series = None
        else:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                raise CTFMError(f"write_ct_series: seed must be an integer or None, not {seed!r}")
            content = hashlib.sha256()
            content.update(str((image.shape, image.dtype.str)).encode())
            content.update(np.ascontiguousarray(image).data)
            content.update(np.ascontiguousarray(affine).data)
            self._study = ["ctfm.dicom_series", "study", str(int(seed)), patient_id, study_description]
            self._series = [*self._study, "series", str(series_number), series_description, content.hexdigest()]
        self.study = self._uid(self._study)
        self.series = self._uid(self._series)
        self.frame_of_reference = self._uid(None if self._series is None else [*self._series, "frame"])

    def instance(self, index: int) -> pydicom.uid.UID:
        return self._uid(None if self._series is None else [*self._series, "instance", str(index)])

    @staticmethod
    def _uid(entropy: list[str] | None) -> pydicom.uid.UID:
        return generate_uid() if entropy is None else generate_uid(entropy_srcs=entropy)


def _check_text(name: str, value: str) -> None:
    if not isinstance(value, str):
        raise CTFMError(f"write_ct_series: {name} must be a string, not {type(value).__name__}")
    if len(value) > _LO_MAX or "\\" in value or any(ord(ch) < 32 for ch in value):
        raise CTFMError(
            f"write_ct_series: {name} {value[:80]!r} is not a valid DICOM LO value (at most {_LO_MAX} characters, "
            "no backslash or control characters)"
        )


def _ds(value: float) -> str:
    """A decimal string (DS, at most 16 characters); ``-0`` written as ``0``."""
    return format_number_as_ds(float(value) + 0.0)


def _series_dataset(
    geometry: _Geometry, uids: _Uids, patient_id: str, study_description: str, series_description: str,
    series_number: int,
) -> Dataset:
    """The elements every slice of the series shares."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: patient and description fields may hold any text
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    for prefix in ("Study", "Series", "Content"):
        setattr(ds, f"{prefix}Date", STUDY_DATE)
        setattr(ds, f"{prefix}Time", STUDY_TIME)
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "ctfm"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.KVP = ""
    ds.SliceThickness = _ds(geometry.spacing[geometry.slice_axis])
    ds.SpacingBetweenSlices = _ds(geometry.spacing[geometry.slice_axis])
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids.study
    ds.SeriesInstanceUID = uids.series
    ds.StudyID = ""
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [_ds(v) for v in geometry.orientation]
    ds.FrameOfReferenceUID = uids.frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = geometry.shape[geometry.down_rows]
    ds.Columns = geometry.shape[geometry.along_row]
    ds.PixelSpacing = [_ds(geometry.spacing[geometry.down_rows]), _ds(geometry.spacing[geometry.along_row])]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _slice_dataset(template: Dataset, geometry: _Geometry, uids: _Uids, image: np.ndarray, index: int) -> Dataset:
    """Slice ``index``: the series' elements plus its instance UID, number, position and pixels."""
    ds = Dataset()
    ds.update(template)
    sop = uids.instance(index)
    ds.SOPInstanceUID = sop
    ds.InstanceNumber = index + 1
    position = geometry.position(index)
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(float(np.dot(position, geometry.normal)))
    ds.PixelData = geometry.pixels(image, index).tobytes()
    # PixelData's VR (OW) and the element order are settled when written; the file meta describes this instance.
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds
