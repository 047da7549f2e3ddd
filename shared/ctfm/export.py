"""Running CT-FM networks outside PyTorch: ONNX export and parity check, ONNX Runtime, int8, TensorRT.

- :func:`export_onnx` writes one ONNX graph (fixed spatial patch, dynamic batch) that returns the pooled
  embedding ``(B, 512)``, the five dense feature maps, or a network's single output (``logits``).
- :func:`check_onnx` runs the file in ONNX Runtime (CPU) next to PyTorch on fresh CT-like input.
- :class:`OnnxRuntimeModule` makes a session callable like a torch module; :func:`ort_session` builds the
  session with the best execution provider at hand (TensorRT, CUDA, OpenVINO, then CPU) and logs any fall-back;
  :func:`onnx_runtime_network` exports once per patch size and weights and returns such a module (bundles).
- :func:`quantize_onnx` makes a static int8 QDQ copy of a graph, calibrated on a few patches.
- :func:`trt_compile_encoder` swaps an encoder's forward for a TensorRT fp16 engine through MONAI's
  ``trt_compile``, or leaves it as PyTorch where CUDA or TensorRT is missing.

Exporter: torch 2.13's default (``dynamo=True``) cannot write opset 17 for this network (its down-conversion
from opset 18 fails on ``ReduceMean``, prints the traceback and writes opset 18). Otherwise the two exporters
give the same nodes (``Conv`` with a following ``BatchNormalization`` folded in) and, measured on the full
encoder, bit-identical ONNX Runtime outputs at the same speed. The TorchScript exporter (``dynamo=False``)
honours the requested opset, so it is used; it traces with real tensors, so exporting the full encoder takes a
few seconds of CPU.

Command line::

    python -m ctfm.export onnx --weights HF_FOLDER_OR_CHECKPOINT --out model.onnx --patch_size 32,128,128 \\
        --output embedding --check
    python -m ctfm.export quantize --model model.onnx --out model.int8.onnx
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from ctfm.errors import CTFMError
from ctfm.files import atomic_path, sha256sum
from ctfm.networks.backbone import size_divisor

__all__ = [
    "FP32_RELATIVE_TOLERANCE",
    "INPUT_NAME",
    "OUTPUT_KINDS",
    "PREFERRED_PROVIDERS",
    "OnnxParity",
    "OnnxRuntimeModule",
    "check_onnx",
    "export_onnx",
    "onnx_runtime_network",
    "ort_session",
    "provider_options",
    "quantize_onnx",
    "smooth_random_patches",
    "trt_compile_encoder",
    "weights_digest",
]

logger = logging.getLogger("ctfm.export")

INPUT_NAME = "image"
OUTPUT_KINDS = ("embedding", "features", "logits")
#: Execution providers in order of preference; :func:`ort_session` keeps those that can run here. OpenVINO's is
#: in the ``onnxruntime-openvino`` build only (which replaces ``onnxruntime-gpu``; one build per environment).
PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider"
)
_GPU_PROVIDERS = PREFERRED_PROVIDERS[:2]
#: Relative parity (max abs error over the reference's largest magnitude) that ``--check`` accepts for fp32.
FP32_RELATIVE_TOLERANCE = 1e-4


class OnnxParity(NamedTuple):
    """ONNX Runtime vs PyTorch on the same input, over all outputs.

    ``max_abs_error`` is in the output's units; ``max_rel_error`` divides each output's max abs error by that
    output's largest reference magnitude (element-wise ratios blow up where ReLU maps are zero).
    """

    max_abs_error: float
    max_rel_error: float


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    patch_size: Sequence[int] = (32, 128, 128),
    in_channels: int = 1,
    output: str = "embedding",
    opset: int = 17,
) -> Path:
    """Write ``module`` as an ONNX graph with input ``image`` ``(batch, in_channels, *patch_size)``, atomically.

    Args:
        module: a backbone (:class:`~ctfm.networks.CTFMEncoder` or :class:`~ctfm.networks.CTFMViT`) for
            ``embedding``, CT-FM's encoder for ``features``; any network returning one tensor for ``logits`` (e.g.
            MONAI ``SegResNetDS``, which returns one tensor in eval mode).
        path: the ``.onnx`` file; nothing is left there if export fails.
        patch_size: spatial ``(D, H, W)`` in voxels, fixed in the graph (multiples of the backbone's
            ``size_divisor``: 16 for CT-FM's encoder, the patch size for the ViT).
        in_channels: input channels.
        output: ``embedding`` -> output ``embedding`` ``(batch, embedding_dim)``; ``features`` -> outputs
            ``features_0`` .. ``features_4``, ``(batch, init_filters * 2**i, *patch_size / 2**i)``; ``logits``
            -> output ``logits``, whatever the network returns.
        opset: ONNX opset.

    The batch axis is dynamic. The module is exported in eval mode and left in the mode it came in.
    """
    graph = _output_graph(module, output)
    names = _output_names(module, output)
    device = _device_of(module)
    example = smooth_random_patches(2, in_channels, patch_size, seed=0).to(device)
    with atomic_path(path) as tmp, _eval_mode(module), torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is chosen on purpose (see the module docstring); its deprecation notice is noise
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        # shape checks (e.g. SegResNetDS.is_valid_shape) trace to constants: right, the spatial size is fixed here;
        # a batch-size dependency would break the dynamic-batch parity tests instead
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            graph,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *names)},
        )
    logger.info("wrote %s (%s, patch %s, opset %d)", path, output, tuple(patch_size), opset)
    return Path(path)


def check_onnx(module: nn.Module, path: str | os.PathLike, batch_size: int = 2, seed: int = 1) -> OnnxParity:
    """Run ``path`` in ONNX Runtime (CPU) and ``module`` in PyTorch on the same fresh CT-like batch.

    The input shape and the output kind are read from the file; the input is :func:`smooth_random_patches`
    ``(batch_size, C, D, H, W)`` with ``seed`` (the export traced seed 0). Returns the largest absolute and
    relative differences over all outputs.
    """
    session = ort_session(path, providers=["CPUExecutionProvider"])
    _, channels, *spatial = session.get_inputs()[0].shape
    names = [o.name for o in session.get_outputs()]
    graph = _output_graph(module, _output_kind(names))
    x = smooth_random_patches(batch_size, channels, spatial, seed)
    with _eval_mode(module), torch.no_grad():
        expected = graph(x.to(_device_of(module)))
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    got = session.run(None, {INPUT_NAME: x.numpy()})
    abs_errors, rel_errors = [], []
    for e, g in zip(expected, got):
        e = e.float().cpu().numpy()
        err = float(np.abs(g - e).max())
        abs_errors.append(err)
        rel_errors.append(err / max(float(np.abs(e).max()), np.finfo(np.float32).tiny))
    return OnnxParity(max(abs_errors), max(rel_errors))


def smooth_random_patches(
    batch_size: int, in_channels: int, patch_size: Sequence[int], seed: int = 0
) -> torch.Tensor:
    """CT-like test input: smooth random fields in [0, 1], ``(batch_size, in_channels, *patch_size)`` float32.

    Uniform noise on a grid 8x coarser than the patch, trilinearly upsampled and rescaled per patch to [0, 1]:
    piecewise smooth like a preprocessed CT, unlike white noise, which no trained network ever saw.
    """
    size = tuple(int(s) for s in patch_size)
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, in_channels, *(max(s // 8, 2) for s in size), generator=g)
    field = F.interpolate(coarse, size=size, mode="trilinear", align_corners=False)
    dims = tuple(range(1, field.ndim))
    low, high = field.amin(dim=dims, keepdim=True), field.amax(dim=dims, keepdim=True)
    return (field - low) / (high - low).clamp_min(1e-12)


def ort_session(
    path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None
) -> ort.InferenceSession:
    """An ONNX Runtime session on the best execution provider that can run here.

    Args:
        path: an ``.onnx`` file.
        providers: execution providers in order of preference; default :data:`PREFERRED_PROVIDERS`
            (TensorRT, CUDA, OpenVINO, CPU). Those this onnxruntime build lacks, and the GPU ones where no NVIDIA
            driver is installed, are dropped; ONNX Runtime itself drops those that fail to start. OpenVINO runs
            on its CPU device in fp32 (:func:`provider_options`).
        threads: CPU threads (the CPU provider's intra-op threads, OpenVINO's ``num_of_threads``); ``None`` lets
            each use one per physical core.

    A provider that was asked for by name and is not in use is logged as a warning on ``ctfm.export``; the
    default list narrowing to what the machine has is logged at info level.
    """
    if not Path(path).is_file():
        raise CTFMError(f"{path}: no such ONNX file")
    wanted = list(providers or PREFERRED_PROVIDERS)
    usable = [p for p in wanted if p in ort.get_available_providers()]
    if any(p in _GPU_PROVIDERS for p in usable) and not _nvidia_driver_present():
        usable = [p for p in usable if p not in _GPU_PROVIDERS]
    if "CPUExecutionProvider" not in usable:
        usable.append("CPUExecutionProvider")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(str(path), options, providers=[(p, provider_options(p, threads)) for p in usable])
    in_use = session.get_providers()
    dropped = [p for p in wanted if p not in in_use]
    if dropped:
        log = logger.warning if providers else logger.info
        log("ONNX Runtime on %s for %s (unavailable here: %s)", in_use[0], Path(path).name, ", ".join(dropped))
    return session


def provider_options(provider: str, threads: int | None = None) -> dict[str, str]:
    """Options :func:`ort_session` gives ``provider``: OpenVINO gets its CPU device and fp32 arithmetic (named,
    so that no OpenVINO release's default precision changes the outputs) and ``threads``; others get none."""
    if provider != "OpenVINOExecutionProvider":
        return {}
    return {"device_type": "CPU", "precision": "FP32", **({"num_of_threads": str(threads)} if threads else {})}


class OnnxRuntimeModule(nn.Module):
    """An ONNX graph run by ONNX Runtime, callable like the torch module it was exported from.

    ``forward(x)`` takes a ``(B, C, D, H, W)`` tensor of the exported patch size on any device and returns
    float32 tensors on that device: one tensor for a single-output graph (embedding, logits), else a list in
    the graph's output order (the five feature maps, shallow to deep). Data goes through host memory.
    ``size_divisor``: that of the backbone the graph was exported from (:func:`ctfm.networks.size_divisor`), so
    that a sliding window rounds its patches to the graph's size as it would for the torch module.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None,
                 size_divisor: Sequence[int] | None = None):
        super().__init__()
        self.path = Path(path)
        self.size_divisor = None if size_divisor is None else tuple(int(d) for d in size_divisor)
        self.session = ort_session(path, providers, threads)
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        """Execution providers the session runs on, best first."""
        return self.session.get_providers()

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        inputs = {INPUT_NAME: x.detach().to("cpu", torch.float32).contiguous().numpy()}
        outputs = [torch.from_numpy(y).to(x.device) for y in self.session.run(None, inputs)]
        return outputs[0] if len(outputs) == 1 else outputs


def onnx_runtime_network(
    module: nn.Module,
    path: str | os.PathLike,
    patch_size: Sequence[int],
    output: str = "embedding",
    weights: str | os.PathLike | None = None,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> OnnxRuntimeModule:
    """``module`` as an :class:`OnnxRuntimeModule`, for a bundle's ``inference_onnx.json``.

    ``path`` is exported first (:func:`export_onnx`) unless it already holds a graph of this ``patch_size``
    exported from these very ``weights`` (any graph when ``weights`` is ``None``): the sha256 of the weights file (a table name or a path, see
    :func:`ctfm.weights.resolve`) is kept next to the graph in ``<path>.weights.sha256``, so other weights, older or
    newer, always re-export. The first run exports, later runs start at once. The caller feeds patches of exactly
    ``patch_size`` (e.g. a sliding-window ROI), any batch size.
    """
    path = Path(path)
    record = path.with_name(path.name + ".weights.sha256")
    digest = weights_digest(weights)
    known = record.read_text().strip() if record.is_file() else None
    fresh = path.is_file() and (digest is None or known == digest)  # no weights given: any graph of this patch
    if not fresh or _input_shape(path)[2:] != [int(p) for p in patch_size]:
        channels = next(m for m in module.modules() if isinstance(m, nn.Conv3d)).in_channels
        record.unlink(missing_ok=True)
        export_onnx(module, path, patch_size, channels, output)
        if digest is not None:
            with atomic_path(record) as tmp:
                tmp.write_text(digest + "\n")
    return OnnxRuntimeModule(path, providers, threads, size_divisor(module))


def weights_digest(weights: str | os.PathLike | None) -> str | None:
    """sha256 of the weights file behind ``weights`` (a table name, a file or a Hugging Face folder), or ``None``."""
    if weights is None:
        return None
    from ctfm.checkpoint import HF_WEIGHTS
    from ctfm.weights import resolve

    try:
        path, _ = resolve(weights)
    except CTFMError:
        return None
    path = path / HF_WEIGHTS if path.is_dir() else path
    return sha256sum(path) if path.is_file() else None


def quantize_onnx(
    path_in: str | os.PathLike,
    path_out: str | os.PathLike,
    calibration: Iterable[torch.Tensor] | None = None,
) -> Path:
    """Write a static int8 copy of an fp32 ONNX graph (QDQ around every ``Conv``), atomically.

    Weights are int8 per output channel, activations uint8 with ranges from min-max calibration: each tensor of
    ``calibration`` is one batch ``(B, C, D, H, W)`` of the graph's input shape, preprocessed like real input.
    Real CT patches are best; ``None`` uses four :func:`smooth_random_patches`. Graph preparation (shape
    inference, fusions) comes first, as ONNX Runtime's quantization tool recommends.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration is None:
        _, channels, *spatial = _input_shape(path_in)
        calibration = [smooth_random_patches(1, channels, spatial, seed=100 + i) for i in range(4)]

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = ({INPUT_NAME: b.detach().to("cpu", torch.float32).numpy()} for b in calibration)

        def get_next(self):
            return next(self.batches, None)

    with atomic_path(path_out) as tmp, tempfile.TemporaryDirectory() as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(path_in), str(prepared))
        quantize_static(
            str(prepared),
            str(tmp),
            Batches(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    logger.info("wrote %s (int8 QDQ of %s)", path_out, path_in)
    return Path(path_out)


def trt_compile_encoder(
    module: nn.Module,
    engine_dir: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    precision: str = "fp16",
    batch_sizes: Sequence[int] = (1, 2, 4),
) -> nn.Module:
    """Run ``module``'s forward as a TensorRT engine, built on first call and cached in ``engine_dir``.

    Uses MONAI's ``trt_compile`` (ONNX export at opset 17 -> TensorRT). The engine file is
    ``engine_dir/<module class name>_<precision>.plan``, normally the weights' folder; it is rebuilt when older than
    ``weights``. Its spatial shape is that of the first call; ``batch_sizes`` is the (min, optimal, max) batch
    profile. ``module`` must be on the CUDA device; ``embed`` and ``feature_maps`` go through the engine, and
    the maps it returns are the engine's output buffers, overwritten by the next call (clone to keep them).

    Where CUDA, TensorRT, polygraphy or cuda-python is missing, ``module`` is returned unchanged and a warning on
    ``ctfm.export`` says that it runs as PyTorch.
    """
    missing = _tensorrt_missing()
    if missing:
        logger.warning("TensorRT unavailable (%s): %s runs as PyTorch", ", ".join(missing), type(module).__name__)
        return module
    from monai.networks import trt_compile

    engine_dir = Path(engine_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    args = {
        "precision": precision,
        "dynamic_batchsize": [int(b) for b in batch_sizes],
        "export_args": {"dynamo": False, "opset_version": 17},
    }
    digest = weights_digest(weights)  # in the engine's name: other weights never reuse this engine
    name = f"{type(module).__name__.lower()}_{precision}" + (f"_{digest[:12]}" if digest else "")
    return trt_compile(module, str(engine_dir / name), args=args, logger=logger)


def _tensorrt_missing() -> list[str]:
    """What MONAI's ``trt_compile`` needs and this machine lacks (empty when TensorRT can run)."""
    missing = [] if torch.cuda.is_available() else ["no CUDA device for torch"]
    packages = {"tensorrt": "tensorrt", "polygraphy": "polygraphy", "cuda.bindings": "cuda-python"}
    return missing + [f"no {package} package" for module, package in packages.items() if not _importable(module)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def _nvidia_driver_present() -> bool:
    """Whether the NVIDIA driver library loads; without it no CUDA or TensorRT provider can start."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


class _Embedding(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed(x)


class _FeatureMaps(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.encoder.feature_maps(x))


class _SingleOutput(nn.Module):
    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.network(x)
        if not isinstance(y, torch.Tensor):
            raise CTFMError(f"{type(self.network).__name__} returns {type(y).__name__}, not one tensor (logits)")
        return y


def _output_graph(module: nn.Module, output: str) -> nn.Module:
    """``module`` wrapped so that its forward returns what the ONNX graph should."""
    if output not in OUTPUT_KINDS:
        raise CTFMError(f"output '{output}' is not one of {', '.join(OUTPUT_KINDS)}")
    if output != "logits" and not hasattr(module, "feature_maps"):
        raise CTFMError(f"output '{output}' needs a backbone (CTFMEncoder, CTFMViT), got {type(module).__name__}")
    if output == "features" and not hasattr(module, "blocks_down"):
        raise CTFMError(f"output 'features' (five maps) needs CT-FM's encoder, got {type(module).__name__}; export 'embedding'")
    wrapper = {"embedding": _Embedding, "features": _FeatureMaps, "logits": _SingleOutput}[output](module)
    wrapper.training = False  # not .eval(): that would switch ``module`` too; callers manage its mode
    return wrapper


def _output_names(module: nn.Module, output: str) -> list[str]:
    if output == "features":
        return [f"features_{i}" for i in range(len(module.blocks_down))]
    return [output]


def _output_kind(names: Sequence[str]) -> str:
    """The ``output`` argument a graph was exported with, read back from its output names."""
    if len(names) == 1 and names[0] in ("embedding", "logits"):
        return names[0]
    if names and all(n.startswith("features_") for n in names):
        return "features"
    raise CTFMError(f"ONNX outputs {list(names)} are not those written by ctfm.export")


@contextmanager
def _eval_mode(module: nn.Module):
    """Eval mode inside the block, the caller's mode restored after it."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _input_shape(path: str | os.PathLike) -> list[int | str]:
    """Shape of an ONNX graph's first input, a dimension name where it is dynamic."""
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


def _onnx_command(
    weights: str,
    out: str,
    patch_size: Sequence[int] = (32, 128, 128),
    output: str = "embedding",
    opset: int = 17,
    check: bool = False,
) -> None:
    """Export encoder weights (HF folder or any checkpoint :mod:`ctfm.checkpoint` reads; CT-FM's encoder or FM-CT's
    ViT) to ONNX; ``patch_size`` is rounded up to the encoder's size divisor."""
    from ctfm.checkpoint import load_encoder
    from ctfm.embedding import encoder_patch_size

    encoder, report = load_encoder(weights)
    print(report.summary())
    patch_size = tuple(int(s) for s in patch_size) if isinstance(patch_size, (tuple, list)) else (int(patch_size),) * 3
    patch_size = encoder_patch_size(patch_size, size_divisor(encoder))
    export_onnx(encoder, out, patch_size, encoder.in_channels, output, opset)
    shape = ", ".join(map(str, (encoder.in_channels, *patch_size)))
    print(f"wrote {out}: input {INPUT_NAME} (batch, {shape}), output {output}")
    if check:
        parity = check_onnx(encoder, out)
        print(f"ONNX Runtime vs PyTorch: max abs error {parity.max_abs_error:.3g}, max rel {parity.max_rel_error:.3g}")
        if parity.max_rel_error > FP32_RELATIVE_TOLERANCE:
            raise CTFMError(f"{out}: ONNX Runtime differs from PyTorch by {parity.max_rel_error:.3g} (relative)")


def _quantize_command(model: str, out: str) -> None:
    """Write a static int8 copy of an fp32 ONNX file, calibrated on smooth random patches."""
    quantize_onnx(model, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    import fire

    from ctfm.errors import install_excepthook

    install_excepthook()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    fire.Fire({"onnx": _onnx_command, "quantize": _quantize_command})
