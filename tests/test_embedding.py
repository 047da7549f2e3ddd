"""Whole-CT embeddings: the pooled output of every runtime, and the ctfm_pretrain inference config end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import BEST_CPU_PROVIDER
from ctfm.checkpoint import save_state_dict
from ctfm.embedding import PatchEmbeddingInferer, pooled, sliding_patch_embeddings
from ctfm.networks.encoder import CTFMEncoder

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "ctfm_pretrain" / "configs"
INFERENCE = CONFIGS / "inference.json"


def test_pooled_accepts_feature_maps_and_embeddings(small_encoder, ct_batch):
    maps = small_encoder(ct_batch)
    torch.testing.assert_close(pooled(maps), small_encoder.embed(ct_batch))
    torch.testing.assert_close(pooled(small_encoder.embed(ct_batch)), small_encoder.embed(ct_batch))


def test_inferer_returns_patch_embeddings_with_their_positions(small_encoder):
    volume = torch.rand(1, 1, 20, 40, 36)
    pred = PatchEmbeddingInferer(patch_size=(16, 32, 32), batch_size=2)(volume, small_encoder)
    expected, starts = sliding_patch_embeddings(small_encoder.embed, volume[0], patch_size=(16, 32, 32))
    torch.testing.assert_close(pred.as_tensor(), expected)
    assert torch.equal(pred.meta["patch_starts"], starts) and pred.meta["patch_size"].tolist() == [16, 32, 32]


@pytest.mark.slow
def test_bundle_inference_writes_embeddings_and_map(tmp_path, small_encoder):
    save_state_dict(small_encoder, tmp_path / "encoder.pt")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(INFERENCE), "--bundle_root", str(tmp_path),
           "--ckpt_path", str(tmp_path / "encoder.pt"), "--init_filters", "4", "--roi_size", "[32,64,64]",
           "--datalist", "example_ct.nii.gz"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = load_file(str(tmp_path / "eval" / "example_ct_embedding.safetensors"))
    assert out["patch_embeddings"].shape[1] == small_encoder.embedding_dim == out["embedding"].shape[0]
    assert out["patch_starts"].shape == (out["patch_embeddings"].shape[0], 3) and len(out["patch_starts"]) > 1
    torch.testing.assert_close(out["embedding"], out["patch_embeddings"].mean(0))
    assert (tmp_path / "eval" / "example_ct_embedding.png").stat().st_size > 10_000


@pytest.mark.slow
def test_bundle_inference_with_the_wrong_width_fails_in_one_line(tmp_path):
    save_state_dict(CTFMEncoder(init_filters=4), tmp_path / "encoder.pt")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(INFERENCE), "--bundle_root", str(tmp_path),
           "--ckpt_path", str(tmp_path / "encoder.pt"), "--init_filters", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'encoder.pt'}: ")
    assert "differ in shape" in proc.stderr and not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_onnx_runtime_and_tensorrt_overrides_match_torch(tmp_path, small_encoder):
    """inference_onnx.json runs ONNX Runtime; inference_trt.json falls back to PyTorch and says so."""
    save_state_dict(small_encoder, tmp_path / "encoder.pt")
    outputs = {}
    for name in ("", "_onnx", "_trt"):
        configs = [str(INFERENCE)] + ([str(CONFIGS / f"inference{name}.json")] if name else [])
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(configs), "--bundle_root", str(tmp_path),
               "--ckpt_path", str(tmp_path / "encoder.pt"), "--init_filters", "4", "--output_dir", str(tmp_path / f"out{name}"),
               "--datalist", "example_ct_sm.nii.gz"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs[name] = load_file(str(tmp_path / f"out{name}" / "example_ct_sm_embedding.safetensors"))["patch_embeddings"]
        if name == "_onnx":
            assert f"ONNX Runtime on {BEST_CPU_PROVIDER}" in proc.stderr + proc.stdout
            assert (tmp_path / "models" / "model_embedding.onnx").is_file()
        if name == "_trt":
            assert "runs as PyTorch" in proc.stderr + proc.stdout
    scale = outputs[""].abs().max()
    assert (outputs["_onnx"] - outputs[""]).abs().max() <= 1e-5 * scale  # fp32 in both: rounding only
    assert torch.equal(outputs["_trt"], outputs[""])
