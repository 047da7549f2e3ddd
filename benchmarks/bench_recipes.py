"""CT-FM's recipe (intra-sample SimCLR, ``train.json``) against FM-CT's (DINO + masked image modelling,
``train.json`` + ``train_dino.json``) on equal compute on this CPU, with a random-init floor, on every downstream check.

    python benchmarks/bench_recipes.py [--budget_cpu_s 600] [--init_filters 8] [--work /tmp/bench_recipes] \
        [--out benchmarks/results/recipes_cpu]

In one run:

1. a random-init CT-FM encoder of width ``--init_filters`` (seed 0) is saved as a Hugging Face folder: the
   shared initialisation of every recipe and the floor of every check;
2. each recipe of :data:`RECIPES` runs ``python -m monai.bundle run`` of the ctfm_pretrain bundle from that init
   (``--load_pretrain True --encoder_weights INIT``) on the sample CT of ``ctfm.sample_data`` (the training section
   of its dataset.json: one abdomen/pelvis CT), one thread each, all recipes at once: first for
   ``--calibration_steps`` steps to measure the CPU seconds of a step, then for ``budget_cpu_s / that`` steps (the
   schedules span the run), stopped at ``1.2 * budget_cpu_s`` CPU seconds of training whatever happens. The budget
   is CPU time of the one training thread, so the recipes get equal compute even though they share the machine's
   two cores; each export (``models/encoder_hf``; DINO: the teacher's encoder) is loaded back with
   ``ctfm.checkpoint.load_encoder``;
3. every encoder (random floor and each recipe's export) is scored on
   (a) same-location crop retrieval on the held-out sample CT (``example_ct_dicom``, no run trained on it): 24 random
   crops, two strongly augmented views each (CT-FM's views: random resized crop, flip, histogram shift, blur);
   top-1 = how often view A of crop i has view B of crop i as its nearest neighbour (cosine) among the 24 B views;
   mean over 5 seeds (chance 1/24);
   (b) organ crops cut with the sample CTs' reference labels (``ctfm.retrieval.clustering.organ_crops``, the probe's
   organs) on the training CT and the held-out CT: linear-probe accuracy (multinomial logistic regression on
   standardised embeddings, trained on one scan's crops and tested on the other's, both ways, organs in both
   scans), and the retrieval probe's clustering scores (kNN accuracy leaving one scan out, NMI);
   (c) the triage bundle's few-shot table: ``python -m monai.bundle run`` of ctfm_triage's ``train.json`` +
   ``probe.json`` with ``--encoder_weights EXPORT`` on its demo head CTs (80 training, 40 test phantoms with
   synthetic bleeds; CT-FM's triage recipe, four HU windows stacked along S): few-shot AUROC (prototype
   classifier, 10 draws) and the linear probe's AUROC, mean over the findings; one embedding cache for all.
4. ``<out>.json`` and ``<out>.md`` are written at the end only (nothing is written when a step fails).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import machine_info, measure_peak  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "ctfm_pretrain" / "configs"
TRIAGE_CONFIGS = REPO / "bundles" / "ctfm_triage" / "configs"
#: name -> (config files of ctfm_pretrain, overrides beyond the shared ones)
RECIPES = {
    "simclr": (["train.json"], {}),
    "dino_mim": (["train.json", "train_dino.json"], {}),
    "dino_mim_k4096": (["train.json", "train_dino.json"], {"num_prototypes": 4096}),
}
LABELS = {"random": "random init (floor)", "simclr": "CT-FM SimCLR (train.json)",
          "dino_mim": "FM-CT DINO + MIM (train_dino.json, 65,536 prototypes)",
          "dino_mim_k4096": "FM-CT DINO + MIM, 4,096 prototypes"}
ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta", "colon", "vertebrae_T12", "autochthon_left",
          "autochthon_right", "iliopsoas_left", "gluteus_maximus_left", "urinary_bladder", "hip_left"]
SPACING = [3.0, 1.0, 1.0]  # train.json's
CROP = [16, 64, 64]  # train.json's crop, the DINO global crops' size after resizing
SHOTS = (1, 2, 4, 8)
#: The last config file of every run: stop at a CPU-time budget and record the training loop's CPU and wall seconds
#: (its ``imports`` join the recipes' own, which a later config file's list would otherwise replace: :func:`bench_config`).
BENCH_CONFIG = {
    "imports": ["$import json", "$import time", "$import ignite"],
    "budget_cpu_s": 60,
    "bench_timing": "$@bundle_root + '/bench_timing.json'",
    "run": [
        "$@train#trainer.add_event_handler(ignite.engine.Events.STARTED, lambda e: setattr(e.state, 'bench_t0', (time.process_time(), time.perf_counter())))",
        "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once=1), lambda e: setattr(e.state, 'bench_cpu_1', time.process_time()))",
        "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED, lambda e: e.terminate() if time.process_time() - e.state.bench_t0[0] > 1.2 * @budget_cpu_s else None)",
        "$@train#trainer.add_event_handler(ignite.engine.Events.COMPLETED, lambda e: open(@bench_timing, 'w').write(json.dumps({'steps': e.state.iteration, 'cpu_s': time.process_time() - e.state.bench_t0[0], 'cpu_s_after_first_step': time.process_time() - e.state.bench_cpu_1, 'wall_s': time.perf_counter() - e.state.bench_t0[1]})))",
        "$@train#trainer.run()",
    ],
}


def bench_config() -> dict:
    """:data:`BENCH_CONFIG` with the ``imports`` of every recipe's config files before its own."""
    imports = [i for configs, _ in RECIPES.values() for c in configs for i in json.loads((CONFIGS / c).read_text()).get("imports", [])]
    return {**BENCH_CONFIG, "imports": list(dict.fromkeys(imports + BENCH_CONFIG["imports"]))}


