"""ONNX export, ONNX Runtime parity and providers, int8, and the TensorRT fall-back, on CPU with small models.

Tolerance: ONNX Runtime and PyTorch compute the same fp32 convolutions with different summation orders and
ONNX Runtime folds BatchNorm into the preceding convolution, so outputs differ by float32 rounding only, about
1e-7 relative (measured: ~1e-8 absolute on the embedding). ``ATOL = 1e-4`` is far above that and far below any
real mistake (BatchNorm in training mode, a wrong weight, a baked-in batch size), which moves these outputs by
1e-2 or more.
"""

import hashlib
import importlib.util
import logging
import os

import numpy as np
import onnx
import pytest
import torch
from monai.networks.nets import SegResNetDS

from conftest import BEST_CPU_PROVIDER, randomise, tiny_vit_config
from ctfm.checkpoint import save_state_dict
from ctfm.networks import CTFMEncoder
from ctfm.errors import CTFMError
from ctfm.export import (
    INPUT_NAME,
    OnnxRuntimeModule,
    _nvidia_driver_present,
    check_onnx,
    export_onnx,
    onnx_runtime_network,
    quantize_onnx,
    smooth_random_patches,
    trt_compile_encoder,
)

PATCH = (16, 32, 32)
ATOL = 1e-4


def _input_dims(path):
    (graph_input,) = onnx.load(str(path)).graph.input
    assert graph_input.name == INPUT_NAME
    return [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]


@pytest.fixture
def embedding_onnx(small_encoder, tmp_path):
    return export_onnx(small_encoder, tmp_path / "encoder.onnx", PATCH, output="embedding")


@pytest.mark.skipif(
    BEST_CPU_PROVIDER != "OpenVINOExecutionProvider",
    reason="OpenVINO's execution provider is in the onnxruntime-openvino build only",
)
def test_openvino_provider_matches_torch_in_fp32(small_encoder, embedding_onnx):
    runtime = OnnxRuntimeModule(embedding_onnx, threads=1)  # the default order: OpenVINO before the CPU provider
    assert runtime.providers[0] == "OpenVINOExecutionProvider"
    for batch_size in (1, 2):
        x = smooth_random_patches(batch_size, 1, PATCH, seed=batch_size)
        with torch.no_grad():
            torch.testing.assert_close(runtime(x), small_encoder.embed(x), atol=ATOL, rtol=0)


def test_embedding_export_has_dynamic_batch_and_matches_torch(small_encoder, embedding_onnx):
    assert _input_dims(embedding_onnx) == ["batch", 1, *PATCH]
    runtime = OnnxRuntimeModule(embedding_onnx, providers=["CPUExecutionProvider"])
    for batch_size in (1, 3):
        x = smooth_random_patches(batch_size, 1, PATCH, seed=batch_size)
        got = runtime(x)
        assert got.shape == (batch_size, small_encoder.embedding_dim)
        with torch.no_grad():
            torch.testing.assert_close(got, small_encoder.embed(x), atol=ATOL, rtol=0)
    parity = check_onnx(small_encoder, embedding_onnx)
    assert parity.max_abs_error < ATOL and parity.max_rel_error < 1e-4


def test_feature_maps_export_has_five_named_outputs(small_encoder, tmp_path):
    path = export_onnx(small_encoder, tmp_path / "features.onnx", PATCH, output="features")
    runtime = OnnxRuntimeModule(path, providers=["CPUExecutionProvider"])
    assert runtime.output_names == [f"features_{i}" for i in range(5)]
    for batch_size in (1, 3):
        x = smooth_random_patches(batch_size, 1, PATCH, seed=batch_size)
        with torch.no_grad():
            expected = small_encoder.feature_maps(x)
        got = runtime(x)
        assert [g.shape for g in got] == [e.shape for e in expected]
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=ATOL, rtol=0)
    assert check_onnx(small_encoder, path, batch_size=3).max_abs_error < ATOL


def test_export_keeps_the_module_mode(small_encoder, tmp_path):
    small_encoder.train()
    export_onnx(small_encoder, tmp_path / "a.onnx", PATCH)
    assert all(m.training for m in small_encoder.modules())
    small_encoder.eval()
    check_onnx(small_encoder, tmp_path / "a.onnx")
    assert not any(m.training for m in small_encoder.modules())


