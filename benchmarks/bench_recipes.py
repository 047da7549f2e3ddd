"""CT-FM's recipe (intra-sample SimCLR, ``train.json``) against FM-CT's (DINO + masked image modelling,
``train.json`` + ``train_dino.json``) on equal wall-clock compute on this CPU, with a random-init floor.

    python benchmarks/bench_recipes.py [--budget_s 420] [--init_filters 8] [--work /tmp/bench_recipes] \
        [--out benchmarks/results/recipes_cpu]

In one run:

1. a random-init CT-FM encoder of width ``--init_filters`` (seed 0) is saved as a Hugging Face folder: the
   shared initialisation of both recipes and the floor of every check;
2. each recipe runs ``python -m monai.bundle run`` of the ctfm_pretrain bundle from that init
   (``--load_pretrain true --encoder_weights INIT``) on the sample CT of ``ctfm.sample_data`` (the training section
   of its dataset.json: one abdomen/pelvis CT), first for 8 steps to time a step, then for
   ``budget_s / step time`` steps (the schedules span the run), stopped at ``1.2 * budget_s`` whatever happens;
   each export (``models/encoder_hf``; DINO: the teacher's encoder) is loaded back with ``ctfm.checkpoint.load_encoder``;
3. every encoder (random floor, SimCLR, DINO + MIM) is scored on
   (a) same-location crop retrieval on the held-out sample CT (``example_ct_dicom``, no run trained on it): 24 random
   crops, two strongly augmented views each (CT-FM's views: random resized crop, flip, histogram shift, blur);
   top-1 = how often view A of crop i has view B of crop i as its nearest neighbour (cosine) among the 24 B views;
   mean over 5 seeds (chance 1/24);
   (b) organ crops cut with the sample CTs' reference labels (``ctfm.retrieval.clustering.organ_crops``, the probe's
   organs) on the training CT and the held-out CT: linear-probe accuracy (multinomial logistic regression on
   standardised embeddings, trained on one scan's crops and tested on the other's, both ways, organs in both
   scans), and the retrieval probe's clustering scores (kNN accuracy leaving one scan out, NMI).
4. ``<out>.json`` and ``<out>.md`` are written at the end only (nothing is written when a step fails).

Both runs use one thread (``OMP_NUM_THREADS=1``) and cache the deterministic preprocessing: the third config file
wraps ``CTFMPreprocessd`` in a (non-random) ``Lambda`` so that MONAI's ``CacheDataset``, which stops caching at a
nested ``Compose``, caches the resampled CT instead of resampling it every step; both recipes get the same.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "ctfm_pretrain" / "configs"
RECIPES = {"simclr": ["train.json"], "dino_mim": ["train.json", "train_dino.json"]}
LABELS = {"random": "random init (floor)", "simclr": "CT-FM SimCLR (train.json)", "dino_mim": "FM-CT DINO + MIM (train_dino.json)"}
ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta", "colon", "vertebrae_T12", "autochthon_left",
          "autochthon_right", "iliopsoas_left", "gluteus_maximus_left", "urinary_bladder", "hip_left"]
SPACING = [3.0, 1.0, 1.0]  # train.json's
CROP = [16, 64, 64]  # train.json's crop, the DINO global crops' size after resizing
#: The third config file of every run: cache the preprocessing (see the module docstring) and stop at a wall clock.
BENCH_CONFIG = {
    "imports": ["$import os", "$import time", "$import torch", "$import ignite", "$import monai", "$import ctfm", "$import ctfm.bundle",
                "$import ctfm.datalist", "$import ctfm.engine", "$import ctfm.networks", "$import ctfm.pretrain.dino",
                "$import ctfm.pretrain.simclr", "$import ctfm.sample_data", "$import ctfm.transforms", "$import ctfm.weights"],
    "budget_s": 60,
    "train#preprocessing#transforms#1": "$monai.transforms.Lambda(ctfm.transforms.CTFMPreprocessd(keys='image', spacing=@spacing, min_size=@crop_size))",
    "run": [
        "$@train#trainer.add_event_handler(ignite.engine.Events.STARTED, lambda e: setattr(e.state, 'bench_t0', time.perf_counter()))",
        "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED, lambda e: e.terminate() if time.perf_counter() - e.state.bench_t0 > 1.2 * @budget_s else None)",
        "$@train#trainer.run()",
    ],
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_recipe(name: str, root: Path, init: Path, bench_file: Path, steps: int, budget_s: float, init_filters: int) -> dict:
    """One ``monai.bundle run`` of recipe ``name``; returns its command, wall-clock, CPU time and the steps it reached."""
    files = [str(CONFIGS / c) for c in RECIPES[name]] + [str(bench_file)]
    overrides = {"bundle_root": str(root), "init_filters": init_filters, "num_workers": 0, "load_pretrain": True,
                 "encoder_weights": str(init), "epoch_length": steps, "max_epochs": 1, "warmup_iterations": max(steps // 10, 1),
                 "checkpoint_interval": steps, "budget_s": budget_s}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(files), *[f"--{k}={v}" for k, v in overrides.items()]]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (root / "run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: the bundle run failed (exit {proc.returncode}); see {root / 'run.log'}:\n{proc.stderr[-3000:]}")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "runs"))
    events.Reload()
    loss = events.Scalars("train_loss")
    times = [e.wall_time for e in loss]
    step_s = (times[-1] - times[1]) / (len(times) - 2) if len(times) > 2 else float("nan")
    terms = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return {
        "command": shlex.join(cmd),
        "steps": len(loss),
        "train_s": times[-1] - times[0] + (step_s if np.isfinite(step_s) else 0.0),
        "step_s": step_s,
        "process_wall_s": wall,
        "process_cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "first_loss": loss[0].value,
        "last_loss_mean10": float(np.mean([e.value for e in loss[-10:]])),
        "last_terms_mean10": {k: float(np.mean(v[-10:])) for k, v in terms.items()},
    }


@torch.no_grad()
def embed(encoder: torch.nn.Module, crops: torch.Tensor, batch: int = 8) -> np.ndarray:
    """``(N, C, *crop)`` -> ``(N, E)`` pooled embeddings, eval mode."""
    encoder.eval()
    return torch.cat([encoder.embed(crops[i : i + batch]) for i in range(0, len(crops), batch)]).numpy()


def retrieval_top1(encoder: torch.nn.Module, views: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    out = []
    for a, b in views:
        za, zb = embed(encoder, a), embed(encoder, b)
        za /= np.maximum(np.linalg.norm(za, axis=1, keepdims=True), 1e-12)
        zb /= np.maximum(np.linalg.norm(zb, axis=1, keepdims=True), 1e-12)
        out.append(float(np.mean(np.argmax(za @ zb.T, axis=1) == np.arange(len(za)))))
    return out


def linear_probe(x: np.ndarray, organs: list[str], scans: list[str]) -> float:
    """Accuracy of a multinomial logistic regression trained on one scan's crops, tested on the other's (both ways)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    y, groups = np.asarray(organs), np.asarray(scans)
    shared = sorted(set(y[groups == groups[0]]) & set(y[groups != groups[0]]))
    correct = total = 0
    for scan in sorted(set(groups)):
        train = (groups != scan) & np.isin(y, shared)
        test = (groups == scan) & np.isin(y, shared)
        scaler = StandardScaler().fit(x[train])
        model = LogisticRegression(max_iter=5000, random_state=0).fit(scaler.transform(x[train]), y[train])
        correct += int((model.predict(scaler.transform(x[test])) == y[test]).sum())
        total += int(test.sum())
    return correct / total


