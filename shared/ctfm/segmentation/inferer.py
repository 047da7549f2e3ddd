"""Sliding-window inference that returns a label map and never holds class scores for the whole volume.

MONAI's ``SlidingWindowInferer`` stitches a ``(B, C, S, P, L)`` float volume of class scores and only then
takes the argmax; with TotalSegmentator's 118 classes that buffer alone is ~46 GiB for a 512x512x400 CT. Here
the windows are visited in order of their first (S) coordinate, and Gaussian-weighted scores are summed in a
ring buffer that covers only the ``roi_size[0]`` rows under the current windows: ``(C, roi_S, P, L)``. A row
is turned into labels (argmax) as soon as no later window can touch it, i.e. when the windows move past it.

Peak memory is then ``C x roi_S x P x L`` scores (float32 or float16) plus a one-channel weight sum of the
same extent and the ``(S, P, L)`` label map, independent of the volume's S length. The windows, their
padding, the Gaussian importance map and the weighted average are MONAI's, so the labels equal
``argmax(SlidingWindowInferer(mode="gaussian")(x))`` (see ``tests/test_sliding_window.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import Inferer
from monai.utils import ensure_tuple_rep

__all__ = ["FINALISE_BYTES", "LabelMapSlidingWindowInferer", "buffer_bytes", "label_dtype", "scan_interval"]

logger = logging.getLogger("ctfm.segmentation")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Size cap of the float32 temporary that turns finished rows into labels, in bytes.
FINALISE_BYTES = 128 * 2**20


def label_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer dtype that holds labels ``0 .. num_classes - 1``."""
    return torch.uint8 if num_classes <= 256 else torch.int16 if num_classes <= 32768 else torch.int32


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: Sequence[float]) -> tuple[int, ...]:
    """Window stride per axis, as MONAI computes it: ``int(roi * (1 - overlap))``, at least 1; ``roi`` where
    the window spans the axis."""
    return tuple(
        r if r == n else max(int(r * (1 - o)), 1) for n, r, o in zip(image_size, roi_size, overlap)
    )


def buffer_bytes(num_classes: int, roi_size: Sequence[int], plane_shape: Sequence[int], dtype: str = "float32") -> int:
    """Bytes of the score ring buffer for ``num_classes`` over ``roi_size[0]`` rows of ``plane_shape`` (P, L)."""
    return num_classes * int(roi_size[0]) * math.prod(int(s) for s in plane_shape) * _DTYPES[dtype].itemsize


