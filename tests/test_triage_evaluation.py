"""ctfm.triage.evaluation: per-finding metrics against hand-computed values, thresholds, seeded bootstrap, ECE,
the report folder, the summary / metadata numbers and the ignite handler (also under a 2-process gloo group)."""

import json
import logging
import re
import socket

import matplotlib.image
import numpy as np
import pytest
import torch
from ctfm.errors import CTFMError
from ctfm.triage.evaluation import (
    TriageReport,
    choose_thresholds,
    evaluate,
    expected_calibration_error,
    metadata_eval_metrics,
    summary_lines,
    write_report,
)
from ignite.engine import Engine
from monai.data import MetaTensor
from sklearn.metrics import roc_auc_score

FINDINGS = ["ICH", "fracture"]

#: Six cases. ICH: positives 0.9, 0.8, 0.4 and negatives 0.6, 0.3, 0.2; fracture: positives 0.9, 0.6 and
#: negatives 0.7, 0.4, 0.3, 0.2.
Y = np.array([[1, 1], [1, 0], [1, 0], [0, 1], [0, 0], [0, 0]])
P = np.array([[0.9, 0.9], [0.8, 0.7], [0.4, 0.4], [0.6, 0.6], [0.3, 0.3], [0.2, 0.2]])


def signal_data(n=80, seed=3):
    """``(N, 2)`` labels and float32-representable probabilities that rank positives higher, mostly."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (n, 2))
    p = np.clip(0.35 * y + 0.65 * rng.random((n, 2)), 0, 1)
    return y, p.astype(np.float32).astype(np.float64)


def test_metrics_equal_hand_computed_values():
    result = evaluate(Y, P, FINDINGS, thresholds={"ICH": 0.35, "fracture": 0.5}, n_bootstrap=0)
    ich, fracture = result["findings"]["ICH"], result["findings"]["fracture"]
    # ICH AUROC: of the 9 (positive, negative) pairs only (0.4, 0.6) is ordered wrongly -> 8/9.
    # AP: ranked 0.9+ 0.8+ 0.6- 0.4+: precision at each positive 1, 1, 3/4 -> (1 + 1 + 3/4) / 3.
    # At t = 0.35: called 0.9, 0.8, 0.6, 0.4 -> tp 3, fp 1, fn 0, tn 2.
    assert ich["auroc"]["value"] == pytest.approx(8 / 9)
    assert ich["ap"]["value"] == pytest.approx(2.75 / 3)
    assert ich["sensitivity"]["value"] == pytest.approx(1.0)
    assert ich["specificity"]["value"] == pytest.approx(2 / 3)
    assert ich["f1"]["value"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 0))
    # fracture AUROC: 0.9 beats all 4 negatives, 0.6 beats 3 of them -> 7/8.
    # AP: ranked 0.9+ 0.7- 0.6+: precision at the positives 1, 2/3 -> 5/6.
    # At t = 0.5: called 0.9, 0.7, 0.6 -> tp 2, fp 1, fn 0, tn 3.
    assert fracture["auroc"]["value"] == pytest.approx(7 / 8)
    assert fracture["ap"]["value"] == pytest.approx(5 / 6)
    assert fracture["sensitivity"]["value"] == pytest.approx(1.0)
    assert fracture["specificity"]["value"] == pytest.approx(3 / 4)
    assert fracture["f1"]["value"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))
    assert (ich["positives"], ich["negatives"], fracture["positives"], fracture["negatives"]) == (3, 3, 2, 4)
    assert (ich["threshold"], fracture["threshold"]) == (0.35, 0.5)
    # ECE, 10 bins, one case per bin: ICH |1-.9|+|1-.8|+|1-.4|+|0-.6|+|0-.3|+|0-.2| = 2.0 over 6 cases.
    assert ich["ece"] == pytest.approx(2.0 / 6)
    assert result["mean_auroc"]["value"] == pytest.approx((8 / 9 + 7 / 8) / 2)
    assert result["n_cases"] == 6 and ich["auroc"]["ci"] is None and result["mean_auroc"]["ci"] is None


def test_default_threshold_is_one_half():
    ich = evaluate(Y, P, FINDINGS, n_bootstrap=0)["findings"]["ICH"]
    # At 0.5: called 0.9, 0.8, 0.6 -> tp 2, fp 1, fn 1, tn 2.
    assert ich["threshold"] == 0.5
    assert (ich["sensitivity"]["value"], ich["specificity"]["value"]) == pytest.approx((2 / 3, 2 / 3))
    assert ich["f1"]["value"] == pytest.approx(4 / 6)


def test_youden_and_f1_thresholds():
    # fracture J (2 positives, 4 negatives): t=.9 -> 1/2, .7 -> 1/2 - 1/4, .6 -> 1 - 1/4 (best), .4 -> 1 - 1/2.
    # ICH J: t=.9 -> 1/3, .8 -> 2/3, .6 -> 1/3, .4 -> 2/3: a tie, broken towards the higher threshold.
    assert choose_thresholds(Y, P, FINDINGS) == {"ICH": 0.8, "fracture": 0.6}
    # ICH F1: t=.9 -> 1/2, .8 -> 4/5, .6 -> 2/3, .4 -> 6/7 (best), .3 -> 3/4; fracture: .6 -> 4/5 (best).
    assert choose_thresholds(Y, P, FINDINGS, rule="f1") == {"ICH": 0.4, "fracture": 0.6}


def test_one_class_threshold_is_one_half_with_a_warning(caplog):
    y = Y.copy()
    y[:, 1] = 0
    with caplog.at_level(logging.WARNING, logger="ctfm.triage"):
        thresholds = choose_thresholds(y, P, FINDINGS)
    assert thresholds == {"ICH": 0.8, "fracture": 0.5}
    assert any("fracture" in record.getMessage() for record in caplog.records)


def test_bootstrap_is_seeded_and_contains_the_estimate():
    y, p = signal_data()
    first = evaluate(y, p, FINDINGS, n_bootstrap=200, seed=7)
    assert evaluate(y, p, FINDINGS, n_bootstrap=200, seed=7) == first
    other = evaluate(y, p, FINDINGS, n_bootstrap=200, seed=8)
    assert other["findings"]["ICH"]["auroc"]["ci"] != first["findings"]["ICH"]["auroc"]["ci"]
    entries = [metrics[m] for metrics in first["findings"].values() for m in ("auroc", "ap", "f1", "sensitivity", "specificity")]
    for entry in [*entries, first["mean_auroc"]]:
        lo, hi = entry["ci"]
        assert lo <= entry["value"] <= hi and lo < hi
    assert (first["n_bootstrap"], first["seed"]) == (200, 7)


def test_bootstrap_is_the_percentile_interval_of_case_resamples():
    """The interval equals scikit-learn's AUROC on cases drawn with replacement from default_rng(seed)."""
    y, p = signal_data(n=40)
    result = evaluate(y, p, FINDINGS, n_bootstrap=60, seed=5, ci=0.9)
    rng = np.random.default_rng(5)
    resampled = []
    for _ in range(60):
        idx = rng.integers(0, len(y), len(y))
        resampled.append(roc_auc_score(y[idx, 0], p[idx, 0]))  # both classes present in all 60 at this size
    assert result["findings"]["ICH"]["auroc"]["ci"] == pytest.approx(np.percentile(resampled, [5, 95]).tolist())