def evaluation_data(seeds: int = 5):
    """(retrieval views per seed, organ crops, organ names, scan ids), from the sample CTs."""
    from monai.transforms import Compose, LoadImaged

    from ctfm.ct_io import LoadCTd
    from ctfm.pretrain.simclr import IntraSampleViewsd
    from ctfm.retrieval.clustering import organ_crops
    from ctfm.sample_data import totalseg_classes
    from ctfm.segmentation.data import AlignLabeld, sample_evaluation_data, sample_training_data
    from ctfm.transforms import CTFMPreprocessd

    with_labels = Compose([LoadCTd(keys="image"), LoadImaged(keys="label", ensure_channel_first=True, image_only=True),
                           AlignLabeld(keys="label", image_key="image", mode="world"),
                           CTFMPreprocessd(keys="image", label_keys="label", spacing=SPACING, min_size=CROP)])
    scans = {"example_ct (training CT)": sample_training_data()[0], "example_ct_dicom (held out)": sample_evaluation_data()[0]}
    names = totalseg_classes()
    crops, organs, scan_of, held_out = [], [], [], None
    for sid, item in scans.items():
        d = with_labels(dict(item))
        for crop, organ in organ_crops(d["image"], d["label"], names, ORGANS, CROP, 6, 200, 0):
            crops.append(torch.as_tensor(crop)[0])
            organs.append(organ)
            scan_of.append(sid)
        if "held out" in sid:
            held_out = torch.as_tensor(d["image"]).float()
    views = []
    for seed in range(seeds):
        v = IntraSampleViewsd("image", num_crops=24, crop_size=CROP).set_random_state(seed=seed)({"image": held_out})
        views.append((v["view0"], v["view1"]))
    return views, torch.stack(crops).float(), organs, scan_of


