"""Triage probe on the CPU: preprocessing, embedding, the embedding cache and the probe fits, per recipe, in one run.

Measured, for each input recipe of the ctfm_triage bundle (CT-FM: ``train.json``, orientation SPL, (5, 2, 2) mm,
48x128x128, four HU windows stacked along S -> network input ``(1, 192, 128, 128)``; FM-CT: ``train.json`` +
``recipe_fmct.json``, RAS, 1 mm, resized to 96³, three windows as channels -> ``(3, 96, 96, 96)``; the
preprocessing is the bundle's own ``validate#preprocessing``, parsed from those configs) and each encoder width
of ``--widths`` (8: the shipped demo encoder; 32: CT-FM's published width):

1. the machine: fp32 peak (median of 4096x4096 ``torch`` matmuls, GFLOP/s) and ONNX Runtime's own 4096² MatMul
   (``bench_inference.measure_peak``), at the start and at the end; the higher of the two is kept;
2. preprocessing, seconds per scan over the first ``--scans`` scans of the demo phantom set (``train.csv`` of
   ``ctfm.triage.demo.demo_dir()``): the read (``LoadCTd``) and the recipe's transforms (head check, grid, HU
   windows) timed apart; the files are in the page cache (one untimed pass first), so a cold disk is not measured;
3. embedding one preprocessed scan (the first) with a seeded random encoder of that width (speed does not
   depend on the weights' values): torch eager fp32 (``encoder.embed`` under ``torch.no_grad()``) against ONNX
   Runtime's CPU provider fp32 (an ``output="embedding"`` export of the same encoder, ``ctfm.export``):
   seconds, scans/s, achieved GFLOP/s (FLOPs from ``torch.utils.flop_counter.FlopCounterMode`` on the meta
   device) and percent of the peak, speed-up, max abs difference and cosine to torch, working memory;
4. the probe's embedding cache end to end: ``ctfm.embedding_store.extract_embeddings`` over the scans into a
   fresh temporary ``EmbeddingStore`` (read, preprocess, embed, write one safetensors row per scan), with
   ``encoder.embed`` and with the ONNX Runtime module as the ``embed`` callable; scans/s, the part of each scan
   that is neither preprocessing nor the network (store write, tensor hand-over), working memory of the first
   pass, agreement of the two stores' rows, and the rerun over the full store, which must skip every scan;
5. probe fits (``ctfm.triage.probe``): ``fit_linear_probe``, ``few_shot`` (prototype, shots 1, 2, 4, 8 x 10
   seeds, as ``probe.json``) and ``label_efficiency`` (its defaults: 2, 5, 10, 100 % x 5 seeds) on the
   embeddings just extracted (torch's store) with the demo labels, split half / half by
   ``ctfm.triage.datasets.split_cases``; and once on synthetic embeddings, 10,000 x 512 (plus 2,000 test rows)
   with 10 findings, to show the scale. The AUROCs of the demo rows come from random encoders: they say nothing
   of CT-FM and are there only to show that the fits ran on sensible data.

Timing: as in ``bench_inference.py``: the first call of each backend gives its output and working memory (peak
host RSS above the RSS before the call, Linux ``VmHWM``), then ``repeats`` interleaved rounds time each backend
once in turn and the median is reported; the cache passes are interleaved the same way (a fresh store each
pass). Preprocessing and probe fits report the median of ``repeats`` passes. torch, ONNX Runtime and the BLAS
under scikit-learn (``threadpoolctl``) all get ``--threads`` threads. Results go to
``<out>/triage_probe_cpu.{json,md}``, written atomically; the Markdown table is printed too.

Cost: per recipe, each scan is read and preprocessed repeats + 1 times (preprocessing), and per recipe and width
2 x repeats times more (the cache passes), where each backend embeds it repeats times; the first scan is embedded
repeats + 1 more times by each backend (the embedding rows). The FM-CT preprocessing (about 1 s a scan on 2
cores) and the synthetic ``label_efficiency`` (about a minute a call) dominate the defaults (20 scans, width 8,
3 repeats: roughly 10-15 minutes on 2 cores). Width 32 costs 1.2 TFLOP per CT-FM scan and 0.35 TFLOP per FM-CT
scan (width 8: 77 and 22 GFLOP), so ``--widths 8 32`` adds about 25 minutes where the encoder runs near
150 GFLOP/s, far more on a slower or busy machine.

    python benchmarks/bench_triage_probe.py --scans 20 --widths 8 32 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import sklearn
import torch
from monai.bundle import ConfigParser
from threadpoolctl import threadpool_limits
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import (  # noqa: E402
    RESULTS,
    ROOT,
    _mib,
    call_with_memory,
    cpu_seconds,
    encoder_rows,
    machine_info,
    measure_peak,
    time_interleaved,
)

from ctfm.embedding_store import EmbeddingStore, extract_embeddings  # noqa: E402
from ctfm.export import OnnxRuntimeModule, export_onnx  # noqa: E402
from ctfm.files import atomic_path  # noqa: E402
from ctfm.networks.encoder import CTFMEncoder  # noqa: E402
from ctfm.triage.datasets import read_triage_dataset, split_cases, subset  # noqa: E402
from ctfm.triage.demo import FINDINGS, demo_dir  # noqa: E402
from ctfm.triage.probe import few_shot, fit_linear_probe, label_efficiency, mean_auroc  # noqa: E402

NAME = "triage_probe_cpu"
CONFIGS = ROOT / "bundles" / "ctfm_triage" / "configs"
#: recipe key -> (name in the tables, the bundle configs that define it, later ones overriding).
RECIPES = {"ctfm": ("CT-FM", ("train.json",)), "fmct": ("FM-CT", ("train.json", "recipe_fmct.json"))}
SHOTS = (1, 2, 4, 8)
FEW_SHOT_SEEDS = tuple(range(10))
#: The synthetic probe data: training rows, test rows, embedding length, findings.
SYNTHETIC = {"train": 10_000, "test": 2_000, "dim": 512, "findings": 10}
TORCH, ORT = "torch eager fp32", "ONNX Runtime CPU fp32"


def load_recipe(key: str) -> dict:
    """The bundle's validation preprocessing and network input of recipe ``key``, parsed from its configs."""
    name, files = RECIPES[key]
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    channels = int(parser.get_parsed_content("in_channels"))
    return {
        "key": key,
        "name": name,
        "configs": list(files),
        "preprocessing": parser.get_parsed_content("validate#preprocessing"),
        "recipe": parser.get_parsed_content("recipe"),
        "in_channels": channels,
        "input": [channels, *(int(s) for s in parser.get_parsed_content("network_input_size"))],
    }


