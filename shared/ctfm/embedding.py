"""Whole-CT embeddings from any encoder runtime: patch embeddings by sliding window, saved with a PNG map.

The network may be any backbone of :mod:`ctfm.networks.backbone` (CT-FM's encoder: five feature maps; FM-CT's ViT:
the token map), an ONNX Runtime module exported with ``output="embedding"`` (``(B, D)``) or ``"features"`` (maps), or
a TensorRT-compiled encoder: :func:`pooled` turns each output into ``(B, D)``, so one inferer serves every runtime.
Patch sides are rounded up to the backbone's ``size_divisor`` (:func:`encoder_patch_size`; 16 for CT-FM's encoder
and for a runtime that does not say, the patch size for the ViT).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.data.utils import dense_patch_slices
from monai.inferers import Inferer
from monai.transforms import MapTransform
from safetensors import safe_open
from safetensors.torch import save_file

from ctfm.datalist import OutputGuard, output_stem
from ctfm.errors import CTFMError
from ctfm.files import atomic_path
from ctfm.networks.backbone import size_divisor
from ctfm.networks.encoder import SIZE_DIVISOR
from ctfm.preview import write_embedding_map

__all__ = ["PATCH_SIZE", "PATCH_STARTS", "PatchEmbeddingInferer", "SaveEmbeddingd", "encoder_patch_size", "patch_grid", "pooled", "sliding_patch_embeddings"]

PATCH_STARTS = "patch_starts"
PATCH_SIZE = "patch_size"


def pooled(output: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """``(B, D)`` from an encoder output: feature maps (global average of the deepest) or an embedding."""
    deepest = output[-1] if isinstance(output, (list, tuple)) else output
    return deepest if deepest.ndim == 2 else deepest.mean(dim=tuple(range(2, deepest.ndim)))


def encoder_patch_size(patch_size: Sequence[int], divisor: Sequence[int] | int = SIZE_DIVISOR) -> tuple[int, ...]:
    """``patch_size`` with each side rounded up to a multiple of the backbone's ``divisor`` (per axis or one for all;
    default CT-FM's encoder's 16: its 3D-MIR patch 24x128x128 runs as 32x128x128; a ViT of patch 12 runs it as
    24x132x132)."""
    divisors = [int(d) for d in divisor] if isinstance(divisor, (list, tuple)) else [int(divisor)] * len(patch_size)
    if len(divisors) != len(patch_size):
        raise ValueError(f"size divisor {divisor} does not match the patch {tuple(patch_size)}")
    return tuple(-(-int(p) // d) * d for p, d in zip(patch_size, divisors))


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
    divisor: Sequence[int] | int = SIZE_DIVISOR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed a whole CT patch by patch, as CT-FM's retrieval recipe does.

    Args:
        embed: ``(B, C, *patch) -> (B, D)``.
        volume: one preprocessed CT ``(C, S, P, L)``; padded with its minimum up to at least one patch.
        patch_size: patch extent in voxels; each side is rounded up to a multiple of ``divisor``.
        overlap: fraction of a patch shared with its neighbour, in [0, 1).
        batch_size: patches per forward pass.
        divisor: the backbone's ``size_divisor`` (:func:`ctfm.networks.size_divisor`).

    Returns:
        ``(embeddings, starts)``: ``(P, D)`` float32 and ``(P, 3)`` int64 voxel index of each patch's first corner.
    """
    patch = encoder_patch_size(patch_size, divisor)
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

    ``network`` is any encoder runtime (see the module docstring), whose ``size_divisor`` the patch sides are
    rounded up to; the CT-level embedding is the mean over patches (:class:`SaveEmbeddingd` writes both).
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
        divisor = size_divisor(network, volume.ndim - 1)
        embeddings, starts = sliding_patch_embeddings(
            lambda x: pooled(network(x.to(device))), volume, self.patch_size, self.overlap, self.batch_size, divisor
        )
        meta = dict(inputs.meta) if isinstance(inputs, MetaTensor) else {}
        meta.update({PATCH_STARTS: starts, PATCH_SIZE: torch.tensor(encoder_patch_size(self.patch_size, divisor))})
        return MetaTensor(embeddings, meta=meta)


class SaveEmbeddingd(MapTransform):
    """Write ``<output_dir>/<stem>_embedding.safetensors`` and ``<stem>_embedding.png`` per CT, each atomically.

    ``<stem>`` is the input's path relative to ``data_root_dir`` without its extension
    (:func:`ctfm.datalist.output_stem`): inputs of one run never share an output (two that would still stop the
    run), and an output left by an earlier run is replaced only when it was made from the same input (recorded in
    the safetensors metadata as ``source``). The safetensors file holds ``embedding`` ``(D,)`` (mean over patches),
    ``patch_embeddings`` ``(P, D)`` and ``patch_starts`` ``(P, 3)`` (voxel index in the preprocessed SPL volume);
    the PNG shows the mid-sagittal and mid-coronal planes of ``image_key`` with each patch coloured by the first
    three principal components of the patch embeddings (similar colour = similar embedding).

    Args:
        output_dir: where the outputs go.
        data_root_dir: the folder the inputs' names are taken relative to (the bundle's ``dataset_dir``).
        output_ext: ``.safetensors`` (the one format written).
        image_key: the preprocessed CT drawn under the map.
    """

    OUTPUT_EXTENSIONS = (".safetensors",)

    def __init__(
        self,
        keys: str = "pred",
        output_dir: str | os.PathLike = "eval",
        data_root_dir: str | os.PathLike | None = None,
        output_ext: str = ".safetensors",
        image_key: str = "image",
    ):
        super().__init__(keys)
        if output_ext not in self.OUTPUT_EXTENSIONS:
            raise CTFMError(f"output_ext {output_ext!r}: embeddings are written as {', '.join(self.OUTPUT_EXTENSIONS)}")
        self.output_dir = Path(output_dir)
        self.data_root_dir = data_root_dir
        self.output_ext = output_ext
        self.image_key = image_key
        self._guard = OutputGuard(_recorded_source)

    def outputs_for(self, source: str | os.PathLike) -> dict[str, Path]:
        """The files written for the input ``source``: ``embedding`` and ``png``."""
        stem = self.output_dir / f"{output_stem(source, self.data_root_dir)}_embedding"
        return {"embedding": stem.with_name(stem.name + self.output_ext), "png": stem.with_name(stem.name + ".png")}

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            source = pred.meta.get("filename_or_obj", "ct")
            source = str(source[0] if isinstance(source, (list, tuple)) else source)
            outputs = self.outputs_for(source)
            self._guard.check(source, outputs["embedding"])
            patches = pred.as_tensor().float().contiguous()
            tensors = {"embedding": patches.mean(0), "patch_embeddings": patches, "patch_starts": pred.meta[PATCH_STARTS]}
            try:
                with atomic_path(outputs["embedding"]) as tmp:
                    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=_provenance(source))
                image = torch.as_tensor(d[self.image_key])
                image = image[0] if image.ndim == 5 else image
                write_embedding_map(
                    image[0].numpy(), patches.numpy(), pred.meta[PATCH_STARTS].numpy(), pred.meta[PATCH_SIZE].tolist(),
                    outputs["png"],
                )
            except OSError as err:
                raise CTFMError(f"{err.filename or self.output_dir}: cannot write outputs ({err.strerror})") from None
            self._guard.done(source, outputs["embedding"])
        return d


def _provenance(source: str) -> dict[str, str]:
    return {"source": str(Path(source).resolve())}


def _recorded_source(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("source")
    except Exception:  # an unreadable earlier output records nothing
        return None
