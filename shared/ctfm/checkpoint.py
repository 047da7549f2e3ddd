"""Load and save CT-FM weights in every published layout, safely and with a report of what matched.

Layouts read (file or folder):

- Hugging Face model folder: ``config.json`` + ``model.safetensors`` (``PyTorchModelHubMixin``), keys exactly
  MONAI's ``SegResEncoder`` keys (``project-lighter/ct_fm_feature_extractor``).
- ``SegResNetDS`` state dicts: ``encoder.*`` + ``up_layers.*`` (``ct_fm_segresnet``, ``whole_body_segmentation``).
- Lightning checkpoints: ``{"state_dict": {"model.backbone.*", "model.projection_head.*"}, ...}``, with
  ``_orig_mod.`` where the run used ``torch.compile``.
- Plain state dicts, ``.safetensors``, ``.pt``/``.pth``/``.ckpt``; DDP's ``module.`` is dropped too.

Every file is read once; a floating-point tensor holding NaN or Inf is refused (a damaged file that still parses).

Nothing is unpickled beyond tensors and plain containers: ``.pt`` files go through
``torch.load(weights_only=True)``, and a file that needs more is refused with a one-line error.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ctfm.errors import CTFMError
from ctfm.files import atomic_path, sha256sum
from ctfm.networks.backbone import build_encoder
from ctfm.networks.encoder import CTFM_BLOCKS_DOWN, STEM_WEIGHT, CTFMEncoder, adapt_input_conv
from ctfm.networks.vit import VIT_MODEL_TYPE, CTFMViT

__all__ = [
    "CheckpointError",
    "LoadReport",
    "load_encoder",
    "load_weights",
    "read_state_dict",
    "save_hf_folder",
    "save_state_dict",
]

logger = logging.getLogger("ctfm.checkpoint")
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
_WRAPPER_SEGMENTS = re.compile(r"^module\.|(?:^|(?<=\.))_orig_mod\.")  # DDP and torch.compile wrappers
ENCODER_CONFIG_KEYS = ("blocks_down", "in_channels", "init_filters", "spatial_dims")
#: What a ``SegResNetDS`` folder (``whole_body_segmentation``) adds to the encoder's arguments.
SEGMENTATION_CONFIG_KEYS = ("out_channels", "dsdepth")
#: ... and of a :class:`~ctfm.networks.CTFMClassifier`.
CLASSIFIER_CONFIG_KEYS = ("num_classes", "head", "hidden_features")
#: ... and of a :class:`~ctfm.networks.CTFMViT` folder, told apart by ``"model_type": "ctfm_vit"``.
VIT_CONFIG_KEYS = ("model_type", "in_channels", "img_size", "patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads", "spatial_dims")
_CONTAINER_KEYS = ("state_dict", "model", "network", "model_state_dict")


class CheckpointError(CTFMError, ValueError):
    """A checkpoint that cannot be read or does not fit the module; the message names the file."""


@dataclass
class LoadReport:
    """Which keys of a checkpoint went where: the answer to "did my weights really load?"."""

    source: str
    layout: str
    prefix: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        prefix = f" under prefix '{self.prefix}'" if self.prefix else ""
        return (
            f"{self.source} ({self.layout}{prefix}): {len(self.matched)} matched, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected keys"
        )


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read tensors from any supported layout; returns ``(state_dict, layout name)`` with wrapper prefixes kept.

    Raises:
        CheckpointError: missing or unreadable file, not a state dict of tensors, a NaN or infinite value.
    """
    state, layout = _read_tensors(Path(path))
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors hold NaN or infinite values (first: {bad[0]}); damaged weights")
    return state, layout


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    if path.is_dir():
        weights = path / HF_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{path}: folder has no {HF_WEIGHTS} (expected a Hugging Face model folder)")
        return _read_safetensors(weights), "huggingface folder"
    if path.suffix == ".safetensors":
        return _read_safetensors(path), "safetensors"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors carry multi-line advice; keep the first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not loadable as a tensors-only checkpoint ({first})") from None
    layout = "state dict"
    for key in _CONTAINER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            layout = "lightning checkpoint" if "pytorch-lightning_version" in obj or key == "state_dict" else key
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return obj, layout


