"""ONNX Runtime CUDA and TensorRT fp16 against PyTorch fp32; skipped where the GPU pieces are missing.

Tolerances, relative to the reference's largest magnitude:

- ONNX Runtime CUDA, fp32 graph: cuDNN may pick TF32 convolutions (10-bit mantissa, ~5e-4 relative per
  product) and 31 convolutions compound it, so 1e-2; cosine > 0.9999 catches anything structural.
- TensorRT fp16 (MONAI ``trt_compile``, BatchNorm kept in fp32 by its casts): fp16 rounding (~5e-4) through
  the same depth, so 2e-2; cosine > 0.999.
"""

import onnxruntime as ort
import pytest
import torch
from torch.nn.functional import cosine_similarity

from conftest import randomise
from ctfm.networks.encoder import CTFMEncoder
from ctfm.export import (
    OnnxRuntimeModule,
    _nvidia_driver_present,
    _tensorrt_missing,
    export_onnx,
    smooth_random_patches,
    trt_compile_encoder,
)

PATCH = (32, 64, 64)
ORT_CUDA_TOLERANCE = 1e-2
TRT_FP16_TOLERANCE = 2e-2

needs_ort_cuda = pytest.mark.skipif(
    not _nvidia_driver_present() or "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="no NVIDIA driver or no CUDA provider in this onnxruntime",
)
needs_tensorrt = pytest.mark.skipif(bool(_tensorrt_missing()), reason="needs CUDA torch, tensorrt and polygraphy")


@pytest.fixture
def encoder() -> CTFMEncoder:
    return randomise(CTFMEncoder(init_filters=8))


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float().cpu() - expected.cpu()).abs().max() / expected.abs().max())


@needs_ort_cuda
def test_onnxruntime_cuda_matches_torch(encoder, tmp_path):
    path = export_onnx(encoder, tmp_path / "encoder.onnx", PATCH)
    runtime = OnnxRuntimeModule(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert runtime.providers[0] == "CUDAExecutionProvider"
    x = smooth_random_patches(3, 1, PATCH, seed=5)
    with torch.no_grad():
        expected = encoder.embed(x)
    got = runtime(x)
    assert _relative_error(got, expected) < ORT_CUDA_TOLERANCE
    assert cosine_similarity(got, expected).min() > 0.9999


@needs_tensorrt
def test_tensorrt_fp16_matches_torch_and_caches_the_engine(encoder, tmp_path):
    x = smooth_random_patches(2, 1, PATCH, seed=6).cuda()
    encoder = encoder.cuda()
    with torch.no_grad():
        expected = encoder.embed(x)
    compiled = trt_compile_encoder(encoder, tmp_path, batch_sizes=(1, 2, 4))
    with torch.no_grad():
        got = compiled.embed(x)
    assert _relative_error(got, expected) < TRT_FP16_TOLERANCE
    assert cosine_similarity(got.float(), expected).min() > 0.999
    assert [p.name for p in tmp_path.glob("*.plan")] == ["ctfmencoder_fp16.plan"]

    other_weights = randomise(CTFMEncoder(init_filters=8), seed=1).cuda()
    reloaded = trt_compile_encoder(other_weights, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.embed(x), got)  # the cached engine, not a rebuild from other weights