def test_bootstrap_counts_resamples_with_one_class():
    y = np.array([[1], [0], [0], [0], [0], [0]])
    p = np.array([[0.9], [0.1], [0.2], [0.3], [0.4], [0.5]])
    result = evaluate(y, p, ["ICH"], n_bootstrap=100, seed=0)
    rng = np.random.default_rng(0)
    without_positive = sum(0 not in rng.integers(0, 6, 6) for _ in range(100))
    assert without_positive > 0
    assert result["findings"]["ICH"]["bootstrap_skipped"] == without_positive
    assert result["mean_auroc"]["bootstrap_skipped"] == without_positive


def test_expected_calibration_error_two_bins():
    # bin [0, .5): p .2, .4 -> confidence .3, accuracy 1/2; bin [.5, 1]: p .6, .9 -> confidence .75, accuracy 1.
    # ECE = 2/4 * |.5 - .3| + 2/4 * |1 - .75| = .1 + .125.
    assert expected_calibration_error([0, 1, 1, 1], [0.2, 0.4, 0.6, 0.9], n_bins=2) == pytest.approx(0.225)
    # 0.5 and 1.0 both fall in the upper bin: confidence .75, accuracy .5.
    assert expected_calibration_error([1, 0], [0.5, 1.0], n_bins=2) == pytest.approx(0.25)


def test_one_class_finding_gives_none():
    y = Y.copy()
    y[:, 1] = 0
    result = evaluate(y, P, FINDINGS, n_bootstrap=50)
    fracture = result["findings"]["fracture"]
    assert fracture["auroc"] == {"value": None, "ci": None}
    assert fracture["ap"]["value"] is None and fracture["sensitivity"]["value"] is None
    assert fracture["specificity"]["value"] == pytest.approx(3 / 6)  # 0.9, 0.7, 0.6 called at 0.5
    assert fracture["bootstrap_skipped"] == 50 and fracture["positives"] == 0
    assert result["mean_auroc"]["value"] == pytest.approx(8 / 9)  # over ICH only
    json.dumps(result, allow_nan=False)
    assert "fracture: AUROC n/a  AP n/a" in summary_lines(result)[1]
    assert metadata_eval_metrics(result)["fracture_auroc"] is None


