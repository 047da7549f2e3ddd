"""Reading one CT volume, with a one-line :class:`CTInputError` for every kind of bad input.

:func:`read_ct` reads NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``)
or a folder holding one DICOM series (any transfer syntax GDCM decodes, JPEG 2000 included) through ITK, and
returns what MONAI's ``LoadImage(reader="ITKReader", ensure_channel_first=True, image_only=True)`` returns: a
``MetaTensor`` of shape ``(1, X, Y, Z)``, float32 Hounsfield units, indexed in ITK's voxel order (``X`` along
the first image axis), with a RAS affine in mm. A DICOM series keeps its row / column / slice order, which for
an ordinary axial series is LPS (axis 0 runs towards the patient's left, axis 1 towards posterior, slices sorted
inferior to superior), while NIfTI files are often RAS: reorient with ``Orientationd`` where it matters.

:class:`LoadCTd` is the dictionary transform the bundles use in place of ``LoadImaged``. ``python -m ctfm.ct_io
PATH...`` prints a one-line summary per volume and ``error: <path>: <problem>`` for each bad one (exit 1).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

import itk
import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.config import KeysCollection
from monai.data import ITKReader, MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import EnsureChannelFirst, LoadImaged, MapTransform
from monai.utils import ImageMetaKey
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom

from ctfm.errors import CTFMError

#: Plausible voxel spacing of a CT, in mm; anything outside is a broken header.
MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 50.0


class CTInputError(CTFMError):
    """A CT that cannot be used: the message is ``<path>: <problem>`` on one line."""


def read_ct(path: str | os.PathLike) -> MetaTensor:
    """Read and validate one CT volume.

    Args:
        path: a NIfTI / NRRD / MetaImage file, or a folder holding exactly one DICOM series (files directly in it).

    Returns:
        ``MetaTensor`` ``(1, X, Y, Z)`` float32 HU; ``.affine`` maps voxel indices to RAS mm, ``.meta`` is
        ITKReader's (``spacing`` in mm, ``original_affine``, ``spatial_shape``) plus ``filename_or_obj = str(path)``.

    Raises:
        CTInputError: missing path, folder without DICOM, several DICOM series, DICOM Modality other than CT,
            unreadable or corrupt file, not a 3-D single-channel volume (every axis needs >= 2 voxels),
            NaN or infinite values, voxel spacing outside [0.05, 50] mm.
    """
    path = Path(path)
    if not path.exists():
        raise CTInputError(f"{path}: no such file or folder")
    series_files = _dicom_series_files(path) if path.is_dir() else None
    if series_files or is_dicom(path):
        _check_modality(path, series_files[0] if series_files else path)

    try:
        array, meta = ITKReader().get_data(itk.imread(series_files or str(path)))
    except Exception as exc:  # ITK raises RuntimeError, TypeError (TemplateTypeError), ValueError...
        raise CTInputError(f"{path}: unreadable or corrupt image ({_itk_reason(exc)})") from exc

    meta[ImageMetaKey.FILENAME_OR_OBJ] = str(path)
    image = EnsureChannelFirst()(MetaTensor(torch.as_tensor(np.asarray(array, dtype=np.float32)), meta=meta))
    _check_volume(path, image)
    if path.name.endswith((".nii", ".nii.gz")):
        _check_nifti_payload(path)  # ITK's reader hides some damage that _check_volume cannot see
    return image


def ct_from_memory(volume: np.ndarray | torch.Tensor) -> MetaTensor:
    """A CT volume that the caller has already read, checked and shaped as :func:`read_ct` returns one.

    Args:
        volume: HU voxels ``(X, Y, Z)``, or ``(1, X, Y, Z)`` with the channel first; a ``MetaTensor`` keeps its
            affine (RAS, mm) and meta (MONAI Deploy's DICOM volumes are ``(X, Y, Z)`` with the series' affine).

    Returns:
        ``MetaTensor`` ``(1, X, Y, Z)`` float32.

    Raises:
        CTInputError: not one 3-D volume, implausible spacing, NaN or infinite values; the message names
            ``meta["filename_or_obj"]`` or ``in-memory volume``.
    """
    image = volume if isinstance(volume, MetaTensor) else MetaTensor(torch.as_tensor(volume))
    image = image.float()
    name = image.meta.get(ImageMetaKey.FILENAME_OR_OBJ, "in-memory volume")
    if image.ndim not in (3, 4):
        raise CTInputError(f"{name}: {image.ndim}-D array; expected one 3-D volume (X, Y, Z) or (1, X, Y, Z)")
    image = EnsureChannelFirst(channel_dim="no_channel" if image.ndim == 3 else 0)(image)
    _check_volume(name, image)
    return image


class LoadCTd(LoadImaged):
    """``LoadImaged`` for CTs: replace each path under ``keys`` by :func:`read_ct`'s ``(1, X, Y, Z)`` HU MetaTensor,
    and a volume already in memory by :func:`ct_from_memory`'s.

    MONAI Deploy's ``MonaiBundleInferenceOperator`` hands the bundle's ``preprocessing`` a volume, not a path,
    after removing transforms whose class name contains ``LoadImage``; this one stays and takes the volume.
    Metadata travels on the MetaTensor; ``meta["filename_or_obj"]`` is the path. It subclasses ``LoadImaged`` so
    that tools which look for the loader by type find it: MONAI Label sets ``_loader.image_only = False`` on it
    (then ``<key>_meta_dict`` entries are added too) and wraps it for in-memory inputs. MONAI's readers are not
    built: their constructors print warnings, and :func:`read_ct` needs only ITK.
    """

    def __init__(self, keys: KeysCollection = ("image",), allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self._loader = SimpleNamespace(image_only=True)
        self.meta_key_postfix = "meta_dict"
        self.overwriting = False

    def __call__(self, data: Mapping[Hashable, str | os.PathLike], reader=None) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = read_ct(d[key]) if isinstance(d[key], (str, os.PathLike)) else ct_from_memory(d[key])
            if not self._loader.image_only:
                d[f"{key}_{self.meta_key_postfix}"] = dict(d[key].meta)
        return d


def describe(image: MetaTensor) -> str:
    """One-line summary of a :func:`read_ct` volume: voxels, spacing (mm), HU range, orientation code."""
    shape = "x".join(str(n) for n in image.shape[1:])
    spacing = "x".join(f"{s:.3g}" for s in affine_to_spacing(image.affine, r=3).tolist())
    orientation = "".join(nib.orientations.aff2axcodes(image.affine.numpy()))
    return (
        f"{image.meta[ImageMetaKey.FILENAME_OR_OBJ]}: {shape} voxels, spacing {spacing} mm, "
        f"HU {image.min().item():.0f}..{image.max().item():.0f}, orientation {orientation}"
    )


def _dicom_series_files(folder: Path) -> list[str]:
    """The files of the one DICOM series in ``folder``, in ITK's slice order (MONAI ITKReader's series rules)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise CTInputError(f"{folder}: empty folder (expected a DICOM series)")
    if not any(is_dicom(f) for f in files):
        raise CTInputError(f"{folder}: folder holds no DICOM files (subfolders are not searched)")
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")  # series date, as MONAI's ITKReader
    names.SetDirectory(str(folder))
    series = names.GetSeriesUIDs()
    if len(series) != 1:
        raise CTInputError(f"{folder}: folder holds {len(series)} DICOM series, expected one")
    return list(names.GetFileNames(series[0]))


