"""Evaluation of segmentations: per-class Dice and mean surface distance on label maps, memory-bounded (one
class at a time), written as CSVs, JSON and a reference-over-prediction PNG per case (:class:`SegmentationReport`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.metrics import DiceMetric, SurfaceDistanceMetric

from ctfm.datalist import output_stem
from ctfm.errors import CTFMError
from ctfm.files import atomic_path
from ctfm.segmentation.outputs import source_of

__all__ = ["LabelMapMeanDice", "SegmentationReport", "class_metrics", "confusion_counts", "labels_and_reference", "record_eval_metrics"]

logger = logging.getLogger("ctfm.segmentation")


def labels_and_reference(output: Mapping | Sequence[Mapping]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted labels, reference labels)``, both ``(B, 1, ...)``, from a trainer's output: decollated (a list
    of per-sample dicts, ``(C, ...)`` logits and ``(1, ...)`` labels) or not (``(B, C, ...)`` and ``(B, 1, ...)``).

    Takes the full-resolution head when the network returned deep-supervision outputs. For MONAI's
    ``MeanDice(num_classes=...)``, which then needs no one-hot volumes.
    """

    def full_resolution(pred):
        return (pred[0] if isinstance(pred, (list, tuple)) else pred).detach()

    if isinstance(output, Mapping):
        return full_resolution(output["pred"]).argmax(dim=1, keepdim=True), output["label"]
    preds = [full_resolution(item["pred"]).argmax(dim=0, keepdim=True) for item in output]
    return torch.stack(preds), torch.stack([item["label"] for item in output])


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
                f"{source_of(label)}: reference label shape {tuple(label.shape)} differs from prediction {tuple(pred.shape)}"
            )
        spacing = np.linalg.norm(np.asarray(label.affine, float)[:3, :3], axis=0)
        case = source_of(pred)
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
        if self.images and not (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
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
        path = self.output_dir / f"{output_stem(case)}_eval.png"
        render_comparison(
            ct[0].numpy(), reference.astype(np.int64), pred.astype(np.int64), affine, path, self.class_names,
            title=f"{Path(case).name}: reference (top) and prediction (bottom)",
        )

    def complete(self, engine: Engine | None = None) -> dict:
        """Write the CSVs and JSON, print the table; returns the summary. Under DDP every rank evaluates the whole
        validation set (no sampler) and only rank 0 writes."""
        self.summary = self.summarise()
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return self.summary
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


class LabelMapMeanDice(Metric):
    """Ignite metric: Dice of label maps, averaged over the classes present in each reference, then over cases.

    ``update((preds, labels))`` takes lists of ``(1, X, Y, Z)`` label maps (``from_engine(["pred", "label"])`` of a
    decollated evaluator), or single maps. Dice per class comes from one confusion count per case
    (:func:`confusion_counts`), so memory does not grow with the number of classes (MONAI's ``MeanDice`` needs a
    one-hot of every class: 2.5 GB for 118 classes on a 512x512x20 series). A class missed entirely counts 0;
    classes only in the prediction are not averaged (MONAI's ``ignore_empty``). Background (0) is left out.
    """

    def reset(self) -> None:
        self._scores: list[float] = []

    def update(self, output) -> None:
        preds, labels = output
        preds = preds if isinstance(preds, (list, tuple)) else [preds]
        labels = labels if isinstance(labels, (list, tuple)) else [labels]
        for pred, label in zip(preds, labels):
            counts = confusion_counts(torch.as_tensor(pred)[0].cpu(), torch.as_tensor(label)[0].cpu()).double()
            reference, predicted, overlap = counts.sum(1), counts.sum(0), counts.diagonal()
            present = torch.nonzero(reference[1:]).flatten() + 1
            if len(present):
                dice = 2 * overlap[present] / (reference[present] + predicted[present])
                self._scores.append(float(dice.mean()))

    def compute(self) -> float:
        return float(np.mean(self._scores)) if self._scores else float("nan")


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


def _rounded(value: float, digits: int):
    return round(value, digits) if math.isfinite(value) else None


def _cell(value: float, digits: int) -> str:
    return "" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.{digits}f}")
