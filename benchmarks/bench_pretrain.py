"""Pre-training throughput on this machine: crops/s and the fraction of time the trainer waits for data.

    python benchmarks/bench_pretrain.py [--iterations 20] [--warmup 3] [--init_filters 8] [--out benchmarks/results]

Runs the ctfm_pretrain bundle's own train config (through ``monai.bundle.ConfigParser``, handlers for
checkpoints, export and TensorBoard removed) on the sample CT in three data set-ups, in one process, so
the rows compare like with like:

- baseline: no cache, loading in the training process (``cache_rate=0, num_workers=0``): every step reads,
  resamples and crops the CT before the network runs;
- cached: the deterministic preprocessing cached in memory (``cache_rate=1``), views made in-process;
- cached + workers: views made by ``--workers`` DataLoader workers while the network runs.

Timing uses ignite's ``GET_BATCH_STARTED/COMPLETED`` events (time waiting for the loader) and
``ITERATION_STARTED/COMPLETED`` (the step); the first ``--warmup`` iterations are dropped. One crop = two views
of ``crop_size`` voxels; crops/s counts crops, i.e. ``batch_size * num_crops`` per iteration.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from ctfm.files import atomic_path

CONFIG = Path(__file__).resolve().parents[1] / "bundles" / "ctfm_pretrain" / "configs" / "train.json"
KEPT_HANDLERS = ("LrScheduleHandler",)


def measure(overrides: dict, iterations: int, warmup: int) -> dict:
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.update(overrides | {"epoch_length": iterations + warmup, "max_epochs": 1})
    parser["train#handlers"] = [h for h in parser["train#handlers"] if h["_target_"] in KEPT_HANDLERS]
    parser["train#main_handlers"] = []
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    marks: dict[str, list[float]] = {"wait": [], "step": []}
    started: dict[str, float] = {}

    def mark(name: str, begin: bool):
        def handler(engine):
            if begin:
                started[name] = time.perf_counter()
            else:
                marks[name].append(time.perf_counter() - started[name])

        return handler

    trainer.add_event_handler(Events.GET_BATCH_STARTED, mark("wait", True))
    trainer.add_event_handler(Events.GET_BATCH_COMPLETED, mark("wait", False))
    trainer.add_event_handler(Events.ITERATION_STARTED, mark("step", True))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, mark("step", False))
    trainer.run()
    wait, step = sum(marks["wait"][-iterations:]), sum(marks["step"][-iterations:])  # warm-up dropped
    crops = iterations * parser["batch_size"] * parser["num_crops"]
    return {"iterations": iterations, "seconds": wait + step, "crops_per_s": crops / (wait + step), "data_wait_fraction": wait / (wait + step)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--init_filters", type=int, default=8)
    ap.add_argument("--crop_size", default="16,64,64")
    ap.add_argument("--num_crops", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    common = {
        "init_filters": args.init_filters,
        "crop_size": [int(s) for s in args.crop_size.split(",")],
        "num_crops": args.num_crops,
        "batch_size": 1,
        "bundle_root": "/tmp/ctfm_bench_pretrain",
    }
    setups = {
        "baseline: no cache, 0 workers": {"cache_rate": 0.0, "num_workers": 0},
        "cached, 0 workers": {"cache_rate": 1.0, "num_workers": 0},
        f"cached, {args.workers} workers": {"cache_rate": 1.0, "num_workers": args.workers},
    }
    rows = {name: measure(common | s, args.iterations, args.warmup) for name, s in setups.items()}
    base = rows["baseline: no cache, 0 workers"]["crops_per_s"]
    lines = [
        f"Pre-training throughput, width {args.init_filters}, {args.num_crops} crops x 2 views of {args.crop_size} voxels per scan, "
        f"batch 1, {args.iterations} iterations after {args.warmup} warm-up; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}",
        "",
        "| data set-up | crops/s | time waiting for data | speed-up vs baseline |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {r['crops_per_s']:.2f} | {100 * r['data_wait_fraction']:.1f}% | {r['crops_per_s'] / base:.2f}x |" for n, r in rows.items()]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "pretrain_cpu.md") as tmp:
        tmp.write_text(table + "\n")
    with atomic_path(args.out / "pretrain_cpu.json") as tmp:
        tmp.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
