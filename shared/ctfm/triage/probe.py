"""Frozen-encoder triage: linear probe, few-shot and label efficiency, on cached embeddings (``probe.json``).

Every scan is embedded once per encoder (:mod:`ctfm.embedding_store`, the cache the retrieval bundle uses too);
each protocol then fits in seconds:

- **linear probe**: per finding, logistic regression on standardised embeddings of the training split; thresholds
  chosen on the validation split; evaluated on the test set (:func:`ctfm.triage.evaluation.evaluate`).
- **few-shot**: ``N`` positives and ``N`` negatives per finding drawn from the training split, a prototype
  classifier (cosine to the class means) or logistic regression; repeated over seeds, AUROC mean and spread.
- **label efficiency**: the linear probe on a stratified fraction of the training labels (2, 5, 10, 100 %),
  repeated over seeds.

Each runs for the pre-trained encoder and a random-init encoder of the same width in the same run, so the table
shows what pre-training bought.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from ctfm.embedding_store import EmbeddingStore, encoders_to_compare, extract_embeddings
from ctfm.errors import CTFMError
from ctfm.files import atomic_path
from ctfm.triage.datasets import label_fraction_indices

__all__ = [
    "LinearProbe",
    "few_shot",
    "fit_linear_probe",
    "label_efficiency",
    "mean_auroc",
    "run_probe",
]

logger = logging.getLogger("ctfm.triage")


class LinearProbe:
    """Per-finding logistic regression on standardised embeddings: ``(N, D) -> (N, F)`` probabilities.

    A finding with one class only in the training labels predicts that class's rate (a constant), and says so.
    """

    def __init__(self, c: float = 1.0, seed: int = 0):
        self.c = float(c)
        self.seed = int(seed)

    def fit(self, x: np.ndarray, y: np.ndarray) -> LinearProbe:
        """``x`` ``(N, D)`` embeddings, ``y`` ``(N, F)`` 0/1 labels."""
        self.scaler = StandardScaler().fit(x)
        z = self.scaler.transform(x)
        self.models = []
        for f in range(y.shape[1]):
            if len(np.unique(y[:, f])) < 2:
                logger.warning("linear probe: finding %d has one class in training; predicting its rate", f)
                self.models.append(float(y[:, f].mean()))
                continue
            model = LogisticRegression(C=self.c, max_iter=2000, class_weight="balanced", random_state=self.seed)
            self.models.append(model.fit(z, y[:, f]))
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = self.scaler.transform(x)
        columns = [np.full(len(z), m) if isinstance(m, float) else m.predict_proba(z)[:, 1] for m in self.models]
        return np.stack(columns, axis=1)


def fit_linear_probe(x: np.ndarray, y: np.ndarray, c: float = 1.0, seed: int = 0) -> LinearProbe:
    return LinearProbe(c, seed).fit(x, y)


def mean_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Mean over findings with both classes of the AUROC of ``p`` ``(N, F)`` against ``y`` ``(N, F)``; NaN if none."""
    scores = [roc_auc_score(y[:, f], p[:, f]) for f in range(y.shape[1]) if len(np.unique(y[:, f])) == 2]
    return float(np.mean(scores)) if scores else float("nan")


