"""Shared fixtures and helpers: small encoders with non-trivial weights and BatchNorm statistics, a tiny ViT's
description, body phantoms with label maps."""

from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from ctfm.networks.encoder import CTFMEncoder
from ctfm.export import _GPU_PROVIDERS, PREFERRED_PROVIDERS
from ctfm.phantom import body_phantom, write_phantom_nifti

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


def tiny_vit_config(**overrides) -> dict:
    """The description (``ctfm.networks.build_encoder``) of a tiny FM-CT ViT: width 24, one layer, patch 12, position
    embeddings learned at 24^3; ``overrides`` replace entries."""
    return {"model_type": "ctfm_vit", "img_size": [24, 24, 24], "patch_size": [12, 12, 12], "hidden_size": 24, "mlp_dim": 32,
            "num_layers": 1, "num_heads": 2, **overrides}


def body_phantoms(folder: Path, n: int = 2) -> list[dict]:
    """``n`` seeded body phantoms with their label maps in ``folder``: the retrieval probe's ``probe_data`` items."""
    items = []
    for i in range(n):
        image, label = folder / f"body_{i}.nii.gz", folder / f"body_{i}_labels.nii.gz"
        write_phantom_nifti(image, label, body_phantom(shape=(48, 48, 24), seed=i))
        items.append({"image": str(image), "label": str(label)})
    return items


@pytest.fixture
def small_encoder() -> CTFMEncoder:
    return randomise(CTFMEncoder(init_filters=4))


@pytest.fixture
def ct_batch() -> torch.Tensor:
    """Two CT-like inputs in [0, 1], (2, 1, 16, 32, 32)."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 1, 16, 32, 32, generator=g)