def markdown(result: dict) -> str:
    rows = result["encoders"]
    lines = [
        f"# CT-FM's recipe vs FM-CT's recipe on equal compute (CPU, width {result['init_filters']})",
        "",
        f"Run {result['date']} on {result['cpu']} ({result['cores']} cores), torch {result['torch']}, one thread per run, "
        f"budget {result['budget_s']:.0f} s of training per recipe; load average {result['loadavg_start']} at start, "
        f"{result['loadavg_end']} at the end (the machine was shared with other work, so wall-clock steps are noisy).",
        "",
        "**How small this is:** pre-training on ONE abdomen/pelvis CT (the sample CT, 112 slices of 3 mm) for a few "
        "minutes of one CPU core, a CT-FM encoder of width "
        f"{result['init_filters']} ({result['parameters']:,} parameters); evaluation on 2 CTs. These numbers say whether "
        "each recipe runs and moves the encoder away from its random init on this data; they say nothing about either "
        "recipe at scale (CT-FM: 148,000 CTs; FM-CT: 361,663 head CTs; GPUs for days).",
        "",
        "| encoder | steps | train s | s / step | CPU s | crop retrieval top-1 (held-out CT, 24 crops; chance 0.042) "
        "| organ linear probe acc. | organ kNN acc. | organ NMI |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        t = r.get("training") or {}
        fmt = lambda v, f="{:.3f}": f.format(v) if v is not None else "-"  # noqa: E731
        lines.append(
            f"| {LABELS[name]} | {t.get('steps', 0)} | {fmt(t.get('train_s'), '{:.0f}')} | {fmt(t.get('step_s'), '{:.2f}')} | "
            f"{fmt(t.get('process_cpu_s'), '{:.0f}')} | {r['retrieval_top1_mean']:.3f} (min {min(r['retrieval_top1']):.3f}, "
            f"max {max(r['retrieval_top1']):.3f}) | {r['organ_linear_probe_accuracy']:.3f} | {r['organ_knn_accuracy']:.3f} | {r['organ_nmi']:.3f} |"
        )
    used = {name: rows[name]["training"] for name in RECIPES}
    lines += [
        "",
        "Compute actually used (training loop, measured): " + "; ".join(
            f"{LABELS[n]}: {t['steps']} of {t['planned_steps']} planned steps, {t['train_s']:.0f} s, {t['process_cpu_s']:.0f} CPU s "
            f"for the whole process (calibration: {t['calibration_step_s']:.2f} s / step)" for n, t in used.items())
        + ". Steps are planned from a short timed run of each recipe; the shared machine's load changes between runs, "
        "so the budgets are equal only to within that.",
        "",
        f"Organ crops: {result['organ_crops']} crops of {', '.join(map(str, CROP))} voxels ({result['organs']} organs, 6 per organ and "
        "scan, TotalSegmentator reference labels); linear probe trained on one scan's crops and tested on the other's, "
        "organs present in both. Retrieval: 5 seeds x 24 crops of the held-out CT, two CT-FM views each (the views "
        "SimCLR is trained to match, so check (a) favours it by construction).",
        "",
        "Triage few-shot table: left out. It needs the triage bundle's labelled head CTs (demo phantoms with synthetic "
        "findings, three HU windows as channels); an encoder pre-trained for minutes on one abdominal CT at one "
        "channel says nothing there, and it would not fit the 25-minute budget of this run.",
        "",
        "Commands (the third config file is written by the benchmark, content in the .json):",
        "",
    ]
    for name in RECIPES:
        lines += [f"- {LABELS[name]}:", "", "  ```", f"  {rows[name]['training']['command']}", "  ```", ""]
    lines += [f"Benchmark: `{result['benchmark_command']}` ({result['total_s']:.0f} s in all).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget_s", type=float, default=420.0, help="training seconds per recipe (default 420)")
    parser.add_argument("--init_filters", type=int, default=8)
    parser.add_argument("--calibration_steps", type=int, default=8)
    parser.add_argument("--work", default="/tmp/bench_recipes", help="scratch folder for the runs")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recipes_cpu"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from ctfm.checkpoint import load_encoder, save_hf_folder
    from ctfm.files import atomic_path
    from ctfm.networks import CTFMEncoder
    from ctfm.retrieval.clustering import cluster_scores

    t0 = time.perf_counter()
    loadavg_start = os.getloadavg()
    work = Path(args.work)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    torch.manual_seed(0)
    init_encoder = CTFMEncoder(init_filters=args.init_filters)
    init = save_hf_folder(init_encoder, work / "init" / "encoder_hf")
    bench_file = work / "bench.json"
    bench_file.write_text(json.dumps(BENCH_CONFIG, indent=2))

    training = {}
    for name in RECIPES:
        calibration = run_recipe(name, work / f"{name}_calibration", init, bench_file, args.calibration_steps, 10 * args.budget_s, args.init_filters)
        steps = max(int(args.budget_s / calibration["step_s"]), 2)
        print(f"{name}: {calibration['step_s']:.2f} s/step in calibration -> {steps} steps", flush=True)
        training[name] = run_recipe(name, work / name, init, bench_file, steps, args.budget_s, args.init_filters)
        training[name]["planned_steps"] = steps
        training[name]["calibration_step_s"] = calibration["step_s"]
        print(f"{name}: {training[name]['steps']} steps in {training[name]['train_s']:.0f} s", flush=True)

    encoders = {"random": load_encoder(init)[0]}
    for name in RECIPES:
        encoders[name] = load_encoder(work / name / "models" / "encoder_hf")[0]
    views, crops, organs, scans = evaluation_data()
    results = {}
    for name, encoder in encoders.items():
        top1 = retrieval_top1(encoder, views)
        x = embed(encoder, crops)
        clusters = cluster_scores(x, organs, scans, seed=0)
        results[name] = {"training": training.get(name), "retrieval_top1": top1, "retrieval_top1_mean": float(np.mean(top1)),
                         "organ_linear_probe_accuracy": linear_probe(x, organs, scans), "organ_knn_accuracy": clusters["knn_accuracy"],
                         "organ_nmi": clusters["nmi"], "organ_silhouette": clusters["silhouette"]}
        print(name, {k: v for k, v in results[name].items() if k != "training"}, flush=True)

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "init_filters": args.init_filters,
        "parameters": sum(p.numel() for p in init_encoder.parameters()),
        "budget_s": args.budget_s,
        "loadavg_start": [round(v, 2) for v in loadavg_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "organ_crops": len(organs),
        "organs": len(set(organs)),
        "bench_config": BENCH_CONFIG,
        "benchmark_command": shlex.join(["python", "benchmarks/bench_recipes.py", *(argv if argv is not None else sys.argv[1:])]),
        "total_s": time.perf_counter() - t0,
        "encoders": results,
    }
    out = Path(args.out)
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
