"""Reading one CT volume, with a one-line :class:`CTInputError` for every kind of bad input.

:func:`read_ct` reads NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``)
or a folder holding one DICOM series (any transfer syntax GDCM decodes, JPEG 2000 included) through ITK, and
returns what MONAI's ``LoadImage(reader="ITKReader", ensure_channel_first=True, image_only=True)`` returns: a
``MetaTensor`` of shape ``(1, X, Y, Z)``, float32 Hounsfield units, indexed in ITK's voxel order (``X`` along
the first image axis), with a RAS affine in mm. A DICOM series keeps its row / column / slice order, which for
an ordinary axial series is LPS (axis 0 runs towards the patient's left, axis 1 towards posterior, slices sorted
inferior to superior), while NIfTI files are often RAS: reorient with ``Orientationd`` where it matters.

Input integrity is checked before any voxel is read, from headers alone (:func:`check_ct_header`): the voxel
type (one value per voxel, of a type ITK reads and HU fit in), the declared voxel count against
:data:`MAX_VOXELS` and this machine's memory, a NIfTI's geometry (pixdim) and its payload (gzip CRC and length,
payload size against the header), and every file of a DICOM series (one series, told apart by geometry and
acquisition fields as well as UIDs; no truncated file; one slice per position, evenly spaced, no gap). After
the read, the values must look like HU (:func:`check_hu_range`): a volume with nothing below 0 HU but soft
tissue and bone above is refused as a CT stored as HU + 1024 without its rescale intercept.

:class:`LoadCTd` is the dictionary transform the bundles use in place of ``LoadImaged``. ``python -m ctfm.ct_io
PATH...`` prints a one-line summary per volume and ``error: <path>: <problem>`` for each bad one (exit 1).
"""

from __future__ import annotations

__all__ = [
    "CTInputError",
    "HU_AIR_MISSING_MAX_HU",
    "MAX_SPACING_MM",
    "MAX_VOXELS",
    "MIN_SPACING_MM",
    "SLICE_POSITION_TOLERANCE_MM",
    "SLICE_SPACING_TOLERANCE",
    "SUPPORTED_VOXEL_TYPES",
    "LoadCTd",
    "check_ct_header",
    "check_hu_range",
    "ct_from_memory",
    "describe",
    "main",
    "memory_limit_bytes",
    "read_ct",
]

import argparse
import math
import os
import struct
import sys
import zlib
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
from nibabel.openers import ImageOpener
from pydicom.misc import is_dicom
from pydicom.multival import MultiValue

from ctfm.errors import CTFMError

