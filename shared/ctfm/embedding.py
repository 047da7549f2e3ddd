"""Whole-CT embeddings from any encoder runtime: patch embeddings by sliding window, saved with a PNG map.

The network may be the torch :class:`~ctfm.encoder.CTFMEncoder` (five feature maps), an ONNX Runtime module
exported with ``output="embedding"`` (``(B, D)``) or ``"features"`` (maps), or a TensorRT-compiled encoder:
:func:`pooled` turns each output into ``(B, D)``, so one inferer serves every runtime.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import dense_patch_slices
from monai.inferers import Inferer
from monai.transforms import MapTransform
from safetensors.torch import save_file

from ctfm.encoder import SIZE_DIVISOR
from ctfm.files import atomic_path

PATCH_STARTS = "patch_starts"
PATCH_SIZE = "patch_size"


def pooled(output: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """``(B, D)`` from an encoder output: feature maps (global average of the deepest) or an embedding."""
    deepest = output[-1] if isinstance(output, (list, tuple)) else output
    return deepest if deepest.ndim == 2 else deepest.mean(dim=tuple(range(2, deepest.ndim)))


def patch_grid(spatial_shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """Patches covering a volume of ``spatial_shape`` (at least one patch in size); the last one on each axis
    ends at the border."""
    interval = [max(int(p * (1 - overlap)), 1) for p in patch_size]
    return dense_patch_slices(spatial_shape, patch_size, interval)


@torch.no_grad()
def sliding_patch_embeddings(
    embed: Callable[[torch.Tensor], torch.Tensor],
    volume: torch.Tensor,
    patch_size: Sequence[int] = (24, 128, 128),
    overlap: float = 0.0,
    batch_size: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed a whole CT patch by patch, as CT-FM's retrieval recipe does.

    Args:
        embed: ``(B, C, *patch) -> (B, D)``.
        volume: one preprocessed CT ``(C, S, P, L)``; padded with its minimum up to at least one patch.
        patch_size: patch extent in voxels; each side is rounded up to a multiple of 16 for the encoder.
        overlap: fraction of a patch shared with its neighbour, in [0, 1).
        batch_size: patches per forward pass.

    Returns:
        ``(embeddings, starts)``: ``(P, D)`` float32 and ``(P, 3)`` int64 voxel index of each patch's first corner.
    """
    patch = tuple(-(-int(p) // SIZE_DIVISOR) * SIZE_DIVISOR for p in patch_size)
    pad = [max(p - s, 0) for p, s in zip(patch, volume.shape[1:])]
    if any(pad):
        volume = torch.nn.functional.pad(volume, [v for d in reversed(pad) for v in (0, d)], value=float(volume.min()))
    slices = patch_grid(volume.shape[1:], patch, overlap)
    embeddings = []
    for i in range(0, len(slices), batch_size):
        batch = torch.stack([volume[(slice(None), *s)] for s in slices[i : i + batch_size]])
        embeddings.append(embed(batch).float().cpu())
    starts = torch.tensor([[s.start for s in sl] for sl in slices], dtype=torch.int64)
    return torch.cat(embeddings), starts


class PatchEmbeddingInferer(Inferer):
    """``inputs (1, C, S, P, L) -> pred (P, D)`` patch embeddings; ``pred.meta`` holds their starts and size.

    ``network`` is any encoder runtime (see the module docstring); the CT-level embedding is the mean over
    patches (:class:`SaveEmbeddingd` writes both).
    """

    def __init__(self, patch_size: Sequence[int] = (24, 128, 128), overlap: float = 0.0, batch_size: int = 4):
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.overlap = float(overlap)
        self.batch_size = int(batch_size)

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs) -> MetaTensor:
        if inputs.shape[0] != 1:
            raise ValueError(f"PatchEmbeddingInferer embeds one CT at a time, got a batch of {inputs.shape[0]}")
        device = next((p.device for p in network.parameters()), inputs.device) if isinstance(network, torch.nn.Module) else inputs.device
        volume = torch.as_tensor(inputs[0])
        embeddings, starts = sliding_patch_embeddings(
            lambda x: pooled(network(x.to(device))), volume, self.patch_size, self.overlap, self.batch_size
        )
        meta = dict(inputs.meta) if isinstance(inputs, MetaTensor) else {}
        meta.update({PATCH_STARTS: starts, PATCH_SIZE: torch.tensor(self.patch_size)})
        return MetaTensor(embeddings, meta=meta)


class SaveEmbeddingd(MapTransform):
    """Write ``<output_dir>/<CT name>_embedding.safetensors`` and ``..._embedding.png``, each atomically.

    The safetensors file holds ``embedding`` ``(D,)`` (mean over patches), ``patch_embeddings`` ``(P, D)`` and
    ``patch_starts`` ``(P, 3)`` (voxel index in the preprocessed SPL volume); the PNG shows the mid-sagittal
    and mid-coronal planes of ``image_key`` with each patch coloured by the first three principal components
    of the patch embeddings (similar colour = similar embedding).
    """

    def __init__(self, keys: str = "pred", output_dir: str | os.PathLike = "eval", image_key: str = "image"):
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            source = pred.meta.get("filename_or_obj", "ct")
            name = _stem(str(source[0] if isinstance(source, (list, tuple)) else source))
            patches = pred.as_tensor().float().contiguous()
            tensors = {"embedding": patches.mean(0), "patch_embeddings": patches, "patch_starts": pred.meta[PATCH_STARTS]}
            with atomic_path(self.output_dir / f"{name}_embedding.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            image = torch.as_tensor(d[self.image_key])
            image = image[0] if image.ndim == 5 else image
            write_embedding_map(image[0].numpy(), patches.numpy(), pred.meta[PATCH_STARTS].numpy(), pred.meta[PATCH_SIZE].tolist(), self.output_dir / f"{name}_embedding.png")
        return d


def write_embedding_map(volume: np.ndarray, embeddings: np.ndarray, starts: np.ndarray, patch_size: Sequence[int], path: Path) -> None:
    """PNG of two mid planes of ``volume`` (S, P, L) in [0, 1] with patches tinted by 3 principal components."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centred = embeddings - embeddings.mean(0)
    components = np.linalg.svd(centred, full_matrices=False)[2][:3] if len(embeddings) > 1 else np.eye(3, embeddings.shape[1])
    rgb = centred @ components.T
    rgb = (rgb - rgb.min(0)) / np.maximum(rgb.max(0) - rgb.min(0), 1e-8)
    rgb = np.pad(rgb, ((0, 0), (0, 3 - rgb.shape[1])))
    tint = np.zeros((*volume.shape, 3), dtype=np.float32)
    for (s, p, l), colour in zip(starts, rgb):
        tint[s : s + patch_size[0], p : p + patch_size[1], l : l + patch_size[2]] = colour
    mid_p, mid_l = volume.shape[1] // 2, volume.shape[2] // 2
    planes = {"sagittal (mid L)": (volume[:, :, mid_l], tint[:, :, mid_l]), "coronal (mid P)": (volume[:, mid_p, :], tint[:, mid_p, :])}
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, (title, (ct, colour)) in zip(axes, planes.items()):
        ax.imshow(ct[::-1], cmap="gray", vmin=0.25, vmax=0.45, aspect="auto")  # S up; soft-tissue window in [0, 1]
        ax.imshow(colour[::-1], alpha=0.35, aspect="auto")
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"{len(embeddings)} patch embeddings, coloured by their first 3 principal components")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)


def _stem(path: str) -> str:
    name = Path(path.rstrip("/")).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