def describe_recipe(recipe: dict) -> str:
    r = recipe["recipe"]
    stack = "stacked along S" if r["window_stack"] == "S" else "as channels"
    return (f"{r['orientation']}, {'x'.join(f'{s:g}' for s in r['spacing'])} mm, {r['size_mode']} to "
            f"{'x'.join(map(str, r['input_size']))}, {len(r['windows'])} windows {stack}")


def flops_per_scan(width: int, in_channels: int, spatial: Sequence[int]) -> int:
    """FLOPs of one embedding ``(1, in_channels, *spatial)`` -> ``(1, 16 * width)``, counted on the meta device."""
    with torch.device("meta"):
        encoder = CTFMEncoder(init_filters=width, in_channels=in_channels).eval()
        x = torch.empty(1, in_channels, *spatial)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder.embed(x)
    return counter.get_total_flops()


def demo_items(scans: int) -> tuple[list[dict], np.ndarray, dict[str, list[str]], list[str]]:
    """The first ``scans`` cases of the demo set's ``train.csv``: datalist items, labels ``(N, F)``, a half / half
    train / test split of their ids, and the ids."""
    data = read_triage_dataset("csv", demo_dir() / "train.csv", findings=list(FINDINGS))
    if not 2 <= scans <= len(data):
        raise SystemExit(f"--scans {scans}: the demo set's train.csv has {len(data)} scans; choose 2 to {len(data)}")
    data = subset(data, data.ids[:scans])
    split = split_cases(data, fractions=(0.5, 0.0, 0.5), seed=0)
    return data.items(), data.label_array(), split, data.ids