#: Plausible voxel spacing of a CT, in mm; anything outside is a broken header.
MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 50.0
#: Most voxels one CT may declare: 2**31 = 1024 x 1024 x 2048, beyond the largest clinical and micro-CT volumes
#: the bundles take (a 512 x 512 x 2000 whole-body CT is 5.2e8), 8 GiB as float32, and the point past which
#: 32-bit voxel indices (some torch / CUDA kernels) overflow. A header declaring more is broken or hostile.
MAX_VOXELS = 2**31
#: Voxel types (numpy names) a CT file may store: those ITK Python reads and HU (-1024..3071) fit in, plus
#: uint8 (label maps are read with :func:`read_ct` too). int8, 64-bit integers, complex, bool, RGB are refused.
SUPPORTED_VOXEL_TYPES = ("uint8", "int16", "uint16", "int32", "uint32", "float32", "float64")
#: Slices of a DICOM series must be evenly spaced along the slice normal: every step within this fraction of
#: the median step, or within 0.01 mm (:data:`SLICE_POSITION_TOLERANCE_MM`), whichever is larger.
SLICE_SPACING_TOLERANCE = 0.01
SLICE_POSITION_TOLERANCE_MM = 0.01
#: A volume whose lowest value is >= 0 and whose highest is at least this (HU) has soft tissue and bone but no
#: air, fat or lung: CT numbers stored as HU + 1024 without their rescale intercept (air ~0, water ~1024).
HU_AIR_MISSING_MAX_HU = 900.0

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 24  # bytes of decompressed NIfTI payload looked at at once (16 MiB)
#: ITK ImageIO component type names -> numpy names.
_ITK_COMPONENT = {
    "unsigned_char": "uint8", "char": "int8", "unsigned_short": "uint16", "short": "int16",
    "unsigned_int": "uint32", "int": "int32", "unsigned_long": "uint64", "long": "int64",
    "unsigned_long_long": "uint64", "long_long": "int64", "float": "float32", "double": "float64",
}


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
            unreadable, truncated or corrupt file (gzip CRC, payload shorter than its header says), unsupported
            voxel type, more voxels than :data:`MAX_VOXELS` or memory holds, NIfTI without geometry, DICOM
            slices missing, duplicated or unevenly spaced, not a 3-D single-channel volume (every axis needs
            >= 2 voxels), NaN or infinite values, voxel spacing outside [0.05, 50] mm, no air in an otherwise
            CT-like volume (a missing rescale intercept).
    """
    path = Path(path)
    series_files = _checked_header(path)
    try:
        array, meta = ITKReader().get_data(itk.imread(series_files or str(path)))
    except Exception as exc:  # ITK raises RuntimeError, TypeError (TemplateTypeError), ValueError...
        raise CTInputError(f"{path}: unreadable or corrupt image ({_itk_reason(exc)})") from exc

    meta[ImageMetaKey.FILENAME_OR_OBJ] = str(path)
    image = EnsureChannelFirst()(MetaTensor(torch.as_tensor(np.asarray(array, dtype=np.float32)), meta=meta))
    _check_volume(path, image)
    check_hu_range(path, image)
    return image


#: Header checks passed in this process, by path and (name, size, mtime) of its files: reading the same unchanged
#: CT again (the segmentation preview reads its input a second time) does not decompress and walk it again.
_CHECKED_HEADERS: dict[tuple, list[str] | None] = {}
_CHECKED_HEADERS_KEPT = 64


def _checked_header(path: Path) -> list[str] | None:
    try:
        entries = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        key = (str(path.resolve()), tuple((p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in entries))
    except OSError:
        return check_ct_header(path)  # it names what is missing or unreadable
    if key not in _CHECKED_HEADERS:
        result = check_ct_header(path)
        if len(_CHECKED_HEADERS) >= _CHECKED_HEADERS_KEPT:
            _CHECKED_HEADERS.pop(next(iter(_CHECKED_HEADERS)))
        _CHECKED_HEADERS[key] = result
    return _CHECKED_HEADERS[key]


def check_ct_header(path: str | os.PathLike) -> list[str] | None:
    """Everything about a CT that can be checked before its voxels are read, from headers (and a NIfTI's payload).

    Reads no pixel data into memory (a ``.nii.gz`` is decompressed once in 16 MiB pieces to check its CRC,
    length and, for float types, NaN; a DICOM slice's pixel data is walked with seeks, not decoded).

    Args:
        path: a NIfTI / NRRD / MetaImage file, a single DICOM file, or a folder holding one DICOM series.

    Returns:
        For a folder, the series' files in ITK's slice order (what ``itk.imread`` takes); otherwise ``None``.

    Raises:
        CTInputError: see :func:`read_ct` (every problem but those only the voxel values show).
    """
    path = Path(path)
    if not path.exists():
        raise CTInputError(f"{path}: no such file or folder")
    if path.is_dir():
        files = _check_dicom_folder(path)
        series_files = _dicom_series_files(path)
        if set(series_files) != set(files):
            raise CTInputError(
                f"{path}: ITK/GDCM takes {len(series_files)} of the {len(files)} DICOM image files as the series"
            )
        return series_files
    if is_dicom(path):
        ds, pixel_offset = _read_dicom_header(path, path)
        _check_modality(path, ds)
        _check_dicom_voxels(path, [ds])
        _check_dicom_pixel_data(path, path, ds, pixel_offset)
    elif path.name.endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    else:
        _check_itk_header(path)
    return None


def ct_from_memory(volume: np.ndarray | torch.Tensor) -> MetaTensor:
    """A CT volume that the caller has already read, checked and shaped as :func:`read_ct` returns one.

    Args:
        volume: HU voxels ``(X, Y, Z)``, or ``(1, X, Y, Z)`` with the channel first; a ``MetaTensor`` keeps its
            affine (RAS, mm) and meta (MONAI Deploy's DICOM volumes are ``(X, Y, Z)`` with the series' affine).

    Returns:
        ``MetaTensor`` ``(1, X, Y, Z)`` float32.

    Raises:
        CTInputError: not one 3-D volume, voxel type bool / complex / int8, implausible spacing, NaN or
            infinite values, no air (see :func:`check_hu_range`); the message names ``meta["filename_or_obj"]``
            or ``in-memory volume``.
    """
    image = volume if isinstance(volume, MetaTensor) else MetaTensor(torch.as_tensor(volume))
    name = image.meta.get(ImageMetaKey.FILENAME_OR_OBJ, "in-memory volume")
    if image.dtype in (torch.bool, torch.int8) or image.is_complex():
        _check_voxel_type(name, str(image.dtype).removeprefix("torch."))
    image = image.float()
    if image.ndim not in (3, 4):
        raise CTInputError(f"{name}: {image.ndim}-D array; expected one 3-D volume (X, Y, Z) or (1, X, Y, Z)")
    image = EnsureChannelFirst(channel_dim="no_channel" if image.ndim == 3 else 0)(image)
    _check_volume(name, image)
    check_hu_range(name, image)
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


def check_hu_range(path: Path | str, image: MetaTensor | torch.Tensor) -> None:
    """Refuse a volume whose values say it is not in HU: nothing below 0 but soft tissue and bone above.

    Every CT holds air (-1000 HU: outside the body, in the corners of a head scan, in the lungs and bowel) or
    at least fat (-100 HU) and noise below 0; an integer CT stored as HU + 1024 without its rescale intercept
    has air near 0 and water near 1024. The check applies only when the lowest value is >= 0 (so to every
    unsigned volume without a rescale) and the highest is >= :data:`HU_AIR_MISSING_MAX_HU`: a CT whose minimum is
    around -1024..-900, or whose 1st percentile is below -500, is never refused; label maps (0..117) are not.

    Args:
        path: named in the message.
        image: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` values, HU expected.

    Raises:
        CTInputError: ``<path>: no voxel below 0 HU ...: air is not near -1000 HU ...``.
    """
    low, high = float(image.min()), float(image.max())
    if low >= 0 and high >= HU_AIR_MISSING_MAX_HU:
        raise CTInputError(
            f"{path}: no voxel below 0 HU (values {low:.0f}..{high:.0f}): air is not near -1000 HU; likely CT "
            "numbers stored as HU + 1024 without their rescale intercept (-1024; DICOM RescaleIntercept, NIfTI "
            "scl_inter)"
        )


def memory_limit_bytes() -> int:
    """Bytes of memory this process may use at most: physical memory, or the cgroup limit if lower."""
    limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for cgroup in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(cgroup).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return limit


def _check_voxel_count(path: Path, shape: Sequence[int], stored_bytes: int) -> None:
    """Refuse, from the header's ``shape`` (every dimension, components included), more voxels than
    :data:`MAX_VOXELS` or than memory holds: the read keeps the stored voxels (``stored_bytes`` each) and their
    float32 copy (4 bytes each) at once."""
    size = "x".join(str(int(n)) for n in shape)
    count = math.prod(int(n) for n in shape)
    if count > MAX_VOXELS:
        raise CTInputError(
            f"{path}: header declares {size} voxels ({count:.3g}), more than a CT may have "
            f"(MAX_VOXELS = {MAX_VOXELS:.3g}); broken header?"
        )
    need, have = count * (stored_bytes + 4), memory_limit_bytes()
    if need > have:
        raise CTInputError(
            f"{path}: header declares {size} voxels; reading them needs {need / 2**30:.1f} GiB, more than the "
            f"{have / 2**30:.1f} GiB of memory here"
        )


def _check_voxel_type(path: Path | str, kind: str) -> None:
    """Refuse a voxel type (numpy name, or e.g. ``RGB``) that is not in :data:`SUPPORTED_VOXEL_TYPES`."""
    if kind in SUPPORTED_VOXEL_TYPES:
        return
    if kind in ("int8", "bool"):
        why = "too narrow for HU (-1024..3071)"
    elif kind.startswith("complex"):
        why = "complex values are not HU"
    elif kind.startswith(("int", "uint")):
        why = "64-bit integers are not wrapped for Python by ITK"
    else:
        why = "a CT has one HU value per voxel"
    raise CTInputError(
        f"{path}: voxel type {kind} is not supported ({why}); expected one of {', '.join(SUPPORTED_VOXEL_TYPES)}"
    )


def _check_itk_header(path: Path) -> None:
    """NRRD / MetaImage (any file ITK reads): voxel type and count from ITK's ImageIO header, no pixel read."""
    try:
        io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
        if io is None:
            raise RuntimeError("Could not create IO object")
        io.SetFileName(str(path))
        io.ReadImageInformation()
    except Exception as exc:
        raise CTInputError(f"{path}: unreadable or corrupt image ({_itk_reason(exc)})") from exc
    component = _ITK_COMPONENT.get(io.GetComponentTypeAsString(io.GetComponentType()), "unknown")
    pixel, components = io.GetPixelTypeAsString(io.GetPixelType()), io.GetNumberOfComponents()
    if pixel == "complex":
        _check_voxel_type(path, "complex64" if component == "float32" else "complex128")
    elif pixel != "scalar" or components != 1:
        name = pixel.upper() if pixel in ("rgb", "rgba") else pixel
        _check_voxel_type(path, f"{name} ({components} values per voxel)")
    _check_voxel_type(path, component)
    shape = [io.GetDimensions(i) for i in range(io.GetNumberOfDimensions())]
    _check_voxel_count(path, shape, np.dtype(component).itemsize)
    _check_raw_payload(path, math.prod(shape) * np.dtype(component).itemsize)


def _check_raw_payload(path: Path, nbytes: int) -> None:
    """An uncompressed MetaImage / NRRD (data in the file or one detached file) must hold ``nbytes`` of voxels.

    ITK allocates the whole image before it finds a short file. Compressed, listed or skipped-byte data files
    are left to ITK.
    """
    if not path.name.lower().endswith((".mha", ".mhd", ".nrrd", ".nhdr")):
        return
    fields, header_bytes = {}, 0
    with open(path, "rb") as file:
        for raw in iter(lambda: file.readline(65536), b""):
            header_bytes += len(raw)
            line = raw.decode("latin-1").strip()
            if path.name.lower().endswith((".nrrd", ".nhdr")):
                if not line and fields:  # the blank line that ends a NRRD header
                    break
                key, sep, value = line.partition(":")
            else:
                key, sep, value = line.partition("=")
            if sep:
                fields[key.strip().lower().replace(" ", "")] = value.strip().lstrip("=").strip()
            if key.strip().lower() == "elementdatafile":  # the last MetaImage header line
                break
    if path.name.lower().endswith((".mha", ".mhd")):
        detached = fields.get("elementdatafile", "LOCAL")
        raw = fields.get("compresseddata", "false").lower() == "false" and "headersize" not in fields
    else:
        detached = fields.get("datafile", "LOCAL")
        raw = fields.get("encoding", "") == "raw" and not {"lineskip", "byteskip"} & set(fields)
    if not raw or detached.upper() == "LIST" or " " in detached:
        return
    data = path if detached == "LOCAL" else path.parent / detached
    held = os.path.getsize(data) - (header_bytes if detached == "LOCAL" else 0) if data.is_file() else 0
    if held < nbytes:
        raise CTInputError(
            f"{path}: unreadable or corrupt image (truncated: the header declares {nbytes} bytes of voxels, "
            f"{data.name} holds {max(held, 0)})"
        )


def _check_nifti(path: Path) -> None:
    """A NIfTI file from its header (nibabel; cheap), then its payload: voxel type, count, geometry, gzip, size."""
    try:
        nifti = nib.load(path)
        start = int(nifti.dataobj.offset)
        with ImageOpener(path) as file:  # the header as stored: nib.load's copy "fixes" pixdim 0
            header = type(nifti.header).from_fileobj(file, check=False)
    except Exception as exc:  # nibabel raises OSError, EOFError, zlib.error, ImageFileError...
        raise CTInputError(f"{path}: unreadable or corrupt image ({_first_line(exc)})") from exc
    dtype = header.get_data_dtype()
    kind = "RGB" if dtype.names else dtype.name
    _check_voxel_type(path, f"{kind} ({len(dtype.names)} values per voxel)" if dtype.names else kind)
    shape = header.get_data_shape()
    _check_voxel_count(path, shape, dtype.itemsize)

    # Geometry: ITK (and nibabel) silently take a pixdim that is 0, negative or NaN as 1 mm.
    pixdim = [float(v) for v in header["pixdim"][1 : 1 + min(len(shape), 3)]]
    if not all(math.isfinite(v) and v > 0 for v in pixdim):
        codes = int(header["qform_code"]), int(header["sform_code"])
        sizes = "x".join(f"{v:g}" for v in pixdim)
        if codes == (0, 0):
            raise CTInputError(f"{path}: missing geometry: voxel size (pixdim) {sizes} and no qform/sform")
        raise CTInputError(
            f"{path}: broken geometry: voxel size (pixdim) {sizes} is not positive (ITK would read 1 mm; "
            f"qform_code {codes[0]}, sform_code {codes[1]})"
        )
    if not np.isfinite(header.get_best_affine()).all():
        raise CTInputError(f"{path}: broken geometry: qform/sform holds NaN or infinite values")
    _check_nifti_payload(path, header, start)


def _check_nifti_payload(path: Path, header: nib.Nifti1Header, start: int) -> None:
    """The NIfTI payload: gzip CRC and length, as many bytes as the header declares from byte ``start`` (the
    voxel offset), no NaN in float voxels.

    ITK's NIfTI reader zero-fills a truncated file, does not check a ``.nii.gz``'s CRC (damaged streams read as
    garbage, e.g. HU -2.1e9..2.1e9) and turns NaN into 0, so the file is looked at here, in 16 MiB pieces: an
    uncompressed file's size is compared with the header, a compressed one is decompressed once (all gzip
    members, CRC-32 and length of each checked by zlib) and never held whole in memory.
    """
    dtype = header.get_data_dtype()
    end = start + math.prod(header.get_data_shape()) * dtype.itemsize
    finite_check = dtype.kind == "f"
    scan = _PayloadScan(start, end, dtype if finite_check else None)
    try:
        with open(path, "rb") as file:
            if path.name.endswith(".gz"):
                _gunzip_into(file, scan)
            elif finite_check:
                while piece := file.read(_CHUNK):
                    scan.feed(piece)
            else:
                scan.seen = os.fstat(file.fileno()).st_size
    except zlib.error as exc:
        reason = str(exc).removeprefix("Error -3 while decompressing data: ")
        if "incorrect data check" in reason:
            reason = "CRC-32 check failed"
        elif "incorrect length check" in reason:
            reason = "length check failed"
        raise CTInputError(f"{path}: unreadable or corrupt image (gzip data damaged: {reason})") from exc
    except OSError as exc:
        raise CTInputError(f"{path}: unreadable or corrupt image ({_first_line(exc)})") from exc
    if scan.non_finite:
        raise CTInputError(f"{path}: image holds NaN or infinite values")
    if scan.seen < end:
        size = "x".join(str(n) for n in header.get_data_shape())
        raise CTInputError(
            f"{path}: unreadable or corrupt image (truncated: the header declares {size} {dtype.name} voxels, "
            f"{end - start} bytes from byte {start}, the {'decompressed ' if path.name.endswith('.gz') else ''}"
            f"file holds {max(scan.seen - start, 0)})"
        )


class _PayloadScan:
    """Counts the bytes fed to it and, given a float ``dtype``, flags non-finite values in bytes ``[start, end)``."""

    def __init__(self, start: int, end: int, dtype: np.dtype | None):
        self.start, self.end, self.dtype = start, end, dtype
        self.seen, self.carry, self.non_finite = 0, b"", False

    def feed(self, piece: bytes) -> None:
        offset, self.seen = self.seen, self.seen + len(piece)
        if self.dtype is None or self.non_finite:
            return
        payload = self.carry + piece[max(self.start - offset, 0) : max(self.end - offset, 0)]
        whole = len(payload) // self.dtype.itemsize * self.dtype.itemsize
        if whole and not np.isfinite(np.frombuffer(payload, self.dtype, whole // self.dtype.itemsize)).all():
            self.non_finite = True
        self.carry = payload[whole:]


def _gunzip_into(file, scan: _PayloadScan) -> None:
    """Decompress every gzip member of ``file`` into ``scan`` (zlib checks each CRC-32 and length); raise
    ``zlib.error`` for damage and for a stream that ends early. Bytes after the last member are ignored."""
    stream, pending = zlib.decompressobj(wbits=31), file.read(1 << 20)
    if not pending.startswith(_GZIP_MAGIC):
        raise zlib.error("not a gzip file")
    while True:
        if not pending:
            pending = file.read(1 << 20)
            if not pending:
                scan.feed(stream.flush())
                raise zlib.error("compressed stream ends early (file truncated)")
        scan.feed(stream.decompress(pending, _CHUNK))
        pending = stream.unconsumed_tail
        if stream.eof:
            pending = stream.unused_data + pending
            if len(pending) < 2:
                pending += file.read(1 << 20)
            if not pending.startswith(_GZIP_MAGIC):
                return
            stream = zlib.decompressobj(wbits=31)


def _dicom_series_files(folder: Path) -> list[str]:
    """The files of the one DICOM series in ``folder``, in ITK's slice order (MONAI ITKReader's series rules)."""
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")  # series date, as MONAI's ITKReader
    names.SetDirectory(str(folder))
    series = names.GetSeriesUIDs()
    if len(series) != 1:
        raise CTInputError(f"{folder}: folder holds {len(series)} DICOM series, expected one")
    return list(names.GetFileNames(series[0]))


#: DICOM fields that differ between two series even when anonymisation has emptied their UIDs.
_SERIES_FIELDS = (
    "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "ImageType", "ConvolutionKernel",
    "Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "SliceThickness", "SamplesPerPixel",
    "BitsAllocated", "PixelRepresentation",
)


def _check_dicom_folder(folder: Path) -> list[str]:
    """Read the header of every DICOM file in ``folder`` (no pixels) and check that they make one CT series.

    Returns:
        The image files of the series (paths as ``str``), in folder order.

    Raises:
        CTInputError: empty folder, no DICOM file, unreadable or truncated file (named), Modality not CT,
            several series (by UID, or by geometry / acquisition fields when UIDs are empty), missing
            geometry, duplicate slice positions, a gap or uneven spacing between slices, too many voxels.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise CTInputError(f"{folder}: empty folder (expected a DICOM series)")
    headers = {f: _read_dicom_header(folder, f) for f in files if is_dicom(f)}
    if not headers:
        raise CTInputError(f"{folder}: folder holds no DICOM files (subfolders are not searched)")
    images = {f: ds for f, (ds, _) in headers.items() if "Rows" in ds}  # DICOMDIR, SR... hold no image
    if not images:
        raise CTInputError(f"{folder}: folder holds no DICOM image (only non-image DICOM objects)")
    for ds in images.values():
        _check_modality(folder, ds)

    groups: dict[tuple, list[Path]] = {}
    for f, ds in images.items():
        groups.setdefault(tuple(_series_value(ds, name) for name in _SERIES_FIELDS), []).append(f)
    if len(groups) > 1:
        keys = list(groups)
        differing = [n for i, n in enumerate(_SERIES_FIELDS) if len({k[i] for k in keys}) > 1]
        sizes = "+".join(str(len(g)) for g in groups.values())
        raise CTInputError(
            f"{folder}: folder holds {len(groups)} DICOM series, expected one ({sizes} files differing in "
            f"{', '.join(differing)})"
        )
    _check_dicom_voxels(folder, list(images.values()))
    _check_slice_positions(folder, images)
    for f, ds in images.items():
        _check_dicom_pixel_data(folder, f, ds, headers[f][1])
    return [str(f) for f in images]


def _series_value(ds: pydicom.Dataset, name: str):
    """A hashable, rounded value of one DICOM field (``None`` when absent)."""
    value = ds.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        return tuple(round(float(v), 4) if isinstance(v, (int, float)) else str(v) for v in value)
    if isinstance(value, float):
        return round(value, 4)
    return str(value)


def _read_dicom_header(path: Path, dicom_file: Path) -> tuple[pydicom.Dataset, int]:
    """One DICOM file's header (no pixel data) and the byte offset where reading stopped (its Pixel Data)."""
    try:
        with open(dicom_file, "rb") as fp:
            return pydicom.dcmread(fp, stop_before_pixels=True), fp.tell()
    except Exception as exc:  # InvalidDicomError, OSError, EOFError, struct.error...
        raise CTInputError(f"{path}: unreadable DICOM file {dicom_file} ({_first_line(exc)})") from exc


def _check_modality(path: Path, ds: pydicom.Dataset) -> None:
    modality = ds.get("Modality")
    if modality != "CT":
        raise CTInputError(f"{path}: DICOM Modality is {modality!r}, not 'CT'")


def _check_dicom_voxels(path: Path, headers: Sequence[pydicom.Dataset]) -> None:
    """Voxel type and count (Rows x Columns x slices or frames) of one DICOM series from its headers."""
    ds = headers[0]
    bits, signed = int(ds.get("BitsAllocated", 16)), int(ds.get("PixelRepresentation", 0))
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples != 1:
        _check_voxel_type(path, f"{ds.get('PhotometricInterpretation', 'colour')} ({samples} values per voxel)")
    kind = "bool" if bits == 1 else f"{'int' if signed else 'uint'}{bits}" if bits in (8, 16, 32) else f"{bits}-bit"
    _check_voxel_type(path, kind)
    slices = sum(int(h.get("NumberOfFrames", 1) or 1) for h in headers)
    _check_voxel_count(path, (int(ds.Rows), int(ds.Columns), slices), 4)  # GDCM may rescale to float


def _check_slice_positions(folder: Path, images: Mapping[Path, pydicom.Dataset]) -> None:
    """One slice per position along the slice normal, evenly spaced (:data:`SLICE_SPACING_TOLERANCE`), no gap;
    duplicate positions that split by AcquisitionNumber are two series."""
    if len(images) < 2 or any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in images.values()):
        return  # one slice (refused later as not 3-D) or multi-frame files: no per-file positions to compare
    for f, ds in images.items():
        if len(ds.get("ImagePositionPatient") or []) != 3 or len(ds.get("ImageOrientationPatient") or []) != 6:
            raise CTInputError(
                f"{folder}: missing geometry: {f.name} has no ImagePositionPatient / ImageOrientationPatient"
            )
    orientation = np.asarray(next(iter(images.values())).ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = sorted(
        (float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)), f) for f, ds in images.items()
    )
    steps = np.diff([p for p, _ in positions])
    if (steps <= SLICE_POSITION_TOLERANCE_MM).any():
        i = int(np.argmax(steps <= SLICE_POSITION_TOLERANCE_MM))
        (z, a), (_, b) = positions[i], positions[i + 1]
        acquisitions = {str(images[f].get("AcquisitionNumber")) for f in images}
        counts = {}
        for p, f in positions:
            key = (round(p / SLICE_POSITION_TOLERANCE_MM), str(images[f].get("AcquisitionNumber")))
            counts[key] = counts.get(key, 0) + 1
        if len(acquisitions) > 1 and max(counts.values()) == 1:
            raise CTInputError(
                f"{folder}: folder holds {len(acquisitions)} DICOM series, expected one (same geometry and "
                f"series fields, AcquisitionNumber {', '.join(sorted(acquisitions))}; slices repeat positions)"
            )
        raise CTInputError(
            f"{folder}: duplicate slice position {z:.2f} mm along the slice normal ({a.name}, {b.name})"
        )
    step = float(np.median(steps))
    tolerance = max(SLICE_POSITION_TOLERANCE_MM, SLICE_SPACING_TOLERANCE * step)
    for i, d in enumerate(steps):
        if abs(d - step) <= tolerance:
            continue
        (z0, a), (z1, b) = positions[i], positions[i + 1]
        missing = round(d / step) - 1
        if missing >= 1 and abs(d - (missing + 1) * step) <= tolerance * (missing + 1):
            raise CTInputError(
                f"{folder}: gap in the series: {d:.3g} mm between slices at {z0:.2f} and {z1:.2f} mm ({a.name}, "
                f"{b.name}) where the others are {step:.3g} mm apart; {missing} slice(s) missing"
            )
        raise CTInputError(
            f"{folder}: uneven slice spacing: {d:.3g} mm between slices at {z0:.2f} and {z1:.2f} mm ({a.name}, "
            f"{b.name}) where the others are {step:.3g} mm apart"
        )


def _check_dicom_pixel_data(path: Path, dicom_file: Path, ds: pydicom.Dataset, offset: int) -> None:
    """Refuse a DICOM file cut short: walk its Pixel Data element (and encapsulated fragments) with seeks.

    ``ds`` is the file's header read with ``stop_before_pixels=True``, which stopped at byte ``offset``.
    Deflated transfer syntaxes are skipped.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or syntax.is_deflated:
        return
    little, implicit = syntax.is_little_endian, syntax.is_implicit_VR
    order = "<" if little else ">"
    size = os.path.getsize(dicom_file)

    def short(problem):
        return CTInputError(f"{path}: truncated or corrupt DICOM file {dicom_file} ({problem})")

    with open(dicom_file, "rb") as fp:
        fp.seek(offset)
        head = fp.read(8)
        if len(head) < 8:
            raise short(f"no pixel data: the file ends at byte {size}")
        group, element = struct.unpack(order + "HH", head[:4])
        if group != 0x7FE0:
            return  # not a pixel data element: nothing known to check
        if implicit:
            length = struct.unpack(order + "I", head[4:8])[0]
        elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN", b"OV"):
            extra = fp.read(4)
            if len(extra) < 4:
                raise short(f"pixel data header cut at byte {size}")
            length = struct.unpack(order + "I", extra)[0]
        else:
            length = struct.unpack(order + "H", head[6:8])[0]
        start = fp.tell()
        if length != 0xFFFFFFFF:
            if start + length > size:
                raise short(f"pixel data declares {length} bytes, the file holds {size - start}")
            return
        position = start  # encapsulated: items (FFFE,E000) until the sequence delimiter (FFFE,E0DD)
        fragments = 0
        while True:
            fp.seek(position)
            item = fp.read(8)
            if len(item) < 8:
                raise short(f"encapsulated pixel data ends at byte {size} after {fragments} item(s), no delimiter")
            tag_group, tag_element, item_length = struct.unpack(order + "HHI", item)
            if (tag_group, tag_element) == (0xFFFE, 0xE0DD):
                break
            if (tag_group, tag_element) != (0xFFFE, 0xE000) or item_length == 0xFFFFFFFF:
                raise short(f"bad item in encapsulated pixel data at byte {position}")
            if position + 8 + item_length > size:
                raise short(f"pixel data fragment of {item_length} bytes at byte {position}, the file ends at {size}")
            position += 8 + item_length
            fragments += 1
        if fragments < 2:  # the basic offset table, then at least one fragment of compressed pixels
            raise short("encapsulated pixel data holds no fragment")


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


def _itk_reason(exc: Exception) -> str:
    """The informative line of an ITK exception (which spans many lines and repeats source paths)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    teem = [line for line in lines if line.startswith("[nrrd]")]  # NRRD: the last of teem's lines is the cause
    if teem:
        return teem[-1].split(": ", 1)[-1]
    for line in lines:
        if "ITK ERROR" in line or "itk::ERROR" in line:
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
