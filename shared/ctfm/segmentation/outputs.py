"""What the segmentation bundle writes: label maps put back on the input's grid, then NIfTI, PNG and DICOM SEG.

:class:`LabelsToInputGridd` maps the network-grid label map to the input CT's voxel grid without float copies;
:class:`WriteSegmentationd` writes each case's outputs together, all or nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Hashable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ImageMetaKey

from ctfm.datalist import OutputGuard, output_stem
from ctfm.errors import CTFMError
from ctfm.files import remove_stale_temporaries

__all__ = ["LabelsToInputGridd", "WriteSegmentationd", "labels_to_input_grid", "source_of"]

logger = logging.getLogger("ctfm.segmentation")


class LabelsToInputGridd(MapTransform):
    """Put a label map from the network's grid back onto the input's voxel grid, nearest neighbour, in uint8.

    ``Invertd(nearest_interp=True)`` undoes the preprocessing step by step with float resampling at the
    input's resolution (for a 512x512x400 CT: about 5 GiB of float64 grids and copies). CT-FM's preprocessing
    (orientation, resampling that keeps the axes, crop, pad) maps each input axis to one network axis, so the
    voxel ``i`` of an input axis takes the label at ``round(scale * i + offset)`` of its network axis:
    ``labels[ix_(rows, columns, slices)]``, no float copy. Voxels outside the network grid (cropped away) are
    background. Exact half-voxel ties go to the lower index, where ``Invertd`` puts them too: on the sample CTs
    the result equals ``Invertd``'s voxel for voxel.

    ``d[key]``: ``(1, S, P, L)`` labels whose ``affine`` is the network grid's (as the inferer returns them);
    the input's grid is ``meta["original_affine"]`` and ``meta["spatial_shape"]`` (set by the reader). The output
    is a ``(1, X, Y, Z)`` MetaTensor with the input's affine and meta, ``applied_operations`` emptied.
    """

    def __init__(self, keys: KeysCollection = "pred", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = labels_to_input_grid(d[key])
        return d


def labels_to_input_grid(labels: MetaTensor) -> MetaTensor:
    """See :class:`LabelsToInputGridd`; ``labels`` is one ``(1, S, P, L)`` MetaTensor."""
    meta = dict(labels.meta)
    if "original_affine" not in meta or "spatial_shape" not in meta:
        raise CTFMError(f"{source_of(labels)}: label map meta lacks the input's original_affine / spatial_shape")
    source_affine = np.asarray(_numpy(labels.affine), float)
    target_affine = np.asarray(_numpy(meta["original_affine"]), float)
    target_shape = [int(s) for s in _numpy(meta["spatial_shape"])]
    # network voxel coordinates of input voxel (i, j, k): mapping[:3, :3] @ (i, j, k) + mapping[:3, 3]
    mapping = np.linalg.inv(source_affine) @ target_affine
    linear = mapping[:3, :3]
    axes = np.argmax(np.abs(linear), axis=0)  # network axis fed by each input axis
    off_axis = np.abs(linear).copy()
    off_axis[axes, range(3)] = 0
    if sorted(axes) != [0, 1, 2] or off_axis.max() > 1e-4 * np.abs(linear).max():
        raise CTFMError(f"{source_of(labels)}: network grid is not axis-aligned with the input; use Invertd instead")
    source = labels.as_tensor()[0] if hasattr(labels, "as_tensor") else torch.as_tensor(labels)[0]
    dtype = torch.uint8 if float(source.max()) < 256 else torch.int16
    source = source.to(dtype)
    index, inside = [], []
    for target_axis in range(3):
        source_axis = axes[target_axis]
        position = linear[source_axis, target_axis] * np.arange(target_shape[target_axis]) + mapping[source_axis, 3]
        nearest = np.ceil(position - 0.5 - 1e-6).astype(np.int64)  # half-voxel ties go down, where Invertd lands
        valid = (nearest >= 0) & (nearest < source.shape[source_axis])
        index.append(torch.as_tensor(np.clip(nearest, 0, source.shape[source_axis] - 1)))
        inside.append(torch.as_tensor(valid))
    # gather along the network axes in input-axis order: permute the source so its axes follow the input's
    ordered = source.permute(*[int(a) for a in axes])
    out = ordered[index[0][:, None, None], index[1][None, :, None], index[2][None, None, :]]
    mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    out = out * mask.to(out.dtype)
    meta.pop("affine", None)
    result = MetaTensor(out[None], affine=torch.as_tensor(target_affine), meta=meta)
    result.applied_operations = []
    return result


def _numpy(value):
    return value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)


class WriteSegmentationd(MapTransform):
    """Write each case's outputs next to each other, all or nothing: ``<stem>_<postfix><output_ext>`` (uint8
    label map on the input's grid), ``<stem>_<postfix>.png`` (three-plane preview) and, for a DICOM series
    input, ``<stem>_<postfix>.dcm`` (DICOM SEG).

    ``<stem>`` is the input's path relative to ``data_root_dir`` without its image extension
    (:func:`ctfm.datalist.output_stem`), so ``s1/ct.nii.gz`` and ``s2/ct.nii.gz`` give ``s1/ct_seg.nii.gz`` and
    ``s2/ct_seg.nii.gz``. Two inputs of one run that would still share an output stop the run; an output left by
    an earlier run is replaced only when it was made from the same input (the label map records its input in a
    NIfTI comment extension). ``d[key]`` is the label map ``(1, X, Y, Z)`` on the input's grid whose meta names
    the input (``filename_or_obj``). The files are first written to a temporary folder and moved into place only
    when all of them are complete.

    Args:
        output_dir: where the outputs go.
        class_names: label id -> structure name (legend and DICOM segment labels).
        data_root_dir: the folder the inputs' names are taken relative to (the bundle's ``dataset_dir``).
        output_postfix: appended to the input's name.
        output_ext: ``.nii.gz`` or ``.nii``.
        preview: write the PNG.
        dicom_seg: write a DICOM SEG when the input is a DICOM series folder.
        version: recorded as the algorithm version in the DICOM SEG.
    """

    OUTPUT_EXTENSIONS = (".nii.gz", ".nii")

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike = "./eval",
        class_names: Mapping[int, str] | None = None,
        data_root_dir: str | os.PathLike | None = None,
        output_postfix: str = "seg",
        output_ext: str = ".nii.gz",
        preview: bool = True,
        dicom_seg: bool = True,
        version: str = "0.1.0",
    ):
        super().__init__(keys)
        if output_ext not in self.OUTPUT_EXTENSIONS:
            raise CTFMError(f"output_ext {output_ext!r}: label maps are written as {' or '.join(self.OUTPUT_EXTENSIONS)}")
        self.output_dir = Path(output_dir)
        self.class_names = {int(k): str(v) for k, v in (class_names or {}).items()}
        self.data_root_dir = data_root_dir
        self.output_postfix = output_postfix
        self.output_ext = output_ext
        self.preview = preview
        self.dicom_seg = dicom_seg
        self.version = version
        self._guard = OutputGuard(_recorded_source)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            self.write(d[key])
        return d

    def outputs_for(self, source: str | os.PathLike) -> dict[str, Path]:
        """The files written for the input ``source``, by kind (``nifti``, ``png``, ``dicom_seg``)."""
        source = Path(source)
        stem = self.output_dir / f"{output_stem(source, self.data_root_dir)}_{self.output_postfix}"
        outputs = {"nifti": stem.with_name(stem.name + self.output_ext)}
        if self.preview:
            outputs["png"] = stem.with_name(stem.name + ".png")
        if self.dicom_seg and source.is_dir():
            outputs["dicom_seg"] = stem.with_name(stem.name + ".dcm")
        return outputs

    def write(self, pred: MetaTensor) -> dict[str, Path]:
        source = str(pred.meta.get(ImageMetaKey.FILENAME_OR_OBJ, "")) if hasattr(pred, "meta") else ""
        if not source:
            raise CTFMError("prediction carries no input file name (meta 'filename_or_obj'); cannot name outputs")
        labels = np.asarray(pred.detach().cpu().numpy()[0]).round().astype(np.uint8 if int(pred.max()) < 256 else np.int16)
        affine = np.asarray(pred.affine.detach().cpu().numpy() if torch.is_tensor(pred.affine) else pred.affine, float)
        outputs = self.outputs_for(source)
        self._guard.check(source, outputs["nifti"])
        try:
            for path in outputs.values():
                path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.output_dir)  # staging folders of killed runs
            staging = Path(tempfile.mkdtemp(prefix=f".ctfm_seg.{os.getpid()}.", suffix=".tmp", dir=self.output_dir))
        except OSError as err:
            raise CTFMError(f"{err.filename or self.output_dir}: cannot write outputs ({err.strerror})") from None
        try:
            staged = {kind: staging / path.name for kind, path in outputs.items()}
            nifti = nib.Nifti1Image(labels, affine)
            nifti.set_qform(affine, code=1)
            nifti.set_sform(affine, code=1)
            nifti.header.extensions.append(nib.nifti1.Nifti1Extension("comment", _provenance(source)))
            nib.save(nifti, staged["nifti"])
            if "png" in staged:
                from ctfm.ct_io import read_ct
                from ctfm.preview import render_preview

                ct = read_ct(source)
                render_preview(
                    ct[0].numpy(), labels, affine, staged["png"], self.class_names, title=Path(source).name
                )
            if "dicom_seg" in staged:
                from ctfm.segmentation.dicom_seg import write_dicom_seg

                write_dicom_seg(staged["dicom_seg"], labels, affine, source, self.class_names, algorithm_version=self.version)
            for kind in sorted(outputs, key=lambda k: k == "nifti"):  # the label map, which names its input, last
                os.replace(staged[kind], outputs[kind])
        except OSError as err:
            raise CTFMError(f"{err.filename or self.output_dir}: cannot write outputs ({err.strerror})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._guard.done(source, outputs["nifti"])
        logger.info("wrote %s", ", ".join(str(p) for p in outputs.values()))
        return outputs


_PROVENANCE_KEY = "ctfm_input"


def _provenance(source: str) -> bytes:
    return json.dumps({_PROVENANCE_KEY: str(Path(source).resolve())}).encode()


def _recorded_source(label_map: Path) -> str | None:
    """The input recorded in a label map written by :class:`WriteSegmentationd`, or ``None``."""
    try:
        extensions = nib.load(label_map).header.extensions
    except Exception:  # an unreadable earlier output records nothing
        return None
    for ext in extensions:
        try:
            value = json.loads(ext.get_content())
        except (ValueError, TypeError, UnicodeDecodeError):
            continue
        if isinstance(value, dict) and _PROVENANCE_KEY in value:
            return str(value[_PROVENANCE_KEY])
    return None


def source_of(image) -> str:
    meta = getattr(image, "meta", None) or {}
    return str(meta.get(ImageMetaKey.FILENAME_OR_OBJ, "case"))