def time_preprocessing(preprocessing, items: list[dict], repeats: int) -> tuple[dict, torch.Tensor]:
    """Median over ``repeats`` passes of the read and the transforms, seconds per scan; and the first scan's
    network input ``(C, *spatial)`` as a plain float32 tensor."""
    read, transforms = preprocessing.transforms[0], preprocessing.transforms[1:]
    first = preprocessing(dict(items[0]))["image"]  # untimed: ITK loads its IO modules, the files enter the cache
    for item in items[1:]:
        preprocessing(dict(item))
    passes = []
    for _ in range(repeats):
        read_s = transforms_s = 0.0
        for item in items:
            start = time.perf_counter()
            d = read(dict(item))
            middle = time.perf_counter()
            for t in transforms:
                d = t(d)
            transforms_s += time.perf_counter() - middle
            read_s += middle - start
        passes.append((read_s / len(items), transforms_s / len(items)))
    read_s = statistics.median(p[0] for p in passes)
    transforms_s = statistics.median(p[1] for p in passes)
    total = statistics.median(p[0] + p[1] for p in passes)
    row = {"scans": len(items), "read_s": read_s, "transforms_s": transforms_s, "total_s": total,
           "scans_per_s": 1.0 / total, "output_shape": list(first.shape)}
    image = first.as_tensor() if hasattr(first, "as_tensor") else torch.as_tensor(first)
    return row, image.float().contiguous()


def cache_passes(
    backends: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    items: list[dict],
    preprocessing,
    description: dict,
    repeats: int,
    work: Path,
) -> tuple[list[dict], EmbeddingStore]:
    """``extract_embeddings`` over ``items`` into a fresh store per backend and round (interleaved rounds; the
    first round also gives the working memory), then the rerun over each backend's full store, which must skip
    every scan. Returns one row per backend and torch's last store."""
    times = {name: [] for name in backends}
    memory, stores = {}, {}
    for r in range(repeats):
        for b, (name, embed) in enumerate(backends.items()):
            store = EmbeddingStore(work / f"round{r}_backend{b}", description)

            def run(store=store, embed=embed):
                start = time.perf_counter()
                report = extract_embeddings(store, items, preprocessing, embed)
                return report, time.perf_counter() - start

            (report, seconds), used = call_with_memory(run, "cpu", measure=r == 0)
            if report.failed or len(report.embedded) != len(items):
                first = next(iter(report.failed.values()), "no error given")
                raise RuntimeError(f"{name}: {report.summary()} (first failure: {first})")
            times[name].append(seconds)
            memory.setdefault(name, used)
            stores[name] = store
    ids = [str(item["id"]) for item in items]
    matrices = {name: torch.from_numpy(store.matrix(ids)) for name, store in stores.items()}
    reference = matrices[next(iter(backends))]
    rows = []
    for name, embed in backends.items():
        reruns = []
        for _ in range(repeats):
            start = time.perf_counter()
            report = extract_embeddings(stores[name], items, preprocessing, embed)
            reruns.append(time.perf_counter() - start)
            if report.embedded or report.failed or len(report.skipped) != len(items):
                raise RuntimeError(f"{name}: the rerun over the full store did not skip every scan: {report.summary()}")
        seconds = statistics.median(times[name])
        rows.append({
            "backend": name,
            "scans": len(items),
            "seconds": seconds,
            "scans_per_s": len(items) / seconds,
            "seconds_per_scan": seconds / len(items),
            "memory_bytes": memory[name],
            "max_abs_diff": float((matrices[name] - reference).abs().max()),
            "min_cosine": float(torch.nn.functional.cosine_similarity(matrices[name], reference).min()),
            "rerun_seconds": statistics.median(reruns),
            "rerun_skipped": len(items),
        })
    return rows, stores[next(iter(backends))]