def _check_modality(path: Path, dicom_file: str | os.PathLike) -> None:
    try:
        modality = pydicom.dcmread(dicom_file, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality")
    except (InvalidDicomError, OSError) as exc:
        raise CTInputError(f"{path}: unreadable DICOM file {dicom_file} ({_first_line(exc)})") from exc
    if modality != "CT":
        raise CTInputError(f"{path}: DICOM Modality is {modality!r}, not 'CT'")


def _check_volume(path: Path | str, image: MetaTensor) -> None:
    """One 3-D single-channel volume with plausible spacing and finite values, or a one-line CTInputError."""
    spatial = tuple(image.shape[1:])
    if image.shape[0] != 1:
        raise CTInputError(
            f"{path}: {image.shape[0]} values per voxel (a 4-D or multi-channel image); expected one 3-D volume"
        )
    if len(spatial) != 3 or min(spatial) < 2:
        size = "x".join(str(n) for n in spatial)
        raise CTInputError(f"{path}: not a 3-D volume ({size} voxels); every one of 3 axes needs >= 2 voxels")
    spacing = affine_to_spacing(image.affine, r=3).tolist()
    if not all(math.isfinite(s) and MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        raise CTInputError(
            f"{path}: implausible voxel spacing {'x'.join(f'{s:.4g}' for s in spacing)} mm "
            f"(expected {MIN_SPACING_MM} to {MAX_SPACING_MM} mm per axis)"
        )
    if not bool(torch.isfinite(image).all()):
        raise CTInputError(f"{path}: image holds NaN or infinite values")


def _check_nifti_payload(path: Path) -> None:
    """Re-read a NIfTI's voxels with nibabel: ITK's NIfTI reader zero-fills a truncated file and turns NaN into 0."""
    try:
        voxels = nib.load(path).dataobj.get_unscaled()
    except Exception as exc:  # nibabel raises OSError, EOFError, zlib.error, ImageFileError...
        raise CTInputError(f"{path}: unreadable or corrupt image ({_first_line(exc)})") from exc
    if voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
        raise CTInputError(f"{path}: image holds NaN or infinite values")


def _itk_reason(exc: Exception) -> str:
    """The informative line of an ITK exception (which spans many lines and repeats source paths)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "ITK ERROR" in line:
            return line.split("): ", 1)[-1]
    if lines and lines[0].startswith("Could not create IO object"):
        return "no ITK image reader recognises the file"
    return _first_line(exc)


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ctfm.ct_io PATH [PATH...]``: summary line per good volume on stdout, ``error: ...`` per bad one."""
    parser = argparse.ArgumentParser(prog="python -m ctfm.ct_io", description="Read and check CT volumes.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="NIfTI / NRRD / MetaImage file or DICOM series folder")
    args = parser.parse_args(argv)
    failed = False
    for path in args.paths:
        try:
            print(describe(read_ct(path)), flush=True)
        except CTInputError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