def test_write_report(tmp_path):
    y, p = signal_data(n=30)
    ids = [f"CQ500-CT-{i}" for i in range(30)]
    result = evaluate(y, p, FINDINGS, n_bootstrap=20)
    paths = write_report(result, y, p, FINDINGS, ids, tmp_path / "report")
    assert sorted(path.name for path in (tmp_path / "report").iterdir()) == sorted(
        ["metrics.json", "probabilities.csv", "roc.png", "pr.png", "reliability.png"]
    )  # and no temporaries left behind
    assert set(paths) == {"metrics", "probabilities", "roc", "pr", "reliability"}
    assert json.loads(paths["metrics"].read_text()) == result
    rows = paths["probabilities"].read_text().splitlines()
    assert rows[0] == "id,ICH_prob,ICH_label,fracture_prob,fracture_label"
    assert [row.split(",")[0] for row in rows[1:]] == ids
    first = rows[1].split(",")
    assert (float(first[1]), int(first[2]), float(first[3]), int(first[4])) == (p[0, 0], y[0, 0], p[0, 1], y[0, 1])
    for name in ("roc", "pr", "reliability"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(paths[name])
        assert image.shape[0] > 300 and image.shape[1] > 300 and image.std() > 0.01


def test_metadata_eval_metrics_match_the_summary_lines():
    y, p = signal_data()
    result = evaluate(y, p, FINDINGS, thresholds={"ICH": 0.43, "fracture": 0.61}, n_bootstrap=30)
    metadata = metadata_eval_metrics(result)
    lines = summary_lines(result)
    assert len(lines) == len(FINDINGS) + 1
    number = r"(-?\d+\.\d+|n/a)"
    pattern = re.compile(
        rf"^(\S+): AUROC {number} \[.*\]  AP {number} \[.*\]  F1 {number} \[.*\]  sens {number} \[.*\]"
        rf"  spec {number} \[.*\]  @ t={number}  ECE {number}  \(\d+ pos / \d+ neg\)$"
    )
    printed = {}
    for line in lines[:-1]:
        match = pattern.match(line)
        assert match, line
        name, *values = match.groups()
        for key, value in zip(("auroc", "ap", "f1", "sensitivity", "specificity", "threshold", "ece"), values):
            printed[f"{name}_{key}"] = float(value)
    printed["mean_auroc"] = float(re.match(rf"^mean AUROC {number} ", lines[-1]).group(1))
    assert printed == metadata
    assert metadata["ICH_threshold"] == 0.43 and all(round(v, 4) == v for v in metadata.values())


def _engine_over(y, p, batch_size, item):
    """An ignite Engine whose process function returns decollated per-case dicts built by ``item(i)``."""
    batches = [list(range(i, min(i + batch_size, len(y)))) for i in range(0, len(y), batch_size)]
    return Engine(lambda engine, batch: [item(i) for i in batch]), batches


def test_triage_report_matches_evaluate(tmp_path, capsys, caplog):
    y, p = signal_data(n=25)
    ids = [f"case-{i:02d}" for i in range(len(y))]

    def item(i):
        return {"pred": torch.tensor(p[i], dtype=torch.float32), "label": torch.tensor(y[i]), "id": ids[i]}

    engine, batches = _engine_over(y, p, 4, item)
    report = TriageReport(FINDINGS, tmp_path / "eval", thresholds={"ICH": 0.4, "fracture": 0.55}, n_bootstrap=40, seed=2)
    report.attach(engine)
    with caplog.at_level(logging.INFO, logger="ctfm.triage"):
        engine.run(batches, max_epochs=1)
    expected = evaluate(y, p, FINDINGS, thresholds={"ICH": 0.4, "fracture": 0.55}, n_bootstrap=40, seed=2)
    assert report.result == expected
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == expected
    rows = (tmp_path / "eval" / "probabilities.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ids
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("triage report of 25 cases") and printed[1:] == summary_lines(expected)
    assert not [r for r in caplog.records if r.name == "ctfm.triage"]  # printed once, not logged a second time


def test_triage_report_ids_from_metadata_and_thresholds_from_json(tmp_path):
    y, p = signal_data(n=9)

    def item(i):
        pred = MetaTensor(torch.tensor(p[i]), meta={"filename_or_obj": f"/data/ct_{i}.nii.gz"})
        return {"pred": pred, "label": torch.tensor(y[i]).float()}

    (tmp_path / "thresholds.json").write_text(json.dumps({"ICH": 0.3, "fracture": 0.7, "other": 0.1}))
    engine, batches = _engine_over(y, p, 2, item)
    report = TriageReport(FINDINGS, tmp_path / "eval", thresholds=tmp_path / "thresholds.json", n_bootstrap=0)
    report.attach(engine)
    engine.run(batches, max_epochs=1)
    assert report.result["findings"]["fracture"]["threshold"] == 0.7
    rows = (tmp_path / "eval" / "probabilities.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == [f"/data/ct_{i}.nii.gz" for i in range(9)]
    (tmp_path / "partial.json").write_text(json.dumps({"ICH": 0.3}))
    with pytest.raises(CTFMError, match="fracture"):
        TriageReport(FINDINGS, tmp_path, thresholds=tmp_path / "partial.json")


@pytest.mark.parametrize(
    "y_true, y_prob, problem",
    [
        (Y[:5], P, "shape"),
        (Y, P[:, :1], "shape"),
        (Y[:, :1], P[:, :1], "1 probability columns for 2 findings"),
        (Y, np.where(P == 0.9, np.nan, P), "NaN"),
        (Y, P * 2, r"\[0, 1\]"),
        (Y, P - 0.5, r"\[0, 1\]"),
        (Y * 2, P, "0 or 1"),
        (Y[:0], P[:0], "no cases"),
    ],
)
def test_bad_inputs_raise(y_true, y_prob, problem):
    for call in (lambda: evaluate(y_true, y_prob, FINDINGS, n_bootstrap=0), lambda: choose_thresholds(y_true, y_prob, FINDINGS)):
        with pytest.raises(CTFMError, match=problem) as info:
            call()
        assert "\n" not in str(info.value)


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(CTFMError, match="rule"):
        choose_thresholds(Y, P, FINDINGS, rule="mcc")
    with pytest.raises(CTFMError, match="threshold of 'ICH'"):
        evaluate(Y, P, FINDINGS, thresholds={"ICH": 1.5, "fracture": 0.5})
    with pytest.raises(CTFMError, match="distinct"):
        evaluate(Y, P, ["ICH", "ICH"])
    with pytest.raises(CTFMError, match=r"\(N,\)"):
        expected_calibration_error(Y, P)
    result = evaluate(Y, P, FINDINGS, n_bootstrap=0)
    with pytest.raises(CTFMError, match="5 case ids for 6 cases"):
        write_report(result, Y, P, FINDINGS, ["a"] * 5, tmp_path)
    report = TriageReport(FINDINGS, tmp_path)
    with pytest.raises(CTFMError, match="pred has 3 and label 2 values for 2 findings"):
        report.add_case(torch.rand(3), torch.zeros(2), "case-1")


def _distributed_worker(rank, port, y, p, output_dir):
    """One of two gloo ranks: rank 0 evaluates cases 0, 2, 4, ..., rank 1 cases 1, 3, ... but the last (uneven
    shards); writes its result to ``output_dir/rank<r>.json``."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mine = list(range(rank, len(y), 2))[: None if rank == 0 else -1]

        def item(i):
            return {"pred": torch.tensor(p[i]), "label": torch.tensor(y[i]), "id": f"c{i}"}

        engine = Engine(lambda engine, batch: [item(i) for i in batch])
        report = TriageReport(FINDINGS, output_dir / "eval", n_bootstrap=30)
        report.attach(engine)
        engine.run([mine[i : i + 3] for i in range(0, len(mine), 3)], max_epochs=1)
        (output_dir / f"rank{rank}.json").write_text(json.dumps(report.result))
    finally:
        torch.distributed.destroy_process_group()


def test_triage_report_gathers_across_ranks(tmp_path):
    """Under a 2-process group every rank gets the result of all cases (rank order); only rank 0 writes."""
    y, p = signal_data(n=21)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers need no fresh imports (spawn costs ~10 s here); they run no multithreaded kernels
    torch.multiprocessing.start_processes(_distributed_worker, args=(port, y, p, tmp_path), nprocs=2, start_method="fork")
    order = [*range(0, 21, 2), *list(range(1, 21, 2))[:-1]]  # rank 0's cases, then rank 1's
    expected = evaluate(y[order], p[order], FINDINGS, n_bootstrap=30)
    assert json.loads((tmp_path / "rank0.json").read_text()) == expected
    assert json.loads((tmp_path / "rank1.json").read_text()) == expected
    ids = [row.split(",")[0] for row in (tmp_path / "eval" / "probabilities.csv").read_text().splitlines()[1:]]
    assert ids == [f"c{i}" for i in order]