def timed(run: Callable[[], object], repeats: int) -> tuple[object, float]:
    """``run()``'s first result and the median seconds over ``repeats`` calls (the first one included)."""
    result, times = None, []
    for i in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
        result = out if i == 0 else result
    return result, statistics.median(times)


def probe_fits(x_train, y_train, x_test, y_test, findings: Sequence[str], repeats: int) -> dict:
    """Seconds of ``fit_linear_probe``, ``few_shot`` and ``label_efficiency`` (median of ``repeats``) and what
    they gave: the linear probe's mean test AUROC, few-shot runs and AUROC at the most shots, fits made."""
    quiet = logging.getLogger("ctfm.triage")  # its per-fit warning on a one-class finding (tiny demo splits)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tiny demo splits: means of empty slices, undefined AUROCs
            probe, fit_s = timed(lambda: fit_linear_probe(x_train, y_train, seed=0), repeats)
            few, few_s = timed(lambda: few_shot(x_train, y_train, x_test, y_test, findings, SHOTS, FEW_SHOT_SEEDS),
                               repeats)
            curve, efficiency_s = timed(lambda: label_efficiency(x_train, y_train, x_test, y_test), repeats)
            auroc = mean_auroc(y_test, probe.predict_proba(x_test))
    finally:
        quiet.setLevel(level)
    most = max((r["shots"] for r in few), default=None)
    return {
        "train": int(len(x_train)),
        "test": int(len(x_test)),
        "dim": int(x_train.shape[1]),
        "findings": len(findings),
        "fit_linear_probe_s": fit_s,
        "linear_probe_mean_auroc": auroc,
        "few_shot_s": few_s,
        "few_shot_runs": int(sum(r["runs"] for r in few)),
        "few_shot_max_shots": most,
        "few_shot_mean_auroc_at_max_shots": float(np.mean([r["auroc_mean"] for r in few if r["shots"] == most]))
        if few else float("nan"),
        "label_efficiency_s": efficiency_s,
        "label_efficiency_fits": int(sum(r["runs"] for r in curve)),
        "label_efficiency": curve,
    }


