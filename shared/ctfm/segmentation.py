"""Whole-body and tumour segmentation on the shared CT-FM encoder: the network, its weights, training hooks,
evaluation and the output writer of the ``ctfm_segmentation`` bundle.

The network is MONAI's ``SegResNetDS`` whose ``encoder`` is :class:`ctfm.encoder.CTFMEncoder` -- the same
definition and state-dict keys as MONAI's ``SegResEncoder`` -- so CT-FM's published segmentation checkpoints
(``ct_fm_segresnet``, ``whole_body_segmentation``) and every encoder layout of :mod:`ctfm.checkpoint` load
without key surgery. Deep supervision returns one output per decoder level in training, the full-resolution
one in ``eval()``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.metrics import DiceMetric, SurfaceDistanceMetric
from monai.networks.nets import SegResNetDS
from monai.transforms import Compose, InvertibleTransform, MapTransform
from monai.utils import ImageMetaKey
from torch import nn

from ctfm.checkpoint import LoadReport, load_weights
from ctfm.encoder import CTFM_BLOCKS_DOWN, CTFM_INIT_FILTERS, CTFMEncoder
from ctfm.errors import CTFMError
from ctfm.files import atomic_path

logger = logging.getLogger("ctfm.segmentation")

#: TotalSegmentator v2: 117 structures + background.
TOTALSEG_NUM_CLASSES = 118


class CTFMSegResNetDS(SegResNetDS):
    """``SegResNetDS`` on the CT-FM encoder: ``(B, in_channels, S, P, L)`` in [0, 1] -> class logits.

    Args:
        init_filters: channels of the first level (CT-FM: 32; the shipped demo: 8).
        in_channels: input channels (1 for a CT scaled from [-1024, 2048] HU to [0, 1]).
        out_channels: classes including background (TotalSegmentator v2: 118).
        dsdepth: decoder levels with a deep-supervision head (CT-FM: 4). In ``train()`` the forward returns
            ``dsdepth`` logit maps, full resolution first, each halving the previous; in ``eval()`` only the first.
        blocks_down: residual blocks per encoder level (CT-FM: ``(1, 2, 2, 4, 4)``).
        encoder_weights: optional checkpoint (any layout :func:`ctfm.checkpoint.load_weights` reads: the pre-training
            export, a Hugging Face folder, a Lightning or a SegResNetDS checkpoint) loaded into ``.encoder`` only;
            the decoder starts from scratch. The load report is logged and kept as ``encoder_report``.
        upsample_mode: decoder upsampling (MONAI's default ``"deconv"``, as CT-FM).

    Spatial input sizes must be multiples of 16 (four stride-2 levels).
    """

    def __init__(
        self,
        init_filters: int = CTFM_INIT_FILTERS,
        in_channels: int = 1,
        out_channels: int = TOTALSEG_NUM_CLASSES,
        dsdepth: int = 4,
        blocks_down: Sequence[int] = CTFM_BLOCKS_DOWN,
        encoder_weights: str | os.PathLike | None = None,
        upsample_mode: str = "deconv",
    ):
        super().__init__(
            spatial_dims=3,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=out_channels,
            blocks_down=tuple(blocks_down),
            dsdepth=dsdepth,
            upsample_mode=upsample_mode,
        )
        self.encoder = CTFMEncoder(init_filters=init_filters, in_channels=in_channels, blocks_down=blocks_down)
        self.encoder_report: LoadReport | None = None
        if encoder_weights:
            self.encoder_report = load_weights(self.encoder, encoder_weights)
            logger.info("encoder initialised from %s", self.encoder_report.summary())


def default_bundle_root(name: str = "ctfm_segmentation") -> str:
    """``bundle_root`` for a config run without ``--bundle_root``.

    ``"."`` when the working directory is the bundle (the model zoo's convention); otherwise this repository's
    ``bundles/<name>`` when the package is installed from a clone (so ``python -m monai.bundle run --config_file
    bundles/<name>/configs/inference.json`` works from the repository root); otherwise ``"."``. MONAI Label and
    ``--bundle_root`` override it.
    """
    if (Path.cwd() / "configs" / "metadata.json").is_file():
        return "."
    clone = Path(__file__).resolve().parents[2] / "bundles" / name
    return str(clone) if (clone / "configs" / "metadata.json").is_file() else "."


def load_network(network: nn.Module, path: str | os.PathLike, sha256: str | None = None) -> nn.Module:
    """Load a whole network's weights (strict, any layout of :mod:`ctfm.checkpoint`) and return the network.

    A missing file, a checkpoint of another architecture or width, or a wrong hash raises the loader's one-line
    :class:`~ctfm.checkpoint.CheckpointError`.
    """
    report = load_weights(network, path, strict=True, sha256=sha256)
    logger.info("network weights: %s", report.summary())
    return network


def labels_and_reference(output: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted labels, reference labels)``, both ``(B, 1, ...)``, from a trainer's undecollated output.

    Takes the full-resolution head when the network returned deep-supervision outputs. For MONAI's
    ``MeanDice(num_classes=...)``, which then needs no one-hot volumes.
    """
    pred = output["pred"]
    logits = pred[0] if isinstance(pred, (list, tuple)) else pred
    return logits.detach().argmax(dim=1, keepdim=True), output["label"]


def inline_composes(transform: Callable) -> Compose:
    """A flat ``Compose`` with every nested ``Compose`` (subclasses such as ``CTFMPreprocessd`` included) inlined.

    ``CacheDataset`` caches up to the first ``Randomizable`` transform and MONAI counts every ``Compose`` as one,
    while ``Compose.flatten`` inlines only exact ``Compose`` instances: without this, a nested
    ``CTFMPreprocessd`` (orientation, resampling, cropping) and everything after it would run on every
    iteration instead of once.
    """
    steps = transform.transforms if isinstance(transform, Compose) else [transform]
    flat = []
    for step in steps:
        flat += inline_composes(step).transforms if isinstance(step, Compose) else [step]
    return Compose(flat)


class HideStringSiblingsd(InvertibleTransform, MapTransform):
    """Run ``transform`` with string entries named ``<key>_*`` (MONAI Label's ``image_path``) set aside.

    monai 1.6.1's ``Spacingd`` calls ``.update()`` on every ``<key>_*`` entry of a NIfTI input, which fails on
    MONAI Label's ``image_path`` string. Wrapping the preprocessing in this transform keeps a bundle with
    ``Spacingd`` usable from MONAI Label; inversion is delegated unchanged.
    """

    def __init__(self, keys: KeysCollection, transform: Callable):
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self.transform = transform

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        hidden = {
            k: d.pop(k)
            for k in list(d)
            if isinstance(k, str) and isinstance(d[k], (str, os.PathLike)) and any(k.startswith(f"{key}_") for key in self.keys)
        }
        out = dict(self.transform(d))
        out.update(hidden)
        return out

    def inverse(self, data: Mapping[Hashable, object]) -> dict:
        return self.transform.inverse(data)


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


def labels_to_input_grid(labels) -> "MetaTensor":
    """See :class:`LabelsToInputGridd`; ``labels`` is one ``(1, S, P, L)`` MetaTensor."""
    from monai.data import MetaTensor

    meta = dict(labels.meta)
    if "original_affine" not in meta or "spatial_shape" not in meta:
        raise CTFMError(f"{_source(labels)}: label map meta lacks the input's original_affine / spatial_shape")
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
        raise CTFMError(f"{_source(labels)}: network grid is not axis-aligned with the input; use Invertd instead")
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
    """Write each case's outputs next to each other, all or nothing: ``<name>_<postfix>.nii.gz`` (uint8 label
    map on the input's grid), ``<name>_<postfix>.png`` (three-plane preview) and, for a DICOM series input,
    ``<name>_<postfix>.dcm`` (DICOM SEG).

    ``d[key]`` is the label map ``(1, X, Y, Z)`` already mapped back to the input's space (``Invertd``), whose
    meta names the input (``filename_or_obj``). The files are first written to a temporary folder and moved
    into ``output_dir`` only when all of them are complete.

    Args:
        output_dir: where the outputs go.
        class_names: label id -> structure name (legend and DICOM segment labels).
        output_postfix: appended to the input's name.
        preview: write the PNG.
        dicom_seg: write a DICOM SEG when the input is a DICOM series folder.
        version: recorded as the algorithm version in the DICOM SEG.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike = "./eval",
        class_names: Mapping[int, str] | None = None,
        output_postfix: str = "seg",
        preview: bool = True,
        dicom_seg: bool = True,
        version: str = "0.1.0",
    ):
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.class_names = {int(k): str(v) for k, v in (class_names or {}).items()}
        self.output_postfix = output_postfix
        self.preview = preview
        self.dicom_seg = dicom_seg
        self.version = version

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            self.write(d[key])
        return d

    def outputs_for(self, source: str | os.PathLike) -> dict[str, Path]:
        """The files written for the input ``source``, by kind (``nifti``, ``png``, ``dicom_seg``)."""
        source = Path(source)
        stem = self.output_dir / f"{input_stem(source)}_{self.output_postfix}"
        outputs = {"nifti": stem.with_name(stem.name + ".nii.gz")}
        if self.preview:
            outputs["png"] = stem.with_name(stem.name + ".png")
        if self.dicom_seg and source.is_dir():
            outputs["dicom_seg"] = stem.with_name(stem.name + ".dcm")
        return outputs

    def write(self, pred) -> dict[str, Path]:
        source = str(pred.meta.get(ImageMetaKey.FILENAME_OR_OBJ, "")) if hasattr(pred, "meta") else ""
        if not source:
            raise CTFMError("prediction carries no input file name (meta 'filename_or_obj'); cannot name outputs")
        labels = np.asarray(pred.detach().cpu().numpy()[0]).round().astype(np.uint8 if int(pred.max()) < 256 else np.int16)
        affine = np.asarray(pred.affine.detach().cpu().numpy() if torch.is_tensor(pred.affine) else pred.affine, float)
        outputs = self.outputs_for(source)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".ctfm_seg.", dir=self.output_dir))
        try:
            staged = {kind: staging / path.name for kind, path in outputs.items()}
            nifti = nib.Nifti1Image(labels, affine)
            nifti.set_qform(affine, code=1)
            nifti.set_sform(affine, code=1)
            nib.save(nifti, staged["nifti"])
            if "png" in staged:
                from ctfm.ct_io import read_ct
                from ctfm.preview import render_preview

                ct = read_ct(source)
                render_preview(
                    ct[0].numpy(), labels, affine, staged["png"], self.class_names, title=Path(source).name
                )
            if "dicom_seg" in staged:
                from ctfm.dicom_seg import write_dicom_seg

                write_dicom_seg(staged["dicom_seg"], labels, affine, source, self.class_names, algorithm_version=self.version)
            for kind, path in outputs.items():
                os.replace(staged[kind], path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("wrote %s", ", ".join(str(p) for p in outputs.values()))
        return outputs


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: per-class Dice and mean surface distance on label maps, memory-bounded (one class at a time).


def class_metrics(
    pred: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    class_ids: Sequence[int],
    spacing: Sequence[float],
) -> dict[int, tuple[float, float]]:
    """MONAI's Dice and symmetric mean surface distance (mm) per class of two ``(X, Y, Z)`` label maps.

    Computed one class at a time on a 2-channel (background, class) one-hot cropped to the bounding box of
    the class in either map (plus one voxel), which gives MONAI's values without a ``C x voxels`` one-hot.
    Empty classes follow MONAI (``DiceMetric(ignore_empty=True)``, symmetric ``SurfaceDistanceMetric``): a class
    only predicted -> Dice ``nan``, distance ``inf``; only in the reference (missed) -> Dice 0, distance ``inf``;
    in neither -> ``nan``, ``nan``.

    Returns:
        ``{class_id: (dice, mean_surface_distance_mm)}``.
    """
    pred = torch.as_tensor(np.asarray(pred)).long()
    reference = torch.as_tensor(np.asarray(reference)).long()
    if pred.shape != reference.shape or pred.ndim != 3:
        raise ValueError(f"label maps must share one (X, Y, Z) shape, got {tuple(pred.shape)} and {tuple(reference.shape)}")
    dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    distance_metric = SurfaceDistanceMetric(include_background=False, symmetric=True, reduction="none")
    results = {}
    for class_id in class_ids:
        p, r = pred == class_id, reference == class_id
        if not (p.any() or r.any()):
            results[int(class_id)] = (math.nan, math.nan)
            continue
        box = _bounding_box(p | r, margin=1)
        p, r = p[box], r[box]
        one_hot_p = torch.stack([~p, p])[None].float()
        one_hot_r = torch.stack([~r, r])[None].float()
        dice = float(dice_metric(one_hot_p, one_hot_r)[0, 0])
        with _quiet_monai_warnings():
            distance = float(distance_metric(one_hot_p, one_hot_r, spacing=list(map(float, spacing)))[0, 0])
        results[int(class_id)] = (dice, distance)
    return results


class SegmentationReport:
    """Ignite handler: per-class Dice and mean surface distance of every evaluated case; CSV, JSON, printout.

    Each iteration's decollated output items need ``pred`` and ``label``: ``(1, X, Y, Z)`` label maps on one
    grid (e.g. the prediction after ``Invertd`` and the reference as loaded). Spacing comes from the label's
    affine. At completion it writes, atomically:

    - ``<output_dir>/per_class_metrics.csv``: one row per class (``class_id, class_name, cases,
      dice, mean_surface_distance_mm``; means over the cases whose reference holds the class, blank where
      none does), then the summary line ``mean, <N> classes present, ...``;
    - ``<output_dir>/per_case_metrics.csv``: one row per case and class present in reference or prediction;
    - ``<output_dir>/confusion.csv``: where each reference class's voxels went, one row per case and (reference,
      predicted) pair that occurs (``voxels`` and ``fraction_of_reference``), background included on both sides
      (reference 0 rows are false positives; predicted 0 rows are misses), largest first within a class;
    - ``<output_dir>/summary.json``: the means, the per-class Dice and the cases;
    - with ``images``, ``<output_dir>/<case>_eval.png`` per case: the reference over the prediction on the CT
      (read again from the case's file), three planes each (:func:`ctfm.preview.render_comparison`);

    and prints the per-class Dice of the classes present in the reference, then the summary line. The
    summary means are over the classes present in a reference (NaNs excluded, as MONAI reduces); a class the
    network missed counts with Dice 0 in the Dice mean, and its infinite distance is left out of the distance
    mean (the table and CSVs show it as ``inf``).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Mapping[int, str],
        pred_key: str = "pred",
        label_key: str = "label",
        digits: int = 4,
        images: bool = False,
    ):
        self.output_dir = Path(output_dir)
        self.class_names = {int(k): str(v) for k, v in class_names.items()}
        self.pred_key = pred_key
        self.label_key = label_key
        self.digits = digits
        self.images = images
        self.rows: list[dict] = []
        self.confusion: list[dict] = []
        self.summary: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.COMPLETED, self.complete)

    def reset(self) -> None:
        self.rows.clear()
        self.confusion.clear()
        self.summary = None

    def update(self, engine: Engine) -> None:
        output = engine.state.output
        for item in output if isinstance(output, list) else [output]:
            self.add_case(item[self.pred_key], item[self.label_key])

    def add_case(self, pred, label) -> None:
        """Score one case: ``pred`` and ``label`` ``(1, X, Y, Z)`` label maps (MetaTensors name the case)."""
        if tuple(pred.shape) != tuple(label.shape):
            raise CTFMError(
                f"{_source(label)}: reference label shape {tuple(label.shape)} differs from prediction {tuple(pred.shape)}"
            )
        spacing = np.linalg.norm(np.asarray(label.affine, float)[:3, :3], axis=0)
        case = _source(pred)
        pred_map, ref_map = pred[0].detach().cpu(), label[0].detach().cpu()
        counts = confusion_counts(pred_map, ref_map)
        voxels_in_reference, voxels_in_prediction = counts.sum(dim=1), counts.sum(dim=0)
        present = torch.nonzero(voxels_in_reference + voxels_in_prediction).flatten().tolist()
        for class_id, (dice, distance) in class_metrics(pred_map, ref_map, [c for c in present if c], spacing).items():
            self.rows.append({
                "case": case,
                "class_id": class_id,
                "class_name": self._name(class_id),
                "in_reference": bool(voxels_in_reference[class_id]),
                "dice": dice,
                "mean_surface_distance_mm": distance,
            })
        self._add_confusion(case, counts)
        if self.images:
            self._write_image(case, pred_map.numpy(), ref_map.numpy(), np.asarray(label.affine, float))

    def _add_confusion(self, case: str, counts: torch.Tensor) -> None:
        for ref_id in torch.nonzero(counts.sum(dim=1)).flatten().tolist():
            row = counts[ref_id]
            total = int(row.sum())
            for pred_id in sorted(torch.nonzero(row).flatten().tolist(), key=lambda i: -int(row[i])):
                self.confusion.append({
                    "case": case,
                    "reference_id": ref_id,
                    "reference_name": self._name(ref_id),
                    "predicted_id": pred_id,
                    "predicted_name": self._name(pred_id),
                    "voxels": int(row[pred_id]),
                    "fraction_of_reference": int(row[pred_id]) / total,
                })

    def _name(self, class_id: int) -> str:
        return "background" if class_id == 0 else self.class_names.get(class_id, f"label {class_id}")

    def _write_image(self, case: str, pred: np.ndarray, reference: np.ndarray, affine: np.ndarray) -> None:
        from ctfm.ct_io import read_ct
        from ctfm.preview import render_comparison

        ct = read_ct(case)
        if tuple(ct.shape[1:]) != reference.shape or not np.allclose(ct.affine.numpy(), affine, atol=1e-3):
            raise CTFMError(f"{case}: the evaluated label maps are not on this CT's voxel grid; cannot draw them")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"{input_stem(case)}_eval.png"
        render_comparison(
            ct[0].numpy(), reference.astype(np.int64), pred.astype(np.int64), affine, path, self.class_names,
            title=f"{Path(case).name}: reference (top) and prediction (bottom)",
        )

    def complete(self, engine: Engine | None = None) -> dict:
        """Write the CSVs and JSON, print the table; returns the summary."""
        self.summary = self.summarise()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.output_dir / "per_class_metrics.csv") as tmp:
            tmp.write_text(self._per_class_csv())
        with atomic_path(self.output_dir / "per_case_metrics.csv") as tmp:
            tmp.write_text(self._per_case_csv())
        with atomic_path(self.output_dir / "confusion.csv") as tmp:
            tmp.write_text(self._confusion_csv())
        with atomic_path(self.output_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps(self.summary, indent=2) + "\n")
        print(self.table(), flush=True)
        return self.summary

    def summarise(self) -> dict:
        per_class = self._per_class()
        present = {c: v for c, v in per_class.items() if v["cases"]}
        dice = [v["dice"] for v in present.values()]
        distance = [v["mean_surface_distance_mm"] for v in present.values() if math.isfinite(v["mean_surface_distance_mm"])]
        r = self.digits
        return {
            "cases": sorted({row["case"] for row in self.rows}),
            "num_classes_present": len(present),
            "mean_dice": round(float(np.mean(dice)), r) if dice else None,
            "mean_surface_distance_mm": round(float(np.mean(distance)), r) if distance else None,
            "per_class_dice": {v["class_name"]: _rounded(v["dice"], r) for v in present.values()},
            "per_class_mean_surface_distance_mm": {
                v["class_name"]: _rounded(v["mean_surface_distance_mm"], r) for v in present.values()
            },
        }

    def table(self) -> str:
        summary = self.summary or self.summarise()
        lines = [f"{'id':>4}  {'class':<28} {'Dice':>7} {'MSD mm':>8}"]
        per_class = self._per_class()
        for class_id, v in per_class.items():
            if v["cases"]:
                lines.append(
                    f"{class_id:>4}  {v['class_name']:<28} {v['dice']:>7.{self.digits}f} "
                    f"{v['mean_surface_distance_mm']:>8.2f}"
                )
        lines.append(
            f"mean over {summary['num_classes_present']} classes present in the reference: "
            f"Dice {summary['mean_dice']}, mean surface distance {summary['mean_surface_distance_mm']} mm"
        )
        return "\n".join(lines)

    def _per_class(self) -> dict[int, dict]:
        per_class = {}
        for class_id in sorted(set(self.class_names) | {row["class_id"] for row in self.rows}):
            rows = [row for row in self.rows if row["class_id"] == class_id and row["in_reference"]]
            distances = [row["mean_surface_distance_mm"] for row in rows if not math.isnan(row["mean_surface_distance_mm"])]
            per_class[class_id] = {
                "class_name": self._name(class_id),
                "cases": len(rows),
                "dice": float(np.mean([row["dice"] for row in rows])) if rows else math.nan,
                "mean_surface_distance_mm": float(np.mean(distances)) if distances else math.nan,
            }
        return per_class

    def _per_class_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["class_id", "class_name", "cases", "dice", "mean_surface_distance_mm"])
        for class_id, v in self._per_class().items():
            writer.writerow([class_id, v["class_name"], v["cases"], _cell(v["dice"], self.digits), _cell(v["mean_surface_distance_mm"], self.digits)])
        s = self.summary or self.summarise()
        writer.writerow(["mean", f"{s['num_classes_present']} classes present", len(s["cases"]), s["mean_dice"], s["mean_surface_distance_mm"]])
        return buffer.getvalue()

    def _per_case_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["case", "class_id", "class_name", "in_reference", "dice", "mean_surface_distance_mm"])
        for row in self.rows:
            writer.writerow([row["case"], row["class_id"], row["class_name"], int(row["in_reference"]),
                             _cell(row["dice"], self.digits), _cell(row["mean_surface_distance_mm"], self.digits)])
        return buffer.getvalue()

    def _confusion_csv(self) -> str:
        buffer = io.StringIO()
        columns = ["case", "reference_id", "reference_name", "predicted_id", "predicted_name", "voxels", "fraction_of_reference"]
        writer = csv.DictWriter(buffer, columns, lineterminator="\n")
        writer.writeheader()
        for row in self.confusion:
            writer.writerow({**row, "fraction_of_reference": round(row["fraction_of_reference"], self.digits)})
        return buffer.getvalue()


