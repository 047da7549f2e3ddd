"""Per-finding evaluation of multi-label triage probabilities: AUROC, AP, F1, sensitivity and specificity with
seeded bootstrap confidence intervals, calibration (ECE), operating thresholds, a report folder
(:func:`write_report`) and an ignite handler for MONAI evaluators (:class:`TriageReport`).

Conventions throughout:

- ``y_true`` and ``y_prob`` are ``(N, F)`` arrays, ``N`` cases by ``F`` findings (in the order of ``findings``);
  ``y_true`` holds 0 / 1 (bool or float 0.0 / 1.0 are accepted), ``y_prob`` probabilities in ``[0, 1]``
  (after the sigmoid, not logits). Anything else raises :class:`ctfm.errors.CTFMError`.
- A case is called positive for a finding when ``probability >= threshold``.
- A metric that is undefined on the data (AUROC / AP of a finding with one class only, sensitivity without
  positives, specificity without negatives) is ``None``, never an exception or NaN.
- The bootstrap resamples *cases* (all findings together) with replacement from ``numpy.random.default_rng(seed)``;
  the interval is the percentile interval. A resample in which a finding has one class only is skipped for all
  of that finding's metrics and counted in its ``bootstrap_skipped``.
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
from ignite.metrics import EpochMetric
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from ctfm.errors import CTFMError
from ctfm.files import atomic_path

__all__ = [
    "MeanAUROC",
    "ECE_BINS",
    "TriageReport",
    "choose_thresholds",
    "evaluate",
    "expected_calibration_error",
    "metadata_eval_metrics",
    "record_eval_metrics",
    "reliability_bins",
    "resolved_thresholds",
    "summary_lines",
    "write_report",
]

logger = logging.getLogger("ctfm.triage")

#: Equal-width probability bins of the ECE in :func:`evaluate` and of the reliability diagram.
ECE_BINS = 10

#: The metrics with a value and a bootstrap interval, in report order.
METRICS = ("auroc", "ap", "f1", "sensitivity", "specificity")

#: Decimals of :func:`metadata_eval_metrics` and :func:`summary_lines` (the same numbers in both).
DIGITS = 4

_LABELS = {"auroc": "AUROC", "ap": "AP", "f1": "F1", "sensitivity": "sens", "specificity": "spec"}


# --------------------------------------------------------------------------------------------------- validation


def _validated(y_true, y_prob, findings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, probabilities)`` as ``(N, F)`` int64 and float64 arrays, or :class:`CTFMError` naming the problem."""
    findings = _validated_findings(findings)
    y_true = np.asarray(_numpy(y_true))
    y_prob = np.asarray(_numpy(y_prob))
    if y_prob.ndim != 2:
        raise CTFMError(f"triage evaluation: y_prob must be (N cases, F findings), got shape {y_prob.shape}")
    if y_true.shape != y_prob.shape:
        raise CTFMError(f"triage evaluation: y_true has shape {y_true.shape} but y_prob has {y_prob.shape}")
    if y_prob.shape[1] != len(findings):
        raise CTFMError(f"triage evaluation: {y_prob.shape[1]} probability columns for {len(findings)} findings {findings}")
    if y_prob.shape[0] == 0:
        raise CTFMError("triage evaluation: no cases")
    try:
        y_prob = y_prob.astype(np.float64)
        y_true = y_true.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise CTFMError(f"triage evaluation: labels and probabilities must be numbers ({exc})") from None
    for values, what in ((y_prob, "y_prob"), (y_true, "y_true")):
        nan = np.isnan(values)
        if nan.any():
            where = [findings[f] for f in np.flatnonzero(nan.any(axis=0))]
            raise CTFMError(f"triage evaluation: {what} holds {int(nan.sum())} NaN value(s), for finding(s) {where}")
    if (y_prob < 0).any() or (y_prob > 1).any():
        raise CTFMError(
            f"triage evaluation: probabilities must lie in [0, 1], got min {y_prob.min():g} and max {y_prob.max():g}"
            " (logits? apply a sigmoid first)"
        )
    bad = ~np.isin(y_true, (0.0, 1.0))
    if bad.any():
        raise CTFMError(f"triage evaluation: labels must be 0 or 1, got {sorted(set(y_true[bad].tolist()))[:5]}")
    return y_true.astype(np.int64), y_prob


def _validated_findings(findings: Sequence[str]) -> list[str]:
    if isinstance(findings, str) or not all(isinstance(f, str) and f for f in findings):
        raise CTFMError(f"triage evaluation: findings must be a list of non-empty names, got {findings!r}")
    findings = list(findings)
    if not findings or len(set(findings)) != len(findings):
        raise CTFMError(f"triage evaluation: findings must be distinct and at least one, got {findings}")
    return findings


def _numpy(values):
    """A tensor (on any device) as a numpy array; anything else as it is."""
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values


