"""Running a bundle as a user does, in a subprocess, for the second tier of tests (``test_*_bundle.py``)."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["ENV", "bundle_runner", "error_line", "kill_at_first_checkpoint"]

#: One thread per process: on a shared 2-core machine more threads oversubscribe and run several times slower, and
#: one-thread runs are bit-for-bit repeatable (seed 0 in the configs) whatever the machine's cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def bundle_runner(configs_dir: Path) -> Callable[..., subprocess.CompletedProcess]:
    """``run_bundle(configs, check=True, runner=(python,), cwd=None, **overrides)``: ``python -m monai.bundle run``
    of ``configs`` (file names in ``configs_dir``, merged in order) with ``--id=value`` overrides; with ``check``
    the run must succeed."""

    def run_bundle(configs, check=True, runner=(sys.executable,), cwd=None, **overrides) -> subprocess.CompletedProcess:
        paths = [str(configs_dir / c) for c in configs]
        config_file = paths[0] if len(paths) == 1 else json.dumps(paths)
        cmd = [*runner, "-m", "monai.bundle", "run", "--config_file", config_file, *[f"--{k}={v}" for k, v in overrides.items()]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV, cwd=cwd)
        if check:
            assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    return run_bundle


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error: ...`` line of a failed run (exit code 1, no traceback)."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    return lines[0]


def kill_at_first_checkpoint(process: subprocess.Popen, checkpoints: Path, timeout_s: float = 300, poll_s: float = 0.05) -> Path | None:
    """SIGKILL ``process`` as soon as a checkpoint appears in ``checkpoints`` (or after ``timeout_s``, or when it
    has ended); returns the latest checkpoint then (None if there was none)."""
    from ctfm.engine import latest_checkpoint

    deadline = time.time() + timeout_s
    while time.time() < deadline and latest_checkpoint(checkpoints) is None and process.poll() is None:
        time.sleep(poll_s)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return latest_checkpoint(checkpoints)