def run_recipes(names: list[str], work: Path, init: Path, bench_file: Path, steps: dict[str, int], budget_cpu_s: float,
                init_filters: int, suffix: str = "") -> dict[str, dict]:
    """``monai.bundle run`` of every recipe in ``names`` at once, one thread each; per recipe its command, the steps
    it reached, the training loop's CPU and wall seconds, the process's CPU seconds and its logged terms."""
    runs = {}
    try:
        _start(runs, names, work, init, bench_file, steps, budget_cpu_s, init_filters, suffix)
        return {name: _finish(name, *runs.pop(name)) for name in list(runs)}
    finally:  # a failed recipe: stop the others rather than leave them on the cores
        for cmd, root, log, proc in runs.values():
            proc.kill()
            proc.wait()
            log.close()


def _start(runs: dict, names: list[str], work: Path, init: Path, bench_file: Path, steps: dict[str, int], budget_cpu_s: float,
           init_filters: int, suffix: str) -> None:
    for name in names:
        configs, extra = RECIPES[name]
        root = work / f"{name}{suffix}"
        files = [str(CONFIGS / c) for c in configs] + [str(bench_file)]
        overrides = {"bundle_root": str(root), "init_filters": init_filters, "num_workers": 0, "load_pretrain": True,
                     "encoder_weights": str(init), "epoch_length": steps[name], "max_epochs": 1,
                     "warmup_iterations": max(steps[name] // 10, 1), "checkpoint_interval": steps[name], "budget_cpu_s": budget_cpu_s,
                     **extra}
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(files), *[f"--{k}={v}" for k, v in overrides.items()]]
        root.mkdir(parents=True)
        log = open(root / "run.log", "w")
        runs[name] = (cmd, root, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                                        env={**os.environ, "OMP_NUM_THREADS": "1"}))