def resolved_thresholds(thresholds, findings: Sequence[str]) -> dict[str, float]:
    """``{finding: threshold}`` from ``None`` (0.5 each), a mapping, or the path of a JSON file holding one (as
    :func:`choose_thresholds` returns it). Every finding needs a threshold in ``[0, 1]``; other keys are ignored."""
    findings = _validated_findings(findings)
    if thresholds is None:
        return dict.fromkeys(findings, 0.5)
    source = "thresholds"
    if isinstance(thresholds, (str, os.PathLike)):
        source = str(thresholds)
        try:
            thresholds = json.loads(Path(thresholds).read_text())
        except (OSError, ValueError) as exc:
            raise CTFMError(f"{source}: cannot read thresholds JSON ({exc})") from None
    if not isinstance(thresholds, Mapping):
        raise CTFMError(f"{source}: thresholds must map finding names to numbers, got {type(thresholds).__name__}")
    missing = [f for f in findings if f not in thresholds]
    if missing:
        raise CTFMError(f"{source}: no threshold for finding(s) {missing}")
    resolved = {}
    for f in findings:
        t = thresholds[f]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise CTFMError(f"{source}: threshold of {f!r} must be a number in [0, 1], got {t!r}")
        resolved[f] = float(t)
    return resolved


# --------------------------------------------------------------------------------------------------- thresholds


def choose_thresholds(y_true, y_prob, findings: Sequence[str], rule: str = "youden") -> dict[str, float]:
    """Operating threshold per finding, chosen on *validation* data (never on the test set it is reported on).

    Args:
        y_true: ``(N, F)`` labels in {0, 1}.
        y_prob: ``(N, F)`` probabilities in ``[0, 1]``.
        findings: the ``F`` finding names, in column order.
        rule: ``"youden"`` maximises Youden's J = sensitivity + specificity - 1; ``"f1"`` maximises F1.

    Returns:
        ``{finding: threshold}``: one of the finding's probabilities (positive iff ``probability >= threshold``);
        on ties the highest such threshold. A finding with one class only gets 0.5 and a logged warning.
    """
    if rule not in ("youden", "f1"):
        raise CTFMError(f"triage evaluation: threshold rule must be 'youden' or 'f1', got {rule!r}")
    y_true, y_prob = _validated(y_true, y_prob, findings)
    choose = _youden_threshold if rule == "youden" else _f1_threshold
    thresholds = {}
    for f, name in enumerate(findings):
        y, p = y_true[:, f], y_prob[:, f]
        if y.min() == y.max():
            logger.warning("finding %r has only %s cases; its threshold is 0.5", name, "positive" if y[0] else "negative")
            thresholds[name] = 0.5
        else:
            thresholds[name] = choose(y, p)
    return thresholds


def _youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability of ``(N,)`` scores ``p`` that maximises sensitivity + specificity - 1 (ties: the highest).

    J is compared as ``tp * negatives - fp * positives`` (J times ``positives * negatives``), exact in integers,
    so that equal J at two thresholds is a tie and not a rounding difference."""
    thresholds, tp, fp = _threshold_sweep(y, p)
    positives, negatives = tp[-1], fp[-1]
    return float(thresholds[int(np.argmax(tp * negatives - fp * positives))])


def _f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability of ``(N,)`` scores ``p`` that maximises F1 = 2 tp / (tp + fp + positives) (ties: the
    highest; one division per threshold, so equal F1 gives equal floats)."""
    thresholds, tp, fp = _threshold_sweep(y, p)
    return float(thresholds[int(np.argmax(2 * tp / (tp + fp + tp[-1])))])


