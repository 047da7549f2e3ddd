"""Inference time and peak host memory of the ctfm_segmentation bundle, measured with GNU ``time -v``.

    python benchmarks/bench_segmentation_memory.py [--quick] [--out benchmarks/results]

Each case is one ``python -m monai.bundle run`` of ``configs/inference.json`` (the whole process: reading,
preprocessing, sliding window, inversion, NIfTI and PNG writing) under ``/usr/bin/time -v``; the peak RSS is
its "Maximum resident set size". Cases (118 output classes everywhere):

- the shipped sample CT ``example_ct.nii.gz`` (122x101x112 at 3 mm) with the shipped weights;
- a synthetic 512x512x400 CT at 1.5 mm (a seeded body phantom from ``ctfm.phantom``, int16 HU NIfTI) with the
  shipped weights and config (resampled to the network's 3 mm first), once as shipped and once without the
  foreground crop (the buffer then spans the whole 768 mm field of view: a worst case);
- the same CT at the CT-FM recipe's 1.5 mm geometry without resampling (``init_filters`` 8 random weights,
  ``roi_size`` 32x160x160 and float16 buffer as ``inference_ctfm_whole_body.json``, no crop, overlap 0.25 to keep the run short);
- MONAI's ``SlidingWindowInferer`` (a full ``(118, S, P, L)`` float32 score volume, then argmax) on the cases
  where that volume fits: the comparison the label-map inferer is measured against.

Writes ``<out>/segmentation_cpu.md`` and ``<out>/segmentation_cpu.json``. Needs GNU time (``apt-get install
time``). ``--quick`` runs only the sample CT cases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "ctfm_segmentation"
INFERENCE = BUNDLE / "configs" / "inference.json"
NAIVE = ROOT / "benchmarks" / "bench_segmentation_naive_inferer.json"
GNU_TIME = "/usr/bin/time"
NUM_CLASSES = 118
LIMIT_GIB = 6.0


def synthetic_ct(path: Path) -> Path:
    """A 512x512x400 body phantom at 1.5 mm, int16 HU, written once."""
    if path.is_file():
        return path
    import nibabel as nib

    from ctfm.phantom import body_phantom

    phantom = body_phantom(shape=(512, 512, 400), spacing=(1.5, 1.5, 1.5), seed=0)
    image = nib.Nifti1Image(np.clip(phantom.image, -1024, 3071).astype(np.int16), phantom.affine)
    image.set_qform(phantom.affine, code=1)
    image.set_sform(phantom.affine, code=1)
    nib.save(image, path)
    return path


def random_weights(path: Path, init_filters: int) -> Path:
    import torch

    from ctfm.checkpoint import save_state_dict
    from ctfm.networks import CTFMSegResNetDS

    torch.manual_seed(0)
    return save_state_dict(CTFMSegResNetDS(init_filters=init_filters, out_channels=NUM_CLASSES), path)


def measure(name: str, configs: list[Path], overrides: dict, note: str) -> dict:
    """Run one bundle inference under GNU time; returns wall time, peak RSS and the command."""
    config_file = str(configs[0]) if len(configs) == 1 else json.dumps([str(c) for c in configs])
    args = [f"--{k}={v}" for k, v in overrides.items()]
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file, *args]
    print(f"[{name}] {' '.join(command)}", flush=True)
    proc = subprocess.run([GNU_TIME, "-v", *command], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = _seconds(re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1))
    buffer = re.search(r"score buffer (\d+) x \(([\d, ]+)\) (\w+)", proc.stderr + proc.stdout)
    result = {
        "case": name,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(rss_kib / 2**20, 2),
        "score_buffer": f"{buffer.group(1)} x ({buffer.group(2)}) {buffer.group(3)}" if buffer else "full volume (MONAI)",
        "note": note,
        "command": "/usr/bin/time -v python -m monai.bundle run --config_file "
        + (config_file if len(configs) == 1 else f"'{config_file}'").replace(str(ROOT) + "/", "")
        + " " + " ".join(shlex.quote(a.replace(str(ROOT) + "/", "")) for a in args),
    }
    print(f"[{name}] {result['wall_s']} s, peak RSS {result['peak_rss_gib']} GiB", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the sample CT cases")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ctfm_bench_segmentation")
    args = parser.parse_args(argv)
    if not Path(GNU_TIME).is_file():
        raise SystemExit(f"{GNU_TIME} not found: apt-get install time")
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / "out"
    sample = ROOT / "shared" / "ctfm" / "sample_data" / "example_ct.nii.gz"
    shipped = {"bundle_root": BUNDLE, "output_dir": out}
    results = [
        measure("example_ct.nii.gz, label-map inferer (shipped config)", [INFERENCE], {**shipped, "datalist": sample},
                "122x101x112 at 3 mm"),
        measure("example_ct.nii.gz, MONAI SlidingWindowInferer", [INFERENCE, NAIVE], {**shipped, "datalist": sample},
                "same windows, full score volume then argmax"),
    ]
    if not args.quick:
        big = synthetic_ct(args.work / "synthetic_512x512x400_1.5mm.nii.gz")
        results += [
            measure("synthetic 512x512x400 @ 1.5 mm, label-map inferer (shipped config)", [INFERENCE],
                    {**shipped, "datalist": big}, "resampled to 3 mm, cropped to the body"),
            measure("synthetic 512x512x400 @ 1.5 mm, label-map inferer, no crop", [INFERENCE],
                    {**shipped, "datalist": big, "crop_foreground": False}, "resampled to 3 mm, whole 768 mm field of view"),
            measure("synthetic 512x512x400 @ 1.5 mm, MONAI SlidingWindowInferer", [INFERENCE, NAIVE],
                    {**shipped, "datalist": big}, "resampled to 3 mm, cropped to the body"),
        ]
        results.append({
            "case": "synthetic 512x512x400 @ 1.5 mm, MONAI SlidingWindowInferer, no crop",
            "wall_s": None, "peak_rss_gib": None, "score_buffer": "full volume (MONAI)",
            "note": f"not run: its float32 score volume alone is {NUM_CLASSES * 200 * 256 * 256 * 4 / 2**30:.1f} GiB at 3 mm",
            "command": "",
        })
        wide = random_weights(args.work / "random_init8.pt", 8)
        full_res = {"bundle_root": BUNDLE, "output_dir": out, "datalist": big, "ckpt_path": wide, "spacing": "[1.5,1.5,1.5]",
                    "roi_size": "[32,160,160]", "buffer_dtype": "float16", "overlap": 0.25, "crop_foreground": False,
                    "write_preview": False}
        results.append(
            measure("synthetic 512x512x400 @ 1.5 mm, CT-FM geometry, label-map inferer", [INFERENCE], full_res,
                    "no resampling, whole field of view, random init-8 weights (width 32 adds ~0.1 GiB per window)")
        )
        results.append({
            "case": "synthetic 512x512x400 @ 1.5 mm, CT-FM geometry, MONAI SlidingWindowInferer",
            "wall_s": None, "peak_rss_gib": None, "score_buffer": "full volume (MONAI)",
            "note": f"not run: its float32 score volume alone is {NUM_CLASSES * 512 * 512 * 400 * 4 / 2**30:.1f} GiB",
            "command": "",
        })
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "limit_gib": LIMIT_GIB,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "segmentation_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "segmentation_cpu.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [
        "# ctfm_segmentation inference on CPU: time and peak host memory",
        "",
        f"Measured {report['date']} on {report['machine']} (shared with other jobs, so times are upper bounds) by",
        "`python benchmarks/bench_segmentation_memory.py`: each row is one `python -m monai.bundle run` of",
        "`configs/inference.json` under GNU `time -v` (whole process: read, preprocess, sliding window, invert, write",
        f"NIfTI and PNG). 118 output classes everywhere. Target: peak RSS under {report['limit_gib']:.0f} GB.",
        "",
        "| case | wall s | peak RSS GiB | score buffer | note |",
        "|---|---:|---:|---|---|",
    ]
    for r in report["results"]:
        wall = "" if r["wall_s"] is None else f"{r['wall_s']:.1f}"
        rss = "" if r["peak_rss_gib"] is None else f"{r['peak_rss_gib']:.2f}"
        lines.append(f"| {r['case']} | {wall} | {rss} | {r['score_buffer']} | {r['note']} |")
    lines += ["", "Commands (from the repository root):", ""]
    lines += [f"    {r['command']}" for r in report["results"] if r["command"]]
    return "\n".join(lines) + "\n"


def _seconds(clock: str) -> float:
    parts = [float(p) for p in clock.split(":")]
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


if __name__ == "__main__":
    sys.exit(main())
