"""FM-CT's recipe in the ctfm_pretrain bundle end to end: ``train.json`` + ``train_dino.json`` (CNN encoder, under
torchrun with 2 CPU processes) and + ``train_dino_vit.json`` (ViT backbone, killed with SIGKILL and resumed), on
the sample CT at tiny sizes."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bundle_runs import ENV, bundle_runner, kill_at_first_checkpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ctfm.checkpoint import load_encoder
from ctfm.engine import checkpoints, latest_checkpoint
from ctfm.networks import CTFMEncoder, CTFMViT

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "ctfm_pretrain" / "configs"
DINO = ["train.json", "train_dino.json"]
VIT = [*DINO, "train_dino_vit.json"]
#: Tiny sizes on the sample CT at its own 3 mm (no resampling cost); a step takes a fraction of a second.
SMALL = {
    "spacing": "[3,3,3]",
    "num_workers": 0,
    "warmup_iterations": 0,
    "learning_rate": 0.001,
    "num_prototypes": 64,
    "head_hidden_features": 32,
    "crop_size": "[20,40,40]",
    "global_size": "[16,32,32]",
    "local_crop_size": "[16,16,16]",
    "mask_probability": 1.0,
}
TINY_VIT = {"local_size": "[8,16,16]", "vit_patch_size": "[8,8,8]", "vit_hidden_size": 48, "vit_mlp_dim": 64, "vit_num_layers": 2,
            "vit_num_heads": 2, "num_local_crops": 4}
TERMS = ("train_loss", "dino_loss", "mim_loss", "teacher_entropy", "embedding_std", "momentum", "teacher_temperature", "grad_norm",
         "weight_decay", "learning_rate")
run_bundle = bundle_runner(CONFIGS)


def scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(root / "runs"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def command(root: Path, configs: list[str], **overrides) -> list[str]:
    files = json.dumps([str(CONFIGS / c) for c in configs])
    args = {**SMALL, **overrides, "bundle_root": str(root)}
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, *[f"--{k}={v}" for k, v in args.items()]]


def test_cnn_encoder_under_torchrun_logs_terms_and_exports_the_teacher(tmp_path):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533")
    run_bundle([*DINO, "multi_gpu_train.json"], runner=torchrun, **SMALL, init_filters=4, epoch_length=3, max_epochs=1,
               checkpoint_interval=3, bundle_root=tmp_path)
    logged = scalars(tmp_path)
    for tag in TERMS:
        assert [s for s, _ in logged[tag]] == [1, 2, 3] and all(math.isfinite(v) for _, v in logged[tag]), tag
    assert logged["mim_loss"][0][1] > 0  # masks on every global crop: the patch term is there
    checkpoint = torch.load(latest_checkpoint(tmp_path / "models" / "checkpoints"), weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 3 and {"network", "loss", "optimizer", "lr_scheduler", "rng"} <= set(checkpoint)
    assert "center" in checkpoint["loss"] and bool(checkpoint["loss"]["center"].abs().sum() > 0)
    encoder, report = load_encoder(tmp_path / "models" / "encoder_hf")
    assert isinstance(encoder, CTFMEncoder) and encoder.init_filters == 4 and not report.missing
    network, key = checkpoint["network"], "conv_init.weight"
    assert torch.equal(encoder.state_dict()[key], network[f"teacher.backbone.{key}"])  # DINO exports the teacher
    assert not torch.equal(network[f"student.backbone.{key}"], network[f"teacher.backbone.{key}"])
    plain, _ = load_encoder(tmp_path / "models" / "model.pt")
    x = torch.rand(1, 1, 16, 32, 32)
    assert torch.equal(plain.eval().embed(x), encoder.eval().embed(x))


def test_vit_killed_mid_run_resumes_to_the_same_step_teacher_and_centre(tmp_path):
    settings = {**TINY_VIT, "epoch_length": 4, "max_epochs": 3, "checkpoint_interval": 4}
    straight_root, killed_root = tmp_path / "uninterrupted", tmp_path / "killed"
    straight = subprocess.Popen(command(straight_root, VIT, **settings), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    killed = subprocess.Popen(command(killed_root, VIT, **settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    ckpts = killed_root / "models" / "checkpoints"
    first = kill_at_first_checkpoint(killed, ckpts, poll_s=0.02)
    assert first is not None and first.name != "checkpoint_iteration=12.pt", "the run ended before it could be killed"
    assert not (killed_root / "models" / "encoder_hf").exists()
    # no half-written checkpoint is visible: every one loads (the kill may land after a checkpoint's rename and before
    # its empty temporary folder is removed; the resumed run removes a dead writer's temporaries)
    assert all(torch.load(p, weights_only=True)["trainer"]["iteration"] for p in checkpoints(ckpts))
    proc = run_bundle(VIT, **SMALL, **settings, bundle_root=killed_root)
    assert "resumed from" in proc.stdout + proc.stderr
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # no temporary survives the resumed run
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-3000:]
    resumed = torch.load(latest_checkpoint(ckpts), weights_only=True)
    uninterrupted = torch.load(latest_checkpoint(straight_root / "models" / "checkpoints"), weights_only=True)
    assert resumed["trainer"]["iteration"] == uninterrupted["trainer"]["iteration"] == 12
    # one thread per process: the resumed run ends with the uninterrupted run's student, teacher and centres exactly
    assert any(k.startswith("teacher.") for k in resumed["network"])
    assert all(torch.equal(resumed["network"][k], v) for k, v in uninterrupted["network"].items())
    assert all(torch.equal(resumed["loss"][k], v) for k, v in uninterrupted["loss"].items())
    vit, report = load_encoder(killed_root / "models" / "encoder_hf")
    assert isinstance(vit, CTFMViT) and vit.hidden_size == 48 and not report.missing and not report.unexpected
    key = "patch_embedding.position_embeddings"
    assert torch.equal(vit.state_dict()[key], resumed["network"][f"teacher.backbone.{key}"])
    logged = scalars(killed_root)  # the resumed run logs every step after its checkpoint (the killed one may not have flushed)
    after = int(first.name.split("=")[1].split(".")[0])
    assert set(range(after + 1, 13)) <= {s for s, _ in logged["dino_loss"]} and all(math.isfinite(v) for _, v in logged["dino_loss"])