def load_weights(
    module: nn.Module, path: str | os.PathLike, strict: bool = True, sha256: str | None = None, adapt_stem: bool = False
) -> LoadReport:
    """Copy the weights of ``path`` into ``module`` and report matched / missing / unexpected keys.

    The checkpoint key prefix that addresses ``module`` (``""``, ``encoder.``, ``model.backbone.``, ...) is
    found automatically: the one under which most keys match. Keys outside it are reported as unexpected
    (e.g. a projection head or a decoder); they are not an error.

    Args:
        module: a :class:`~ctfm.networks.CTFMEncoder`, a ``SegResNetDS`` or any module.
        path: a file or a Hugging Face model folder.
        strict: raise if any of ``module``'s keys stay missing.
        sha256: expected SHA-256 of the weights file; checked before reading.
        adapt_stem: let a first convolution of other input channels initialise ``module``'s
            (:func:`~ctfm.networks.encoder.adapt_input_conv`: one channel to HU windows as channels). Only for
            initialising an encoder to fine-tune: a whole network keeps the channels it was trained with.

    Raises:
        CheckpointError: unreadable file, wrong hash, no matching keys, a shape mismatch, or (strict) missing keys.
    """
    path = Path(path)
    if sha256 is not None:
        _check_sha256(path / HF_WEIGHTS if path.is_dir() else path, sha256)
    if path.is_dir() and (path / HF_CONFIG).is_file() and hasattr(module, "config"):
        _check_hf_config(path, {k: v for k, v in module.config.items() if not (adapt_stem and k == "in_channels")})
    raw, layout = read_state_dict(path)
    return _fit(module, raw, layout, path, strict, adapt_stem)


def _fit(
    module: nn.Module, raw: dict[str, torch.Tensor], layout: str, path: Path, strict: bool, adapt_stem: bool = False
) -> LoadReport:
    """Copy the tensors ``raw`` read from ``path`` into ``module`` under the best-fitting key prefix."""
    state = {_WRAPPER_SEGMENTS.sub("", k): v for k, v in raw.items()}
    target = module.state_dict()
    prefix = _best_prefix(state, target)
    inside = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    report = LoadReport(
        source=str(path),
        layout=layout,
        prefix=prefix,
        matched=sorted(k for k in inside if k in target),
        missing=sorted(k for k in target if k not in inside),
        unexpected=sorted([prefix + k for k in inside if k not in target] + [k for k in state if not k.startswith(prefix)]),
    )
    if not report.matched:
        raise CheckpointError(
            f"{path}: no key fits {type(module).__name__} (checkpoint keys look like {sorted(state)[:3]}); "
            "a different architecture?"
        )
    stem_key = getattr(module, "stem_weight", STEM_WEIGHT)
    stem, wanted = inside.get(stem_key), target.get(stem_key)
    if adapt_stem and stem is not None and wanted is not None and stem.shape[1] != wanted.shape[1] and stem.shape[2:] == wanted.shape[2:]:
        inside[stem_key] = adapt_input_conv(stem, wanted.shape[1])
        logger.info("%s: first convolution adapted from %d to %d input channels", path, stem.shape[1], wanted.shape[1])
    bad = [f"{k} {tuple(inside[k].shape)} vs {tuple(target[k].shape)}" for k in report.matched if inside[k].shape != target[k].shape]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} tensors differ in shape from {type(module).__name__} (first: {bad[0]}); "
            "a different width or architecture?"
        )
    if strict and report.missing:
        raise CheckpointError(
            f"{path}: {len(report.missing)} of {len(target)} keys of {type(module).__name__} missing "
            f"(first: {report.missing[0]}); a different architecture?"
        )
    module.load_state_dict({k: inside[k] for k in report.matched}, strict=False)
    return report


def load_encoder(path: str | os.PathLike, sha256: str | None = None) -> tuple[CTFMEncoder | CTFMViT, LoadReport]:
    """Build the backbone of the checkpoint's size and load it: an encoder alone, or the encoder of a
    segmentation network, classifier or pre-training checkpoint, in any layout of this module (files read once).
    A Hugging Face folder's ``config.json`` names the backbone (:func:`ctfm.networks.build_encoder`): no
    ``model_type`` is a :class:`CTFMEncoder`, ``"ctfm_vit"`` a :class:`~ctfm.networks.CTFMViT` (a ViT loads from its
    folder only: its heads and input size are not in the weights); other files hold a :class:`CTFMEncoder`.

    Raises:
        CheckpointError: as :func:`load_weights`; also a checkpoint without an encoder.
    """
    path = Path(path)
    if sha256 is not None:
        _check_sha256(path / HF_WEIGHTS if path.is_dir() else path, sha256)
    state, layout = read_state_dict(path)
    if path.is_dir() and (path / HF_CONFIG).is_file():
        config = _read_hf_config(path)
        keys = VIT_CONFIG_KEYS if config.get("model_type") == VIT_MODEL_TYPE else ENCODER_CONFIG_KEYS
        config = {k: v for k, v in config.items() if k in keys}
    else:
        config = _infer_encoder_config(path, state)
    encoder = build_encoder(config)
    return encoder, _fit(encoder, state, layout, path, strict=True)


