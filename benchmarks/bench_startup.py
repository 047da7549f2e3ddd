"""Where the wall time of one ``monai.bundle run`` segmentation of the sample CT goes.

    python benchmarks/bench_startup.py [--repeats 3] [--threads 2]

Runs ``python -m monai.bundle run --config_file bundles/ctfm_segmentation/configs/inference.json --datalist
example_ct.nii.gz`` as a user types it (a fresh process each time, into a temporary output folder), with a small
``sitecustomize`` that times the parts of the run from inside: Python start-up, MONAI's imports and reading the
config up to its first ``imports`` line; building the network and loading its weights (with their sha256 check);
reading and checking the CT; preprocessing; the network's sliding window (the compute); mapping the labels back;
writing the outputs (NIfTI, PNG). The baseline, measured in the same run, is the compute itself: the table gives
each part's share of the wall time and its ratio to the compute. Also times ``python -c "import monai.bundle"``
alone. Writes ``results/startup_cpu.{md,json}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "bundles" / "ctfm_segmentation" / "configs" / "inference.json"
RESULTS = Path(__file__).parent / "results"

#: Installed as ``sitecustomize`` in the run's process: wraps the stages and prints their times as JSON at exit.
TIMERS = r'''
import atexit, json, os, sys, time
START = float(os.environ["CTFM_BENCH_T0"])
times = {"interpreter_and_imports_s": None}
spent = {}

def timed(owner, name, key):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - t
    setattr(owner, name, wrapper)

def install():
    import ctfm.ct_io, ctfm.transforms, ctfm.weights
    import ctfm.segmentation.inferer as inferer, ctfm.segmentation.outputs as outputs
    timed(ctfm.ct_io, "read_ct", "read_and_check_ct_s")
    timed(ctfm.transforms.CTFMPreprocessd, "__call__", "preprocess_s")
    timed(inferer.LabelMapSlidingWindowInferer, "__call__", "network_sliding_window_s")
    timed(outputs.LabelsToInputGridd, "__call__", "labels_to_input_grid_s")
    timed(outputs.WriteSegmentationd, "write", "write_outputs_s")
    timed(ctfm.weights, "load", "build_network_and_load_weights_s")

import builtins
_import = builtins.__import__
def hooked(name, *args, **kwargs):
    module = _import(name, *args, **kwargs)
    if name == "ctfm.bundle" and not getattr(hooked, "done", False):  # the config's first import line
        hooked.done = True
        times["interpreter_and_imports_s"] = time.time() - START
        install()
    return module
builtins.__import__ = hooked

@atexit.register
def report():
    times.update(spent)
    times["wall_s"] = time.time() - START
    print("CTFM_BENCH " + json.dumps(times), file=sys.stderr, flush=True)
'''


def run_once(threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(TIMERS)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": tmp, "CTFM_BENCH_T0": repr(time.time())}
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIG),
               "--datalist", "example_ct.nii.gz", "--output_dir", str(Path(tmp) / "out")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        line = next(line for line in proc.stderr.splitlines() if line.startswith("CTFM_BENCH "))
        return json.loads(line[len("CTFM_BENCH "):])


def import_only(threads: int) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-c", "import monai.bundle"], check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    runs = [run_once(args.threads) for _ in range(args.repeats)]
    imports = statistics.median(import_only(args.threads) for _ in range(args.repeats))
    keys = ["interpreter_and_imports_s", "build_network_and_load_weights_s", "read_and_check_ct_s", "preprocess_s",
            "network_sliding_window_s", "labels_to_input_grid_s", "write_outputs_s", "wall_s"]
    median = {k: statistics.median(r.get(k) or 0.0 for r in runs) for k in keys}
    accounted = sum(v for k, v in median.items() if k != "wall_s")
    median["other_s"] = median["wall_s"] - accounted
    compute = median["network_sliding_window_s"]
    lines = [
        f"One `monai.bundle run` of `ctfm_segmentation` inference on `example_ct.nii.gz` (shipped weights, outputs "
        f"NIfTI + PNG), median of {args.repeats} fresh processes; OMP_NUM_THREADS={args.threads}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores. `python -c \"import monai.bundle\"` "
        f"alone: {imports:.1f} s.",
        "",
        "| part | seconds | share of wall | vs network compute |",
        "|---|---:|---:|---:|",
    ]
    for k in [*keys[:-1], "other_s", "wall_s"]:
        lines.append(f"| {k[:-2].replace('_', ' ')} | {median[k]:.2f} | {100 * median[k] / median['wall_s']:.0f} % | "
                     f"{median[k] / compute:.2f}x |")
    lines.append("")
    lines.append("`read and check ct` counts both reads of the CT: the input, and the preview's read of it again (whose "
                 "header checks are not repeated: `ctfm.ct_io` remembers a file it checked while it is unchanged); "
                 "`other` is MONAI's config parsing, its handlers and process exit. `interpreter and imports` is "
                 "MONAI's own import (torch, ignite" + (", and mlflow, which MONAI's handlers import at start when it "
                 "is installed, as in the test environment" if importlib.util.find_spec("mlflow") else "") + ").")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup_cpu.md").write_text(text)
    (RESULTS / "startup_cpu.json").write_text(json.dumps({"runs": runs, "median": median, "import_monai_bundle_s": imports,
                                                          "threads": args.threads}, indent=2) + "\n")


if __name__ == "__main__":
    main()