def _finish(name: str, cmd: list[str], root: Path, log, proc: subprocess.Popen) -> dict:
    """Wait for one recipe's run; its measurements (see :func:`run_recipes`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"{name}: the bundle run failed (exit {proc.returncode}); see {root / 'run.log'}:\n"
                         f"{(root / 'run.log').read_text()[-3000:]}")
    timing = json.loads((root / "bench_timing.json").read_text())
    events = EventAccumulator(str(root / "runs"))
    events.Reload()
    terms = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return {
        "command": shlex.join(["python", *cmd[1:]]).replace(f"{REPO}/", ""),
        "steps": timing["steps"],
        "train_cpu_s": timing["cpu_s"],
        "train_wall_s": timing["wall_s"],
        "cpu_s_per_step": timing["cpu_s_after_first_step"] / max(timing["steps"] - 1, 1),  # the first step warms up
        "process_cpu_s": usage.ru_utime + usage.ru_stime,
        "first_loss": terms["train_loss"][0],
        "last_loss_mean10": float(np.mean(terms["train_loss"][-10:])),
        "last_terms_mean10": {k: float(np.mean(v[-10:])) for k, v in terms.items()},
    }


def triage_few_shot(name: str, weights: Path, work: Path, init_filters: int) -> dict:
    """The triage bundle's probe (train.json + probe.json) with ``weights`` as its pre-trained encoder: few-shot mean
    AUROC per shot count and the linear probe's mean AUROC (with its 95 % CI), over the findings."""
    root = work / f"triage_{name}"
    files = [str(TRIAGE_CONFIGS / "train.json"), str(TRIAGE_CONFIGS / "probe.json")]
    overrides = {"bundle_root": str(root), "encoder_weights": str(weights), "init_filters": init_filters, "num_workers": 0,
                 "embedding_dir": str(work / "triage_embeddings"), "shots": json.dumps(list(SHOTS)), "label_fractions": "[1.0]",
                 "n_bootstrap": 200, "device": "$torch.device('cpu')"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(files), *[f"--{k}={v}" for k, v in overrides.items()]]
    root.mkdir(parents=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    (root / "run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"triage probe of {name} failed (exit {proc.returncode}); see {root / 'run.log'}:\n{proc.stderr[-3000:]}")
    rows = [r for r in csv.DictReader(open(root / "eval" / "probe" / "few_shot.csv")) if r["encoder"] == "pretrained"]
    few = {n: float(np.mean([float(r["auroc_mean"]) for r in rows if int(r["shots"]) == n])) for n in SHOTS
           if any(int(r["shots"]) == n for r in rows)}
    probe = json.loads((root / "eval" / "probe" / "metrics.json").read_text())["encoders"]["pretrained"]["linear_probe"]["mean_auroc"]
    return {"command": shlex.join(["python", *cmd[1:]]).replace(f"{REPO}/", ""), "few_shot_auroc": few, "linear_probe_auroc": probe["value"],
            "linear_probe_auroc_ci": probe["ci"], "findings": len({r["finding"] for r in rows})}


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
    fmt = lambda v, f="{:.3f}": f.format(v) if v is not None else "-"  # noqa: E731
    shots = [str(n) for n in SHOTS]
    lines = [
        f"# CT-FM's recipe vs FM-CT's recipe on equal compute (CPU, width {result['init_filters']})",
        "",
        f"Run {result['date']} on {result['cpu']} ({result['cores']} cores; fp32 matmul peak {result['peak_gflops']:.0f} GFLOP/s on "
        f"one thread, measured in this run), torch {result['torch']}; every recipe got {result['budget_cpu_s']:.0f} CPU seconds of "
        "training on one thread, all recipes at once (the budget is CPU time, so sharing the two cores does not favour any); "
        f"load average {result['loadavg_start']} at start, {result['loadavg_end']} at the end.",
        "",
        "**How small this is:** pre-training on ONE abdomen/pelvis CT (the sample CT, 112 slices of 3 mm) for "
        f"{result['budget_cpu_s'] / 60:.0f} minutes of one CPU core per recipe, a CT-FM encoder of width "
        f"{result['init_filters']} ({result['parameters']:,} parameters); the first checks use 2 CTs, the triage checks "
        "synthetic bleeds in 120 head phantoms. These numbers say whether each recipe runs and moves the encoder away "
        "from its random init on this data; they say nothing about either recipe at scale (CT-FM: 148,000 CTs; FM-CT: "
        "361,663 head CTs; GPUs for days).",
        "",
        "| encoder | steps | CPU s (training) | crop retrieval top-1 (held-out CT, 24 crops; chance 0.042) | organ linear probe acc. "
        "| organ kNN acc. | organ NMI | triage few-shot mean AUROC, " + " / ".join(shots) + " shots | triage linear probe mean AUROC (95% CI) |",
        "|---|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for name, r in rows.items():
        t, tri = r.get("training") or {}, r["triage"]
        few = " / ".join(fmt(tri["few_shot_auroc"].get(n, tri["few_shot_auroc"].get(int(n)))) for n in shots)
        lo, hi = tri["linear_probe_auroc_ci"]
        lines.append(
            f"| {LABELS[name]} | {t.get('steps', 0)} | {fmt(t.get('train_cpu_s'), '{:.0f}')} | {r['retrieval_top1_mean']:.3f} "
            f"(min {min(r['retrieval_top1']):.3f}, max {max(r['retrieval_top1']):.3f}) | {r['organ_linear_probe_accuracy']:.3f} | "
            f"{r['organ_knn_accuracy']:.3f} | {r['organ_nmi']:.3f} | {few} | {tri['linear_probe_auroc']:.3f} ({lo:.3f}-{hi:.3f}) |"
        )
    dino = [n for n in RECIPES if n.startswith("dino")]
    lines += [
        "",
        "Training as measured: " + "; ".join(
            f"{LABELS[n]}: {rows[n]['training']['steps']} steps, {rows[n]['training']['train_cpu_s']:.0f} CPU s "
            f"({rows[n]['training']['cpu_s_per_step']:.2f} CPU s / step; {rows[n]['training']['train_wall_s']:.0f} s wall)" for n in RECIPES)
        + ". Steps are planned from a short calibration run of each recipe, also concurrent.",
        "",
        "DINO's collapse watches, mean of the last 10 steps (teacher entropy in nats, of log K at uniform; embedding std "
        "about 1/sqrt(E) when spread, 0 at collapse):",
        "",
        "| recipe | teacher entropy / log K | batch-mean entropy | embedding std | DINO loss | MIM loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n in dino:
        terms = rows[n]["training"]["last_terms_mean10"]
        k = RECIPES[n][1].get("num_prototypes", 65536)
        lines.append(f"| {LABELS[n]} | {terms['teacher_entropy']:.3f} / {np.log(k):.3f} | {terms['teacher_marginal_entropy']:.3f} | "
                     f"{terms['embedding_std']:.4f} | {terms['dino_loss']:.3f} | {terms['mim_loss']:.3f} |")
    lines += [
        "",
        f"Checks: organ crops: {result['organ_crops']} crops of {', '.join(map(str, CROP))} voxels ({result['organs']} organs, 6 per "
        "organ and scan, TotalSegmentator reference labels); linear probe trained on one scan's crops and tested on the "
        "other's, organs present in both. Retrieval: 5 seeds x 24 crops of the held-out CT, two CT-FM views each (the views "
        "SimCLR is trained to match, so this check favours it by construction). Triage: the ctfm_triage bundle's probe.json "
        "with the encoder as `--encoder_weights` (CT-FM's triage recipe: SPL, 5 x 2 x 2 mm, 48 x 128 x 128, four HU windows "
        f"stacked along S) on its demo set; few-shot: N positives + N negatives per finding, prototype classifier, 10 draws, "
        f"AUROC on the 40 test phantoms, mean over the {rows['random']['triage']['findings']} findings.",
        "",
        "Commands (the last config file is written by the benchmark, content in the .json):",
        "",
    ]
    for name in RECIPES:
        lines += [f"- {LABELS[name]}:", "", "  ```", f"  {rows[name]['training']['command']}", "  ```", ""]
    lines += ["- triage few-shot table, per encoder (here the random floor):", "", "  ```", f"  {rows['random']['triage']['command']}",
              "  ```", ""]
    lines += [f"Benchmark: `{result['benchmark_command']}` ({result['total_s']:.0f} s in all; scratch files under `{result['work']}`).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget_cpu_s", type=float, default=600.0, help="CPU seconds of training per recipe (default 600)")
    parser.add_argument("--init_filters", type=int, default=8)
    parser.add_argument("--calibration_steps", type=int, default=8)
    parser.add_argument("--work", default="/tmp/bench_recipes", help="scratch folder for the runs")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recipes_cpu"))
    args = parser.parse_args(argv)

    from ctfm.checkpoint import load_encoder, save_hf_folder
    from ctfm.files import atomic_path
    from ctfm.networks import CTFMEncoder
    from ctfm.retrieval.clustering import cluster_scores

    t0 = time.perf_counter()
    loadavg_start = os.getloadavg()
    torch.set_num_threads(1)  # the recipes' one thread each
    peak = measure_peak(torch.device("cpu"), threads=1)["fp32_gflops"]
    work = Path(args.work)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    torch.manual_seed(0)
    init_encoder = CTFMEncoder(init_filters=args.init_filters)
    init = save_hf_folder(init_encoder, work / "init" / "encoder_hf")
    bench_file = work / "bench.json"
    bench_file.write_text(json.dumps(bench_config(), indent=2))

    names = list(RECIPES)
    calibration = run_recipes(names, work, init, bench_file, {n: args.calibration_steps for n in names}, 10 * args.budget_cpu_s,
                              args.init_filters, suffix="_calibration")
    steps = {n: max(int(args.budget_cpu_s / calibration[n]["cpu_s_per_step"]), 2) for n in names}
    print("planned steps:", steps, flush=True)
    training = run_recipes(names, work, init, bench_file, steps, args.budget_cpu_s, args.init_filters)
    for n in names:
        training[n] |= {"planned_steps": steps[n], "calibration_cpu_s_per_step": calibration[n]["cpu_s_per_step"]}
        print(f"{n}: {training[n]['steps']} steps, {training[n]['train_cpu_s']:.0f} CPU s", flush=True)

    torch.set_num_threads(2)
    exports = {"random": init, **{n: work / n / "models" / "encoder_hf" for n in names}}
    views, crops, organs, scans = evaluation_data()
    results = {}
    for name, weights in exports.items():
        encoder = load_encoder(weights)[0]
        top1 = retrieval_top1(encoder, views)
        x = embed(encoder, crops)
        clusters = cluster_scores(x, organs, scans, seed=0)
        results[name] = {"training": training.get(name), "retrieval_top1": top1, "retrieval_top1_mean": float(np.mean(top1)),
                         "organ_linear_probe_accuracy": linear_probe(x, organs, scans), "organ_knn_accuracy": clusters["knn_accuracy"],
                         "organ_nmi": clusters["nmi"], "organ_silhouette": clusters["silhouette"],
                         "triage": triage_few_shot(name, weights, work, args.init_filters)}
        print(name, {k: v for k, v in results[name].items() if k != "training"}, flush=True)

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": machine_info()["cpu"],
        "cores": os.cpu_count(),
        "peak_gflops": peak,
        "torch": torch.__version__,
        "init_filters": args.init_filters,
        "parameters": sum(p.numel() for p in init_encoder.parameters()),
        "budget_cpu_s": args.budget_cpu_s,
        "loadavg_start": [round(v, 2) for v in loadavg_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "organ_crops": len(organs),
        "organs": len(set(organs)),
        "bench_config": bench_config(),
        "work": str(work),
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