def _threshold_sweep(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(thresholds, tp, fp)``: the distinct probabilities of ``(N,)`` scores in decreasing order, and the
    integer true / false positives when the cases at or above each are called positive."""
    order, labels, ends = _ranked(y, p)
    tp = np.cumsum(labels.astype(np.int64))[ends]
    return p[order][ends], tp, ends + 1 - tp


# ------------------------------------------------------------------------------------------------------ metrics


def _threshold_counts(weights: np.ndarray, y: np.ndarray, called: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(tp, fp, fn, tn)``, each ``(F,)``: cases weighted by ``(N,)`` ``weights`` (ones, or bootstrap counts);
    ``y`` the ``(N, F)`` labels and ``called`` the ``(N, F)`` booleans ``probability >= threshold``."""
    positive = weights @ y
    tp = weights @ (y * called)
    fp = weights @ ((1 - y) * called)
    return tp, fp, positive - tp, weights.sum() - positive - fp


def _threshold_rates(tp, fp, fn, tn) -> dict[str, np.ndarray]:
    """Sensitivity, specificity and F1 from ``(F,)`` counts; NaN where undefined (a zero denominator)."""

    def ratio(numerator, denominator):
        return np.divide(numerator, denominator, out=np.full(np.shape(tp), np.nan), where=denominator > 0)

    return {"f1": ratio(2 * tp, 2 * tp + fp + fn), "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp)}


def _ranking_metrics(y: np.ndarray, p: np.ndarray) -> tuple[float | None, float | None]:
    """``(AUROC, AP)`` of one finding's ``(N,)`` labels and probabilities (scikit-learn); ``None`` for one class."""
    if y.min() == y.max():
        return None, None
    return float(roc_auc_score(y, p)), float(average_precision_score(y, p))


def reliability_bins(y_true_1d, y_prob_1d, n_bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width calibration bins of one finding: case ``i`` falls in bin ``min(floor(p_i * n_bins), n_bins - 1)``
    (so ``[0, 1/n), [1/n, 2/n), ..., [(n-1)/n, 1]``).

    Args:
        y_true_1d: ``(N,)`` labels in {0, 1}.
        y_prob_1d: ``(N,)`` probabilities in ``[0, 1]``.

    Returns:
        ``(counts, confidence, accuracy)``, each ``(n_bins,)``: cases per bin, their mean probability and their
        fraction of positives (NaN for an empty bin).
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise CTFMError(f"triage evaluation: n_bins must be a positive integer, got {n_bins!r}")
    y_true = np.asarray(_numpy(y_true_1d))
    y_prob = np.asarray(_numpy(y_prob_1d))
    if y_true.ndim != 1 or y_prob.ndim != 1:
        raise CTFMError(f"triage evaluation: calibration needs (N,) labels and probabilities, got {y_true.shape} and {y_prob.shape}")
    y, p = _validated(y_true[:, None], y_prob[:, None], ["finding"])
    y, p = y[:, 0], p[:, 0]
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(bins, weights=p, minlength=n_bins) / counts
        accuracy = np.bincount(bins, weights=y, minlength=n_bins) / counts
    return counts, confidence, accuracy


def expected_calibration_error(y_true_1d, y_prob_1d, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of one finding: ``sum_b (n_b / N) * |accuracy_b - confidence_b|`` over
    :func:`reliability_bins` (equal width on ``[0, 1]``); ``(N,)`` labels in {0, 1}, ``(N,)`` probabilities in ``[0, 1]``."""
    counts, confidence, accuracy = reliability_bins(y_true_1d, y_prob_1d, n_bins)
    filled = counts > 0
    return float(np.sum(counts[filled] * np.abs(accuracy[filled] - confidence[filled])) / counts.sum())


# ---------------------------------------------------------------------------------------------------- bootstrap


def _bootstrap(y: np.ndarray, p: np.ndarray, called: np.ndarray, n_bootstrap: int, seed: int) -> dict[str, np.ndarray]:
    """Every metric of every finding on ``n_bootstrap`` case resamples: ``{metric: (n_bootstrap, F)}``, NaN where
    the resample has one class only for that finding. ``y``, ``p``, ``called``: ``(N, F)``.

    A resample is a vector of case counts (``bincount`` of ``N`` indices drawn with replacement); the metrics use
    them as weights, which gives what scikit-learn computes on the resampled cases at a fraction of the cost."""
    n_cases, n_findings = y.shape
    rng = np.random.default_rng(seed)
    ranked = [_ranked(y[:, f], p[:, f]) for f in range(n_findings)]
    out = {m: np.full((n_bootstrap, n_findings), np.nan) for m in METRICS}
    y_float = y.astype(np.float64)
    for b in range(n_bootstrap):
        weights = np.bincount(rng.integers(0, n_cases, n_cases), minlength=n_cases).astype(np.float64)
        tp, fp, fn, tn = _threshold_counts(weights, y_float, called)
        both = (tp + fn > 0) & (tn + fp > 0)
        for metric, values in _threshold_rates(tp, fp, fn, tn).items():
            out[metric][b, both] = values[both]
        for f in np.flatnonzero(both):
            order, labels, ends = ranked[f]
            out["auroc"][b, f], out["ap"][b, f] = _weighted_ranking(weights[order], labels, ends)
    return out


def _ranked(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, sorted labels, ends)`` of one finding: cases by decreasing probability, and the index of the
    last case of each run of equal probabilities (one ROC / PR point per distinct threshold)."""
    order = np.argsort(-p, kind="stable")
    sorted_p = p[order]
    ends = np.append(np.flatnonzero(np.diff(sorted_p)), len(p) - 1)
    return order, y[order].astype(np.float64), ends


def _weighted_ranking(weights: np.ndarray, labels: np.ndarray, ends: np.ndarray) -> tuple[float, float]:
    """``(AUROC, AP)`` of cases sorted by decreasing probability, ``(N,)`` weights and labels, both classes present:
    the trapezoidal area under the ROC and ``sum_k (R_k - R_{k-1}) P_k`` over the distinct thresholds, as
    scikit-learn defines them."""
    tp = np.cumsum(weights * labels)[ends]
    fp = np.cumsum(weights * (1 - labels))[ends]
    tpr = np.concatenate(([0.0], tp / tp[-1]))
    fpr = np.concatenate(([0.0], fp / fp[-1]))
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)
    called = tp + fp  # 0 only where no drawn case is called yet; recall does not move there
    precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
    ap = float(np.sum(np.diff(tpr) * precision))
    return auroc, ap


def _interval(values: np.ndarray, ci: float) -> list[float] | None:
    """Percentile interval ``[lo, hi]`` of the non-NaN ``(B,)`` bootstrap values; ``None`` when there are none."""
    values = values[~np.isnan(values)]
    if not values.size:
        return None
    lo, hi = np.percentile(values, [50 * (1 - ci), 50 * (1 + ci)])
    return [float(lo), float(hi)]


# ----------------------------------------------------------------------------------------------------- evaluate


def evaluate(
    y_true,
    y_prob,
    findings: Sequence[str],
    thresholds: Mapping[str, float] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict:
    """Per-finding metrics with bootstrap confidence intervals.

    Args:
        y_true: ``(N, F)`` labels in {0, 1}.
        y_prob: ``(N, F)`` probabilities in ``[0, 1]``.
        findings: the ``F`` finding names, in column order.
        thresholds: ``{finding: threshold}`` for F1 / sensitivity / specificity (e.g. from
            :func:`choose_thresholds` on validation data); default 0.5 each.
        n_bootstrap: case resamples for the intervals (0: no intervals).
        seed: seed of ``numpy.random.default_rng`` for the resamples.
        ci: the intervals' coverage, e.g. 0.95 for the 2.5th and 97.5th percentiles.

    Returns:
        A JSON-serialisable dict::

            {"findings": {name: {"auroc": {"value": v, "ci": [lo, hi]}, "ap": ..., "f1": ..., "sensitivity": ...,
                                 "specificity": ..., "threshold": t, "positives": int, "negatives": int,
                                 "ece": float, "bootstrap_skipped": int}},
             "mean_auroc": {"value": v, "ci": [lo, hi], "bootstrap_skipped": int},
             "n_cases": N, "n_bootstrap": B, "seed": seed, "ci_level": ci, "ece_bins": ECE_BINS}

        ``value`` / ``ci`` are ``None`` where undefined (one class only; no bootstrap). ``mean_auroc`` averages the
        findings whose AUROC is defined; a resample counts for its interval only if all of them are defined there.
    """
    y_true, y_prob = _validated(y_true, y_prob, findings)
    findings = list(findings)
    thresholds = resolved_thresholds(thresholds, findings)
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise CTFMError(f"triage evaluation: n_bootstrap must be a non-negative integer, got {n_bootstrap!r}")
    if not 0.0 < ci < 1.0:
        raise CTFMError(f"triage evaluation: ci must lie strictly between 0 and 1, got {ci!r}")
    called = y_prob >= np.array([thresholds[f] for f in findings])
    point = _threshold_rates(*_threshold_counts(np.ones(len(y_true)), y_true.astype(np.float64), called))
    resamples = _bootstrap(y_true, y_prob, called, n_bootstrap, seed)
    per_finding = {}
    for f, name in enumerate(findings):
        auroc, ap = _ranking_metrics(y_true[:, f], y_prob[:, f])
        values = {"auroc": auroc, "ap": ap, **{m: _defined(point[m][f]) for m in ("f1", "sensitivity", "specificity")}}
        positives = int(y_true[:, f].sum())
        per_finding[name] = {
            **{m: {"value": values[m], "ci": _interval(resamples[m][:, f], ci)} for m in METRICS},
            "threshold": thresholds[name],
            "positives": positives,
            "negatives": len(y_true) - positives,
            "ece": expected_calibration_error(y_true[:, f], y_prob[:, f], ECE_BINS),
            "bootstrap_skipped": int(np.isnan(resamples["auroc"][:, f]).sum()),
        }
    return {
        "findings": per_finding,
        "mean_auroc": _mean_auroc(per_finding, resamples["auroc"], ci),
        "n_cases": len(y_true),
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "ci_level": ci,
        "ece_bins": ECE_BINS,
    }


def _mean_auroc(per_finding: Mapping[str, dict], resampled_auroc: np.ndarray, ci: float) -> dict:
    """Mean AUROC over the findings where it is defined, with its interval from ``(B, F)`` resampled AUROCs."""
    defined = [f for f, metrics in enumerate(per_finding.values()) if metrics["auroc"]["value"] is not None]
    if not defined:
        return {"value": None, "ci": None, "bootstrap_skipped": len(resampled_auroc)}
    means = resampled_auroc[:, defined].mean(axis=1)  # NaN where any of them had one class
    values = [metrics["auroc"]["value"] for metrics in per_finding.values()]
    return {
        "value": float(np.mean([values[f] for f in defined])),
        "ci": _interval(means, ci),
        "bootstrap_skipped": int(np.isnan(means).sum()),
    }


def _defined(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


# ------------------------------------------------------------------------------------------------------- report


def write_report(result: dict, y_true, y_prob, findings: Sequence[str], case_ids: Sequence, output_dir) -> dict[str, Path]:
    """Write the evaluation folder, each file atomically (:func:`ctfm.files.atomic_path`):

    - ``metrics.json``: ``result`` (from :func:`evaluate` on the same arrays);
    - ``probabilities.csv``: one row per case: ``id``, then ``<finding>_prob`` and ``<finding>_label`` per finding;
    - ``roc.png``: ROC curves, one line per finding (AUROC in the legend, a dot at the operating threshold);
    - ``pr.png``: precision-recall curves (AP in the legend, prevalence dashed);
    - ``reliability.png``: a reliability diagram per finding (ECE in its title) over a bar chart of cases per bin.

    Args:
        y_true, y_prob: ``(N, F)`` labels in {0, 1} and probabilities in ``[0, 1]``.
        case_ids: ``N`` case identifiers (written as text).

    Returns:
        ``{"metrics", "probabilities", "roc", "pr", "reliability"}`` -> path written.
    """
    y_true, y_prob = _validated(y_true, y_prob, findings)
    findings = list(findings)
    case_ids = [str(c) for c in case_ids]
    if len(case_ids) != len(y_true):
        raise CTFMError(f"triage report: {len(case_ids)} case ids for {len(y_true)} cases")
    if list(result.get("findings", {})) != findings or result.get("n_cases") != len(y_true):
        raise CTFMError(f"triage report: the result is not of these {len(y_true)} cases and findings {findings}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / file for name, file in (
        ("metrics", "metrics.json"), ("probabilities", "probabilities.csv"),
        ("roc", "roc.png"), ("pr", "pr.png"), ("reliability", "reliability.png"),
    )}
    with atomic_path(paths["metrics"]) as tmp:
        tmp.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    with atomic_path(paths["probabilities"]) as tmp:
        tmp.write_text(_probabilities_csv(y_true, y_prob, findings, case_ids))
    _save(_roc_figure(result, y_true, y_prob, findings), paths["roc"])
    _save(_pr_figure(result, y_true, y_prob, findings), paths["pr"])
    _save(_reliability_figure(result, y_true, y_prob, findings), paths["reliability"])
    return paths


def _probabilities_csv(y_true: np.ndarray, y_prob: np.ndarray, findings: list[str], case_ids: list[str]) -> str:
    """CSV text: a header ``id, <f>_prob, <f>_label, ...`` and one row per case (probabilities at full precision)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", *(column for f in findings for column in (f"{f}_prob", f"{f}_label"))])
    for case, labels, probabilities in zip(case_ids, y_true, y_prob):
        writer.writerow([case, *(value for p, y in zip(probabilities, labels) for value in (repr(float(p)), int(y)))])
    return buffer.getvalue()


def _figure(width: float, height: float):
    """A matplotlib figure on the Agg canvas, outside pyplot (nothing global to close, safe in any thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    fig.clear()


def _colour(index: int):
    from matplotlib import colormaps

    return colormaps["tab10"](index % 10)


def _roc_figure(result: dict, y_true: np.ndarray, y_prob: np.ndarray, findings: list[str]):
    """ROC curves of ``(N, F)`` labels and probabilities, one line per finding."""
    fig = _figure(6.5, 6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="chance")
    for f, name in enumerate(findings):
        metrics = result["findings"][name]
        if metrics["auroc"]["value"] is None:
            ax.plot([], [], " ", label=f"{name}: one class only, no curve")
            continue
        fpr, tpr, _ = roc_curve(y_true[:, f], y_prob[:, f])
        ax.plot(fpr, tpr, color=_colour(f), lw=2, label=f"{name} (AUROC {metrics['auroc']['value']:.3f})")
        if metrics["sensitivity"]["value"] is not None and metrics["specificity"]["value"] is not None:
            ax.plot(1 - metrics["specificity"]["value"], metrics["sensitivity"]["value"], "o", color=_colour(f), ms=7)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal", xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title=f"ROC, {result['n_cases']} cases (dots: operating thresholds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def _pr_figure(result: dict, y_true: np.ndarray, y_prob: np.ndarray, findings: list[str]):
    """Precision-recall curves of ``(N, F)`` labels and probabilities, one line per finding, prevalence dashed."""
    fig = _figure(6.5, 6)
    ax = fig.add_subplot()
    for f, name in enumerate(findings):
        metrics = result["findings"][name]
        if metrics["ap"]["value"] is None:
            ax.plot([], [], " ", label=f"{name}: one class only, no curve")
            continue
        precision, recall, _ = precision_recall_curve(y_true[:, f], y_prob[:, f])
        prevalence = metrics["positives"] / result["n_cases"]
        ax.plot(recall, precision, color=_colour(f), lw=2, drawstyle="steps-post",
                label=f"{name} (AP {metrics['ap']['value']:.3f}, prevalence {prevalence:.2f})")
        ax.axhline(prevalence, color=_colour(f), ls="--", lw=1, alpha=0.6)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal", xlabel="recall (sensitivity)", ylabel="precision (PPV)",
           title=f"Precision-recall, {result['n_cases']} cases (dashed: prevalence)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    return fig


def _reliability_figure(result: dict, y_true: np.ndarray, y_prob: np.ndarray, findings: list[str]):
    """Per finding: observed fraction positive against mean probability per bin, over the cases per bin."""
    n_bins = result.get("ece_bins", ECE_BINS)
    columns = min(len(findings), 3)
    rows = math.ceil(len(findings) / columns)
    fig = _figure(4.2 * columns, 5.2 * rows)
    grid = fig.add_gridspec(2 * rows, columns, height_ratios=[3, 1] * rows)
    centres = (np.arange(n_bins) + 0.5) / n_bins
    for f, name in enumerate(findings):
        row, column = divmod(f, columns)
        top = fig.add_subplot(grid[2 * row, column])
        bottom = fig.add_subplot(grid[2 * row + 1, column], sharex=top)
        counts, confidence, accuracy = reliability_bins(y_true[:, f], y_prob[:, f], n_bins)
        filled = counts > 0
        top.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect calibration")
        top.plot(confidence[filled], accuracy[filled], "o-", color=_colour(f), label="observed")
        top.set(xlim=(0, 1), ylim=(0, 1.01), ylabel="fraction positive",
                title=f"{name}: ECE {result['findings'][name]['ece']:.3f}")
        top.grid(alpha=0.3)
        top.legend(loc="upper left", fontsize="small")
        top.tick_params(labelbottom=False)
        bottom.bar(centres, counts, width=0.9 / n_bins, color=_colour(f), alpha=0.7)
        bottom.set(xlabel="predicted probability", ylabel="cases")
    fig.suptitle(f"Reliability, {result['n_cases']} cases, {n_bins} equal-width bins")
    return fig


# ---------------------------------------------------------------------------------------------------- summaries


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), DIGITS)


def metadata_eval_metrics(result: dict) -> dict:
    """The flat ``eval_metrics`` of a bundle's ``metadata.json``: ``<finding>_auroc``, ``_ap``, ``_f1``,
    ``_sensitivity``, ``_specificity``, ``_threshold`` and ``_ece`` per finding, then ``mean_auroc``; rounded
    to :data:`DIGITS` decimals (``None`` where undefined). :func:`summary_lines` prints exactly these numbers."""
    flat = {}
    for name, metrics in result["findings"].items():
        for metric in METRICS:
            flat[f"{name}_{metric}"] = _rounded(metrics[metric]["value"])
        flat[f"{name}_threshold"] = _rounded(metrics["threshold"])
        flat[f"{name}_ece"] = _rounded(metrics["ece"])
    flat["mean_auroc"] = _rounded(result["mean_auroc"]["value"])
    return flat


def record_eval_metrics(result: dict, metadata_path: str | os.PathLike, evaluated_on: str | None = None) -> dict:
    """Write :func:`metadata_eval_metrics` of ``result`` as ``eval_metrics`` of the bundle's ``metadata.json``
    (atomically, keeping every other field), with ``evaluated_on`` describing the data; returns what it wrote."""
    if result is None:
        raise CTFMError(f"{metadata_path}: no evaluation result to record (the test run did not complete)")
    path = Path(metadata_path)
    meta = json.loads(path.read_text())
    metrics = metadata_eval_metrics(result)
    if evaluated_on:
        metrics = {"evaluated_on": evaluated_on, **metrics}
    meta["eval_metrics"] = metrics
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=4) + "\n")
    return metrics


def summary_lines(result: dict) -> list[str]:
    """One line per finding, then the mean, e.g.
    ``ICH: AUROC 0.9120 [0.8500, 0.9600]  AP ...  F1 ...  sens ...  spec ...  @ t=0.4300  ECE 0.0410  (12 pos / 88 neg)``.

    Values are :func:`metadata_eval_metrics`' (same rounding), ``n/a`` where undefined; brackets hold the
    bootstrap interval where there is one."""
    lines = []
    for name, metrics in result["findings"].items():
        parts = [f"{_LABELS[m]} {_text(metrics[m]['value'])}{_bracket(metrics[m]['ci'])}" for m in METRICS]
        lines.append(
            f"{name}: {'  '.join(parts)}  @ t={_text(metrics['threshold'])}  ECE {_text(metrics['ece'])}"
            f"  ({metrics['positives']} pos / {metrics['negatives']} neg)"
        )
    mean = result["mean_auroc"]
    defined = sum(metrics["auroc"]["value"] is not None for metrics in result["findings"].values())
    interval = f", {100 * result['ci_level']:g}% bootstrap intervals from {result['n_bootstrap']} resamples (seed {result['seed']})"
    lines.append(
        f"mean AUROC {_text(mean['value'])}{_bracket(mean['ci'])} over {defined} finding(s), {result['n_cases']} cases"
        + (interval if result["n_bootstrap"] else "")
    )
    return lines


def _text(value: float | None) -> str:
    return "n/a" if value is None else f"{_rounded(value):.{DIGITS}f}"


def _bracket(interval: list[float] | None) -> str:
    return "" if interval is None else f" [{_text(interval[0])}, {_text(interval[1])}]"


# ------------------------------------------------------------------------------------------------------ handler


class MeanAUROC(EpochMetric):
    """Ignite / MONAI key metric: the mean AUROC over the findings that have both classes in the data.

    MONAI's macro ``ROCAUC`` is NaN for the whole run as soon as one finding (EDH, say) has no positive in the
    validation split; this one averages the findings it can score and is NaN only when none can. The output
    transform gives ``(preds, labels)``: lists of ``(F,)`` tensors (MONAI's decollated output) or ``(B, F)``.
    """

    def __init__(self, output_transform=lambda output: output, device="cpu"):
        super().__init__(_mean_defined_auroc, output_transform=self._stacked(output_transform), check_compute_fn=False, device=device)

    @staticmethod
    def _stacked(transform):
        def stacked(output):
            pred, label = transform(output)
            as_batch = lambda v: torch.stack([torch.as_tensor(t).reshape(-1) for t in v]) if isinstance(v, (list, tuple)) else torch.as_tensor(v)  # noqa: E731
            return as_batch(pred).float(), as_batch(label).float()

        return stacked


def _mean_defined_auroc(y_pred: torch.Tensor, y: torch.Tensor) -> float:
    y_true, y_prob = y.cpu().numpy(), y_pred.cpu().numpy()
    scores = [roc_auc_score(y_true[:, f], y_prob[:, f]) for f in range(y_true.shape[1]) if len(np.unique(y_true[:, f])) == 2]
    return float(np.mean(scores)) if scores else float("nan")


class TriageReport:
    """Ignite handler for a MONAI ``SupervisedEvaluator``: collects every case's probabilities and labels, then at
    the end of the epoch evaluates them (:func:`evaluate`), writes the report folder (:func:`write_report`) and
    prints :func:`summary_lines`. The result is kept as :attr:`result`.

    Each decollated output item needs ``pred_key``: ``(F,)`` probabilities (after the sigmoid) and ``label_key``:
    ``(F,)`` labels. The case id is the first of: the item's ``id_key``, the matching ``engine.state.batch`` item's
    ``id_key`` (MONAI's evaluator output holds only image / label / pred), ``filename_or_obj`` of the pred's or
    the image's metadata; else ``case<index>``.

    Under ``torch.distributed`` with more than one process every rank gathers all cases (rank order) and computes
    the same result; only rank 0 writes and prints. Give the evaluator a sampler that does not repeat cases
    (``monai.data.DistributedSampler(even_divisible=False, shuffle=False)``); repeated ids are warned about.

    Args:
        findings: the ``F`` finding names, in the order of the pred / label vectors.
        output_dir: the report folder.
        thresholds: ``None`` (0.5 each), ``{finding: threshold}`` or the path of a JSON file holding that
            (:func:`choose_thresholds` on validation data, saved with ``json.dump``).
        n_bootstrap, seed: as :func:`evaluate`.
    """

    def __init__(
        self,
        findings: Sequence[str],
        output_dir: str | os.PathLike,
        thresholds: Mapping[str, float] | str | os.PathLike | None = None,
        n_bootstrap: int = 1000,
        seed: int = 0,
        pred_key: str = "pred",
        label_key: str = "label",
        id_key: str = "id",
    ):
        self.findings = _validated_findings(findings)
        self.output_dir = Path(output_dir)
        self.thresholds = resolved_thresholds(thresholds, self.findings)
        self.n_bootstrap = n_bootstrap
        self.seed = seed
        self.pred_key = pred_key
        self.label_key = label_key
        self.id_key = id_key
        self.probabilities: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.case_ids: list[str | None] = []
        self.result: dict | None = None
        self.paths: dict[str, Path] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.complete)

    def reset(self, engine: Engine | None = None) -> None:
        self.probabilities.clear()
        self.labels.clear()
        self.case_ids.clear()

    def update(self, engine: Engine) -> None:
        """Collect the cases of one iteration's output (a list of per-case dicts, or one batched dict)."""
        output, batch = _decollated(engine.state.output), _decollated(engine.state.batch)
        if len(batch) != len(output) or not all(isinstance(b, Mapping) for b in batch):
            batch = [{}] * len(output)
        for item, batch_item in zip(output, batch):
            self.add_case(item[self.pred_key], item[self.label_key], self._case_id(item, batch_item))

    def add_case(self, pred, label, case_id: str | None = None) -> None:
        """Collect one case: ``(F,)`` probabilities and ``(F,)`` labels (tensors or arrays, any trailing 1s)."""
        pred = np.asarray(_numpy(pred), dtype=np.float64).reshape(-1)
        label = np.asarray(_numpy(label), dtype=np.float64).reshape(-1)
        if pred.size != len(self.findings) or label.size != len(self.findings):
            raise CTFMError(
                f"{case_id or 'triage report'}: pred has {pred.size} and label {label.size} values for "
                f"{len(self.findings)} findings {self.findings}"
            )
        self.probabilities.append(pred)
        self.labels.append(label)
        self.case_ids.append(case_id)

    def complete(self, engine: Engine | None = None) -> dict:
        """Gather, evaluate, write (rank 0), log and print; returns the result."""
        y_prob, y_true, case_ids = _gathered(self.probabilities, self.labels, self.case_ids, len(self.findings))
        case_ids = [case if case is not None else f"case{i}" for i, case in enumerate(case_ids)]
        if len(set(case_ids)) != len(case_ids):
            logger.warning("triage report: %d case id(s) occur more than once", len(case_ids) - len(set(case_ids)))
        self.result = evaluate(y_true, y_prob, self.findings, self.thresholds, self.n_bootstrap, self.seed)
        if _rank() == 0:
            self.paths = write_report(self.result, y_true, y_prob, self.findings, case_ids, self.output_dir)
            heading = f"triage report of {len(case_ids)} cases ({self.output_dir}):"
            print("\n".join([heading, *summary_lines(self.result)]), flush=True)  # printed, as the segmentation report
        return self.result

    def chosen_thresholds(self, rule: str = "youden") -> dict[str, float]:
        """Thresholds chosen on the cases collected so far (a validation run): :func:`choose_thresholds`."""
        y_prob, y_true, _ = _gathered(self.probabilities, self.labels, self.case_ids, len(self.findings))
        return choose_thresholds(y_true, y_prob, self.findings, rule)

    def use_thresholds(self, thresholds: Mapping[str, float] | str | os.PathLike | None) -> None:
        """Evaluate at ``thresholds`` from now on (e.g. another report's :meth:`chosen_thresholds`)."""
        self.thresholds = resolved_thresholds(thresholds, self.findings)

    def _case_id(self, item: Mapping, batch_item: Mapping) -> str | None:
        for source in (item, batch_item):
            if isinstance(source, Mapping) and source.get(self.id_key) is not None:
                return _text_id(source[self.id_key])
        for source in (item.get(self.pred_key), item.get("image"), batch_item.get("image")):
            name = (getattr(source, "meta", None) or {}).get("filename_or_obj")
            if name:
                return _text_id(name)
        return None


def _decollated(data) -> list:
    """Engine output or batch as a list of per-case dicts (MONAI decollates them already when ``decollate=True``)."""
    if isinstance(data, list):
        return data
    if isinstance(data, Mapping):
        from monai.data import decollate_batch

        return decollate_batch(data)
    return []


def _text_id(value) -> str:
    value = _numpy(value)
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    return str(value)


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _gathered(
    probabilities: list[np.ndarray], labels: list[np.ndarray], case_ids: list[str | None], n_findings: int
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """``((N, F) probabilities, (N, F) labels, N ids)`` of this process, or of all processes in rank order under
    ``torch.distributed`` (MONAI's padded all-gather; the ids travel as UTF-8 JSON)."""
    y_prob = np.stack(probabilities) if probabilities else np.zeros((0, n_findings))
    y_true = np.stack(labels) if labels else np.zeros((0, n_findings))
    if not _distributed():
        return y_prob, y_true, list(case_ids)
    from monai.utils import evenly_divisible_all_gather

    y_prob = evenly_divisible_all_gather(torch.from_numpy(y_prob), concat=True).cpu().numpy()
    y_true = evenly_divisible_all_gather(torch.from_numpy(y_true), concat=True).cpu().numpy()
    encoded = torch.tensor(list(json.dumps(case_ids).encode("utf-8")), dtype=torch.uint8)
    ids = [json.loads(bytes(part.cpu().tolist()).decode("utf-8")) for part in evenly_divisible_all_gather(encoded, concat=False)]
    return y_prob, y_true, [case for part in ids for case in part]