def save_hf_folder(network: nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``config.json`` (``network.config``: its arguments, flat; a classifier's are its backbone's description
    plus the head's) + ``model.safetensors``, atomically: the layout ``PyTorchModelHubMixin`` writes and CT-FM
    publishes (``ct_fm_feature_extractor`` for a :class:`~ctfm.networks.CTFMEncoder`, ``whole_body_segmentation`` for
    a :class:`~ctfm.networks.CTFMSegResNetDS`)."""
    with atomic_path(folder, is_dir=True) as tmp:
        (tmp / HF_CONFIG).write_text(json.dumps(network.config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, str(tmp / HF_WEIGHTS))
    return Path(folder)


def save_state_dict(module: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``module``'s plain state dict (``.safetensors`` or ``torch.save``), atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        if Path(path).suffix == ".safetensors":
            save_file(state, str(tmp))
        else:
            torch.save(state, tmp)
    return Path(path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None


def _read_hf_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / HF_CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{folder / HF_CONFIG}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / HF_CONFIG}: not a model config (a JSON object)")
    defaults = {"act": "relu", "norm": "batch", "head_module": None, "anisotropic_scales": None, "upsample_mode": "deconv"}
    known = {*ENCODER_CONFIG_KEYS, *SEGMENTATION_CONFIG_KEYS, *CLASSIFIER_CONFIG_KEYS}
    if config.get("model_type") == VIT_MODEL_TYPE:
        known = {*VIT_CONFIG_KEYS, *CLASSIFIER_CONFIG_KEYS}
    other = {k: v for k, v in config.items() if k not in known and defaults.get(k, "?") != v}
    if other:
        raise CheckpointError(f"{folder / HF_CONFIG}: not a CT-FM encoder, ViT, SegResNetDS or classifier config (unsupported settings {other})")
    return {k: v for k, v in config.items() if k in known}


def _check_hf_config(folder: Path, expected: dict) -> None:
    config = _read_hf_config(folder)
    diff = {k: (v, expected[k]) for k, v in config.items() if k in expected and list(_as_list(v)) != list(_as_list(expected[k]))}
    if diff:
        desc = ", ".join(f"{k}={a} (module has {b})" for k, (a, b) in diff.items())
        raise CheckpointError(f"{folder / HF_CONFIG}: architecture differs from the module: {desc}")


def _infer_encoder_config(path: Path, state: dict[str, torch.Tensor]) -> dict:
    state = {_WRAPPER_SEGMENTS.sub("", k): v for k, v in state.items()}
    conv = [k for k in state if k.endswith("conv_init.weight")]
    if not conv:
        vit = " (a ViT's weights load from its Hugging Face folder, with config.json)" if any("patch_embedding." in k for k in state) else ""
        raise CheckpointError(f"{path}: no conv_init.weight: not a CT-FM / SegResEncoder checkpoint{vit}")
    prefix = conv[0][: -len("conv_init.weight")]
    weight = state[conv[0]]
    blocks = {}
    for key in state:
        m = re.match(re.escape(prefix) + r"layers\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            level, block = int(m.group(1)), int(m.group(2))
            blocks[level] = max(blocks.get(level, 0), block + 1)
    blocks_down = tuple(blocks[i] for i in sorted(blocks)) or CTFM_BLOCKS_DOWN
    return {
        "init_filters": weight.shape[0],
        "in_channels": weight.shape[1],
        "spatial_dims": weight.ndim - 2,
        "blocks_down": blocks_down,
    }


def _best_prefix(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> str:
    candidates = {""}
    for key in state:
        parts = key.split(".")
        candidates.update(".".join(parts[:i]) + "." for i in range(1, min(len(parts), 4)))
    return max(sorted(candidates), key=lambda p: sum(k[len(p) :] in target for k in state if k.startswith(p)))


def _check_sha256(path: Path, expected: str) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    actual = sha256sum(path)
    if actual != expected.lower():
        raise CheckpointError(f"{path}: sha256 {actual} does not match the expected {expected}")


def _as_list(v):
    return v if isinstance(v, (list, tuple)) else [v]