def _prototype_proba(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Cosine to the positive mean minus cosine to the negative mean, squashed to (0, 1): ``(M,)``."""
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
    centre = x_train.mean(0)
    positive, negative = unit(x_train[y_train == 1] - centre).mean(0), unit(x_train[y_train == 0] - centre).mean(0)
    test = unit(x_test - centre)
    return 1.0 / (1.0 + np.exp(-10.0 * (test @ unit(positive) - test @ unit(negative))))


def few_shot(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    findings: Sequence[str],
    shots: Sequence[int] = (1, 2, 4, 8),
    seeds: Sequence[int] = tuple(range(10)),
    method: str = "prototype",
) -> list[dict]:
    """Few-shot AUROC per finding: for each ``N`` in ``shots`` and each seed, ``N`` positives + ``N`` negatives of the
    training split fit the classifier, scored on the whole test set.

    Returns rows ``{"finding", "shots", "auroc_mean", "auroc_std", "runs"}``; a finding with fewer than ``N`` training
    positives or negatives, or one class in the test set, is left out of that ``N``.
    """
    if method not in ("prototype", "logistic"):
        raise CTFMError(f"few-shot method {method!r}: choose prototype or logistic")
    rows = []
    for f, name in enumerate(findings):
        if len(np.unique(y_test[:, f])) < 2:
            continue
        positives, negatives = np.flatnonzero(y_train[:, f] == 1), np.flatnonzero(y_train[:, f] == 0)
        for n in shots:
            if len(positives) < n or len(negatives) < n:
                continue
            scores = []
            for seed in seeds:
                rng = np.random.default_rng(seed)
                chosen = np.concatenate([rng.choice(positives, n, replace=False), rng.choice(negatives, n, replace=False)])
                x, y = x_train[chosen], y_train[chosen, f]
                if method == "prototype":
                    p = _prototype_proba(x, y, x_test)
                else:
                    p = fit_linear_probe(x, y[:, None], seed=seed).predict_proba(x_test)[:, 0]
                scores.append(roc_auc_score(y_test[:, f], p))
            rows.append({"finding": name, "shots": int(n), "auroc_mean": float(np.mean(scores)),
                         "auroc_std": float(np.std(scores)), "runs": len(scores)})
    return rows


def label_efficiency(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    fractions: Sequence[float] = (0.02, 0.05, 0.1, 1.0),
    seeds: Sequence[int] = tuple(range(5)),
) -> list[dict]:
    """Linear-probe mean AUROC on the test set when trained on a stratified ``fraction`` of the training labels.

    Subsamples are :func:`ctfm.triage.datasets.label_fraction_indices` (as ``train_fraction`` in fine-tuning):
    at least one positive and one negative per finding where the split has them. Returns rows
    ``{"fraction", "labels", "auroc_mean", "auroc_std", "runs"}`` (``labels``: training cases used).
    """
    rows = []
    for fraction in fractions:
        scores, sizes = [], []
        for seed in seeds:
            chosen = label_fraction_indices(y_train, fraction, seed)
            probe = fit_linear_probe(x_train[chosen], y_train[chosen], seed=seed)
            scores.append(mean_auroc(y_test, probe.predict_proba(x_test)))
            sizes.append(len(chosen))
            if fraction >= 1.0:
                break  # every label: the subsample is the same for every seed
        rows.append({"fraction": float(fraction), "labels": int(np.median(sizes)), "auroc_mean": float(np.nanmean(scores)),
                     "auroc_std": float(np.nanstd(scores)), "runs": len(scores)})
    return rows


def run_probe(
    train_data,
    test_data,
    split: Mapping[str, Sequence[str]],
    build_encoder: Callable[[str | None], torch.nn.Module],
    encoder_weights: str | None,
    transform: Callable,
    recipe: Mapping,
    output_dir: str | os.PathLike,
    store_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    seed: int = 0,
    shots: Sequence[int] = (1, 2, 4, 8),
    few_shot_seeds: int = 10,
    few_shot_method: str = "prototype",
    fractions: Sequence[float] = (0.02, 0.05, 0.1, 1.0),
    fraction_seeds: int = 5,
    n_bootstrap: int = 1000,
) -> dict:
    """Embed, probe, few-shot and label-efficiency for the pre-trained and the random encoder; write the results.

    Args:
        train_data: a :class:`~ctfm.triage.datasets.TriageDataset` holding ``split["train"]`` and
            ``split["validation"]``.
        test_data: the held-out :class:`~ctfm.triage.datasets.TriageDataset` everything is scored on.
        build_encoder: ``weights or None -> encoder`` (``None``: random init).
        transform: the recipe's preprocessing of one datalist item (``image`` -> ``(C, *spatial)``).
        recipe: what the preprocessing is (part of the embedding cache's fingerprint).
        output_dir: results go to ``<output_dir>/probe/``.
        store_dir: the embedding cache's root.

    Writes ``probe/metrics.json`` (per encoder: linear-probe metrics with CIs, fit time), ``probe/<encoder>/``
    (the linear probe's evaluation report), ``probe/few_shot.csv``, ``probe/label_efficiency.{csv,md,png}``.
    Returns the ``metrics.json`` content.
    """
    from ctfm.triage.datasets import subset
    from ctfm.triage.evaluation import (
        choose_thresholds,
        evaluate,
        summary_lines,
        write_report,
    )

    findings = list(train_data.findings)
    if list(test_data.findings) != findings:
        raise CTFMError(f"{test_data.source}: the test set's findings {list(test_data.findings)} differ from training's {findings}")
    parts = {"train": subset(train_data, split["train"]), "validation": subset(train_data, split["validation"]), "test": test_data}
    labels = {name: np.array([[c.labels[f] for f in findings] for c in part.cases]) for name, part in parts.items()}
    out = Path(output_dir) / "probe"
    results: dict = {"findings": findings, "encoders": {}}
    curves: dict[str, list[dict]] = {}
    few_rows = []
    for name, (encoder, weights_name) in encoders_to_compare(build_encoder, encoder_weights, seed).items():
        encoder = encoder.to(device).eval()
        store = EmbeddingStore.of(store_dir, weights_name, encoder, recipe)
        started = time.perf_counter()
        x = {}
        for part_name, part in parts.items():
            # rows keyed by the image's real path: two datasets' case ids may coincide, their files do not
            items = [{**item, "key": os.path.realpath(item["image"])} for item in part.items()]
            report = extract_embeddings(store, items, transform, encoder.embed, id_key="key", device=device)
            if report.failed:
                first = next(iter(report.failed.values()))
                raise CTFMError(f"{len(report.failed)} scans of the {part_name} set could not be embedded (first: {first})")
            x[part_name] = store.matrix([item["key"] for item in items])
        extract_s = time.perf_counter() - started
        started = time.perf_counter()
        probe = fit_linear_probe(x["train"], labels["train"], seed=seed)
        fit_s = time.perf_counter() - started
        thresholds = choose_thresholds(labels["validation"], probe.predict_proba(x["validation"]), findings)
        test_prob = probe.predict_proba(x["test"])
        metrics = evaluate(labels["test"], test_prob, findings, thresholds=thresholds, n_bootstrap=n_bootstrap, seed=seed)
        write_report(metrics, labels["test"], test_prob, findings, [c.id for c in test_data.cases], out / name)
        for line in summary_lines(metrics):
            print(f"[{name}] {line}")
        results["encoders"][name] = {"weights": weights_name, "embedding_store": str(store.folder),
                                     "extract_s": round(extract_s, 2), "probe_fit_s": round(fit_s, 4), "linear_probe": metrics}
        few_rows += [{"encoder": name, **row} for row in few_shot(
            x["train"], labels["train"], x["test"], labels["test"], findings, shots, range(few_shot_seeds), few_shot_method)]
        curves[name] = label_efficiency(x["train"], labels["train"], x["test"], labels["test"], fractions, range(fraction_seeds))
    _write_json(out / "metrics.json", results)
    _write_csv(out / "few_shot.csv", few_rows)
    efficiency = [{"encoder": name, **row} for name, rows in curves.items() for row in rows]
    _write_csv(out / "label_efficiency.csv", efficiency)
    _write_efficiency_table(out / "label_efficiency.md", curves)
    _plot_efficiency(out / "label_efficiency.png", curves, len(parts["train"].cases))
    for row in efficiency:
        print(f"label efficiency [{row['encoder']}] {row['fraction']:.0%} ({row['labels']} cases): "
              f"mean AUROC {row['auroc_mean']:.3f} +- {row['auroc_std']:.3f} over {row['runs']} runs")
    return results


def _write_json(path: Path, content: Mapping) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2, default=float) + "\n")


def _write_csv(path: Path, rows: Sequence[Mapping]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _write_efficiency_table(path: Path, curves: Mapping[str, Sequence[Mapping]]) -> None:
    names = list(curves)
    lines = ["| labels used | " + " | ".join(f"{n} mean AUROC" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for i, row in enumerate(next(iter(curves.values()))):
        cells = [f"{curves[n][i]['auroc_mean']:.3f} ± {curves[n][i]['auroc_std']:.3f}" for n in names]
        lines.append(f"| {row['fraction']:.0%} ({row['labels']} cases) | " + " | ".join(cells) + " |")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _plot_efficiency(path: Path, curves: Mapping[str, Sequence[Mapping]], n_train: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=100)
    for name, rows in curves.items():
        fractions = [r["fraction"] * 100 for r in rows]
        mean, std = np.array([r["auroc_mean"] for r in rows]), np.array([r["auroc_std"] for r in rows])
        ax.plot(fractions, mean, marker="o", label=f"{name} encoder")
        ax.fill_between(fractions, mean - std, mean + std, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xticks([r["fraction"] * 100 for r in next(iter(curves.values()))])
    ax.set_xticklabels([f"{r['fraction']:.0%}" for r in next(iter(curves.values()))])
    ax.set_xlabel(f"training labels used (of {n_train} cases)")
    ax.set_ylabel("mean AUROC on the test set (linear probe)")
    ax.set_ylim(0.4, 1.02)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Label efficiency: pre-trained vs random-init encoder")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