class LabelMapSlidingWindowInferer(Inferer):
    """Gaussian-blended sliding-window inference straight to an argmax label map, in bounded memory.

    Args:
        roi_size: window size ``(S, P, L)`` in voxels; the input is padded (as MONAI does) where it is smaller.
        overlap: fraction of a window shared with its neighbour, per axis or one value, in [0, 1).
        sw_batch_size: windows per forward pass.
        mode: window weighting, ``"gaussian"`` (CT-FM) or ``"constant"``.
        sigma_scale: Gaussian sigma as a fraction of the window size (MONAI's default 0.125).
        padding_mode: ``torch.nn.functional.pad`` mode for inputs smaller than a window.
        cval: fill value for ``"constant"`` padding (the preprocessed CT's air is 0).
        buffer_dtype: ``"float32"`` (bit-for-bit MONAI's sums) or ``"float16"`` / ``"bfloat16"`` (half the memory;
            argmax differs from float32 only at near-ties).
        sw_device: device the network runs on (default: the input's).
        device: device of the score buffer and of the returned labels (default: the input's).
        progress: log one line per finished row of windows.

    Call with ``inputs`` ``(B, C_in, S, P, L)`` and a network returning ``(N, C, *roi_size)`` scores (logits).
    Returns ``(B, 1, S, P, L)`` labels (``uint8`` up to 256 classes), a ``MetaTensor`` carrying the input's
    meta data and ``applied_operations`` when the input is one, so ``Invertd`` maps it back to the input's space.
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        overlap: Sequence[float] | float = 0.25,
        sw_batch_size: int = 1,
        mode: str = "gaussian",
        sigma_scale: Sequence[float] | float = 0.125,
        padding_mode: str = "constant",
        cval: float = 0.0,
        buffer_dtype: str = "float32",
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
    ):
        super().__init__()
        self.roi_size = tuple(int(r) for r in roi_size)
        if any(r <= 0 for r in self.roi_size):
            raise ValueError(f"roi_size must be positive, got {self.roi_size}")
        self.overlap = tuple(float(o) for o in ensure_tuple_rep(overlap, len(self.roi_size)))
        if any(not 0 <= o < 1 for o in self.overlap):
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if buffer_dtype not in _DTYPES:
            raise ValueError(f"buffer_dtype must be one of {sorted(_DTYPES)}, got {buffer_dtype!r}")
        self.sw_batch_size = int(sw_batch_size)
        self.mode = mode
        self.sigma_scale = sigma_scale
        self.padding_mode = padding_mode
        self.cval = float(cval)
        self.buffer_dtype = _DTYPES[buffer_dtype]
        self.sw_device = sw_device
        self.device = device
        self.progress = progress
        #: shape of the score buffer of the last call, ``(C, roi_S, P, L)``: what bounds the memory.
        self.last_buffer_shape: tuple[int, ...] | None = None

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        if inputs.ndim != len(self.roi_size) + 2:
            raise ValueError(
                f"inputs must be (B, C, {', '.join('S P L'.split()[: len(self.roi_size)])}) for roi_size "
                f"{self.roi_size}, got shape {tuple(inputs.shape)}"
            )
        labels = torch.cat([self._infer_one(inputs[b : b + 1], network, *args, **kwargs) for b in range(inputs.shape[0])])
        if isinstance(inputs, MetaTensor):  # as MONAI's sliding_window_inference: the input's meta, our dtype
            return MetaTensor(labels).copy_meta_from(inputs)
        return labels

    def _infer_one(self, image: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        """Labels ``(1, 1, *spatial)`` of one image ``(1, C_in, *spatial)``."""
        image = image.as_tensor() if isinstance(image, MetaTensor) else image
        device = torch.device(self.device) if self.device is not None else image.device
        sw_device = torch.device(self.sw_device) if self.sw_device is not None else image.device
        spatial = tuple(image.shape[2:])
        roi = self.roi_size
        pad = []  # F.pad order: last axis first, (before, after) per axis; as MONAI, half before
        for n, r in reversed(list(zip(spatial, roi))):
            diff = max(r - n, 0)
            pad += [diff // 2, diff - diff // 2]
        if any(pad):
            image = F.pad(image, pad=pad, mode=self.padding_mode, value=self.cval)
        padded = tuple(image.shape[2:])
        windows = sorted(
            dense_patch_slices(padded, roi, scan_interval(padded, roi, self.overlap)), key=lambda w: w[0].start
        )
        weight = compute_importance_map(roi, mode=self.mode, sigma_scale=self.sigma_scale, device=sw_device, dtype=image.dtype)

        rows = roi[0]
        plane = padded[1:]
        scores: torch.Tensor | None = None  # (C, rows, *plane), allocated once the class count is known
        weights = torch.zeros((rows, *plane), dtype=torch.float32, device=device)
        labels: torch.Tensor | None = None
        done = 0  # rows [0, done) are final

        def finalise(stop: int) -> None:
            """Rows [done, stop) get their labels (scores / weight sum, argmax) and their slots are cleared."""
            nonlocal done
            step = max(1, FINALISE_BYTES // (scores.shape[0] * math.prod(plane) * 4))  # rows per float32 temporary
            for start in range(done, stop, step):
                for ring, local in _ring_parts(start, min(step, stop - start), rows):
                    block = scores[:, ring].float() / weights[ring]
                    labels[start + local.start : start + local.stop] = torch.argmax(block, dim=0).to(labels.dtype)
                    scores[:, ring] = 0
                    weights[ring] = 0
            done = stop

        for first in range(0, len(windows), self.sw_batch_size):
            batch = windows[first : first + self.sw_batch_size]
            patches = torch.cat([image[(slice(None), slice(None), *w)] for w in batch]).to(sw_device)
            out = network(patches, *args, **kwargs)
            if isinstance(out, (list, tuple)):  # deep supervision in train mode: the full-resolution head
                out = out[0]
            if tuple(out.shape[2:]) != roi:
                raise ValueError(f"network output {tuple(out.shape)} does not match the window {roi}")
            if scores is None:
                num_classes = out.shape[1]
                scores = torch.zeros((num_classes, rows, *plane), dtype=self.buffer_dtype, device=device)
                labels = torch.zeros(padded, dtype=label_dtype(num_classes), device=device)
                self.last_buffer_shape = tuple(scores.shape)
                logger.info(
                    "label-map sliding window: %d windows of %s, score buffer %s x %s %s (%.2f GiB)",
                    len(windows), roi, num_classes, (rows, *plane), str(self.buffer_dtype).replace("torch.", ""),
                    scores.numel() * scores.element_size() / 2**30,
                )
            weighted = out.mul_(weight).to(device)  # in place: a window's scores can be ~1 GB at 118 classes
            for w, score in zip(batch, weighted):
                start = w[0].start
                if start > done:
                    finalise(start)
                    if self.progress:
                        logger.info("rows %d/%d final", done, padded[0])
                for ring, local in _ring_parts(start, rows, rows):
                    scores[(slice(None), ring, *w[1:])] += score[:, local]  # cast on the fly, no half copy
                    weights[(ring, *w[1:])] += weight[local].to(device, torch.float32)
        finalise(padded[0])

        crop = tuple(slice(b, b + n) for b, n in zip(pad[::2][::-1], spatial))
        return labels[crop][None, None]


def _ring_parts(start: int, length: int, size: int) -> list[tuple[slice, slice]]:
    """Split absolute rows ``[start, start + length)`` of a ring of ``size`` rows into contiguous pieces.

    Returns ``[(ring slice, slice into the window's rows), ...]``, one or two pieces.
    """
    head = start % size
    first = min(length, size - head)
    parts = [(slice(head, head + first), slice(0, first))]
    if first < length:
        parts.append((slice(0, length - first), slice(first, length)))
    return parts