def test_segmentation_logits_export(tmp_path):
    network = randomise(SegResNetDS(init_filters=4, out_channels=3, blocks_down=(1, 2, 2, 4, 4)))
    path = export_onnx(network, tmp_path / "seg.onnx", PATCH, output="logits")
    logits = OnnxRuntimeModule(path, providers=["CPUExecutionProvider"])(torch.zeros(2, 1, *PATCH))
    assert logits.shape == (2, 3, *PATCH)
    assert check_onnx(network, path).max_abs_error < ATOL


def test_failed_export_leaves_nothing(small_encoder, tmp_path):
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 1, 1)

        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        export_onnx(Broken(), tmp_path / "broken.onnx", PATCH, output="logits")
    with pytest.raises(CTFMError, match="not one tensor"):
        export_onnx(small_encoder, tmp_path / "list.onnx", PATCH, output="logits")
    with pytest.raises(CTFMError, match="not one of"):
        export_onnx(small_encoder, tmp_path / "bad.onnx", PATCH, output="pooled")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(_nvidia_driver_present(), reason="checks the CPU-only fall-back")
def test_provider_fallback_on_a_cpu_machine(embedding_onnx, caplog):
    with caplog.at_level(logging.INFO, logger="ctfm.export"):
        default = OnnxRuntimeModule(embedding_onnx, threads=1)
        asked = OnnxRuntimeModule(embedding_onnx, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert default.providers[0] == BEST_CPU_PROVIDER and asked.providers == ["CPUExecutionProvider"]
    levels = {r.levelno for r in caplog.records if "CUDAExecutionProvider" in r.getMessage()}
    assert levels == {logging.INFO, logging.WARNING}  # narrowing the default list is info; a named provider, a warning
    x = torch.rand(2, 1, *PATCH)
    torch.testing.assert_close(default(x), asked(x), atol=ATOL, rtol=0)


def test_int8_quantization_keeps_the_embedding(small_encoder, embedding_onnx, tmp_path):
    calibration = [smooth_random_patches(2, 1, PATCH, seed=10 + i) for i in range(2)]
    path = quantize_onnx(embedding_onnx, tmp_path / "encoder.int8.onnx", calibration)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = smooth_random_patches(3, 1, PATCH, seed=99)
    got = OnnxRuntimeModule(path, providers=["CPUExecutionProvider"])(x)
    with torch.no_grad():
        expected = small_encoder.embed(x)
    # int8 is an approximation: judge it by direction, as retrieval does (full width: cosine ~0.9999)
    assert torch.nn.functional.cosine_similarity(got, expected).min() > 0.99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.int8.onnx", "encoder.onnx"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fall-back of a machine without CUDA")
