"""The ctfm_pretrain bundle end to end through ``python -m monai.bundle run`` and ``torchrun``, on the sample CT."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bundle_runs import ENV, kill_at_first_checkpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ctfm.checkpoint import load_encoder
from ctfm.engine import checkpoints, latest_checkpoint

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "ctfm_pretrain"
TRAIN = str(BUNDLE / "configs" / "train.json")
MULTI = str(BUNDLE / "configs" / "multi_gpu_train.json")
SMALL = {
    "init_filters": 4,
    "crop_size": "[16,64,64]",
    "num_crops": 4,
    "batch_size": 1,
    "num_workers": 0,
    "warmup_iterations": 0,
    "learning_rate": 0.001,
}


#: The second tier: bundles run in subprocesses (and under torchrun).
pytestmark = pytest.mark.slow


def bundle_command(root: Path, configs: list[str], **overrides) -> list[str]:
    config_file = configs[0] if len(configs) == 1 else json.dumps(configs)
    args = [f"--{k}={v}" for k, v in {**SMALL, **overrides, "bundle_root": str(root)}.items()]
    return ["-m", "monai.bundle", "run", "--config_file", config_file, *args]


def run_bundle(root: Path, **overrides) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *bundle_command(root, [TRAIN], **overrides)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(root: Path) -> list[float]:
    events = EventAccumulator(str(root / "runs"))
    events.Reload()
    return [e.value for e in events.Scalars("train_loss")]


def test_train_logs_every_step_and_export_loads_back(tmp_path):
    """That the loss can fall is test_pretrain.py's fixed-batch test; a short run's loss curve depends on the CPU's
    arithmetic (a run on one machine is bit-repeatable, across machines it is not), so here only what cannot
    depend on it is checked: every step logged and finite, weights moved between checkpoints, the export."""
    run_bundle(tmp_path, epoch_length=20, max_epochs=2, checkpoint_interval=20)
    history = losses(tmp_path)
    assert len(history) == 40 and all(math.isfinite(v) and v > 0 for v in history)
    models = tmp_path / "models"
    assert latest_checkpoint(models / "checkpoints").name == "checkpoint_iteration=40.pt"
    first = torch.load(models / "checkpoints" / "checkpoint_iteration=20.pt", weights_only=True)["network"]
    last = torch.load(models / "checkpoints" / "checkpoint_iteration=40.pt", weights_only=True)["network"]
    assert not torch.equal(first["backbone.conv_init.weight"], last["backbone.conv_init.weight"])
    hf, hf_report = load_encoder(models / "encoder_hf")
    plain, _ = load_encoder(models / "model.pt")
    assert len(hf_report.matched) == len(hf.state_dict()) and hf.init_filters == 4
    x = torch.rand(1, 1, 16, 64, 64)
    assert torch.equal(hf.eval().embed(x), plain.eval().embed(x))
    trained = torch.load(latest_checkpoint(models / "checkpoints"), weights_only=True)["network"]
    assert torch.equal(trained["backbone.conv_init.weight"], hf.conv_init.weight)


def test_sigkill_after_checkpoint_resumes_to_the_same_step_and_weights(tmp_path):
    settings = {"epoch_length": 6, "max_epochs": 2, "checkpoint_interval": 3, "crop_size": "[16,32,32]"}
    cmd = [sys.executable, *bundle_command(tmp_path, [TRAIN], **settings)]
    killed = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    ckpts = tmp_path / "models" / "checkpoints"
    first = kill_at_first_checkpoint(killed, ckpts, poll_s=0.2)
    assert first is not None and first.name != "checkpoint_iteration=12.pt"
    # no half-written checkpoint is visible: every one loads (the kill may land after a checkpoint's rename and before
    # its empty temporary folder is removed; the resumed run removes a dead writer's temporaries)
    assert all(torch.load(p, weights_only=True)["trainer"]["iteration"] for p in checkpoints(ckpts))
    proc = run_bundle(tmp_path, **settings)
    assert "resumed from" in proc.stdout + proc.stderr
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # no temporary survives the resumed run
    assert latest_checkpoint(ckpts).name == "checkpoint_iteration=12.pt"
    resumed = torch.load(latest_checkpoint(ckpts), weights_only=True)
    run_bundle(tmp_path / "uninterrupted", **settings)
    straight = torch.load(latest_checkpoint(tmp_path / "uninterrupted" / "models" / "checkpoints"), weights_only=True)
    assert resumed["trainer"]["iteration"] == straight["trainer"]["iteration"] == 12
    assert resumed["trainer"]["max_epochs"] == straight["trainer"]["max_epochs"] == 2
    # the checkpoints carry every random state (torch, numpy, Python, the transforms' own): with one thread the
    # resumed run ends with the uninterrupted run's weights exactly (tolerance 0)
    assert all(torch.equal(resumed["network"][k], v) for k, v in straight["network"].items())
    assert (tmp_path / "models" / "encoder_hf" / "model.safetensors").is_file()


def test_torchrun_two_processes_on_cpu(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    cmd += bundle_command(tmp_path, [TRAIN, MULTI], epoch_length=2, max_epochs=1, checkpoint_interval=2, crop_size="[16,32,32]")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "models" / "checkpoints").name == "checkpoint_iteration=2.pt"
    encoder, _ = load_encoder(tmp_path / "models" / "encoder_hf")
    assert encoder.init_filters == 4


def test_shipped_weights_load_in_both_layouts():
    hf, report = load_encoder(BUNDLE / "models" / "encoder_hf")
    plain, _ = load_encoder(BUNDLE / "models" / "model.pt")
    assert not report.missing and not report.unexpected and hf.init_filters == 8
    x = torch.rand(2, 1, 16, 64, 64)
    assert torch.equal(hf.eval().embed(x), plain.eval().embed(x))


def test_mlflow_tracking_writes_under_the_output_folder(tmp_path):
    """`--tracking mlflow` (MONAI's own settings) on the trainer's decollated output; nothing lands in models/."""
    cmd = [sys.executable, *bundle_command(tmp_path, [TRAIN], epoch_length=2, max_epochs=1, checkpoint_interval=2,
                                           crop_size="[16,32,32]"), "--tracking", "mlflow"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "eval" / "mlruns.db").is_file() and any((tmp_path / "eval" / "mlruns").iterdir())
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["checkpoints", "encoder_hf", "model.pt"]