def synthetic_embeddings(train: int, test: int, dim: int, findings: int, seed: int = 0):
    """Gaussian embeddings with labels from a random linear model plus noise (prevalence 5-30 %), seeded:
    ``(x_train, y_train, x_test, y_test)``, float32 and 0/1 float."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((train + test, dim), dtype=np.float32)
    weights = rng.standard_normal((dim, findings)) / np.sqrt(dim)
    prevalence = rng.uniform(0.05, 0.3, findings)
    logits = 2.0 * (x @ weights) + np.log(prevalence / (1 - prevalence))
    y = (rng.random(logits.shape) < 1 / (1 + np.exp(-logits))).astype(np.float64)
    return x[:train], y[:train], x[train:], y[train:]


def markdown(report: dict) -> str:
    """The report as Markdown: machine and peak, then one table per measurement."""
    m, p = report["machine"], report["peak"]
    lines = [
        f"# Triage probe on the CPU: preprocessing, embedding, embedding cache, probe fits ({report['name']})",
        "",
        f"Run {report['date']} with `{report['command']}` ({report['threads']} threads, median of "
        f"{report['repeats']}).",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} logical CPUs), {report['threads']} threads for torch, ONNX Runtime "
        f"and BLAS; torch {m['torch']}, onnxruntime {m['onnxruntime']}, scikit-learn {m['sklearn']}. Other "
        f"processes used {m['others_cpu_percent']:.0f}% of the CPU time during the run (load average before: "
        f"{m['load_before']:.2f}). fp32 peak {p['fp32_gflops']:.0f} GFLOP/s (4096² torch matmul; before / after: "
        f"{p['fp32_gflops_before']:.0f} / {p['fp32_gflops_after']:.0f}); ONNX Runtime's 4096² MatMul "
        f"{p['ort_matmul_gflops']:.0f} GFLOP/s.",
        "",
        f"## Preprocessing (read + recipe transforms), {report['scans']} demo scans",
        "",
        "| recipe | transforms | network input | read (s/scan) | transforms (s/scan) | total (s/scan) | scans/s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in report["preprocessing"]:
        lines.append(f"| {r['recipe']} | {r['transforms']} | {'x'.join(map(str, r['network_input']))} | "
                     f"{r['read_s']:.3f} | {r['transforms_s']:.3f} | {r['total_s']:.3f} | {r['scans_per_s']:.2f} |")
    lines += [
        "",
        "## Embedding one preprocessed scan (seeded random encoder, batch 1)",
        "",
        "| recipe | width | GFLOP/scan | backend | s/scan | scans/s | GFLOP/s | % of peak | speed-up | max abs diff "
        "| cosine | working memory (MiB) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["embedding"]:
        lines.append(
            f"| {r['recipe']} | {r['width']} | {r['flops'] / 1e9:.1f} | {r['backend']} | {r['seconds']:.3f} | "
            f"{1 / r['seconds']:.2f} | {r['gflops']:.0f} | {r['percent_of_peak']:.0f}% | {r['speedup']:.2f}x | "
            f"{r['max_abs_diff']:.1e} | {r['cosine']:.6f} | {_mib(r['memory_bytes'])} |"
        )
    lines += [
        "",
        f"## Embedding cache end to end: `extract_embeddings` of {report['scans']} scans into a fresh `EmbeddingStore`",
        "",
        "| recipe | width | embed with | s (all scans) | scans/s | s/scan | of which not preprocessing or network "
        "(s/scan) | working memory (MiB) | rows vs torch's store: max abs diff / min cosine | rerun, all cached (s) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in report["cache"]:
        lines.append(
            f"| {r['recipe']} | {r['width']} | {r['backend']} | {r['seconds']:.2f} | {r['scans_per_s']:.2f} | "
            f"{r['seconds_per_scan']:.3f} | {r['other_seconds_per_scan']:.3f} | {_mib(r['memory_bytes'])} | "
            f"{r['max_abs_diff']:.1e} / {r['min_cosine']:.6f} | {r['rerun_seconds']:.3f} "
            f"({r['rerun_skipped']} skipped) |"
        )
    lines += [
        "",
        "## Probe fits (`ctfm.triage.probe`)",
        "",
        "| embeddings | train x dim | test | findings | `fit_linear_probe` (s) | `few_shot` (s; runs) | "
        "`label_efficiency` (s; fits) | linear probe mean AUROC | few-shot mean AUROC at most shots |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["probe"]:
        shots = "n/a" if r["few_shot_max_shots"] is None else \
            f"{r['few_shot_mean_auroc_at_max_shots']:.3f} ({r['few_shot_max_shots']} shots)"
        lines.append(
            f"| {r['embeddings']} | {r['train']} x {r['dim']} | {r['test']} | {r['findings']} | "
            f"{r['fit_linear_probe_s']:.3f} | {r['few_shot_s']:.3f} ({r['few_shot_runs']}) | "
            f"{r['label_efficiency_s']:.3f} ({r['label_efficiency_fits']}) | {r['linear_probe_mean_auroc']:.3f} | "
            f"{shots} |"
        )
    lines += [
        "",
        "Peak: the higher of the measurements before and after the timings. GFLOP/s counts the encoder's fp32 FLOPs "
        "(`FlopCounterMode`); speed-up, max abs diff and cosine compare with torch eager fp32 of the same recipe and "
        "width in this run. Backends are timed in interleaved rounds; seconds are medians over rounds. Working "
        "memory: peak host RSS of the first call (cache: of the first pass) above the RSS before it. Preprocessing "
        "reads from the page cache. The cache's \"not preprocessing or network\" column is its seconds per scan "
        "less the preprocessing total and the backend's embedding seconds above (the row write and hand-over; "
        "noise can make it negative). `few_shot`: prototype classifier, shots 1, 2, 4, 8 x 10 seeds per finding "
        "(a shot count is left out where the training half has too few positives or negatives); "
        "`label_efficiency`: 2, 5, 10, 100 % of the training labels x 5 seeds, each fit one probe per finding. "
        "Demo embeddings come from random encoders and a split of the first scans into halves, so their AUROCs "
        "are no measure of CT-FM; the synthetic rows are Gaussian embeddings with labels from a random linear "
        "model.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=20, help="demo scans (first of train.csv); default 20")
    ap.add_argument("--widths", nargs="+", default=["8"], help="encoder widths (init_filters), e.g. 8 32 or 8,32")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds / passes; the median is reported")
    ap.add_argument("--threads", type=int, default=2, help="threads for torch, ONNX Runtime and BLAS")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), help=f"of {', '.join(RECIPES)}; default both")
    args = ap.parse_args(argv)
    args.widths = [int(w) for text in args.widths for w in str(text).split(",") if w.strip()]
    args.recipes = [r.strip().lower().replace("-", "") for text in args.recipes for r in text.split(",") if r.strip()]
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe {unknown[0]!r}: choose from {', '.join(RECIPES)}")
    if args.repeats < 1 or args.threads < 1 or not args.widths:
        ap.error("--repeats and --threads must be at least 1, and --widths must name a width")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_triage_probe.py " + " ".join(
        [f"--scans {args.scans}", f"--widths {' '.join(map(str, args.widths))}", f"--repeats {args.repeats}",
         f"--threads {args.threads}", f"--recipes {' '.join(args.recipes)}"])
    machine = dict(machine_info(), sklearn=sklearn.__version__, load_before=os.getloadavg()[0])
    start_wall, (start_all, start_mine) = time.perf_counter(), cpu_seconds()
    peak_before = measure_peak(torch.device("cpu"), args.threads)
    items, labels, split, ids = demo_items(args.scans)
    train = [ids.index(i) for i in split["train"]]
    test = [ids.index(i) for i in split["test"]]
    preprocessing_rows, timed_rows, cache_rows, probe_rows, work = [], [], [], [], {}
    with tempfile.TemporaryDirectory(prefix="bench_triage_probe_") as tmp, threadpool_limits(args.threads):
        for key in args.recipes:
            recipe = load_recipe(key)
            row, image = time_preprocessing(recipe["preprocessing"], items, args.repeats)
            preprocessing_rows.append({"recipe": recipe["name"], "configs": recipe["configs"],
                                       "transforms": describe_recipe(recipe), "network_input": recipe["input"], **row})
            print(f"{recipe['name']:6s} preprocessing {row['total_s']:8.3f} s/scan", flush=True)
            if list(image.shape) != recipe["input"]:
                raise RuntimeError(f"{recipe['name']}: preprocessing gave {list(image.shape)}, not {recipe['input']}")
            x = image.unsqueeze(0)
            for width in args.widths:
                label = f"{recipe['name']} width {width}"
                torch.manual_seed(0)
                encoder = CTFMEncoder(init_filters=width, in_channels=recipe["in_channels"]).eval()
                work[label] = {"flops": flops_per_scan(width, recipe["in_channels"], recipe["input"][1:])}
                path = export_onnx(encoder, Path(tmp) / f"{key}_w{width}.onnx", recipe["input"][1:],
                                   recipe["in_channels"], output="embedding")
                runtime = OnnxRuntimeModule(path, ["CPUExecutionProvider"], args.threads)

                def eager(encoder=encoder, x=x):
                    with torch.no_grad():
                        return encoder.embed(x)

                for row in time_interleaved({TORCH: eager, ORT: lambda r=runtime, x=x: r(x)}, args.repeats, 1, "cpu"):
                    timed_rows.append(dict(row, device="cpu", patch=label, recipe=recipe["name"], width=width))
                    print(f"{label:18s} embed {row['backend']:24s} {row['seconds']:8.3f} s", flush=True)
                embed_s = {r["backend"]: r["seconds"] for r in timed_rows if r["patch"] == label}
                description = {"weights": "random-init seed 0", "encoder": encoder.config, "recipe": recipe["recipe"]}
                rows, store = cache_passes({TORCH: encoder.embed, ORT: runtime}, items, recipe["preprocessing"],
                                           description, args.repeats, Path(tmp) / f"store_{key}_w{width}")
                for r in rows:
                    r.update(recipe=recipe["name"], width=width,
                             other_seconds_per_scan=r["seconds_per_scan"] - preprocessing_rows[-1]["total_s"]
                             - embed_s[r["backend"]])
                    cache_rows.append(r)
                    print(f"{label:18s} cache {r['backend']:24s} {r['scans_per_s']:8.2f} scans/s, rerun "
                          f"{r['rerun_seconds']:.3f} s", flush=True)
                embeddings = store.matrix(ids)
                fits = probe_fits(embeddings[train], labels[train], embeddings[test], labels[test], FINDINGS,
                                  args.repeats)
                probe_rows.append({"embeddings": f"demo, {label}", **fits})
                print(f"{label:18s} probe fits {fits['fit_linear_probe_s']:.3f} / {fits['few_shot_s']:.3f} / "
                      f"{fits['label_efficiency_s']:.3f} s", flush=True)
        s = SYNTHETIC
        x_train, y_train, x_test, y_test = synthetic_embeddings(s["train"], s["test"], s["dim"], s["findings"])
        findings = [f"finding_{i}" for i in range(s["findings"])]
        fits = probe_fits(x_train, y_train, x_test, y_test, findings, args.repeats)
        probe_rows.append({"embeddings": "synthetic (Gaussian, random linear labels)", **fits})
        print(f"synthetic {s['train']}x{s['dim']} probe fits {fits['fit_linear_probe_s']:.3f} / "
              f"{fits['few_shot_s']:.3f} / {fits['label_efficiency_s']:.3f} s", flush=True)
    peak_after = measure_peak(torch.device("cpu"), args.threads)
    peak = {k: max(peak_before[k], peak_after[k]) for k in peak_before}  # a busy spell must not flatter the percentages
    peak.update(fp32_gflops_before=peak_before["fp32_gflops"], fp32_gflops_after=peak_after["fp32_gflops"])
    end_all, end_mine = cpu_seconds()
    capacity = (time.perf_counter() - start_wall) * os.cpu_count()
    machine["others_cpu_percent"] = 100 * max((end_all - start_all) - (end_mine - start_mine), 0) / capacity
    embedding_rows = []
    for row, extra in zip(encoder_rows(timed_rows, work, {"cpu": peak}), timed_rows):
        embedding_rows.append({"recipe": extra["recipe"], "width": extra["width"], "flops": work[row["patch"]]["flops"],
                               "network_input": next(p["network_input"] for p in preprocessing_rows
                                                     if p["recipe"] == extra["recipe"]), **row})
    report = {
        "name": NAME,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "scans": args.scans,
        "widths": args.widths,
        "repeats": args.repeats,
        "threads": args.threads,
        "machine": machine,
        "peak": peak,
        "preprocessing": preprocessing_rows,
        "embedding": embedding_rows,
        "cache": cache_rows,
        "probe": probe_rows,
        "synthetic": SYNTHETIC,
    }
    text = markdown(report)
    print(text)
    with atomic_path(Path(args.out) / f"{NAME}.json") as tmp_json:
        tmp_json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    with atomic_path(Path(args.out) / f"{NAME}.md") as tmp_md:
        tmp_md.write_text(text)
    return report


if __name__ == "__main__":
    main()
