"""SIGKILL the tiny ctfm_pretrain bundle at random moments, resume each time, and check the end matches a straight run.

    python benchmarks/reliability_kill_loop.py --kills 3 --seed 0

Runs the bundle through ``python -m monai.bundle run`` with the tiny overrides of ``tests/test_pretrain_bundle.py``
(one CPU thread), once uninterrupted (its wall time ``T`` sets the kill window), then ``--kills`` times killed
with SIGKILL after a delay drawn (seeded) from ``[0.3 T, 0.8 T]``, each run resuming the previous, then once to
the end. Asserts: no temporary (``.*.tmp`` / ``.*.old``) is left in the checkpoint folder after the final start,
the final checkpoint is at iteration ``epoch_length * max_epochs``, and its network weights equal the straight
run's bit for bit (``max |dW|`` is printed). Prints one table row per run. Exit status 1 on a failed check.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from ctfm.engine import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "bundles" / "ctfm_pretrain" / "configs" / "train.json"
SMALL = {"init_filters": 4, "crop_size": "[16,32,32]", "num_crops": 4, "batch_size": 1, "num_workers": 0,
         "warmup_iterations": 0, "learning_rate": 0.001}
ENV_EXTRA = {"OMP_NUM_THREADS": "1"}


def command(root: Path, epoch_length: int, max_epochs: int, interval: int) -> list[str]:
    overrides = {**SMALL, "epoch_length": epoch_length, "max_epochs": max_epochs, "checkpoint_interval": interval,
                 "bundle_root": str(root)}
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(TRAIN), *[f"--{k}={v}" for k, v in overrides.items()]]


def iteration_of(path: Path | None) -> int | None:
    return None if path is None else int(path.stem.split("=")[1])


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epoch-length", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    env = {**os.environ, **ENV_EXTRA}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ctfm_kill_loop."))
    straight_root, killed_root = work / "straight", work / "killed"
    rng = random.Random(args.seed)
    total = args.epoch_length * args.max_epochs
    rows = []

    t0 = time.time()
    subprocess.run(command(straight_root, args.epoch_length, args.max_epochs, args.interval), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    straight_s = time.time() - t0
    straight = torch.load(latest_checkpoint(straight_root / "models" / "checkpoints"), weights_only=True)
    rows.append(("straight", f"{straight_s:.1f}", "-", iteration_of(latest_checkpoint(straight_root / "models" / "checkpoints")), "-"))

    ckpts = killed_root / "models" / "checkpoints"
    for k in range(args.kills):
        delay = rng.uniform(0.3 * straight_s, 0.8 * straight_s)  # the first ~10 s are imports
        before = iteration_of(latest_checkpoint(ckpts)) if ckpts.is_dir() else None
        proc = subprocess.Popen(command(killed_root, args.epoch_length, args.max_epochs, args.interval), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
            outcome = "finished"
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            outcome = "SIGKILL"
        after = iteration_of(latest_checkpoint(ckpts)) if ckpts.is_dir() else None
        rows.append((f"kill {k + 1}", f"{delay:.1f}", before, after, f"{outcome}; left {len(temporaries(ckpts))} temporaries"))

    t0 = time.time()
    final = subprocess.run(command(killed_root, args.epoch_length, args.max_epochs, args.interval), env=env,
                           capture_output=True, text=True, check=False)
    before = rows[-1][3]
    rows.append(("final", f"{time.time() - t0:.1f}", before, iteration_of(latest_checkpoint(ckpts)), f"exit {final.returncode}"))

    print(f"{'run':<10} {'wall/delay s':>12} {'ckpt before':>12} {'ckpt after':>11}  note")
    for name, secs, b, a, note in rows:
        print(f"{name:<10} {secs:>12} {b!s:>12} {a!s:>11}  {note}")

    failures = []
    if final.returncode != 0:
        failures.append(f"final run failed: {final.stderr[-2000:]}")
    left = temporaries(ckpts)
    if left:
        failures.append(f"temporaries left after the final start: {left}")
    last = latest_checkpoint(ckpts)
    if iteration_of(last) != total:
        failures.append(f"final checkpoint {last} is not at iteration {total}")
    else:
        resumed = torch.load(last, weights_only=True)
        diff = max((resumed["network"][k].float() - v.float()).abs().max().item() for k, v in straight["network"].items())
        same = all(torch.equal(resumed["network"][k], v) for k, v in straight["network"].items())
        print(f"final weights vs straight run: max |dW| = {diff:.3g} ({'bit-identical' if same else 'DIFFERENT'})")
        if not same:
            failures.append("final weights differ from the straight run's")
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    print(f"work folder: {work}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