def confusion_counts(pred: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Voxel counts ``(K, K)`` of every (reference id, predicted id) pair of two label maps of one shape;
    ``K`` is one more than the largest id in either."""
    pred, reference = pred.long().flatten(), reference.long().flatten()
    size = int(max(pred.max(), reference.max())) + 1
    return torch.bincount(reference * size + pred, minlength=size * size).reshape(size, size)


def record_eval_metrics(summary_json: str | os.PathLike, metadata_json: str | os.PathLike, description: str = "") -> dict:
    """Copy ``mean_dice``, ``mean_surface_distance_mm`` and the per-class Dice of an evaluation's
    ``summary.json`` into ``eval_metrics`` of a bundle's ``metadata.json`` (atomically); returns them."""
    summary = json.loads(Path(summary_json).read_text())
    metadata_path = Path(metadata_json)
    metadata = json.loads(metadata_path.read_text())
    metrics = {
        "mean_dice": summary["mean_dice"],
        "mean_surface_distance_mm": summary["mean_surface_distance_mm"],
        "num_classes_present": summary["num_classes_present"],
        "per_class_dice": summary["per_class_dice"],
    }
    if description:
        metrics = {"evaluated_on": description, **metrics}
    metadata["eval_metrics"] = metrics
    with atomic_path(metadata_path) as tmp:
        tmp.write_text(json.dumps(metadata, indent=4) + "\n")
    logger.info("recorded eval_metrics in %s", metadata_path)
    return metrics


def _bounding_box(mask: torch.Tensor, margin: int = 1) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = torch.nonzero(mask.any(dim=other)).flatten()
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


class _quiet_monai_warnings:
    """Silence what MONAI's surface distance warns on every call: empty classes ("... is all 0, this may result in
    nan/inf distance", which the report states) and its own use of a deprecated argument (monai 1.6.1)."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.filterwarnings("ignore", message=".*is all 0.*")
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")  # MONAI calling its own deprecated arg
        return self

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


def input_stem(source: str | os.PathLike) -> str:
    """The name of an input CT without its image extension (a DICOM series folder keeps its name)."""
    name = Path(source).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _source(image) -> str:
    meta = getattr(image, "meta", None) or {}
    return str(meta.get(ImageMetaKey.FILENAME_OR_OBJ, "case"))


def _rounded(value: float, digits: int):
    return round(value, digits) if math.isfinite(value) else None


def _cell(value: float, digits: int) -> str:
    return "" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.{digits}f}")
