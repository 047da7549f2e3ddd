"""Shared fixtures: small encoders with non-trivial weights and BatchNorm statistics."""

import onnxruntime as ort
import pytest
import torch

from ctfm.networks.encoder import CTFMEncoder
from ctfm.export import _GPU_PROVIDERS, PREFERRED_PROVIDERS

#: The execution provider ``ctfm.export`` picks on a machine without a GPU: OpenVINO's in the onnxruntime-openvino
#: build, the CPU provider in onnxruntime-gpu (what CI installs).
BEST_CPU_PROVIDER = next(
    p for p in PREFERRED_PROVIDERS if p not in _GPU_PROVIDERS and p in ort.get_available_providers()
)


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and BatchNorm buffer random values so that a wrong load cannot pass unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return module.eval()


@pytest.fixture
def small_encoder() -> CTFMEncoder:
    return randomise(CTFMEncoder(init_filters=4))


@pytest.fixture
def ct_batch() -> torch.Tensor:
    """Two CT-like inputs in [0, 1], (2, 1, 16, 32, 32)."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 1, 16, 32, 32, generator=g)