def test_tensorrt_fallback_returns_working_pytorch_module(small_encoder, tmp_path, caplog):
    x = torch.rand(1, 1, *PATCH)
    with torch.no_grad():
        expected = small_encoder.embed(x)
    with caplog.at_level(logging.WARNING, logger="ctfm.export"):
        compiled = trt_compile_encoder(small_encoder, tmp_path / "engines", weights=tmp_path / "model.safetensors")
    assert compiled is small_encoder
    assert "no CUDA device" in caplog.text and "runs as PyTorch" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(compiled.embed(x), expected)
    assert list(tmp_path.iterdir()) == []  # no engine folder, no engine


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_fallback_names_the_missing_package(small_encoder, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine without TensorRT
    with caplog.at_level(logging.WARNING, logger="ctfm.export"):
        assert trt_compile_encoder(small_encoder, tmp_path) is small_encoder
    assert "no tensorrt package" in caplog.text


def test_tensorrt_engine_sits_in_engine_dir_and_follows_the_weights(small_encoder, tmp_path, monkeypatch):
    calls = []

    def record(model, base_path, args, logger):
        calls.append((base_path, args))
        return model

    monkeypatch.setattr("ctfm.export._tensorrt_missing", lambda: [])  # as on a machine with everything
    monkeypatch.setattr("monai.networks.trt_compile", record)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    assert trt_compile_encoder(small_encoder, tmp_path / "engines", weights=weights) is small_encoder
    weights.write_bytes(b"other weights")
    os.utime(weights, (0, 0))  # older than the first engine: still other weights
    trt_compile_encoder(small_encoder, tmp_path / "engines", weights=weights)
    (first, args), (second, _) = calls
    # MONAI appends ".plan"; the weights' sha256 is in the name, so other weights never reuse an engine
    assert first == str(tmp_path / "engines" / "ctfmencoder_fp16_e3b0c44298fc")
    assert second == str(tmp_path / "engines" / ("ctfmencoder_fp16_" + hashlib.sha256(b"other weights").hexdigest()[:12]))
    assert args["precision"] == "fp16" and args["dynamic_batchsize"] == [1, 2, 4]


def test_onnx_runtime_network_exports_once_per_patch_and_weights(small_encoder, tmp_path):
    path = tmp_path / "encoder.onnx"
    first = onnx_runtime_network(small_encoder, path, PATCH, providers=["CPUExecutionProvider"])
    written = path.stat().st_mtime_ns
    onnx_runtime_network(small_encoder, path, PATCH, providers=["CPUExecutionProvider"])
    assert path.stat().st_mtime_ns == written  # reused
    x = smooth_random_patches(2, 1, PATCH)
    with torch.no_grad():
        torch.testing.assert_close(first(x), small_encoder.embed(x), atol=ATOL, rtol=0)
    other = onnx_runtime_network(small_encoder, path, (16, 32, 48), providers=["CPUExecutionProvider"])
    assert _input_dims(path) == ["batch", 1, 16, 32, 48] and other(torch.rand(1, 1, 16, 32, 48)).shape == (1, 64)


def test_onnx_runtime_network_re_exports_for_other_weights_whatever_their_age(small_encoder, tmp_path):
    path, weights = tmp_path / "encoder.onnx", tmp_path / "a.pt"
    save_state_dict(small_encoder, weights)
    onnx_runtime_network(small_encoder, path, PATCH, weights=weights, providers=["CPUExecutionProvider"])
    written = path.stat().st_mtime_ns
    onnx_runtime_network(small_encoder, path, PATCH, weights=weights, providers=["CPUExecutionProvider"])
    assert path.stat().st_mtime_ns == written  # the same weights: reused
    other = randomise(CTFMEncoder(init_filters=4), seed=5)
    save_state_dict(other, tmp_path / "b.pt")
    os.utime(tmp_path / "b.pt", (0, 0))  # older than the graph: an mtime rule would reuse the wrong graph
    runtime = onnx_runtime_network(other, path, PATCH, weights=tmp_path / "b.pt", providers=["CPUExecutionProvider"])
    x = smooth_random_patches(2, 1, PATCH)
    with torch.no_grad():
        torch.testing.assert_close(runtime(x), other.embed(x), atol=ATOL, rtol=0)


def test_smooth_random_patches_are_ct_like():
    x = smooth_random_patches(2, 1, PATCH, seed=3)
    assert x.shape == (2, 1, *PATCH) and x.dtype == torch.float32
    assert np.allclose(x.amin(dim=(1, 2, 3, 4)), 0) and np.allclose(x.amax(dim=(1, 2, 3, 4)), 1)
    assert (x[..., 1:] - x[..., :-1]).abs().max() < 0.5  # smooth, unlike white noise
    torch.testing.assert_close(x, smooth_random_patches(2, 1, PATCH, seed=3))


def test_a_vit_exports_and_its_runtime_rounds_patches_as_the_torch_vit(tmp_path):
    """FM-CT's ViT through the same export: the ONNX Runtime module keeps the ViT's size divisor (its patch size), so a
    sliding window cuts the graph's patch size, and the embeddings agree with PyTorch's."""
    from ctfm.embedding import PatchEmbeddingInferer, encoder_patch_size
    from ctfm.networks import build_encoder, size_divisor

    vit = randomise(build_encoder(tiny_vit_config(), "embedding"))
    patch = encoder_patch_size((20, 30, 30), size_divisor(vit))
    runtime = onnx_runtime_network(vit, tmp_path / "vit.onnx", patch, output="embedding")
    assert patch == (24, 36, 36) and size_divisor(runtime) == (12, 12, 12)
    volume = torch.rand(1, 1, 30, 40, 50, generator=torch.Generator().manual_seed(0))
    expected, got = PatchEmbeddingInferer((20, 30, 30))(volume, vit), PatchEmbeddingInferer((20, 30, 30))(volume, runtime)
    assert got.shape == expected.shape == (8, 24) and torch.equal(got.meta["patch_starts"], expected.meta["patch_starts"])
    torch.testing.assert_close(got.as_tensor(), expected.as_tensor(), atol=ATOL, rtol=0)
