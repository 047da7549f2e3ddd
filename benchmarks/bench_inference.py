"""Inference speed and memory: the CT-FM encoder and end-to-end segmentation, per backend, in one run.

Measured, in order:

1. the machine: fp32 peak (median of several 4096x4096 ``torch`` matmuls, GFLOP/s), the same matmul as an
   ONNX Runtime graph on the CPU (the ceiling of its im2col + SGEMM convolutions), and copy bandwidth (a 1 GiB
   host or device-to-device copy, bytes read + written per second, GB/s), per device;
2. the work: encoder FLOPs per patch (``torch.utils.flop_counter.FlopCounterMode`` on the meta device), bytes
   of weights and of all layer outputs;
3. encoder embedding of one patch ``(1, 1, D, H, W)`` -> ``(1, 512)``: torch eager fp32, ONNX Runtime CPU fp32,
   ONNX Runtime CPU int8 (static QDQ); with the ``onnxruntime-openvino`` build also its OpenVINO provider in
   fp32; on a GPU also torch fp32 (TF32 off), torch AMP fp16, ONNX Runtime CUDA and TensorRT fp16. Random
   weights (seeded); speed does not depend on their values;
4. end-to-end segmentation of the sample CT (``example_ct.nii.gz``) with the ctfm_segmentation bundle's
   ``inference.json`` and its shipped weights (read, preprocess, sliding window, labels back on the input grid,
   NIfTI + PNG written): torch eager and ``inference_onnx.json`` on the CPU (and on OpenVINO where present);
   on a GPU also torch AMP, ``inference_onnx.json`` on CUDA and ``inference_trt.json``;
5. the accuracy cost of int8 on real CT: the shipped ctfm_pretrain encoder (width 8), calibrated on patches of
   ``example_ct.nii.gz``, compared with fp32 on patches of the ``example_ct_dicom`` series (another patient);
6. the peak again, keeping the higher of the two figures.

Timing: the first call of each backend gives its output and its working memory (peak host RSS above the RSS
before the call, from Linux's ``VmHWM``: ONNX Runtime's arena grows in that call and keeps its memory; on a
GPU torch's allocator peak, which does not see ONNX Runtime's or TensorRT's own memory), then ``warmup - 1``
more untimed calls; ``repeats`` rounds then time each backend once in turn (so a busy spell on a shared machine hits all
alike) and the median per backend is reported. Encoder rows report achieved GFLOP/s (fp32-equivalent FLOPs over
seconds), percent of the device's measured fp32 peak, speed-up over torch eager on the same device, max abs
difference and cosine similarity to torch fp32; segmentation rows the speed-up and the fraction of voxels whose
label equals torch's. Results go to ``<out>/inference_cpu.{json,md}`` (``inference_gpu`` on a GPU machine,
``inference_cpu_openvino`` with the OpenVINO build), written atomically.

    python benchmarks/bench_inference.py --repeats 5 --threads 2
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import onnxruntime as ort
import torch
from monai.bundle import ConfigParser
from onnx import TensorProto, helper
from torch.utils.flop_counter import FlopCounterMode

from ctfm.checkpoint import load_encoder
from ctfm.ct_io import read_ct
from ctfm.networks.encoder import CTFMEncoder
from ctfm.export import (
    OnnxRuntimeModule,
    export_onnx,
    quantize_onnx,
    smooth_random_patches,
    trt_compile_encoder,
)
from ctfm.files import atomic_path
from ctfm.sample_data import sample_path
from ctfm.transforms import CTFMPreprocessd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SEGMENTATION = ROOT / "bundles" / "ctfm_segmentation"
PRETRAINED_ENCODER = ROOT / "bundles" / "ctfm_pretrain" / "models" / "encoder_hf"
SAMPLE_CT = "example_ct.nii.gz"
#: ONNX Runtime's OpenVINO execution provider (the onnxruntime-openvino build): timed where present.
OPENVINO = "OpenVINOExecutionProvider"
#: Backends whose memory lives outside torch's CUDA allocator: no working-memory figure on a GPU.
_OWN_GPU_MEMORY = ("ONNX Runtime", "TensorRT")


def median_seconds(
    run: Callable[[], object], repeats: int, warmup: int, sync: Callable[[], None] = lambda: None
) -> float:
    """Median wall-clock seconds of ``run()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_peak(device: torch.device, threads: int, repeats: int = 5) -> dict:
    """fp32 matmul peak (GFLOP/s, 4096x4096, TF32 off), 1 GiB copy bandwidth (GB/s, read + write) of ``device``
    and, on the CPU, ONNX Runtime's own 4096x4096 MatMul (GFLOP/s)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = 4096
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    matmul = median_seconds(lambda: a @ b, repeats, warmup=2, sync=sync)
    del a, b
    src = torch.ones(2**28, device=device)  # 1 GiB of float32
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src), repeats, warmup=1, sync=sync)
    del src, dst
    peak = {"fp32_gflops": 2 * n**3 / matmul / 1e9, "copy_gbps": 2 * 2**30 / copy_s / 1e9}
    if device.type == "cpu":
        peak["ort_matmul_gflops"] = ort_matmul_gflops(n, threads, repeats)
    return peak


def ort_matmul_gflops(n: int, threads: int, repeats: int) -> float:
    """GFLOP/s of one ``(n, n) @ (n, n)`` fp32 MatMul run by ONNX Runtime's CPU provider (its SGEMM)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal((n, n), dtype=np.float32) for name in ("a", "b")}
    return 2 * n**3 / median_seconds(lambda: session.run(None, inputs), repeats, warmup=2) / 1e9


def count_work(init_filters: int, patch: Sequence[int]) -> dict:
    """FLOPs of one embedding ``(1, 1, *patch)`` and bytes of weights and of every layer's output (fp32)."""
    with torch.device("meta"):
        encoder = CTFMEncoder(init_filters=init_filters).eval()
        x = torch.empty(1, 1, *patch)
    activation_bytes = 0

    def add_output(module, inputs, output):
        nonlocal activation_bytes
        activation_bytes += output.numel() * output.element_size()

    hooks = [m.register_forward_hook(add_output) for m in encoder.modules() if not list(m.children())]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder.embed(x)
    for hook in hooks:
        hook.remove()
    weight_bytes = sum(t.numel() * t.element_size() for t in (*encoder.parameters(), *encoder.buffers()))
    return {"flops": counter.get_total_flops(), "weight_bytes": weight_bytes, "activation_bytes": activation_bytes}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest cosine similarity between matching rows of two ``(B, 512)`` embeddings."""
    return float(torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu()).min())


def call_with_memory(
    run: Callable[[], torch.Tensor], device: str, measure: bool = True
) -> tuple[torch.Tensor, int | None]:
    """``run()``'s output and the bytes it added at its peak: host RSS above the RSS before it (Linux:
    ``VmHWM`` after resetting it through ``/proc/self/clear_refs``), or torch's CUDA allocator peak above what
    it held before. ``None`` where the figure cannot be had or ``measure`` is false."""
    if not measure:
        return run(), None
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        output = run()
        torch.cuda.synchronize()
        return output, torch.cuda.max_memory_allocated() - before
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark VmHWM to the current RSS
    except OSError:
        return run(), None
    before = _status_kib("VmRSS")
    output = run()
    return output, (_status_kib("VmHWM") - before) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def time_interleaved(
    runs: dict[str, Callable[[], torch.Tensor]], repeats: int, warmup: int, device: str
) -> list[dict]:
    """Output, working memory and median seconds of each run (see the module docstring for the order of calls)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    first = {
        name: call_with_memory(run, device, measure=not (device == "cuda" and name.startswith(_OWN_GPU_MEMORY)))
        for name, run in runs.items()
    }
    for _ in range(warmup - 1):
        for run in runs.values():
            run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    return [
        {"backend": n, "seconds": statistics.median(times[n]), "output": first[n][0], "memory_bytes": first[n][1]}
        for n in runs
    ]


def encoder_cpu_runs(encoder: CTFMEncoder, patch: tuple[int, ...], threads: int, work: str) -> dict:
    """torch eager fp32 (first: the reference), ONNX Runtime CPU fp32 and int8, each embedding one patch."""
    x = smooth_random_patches(1, 1, patch, seed=1)
    fp32_path = export_onnx(encoder, Path(work) / f"encoder_{_name(patch)}.onnx", patch)
    calibration = [smooth_random_patches(1, 1, patch, seed=100 + i) for i in range(4)]
    int8_path = quantize_onnx(fp32_path, fp32_path.with_suffix(".int8.onnx"), calibration)
    fp32, int8 = (OnnxRuntimeModule(p, ["CPUExecutionProvider"], threads) for p in (fp32_path, int8_path))

    def eager():
        with torch.inference_mode():
            return encoder.embed(x)

    runs = {
        "torch eager fp32": eager,
        "ONNX Runtime CPU fp32": lambda: fp32(x),
        "ONNX Runtime CPU int8 (static QDQ)": lambda: int8(x),
    }
    if OPENVINO in ort.get_available_providers():
        openvino = OnnxRuntimeModule(fp32_path, [OPENVINO], threads)
        runs["ONNX Runtime OpenVINO fp32"] = lambda: openvino(x)
    return runs


def encoder_gpu_runs(encoder: CTFMEncoder, patch: tuple[int, ...], work: str) -> dict:
    """torch fp32 (TF32 off; first: the reference), torch AMP fp16, ONNX Runtime CUDA, TensorRT fp16."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    encoder = copy.deepcopy(encoder).cuda()
    x = smooth_random_patches(1, 1, patch, seed=1).cuda()

    def eager():
        with torch.inference_mode():
            return encoder.embed(x)

    def amp():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            return encoder.embed(x)

    runs = {"torch fp32": eager, "torch AMP fp16": amp}
    path = export_onnx(encoder, Path(work) / f"encoder_gpu_{_name(patch)}.onnx", patch)
    runtime = OnnxRuntimeModule(path, providers=["CUDAExecutionProvider"])
    if runtime.providers[0] == "CUDAExecutionProvider":
        runs["ONNX Runtime CUDA fp32"] = lambda: runtime(x)
    compiled = trt_compile_encoder(copy.deepcopy(encoder), Path(work) / f"trt_{_name(patch)}")
    if hasattr(compiled, "_trt_compiler"):  # absent where trt_compile_encoder fell back to PyTorch

        def trt():
            with torch.inference_mode():
                return compiled.embed(x)  # the first call builds the engine

        runs["TensorRT fp16"] = trt
    return runs


def segmentation_run(
    work: str, name: str, overrides: dict, extra_config: str | None = None
) -> Callable[[], torch.Tensor]:
    """A call that segments the sample CT with the ctfm_segmentation bundle's ``inference.json`` (plus
    ``extra_config`` and ``overrides``) and returns the written label map ``(X, Y, Z)``."""
    out_dir = Path(work) / name.replace(" ", "_")
    parser = ConfigParser()
    parser.read_config([str(SEGMENTATION / "configs" / c) for c in ("inference.json", extra_config) if c])
    parser.update({
        "bundle_root": str(SEGMENTATION),
        "datalist": str(sample_path(SAMPLE_CT)),
        "output_dir": str(out_dir),
        "write_dicom_seg": False,
        **overrides,
    })
    evaluator = parser.get_parsed_content("evaluator")
    label_map = out_dir / SAMPLE_CT.replace(".nii.gz", "_seg.nii.gz")

    def run() -> torch.Tensor:
        evaluator.run()
        return torch.from_numpy(np.asarray(nib.load(label_map).dataobj))

    return run


def segmentation_runs(device: str, threads: int, work: str) -> dict:
    """End-to-end segmentation backends on ``device``; the first is the reference (torch fp32)."""
    on = {"device": f"$torch.device('{device}')", "amp": False}
    if device == "cpu":
        onnx_cpu = {**on, "onnx_path": f"{work}/segmentation_cpu.onnx",
                    "network#providers": ["CPUExecutionProvider"], "network#threads": threads}
        runs = {
            "torch eager fp32": segmentation_run(work, "seg cpu torch", on),
            "ONNX Runtime CPU fp32": segmentation_run(work, "seg cpu ort", onnx_cpu, "inference_onnx.json"),
        }
        if OPENVINO in ort.get_available_providers():
            openvino = {**onnx_cpu, "onnx_path": f"{work}/segmentation_ov.onnx", "network#providers": [OPENVINO]}
            runs["ONNX Runtime OpenVINO fp32"] = segmentation_run(work, "seg cpu ov", openvino, "inference_onnx.json")
        return runs
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    onnx_cuda = {**on, "onnx_path": f"{work}/segmentation_cuda.onnx", "network#providers": ["CUDAExecutionProvider"]}
    return {
        "torch fp32": segmentation_run(work, "seg gpu torch", on),
        "torch AMP fp16": segmentation_run(work, "seg gpu amp", {**on, "amp": True}),
        "ONNX Runtime CUDA fp32": segmentation_run(work, "seg gpu ort", onnx_cuda, "inference_onnx.json"),
        "TensorRT fp16": segmentation_run(work, "seg gpu trt", {**on, "network#engine_dir": f"{work}/trt_seg"},
                                          "inference_trt.json"),
    }


def ct_patches(path: Path, patch: Sequence[int]) -> torch.Tensor:
    """Non-overlapping ``patch``-sized crops ``(N, 1, *patch)`` of one CT after CT-FM's preprocessing."""
    image = CTFMPreprocessd("image", min_size=patch)({"image": read_ct(path)})["image"].as_tensor()
    starts = [range(0, max(n - p, 0) + 1, p) for n, p in zip(image.shape[1:], patch)]
    crops = [
        image[:, s : s + patch[0], y : y + patch[1], x : x + patch[2]]
        for s in starts[0] for y in starts[1] for x in starts[2]
    ]
    return torch.stack(crops).float()


def int8_on_real_ct(threads: int, work: str, patch: Sequence[int] = (32, 128, 128)) -> dict:
    """Embedding cosine of int8 (static QDQ) to fp32 for the shipped pre-trained encoder on real CT patches:
    calibrated on ``example_ct.nii.gz``, evaluated on the ``example_ct_dicom`` series."""
    encoder, _ = load_encoder(PRETRAINED_ENCODER)
    encoder.eval()
    calibration = ct_patches(sample_path(SAMPLE_CT), patch)
    test = ct_patches(sample_path("example_ct_dicom"), patch)
    fp32_path = export_onnx(encoder, Path(work) / "pretrained.onnx", patch)
    int8_path = quantize_onnx(fp32_path, Path(work) / "pretrained.int8.onnx", list(calibration.split(1)))
    fp32, int8 = (OnnxRuntimeModule(p, ["CPUExecutionProvider"], threads) for p in (fp32_path, int8_path))
    with torch.inference_mode():
        reference = torch.cat([encoder.embed(x) for x in test.split(1)])
    results = {"fp32": torch.cat([fp32(x) for x in test.split(1)]), "int8": torch.cat([int8(x) for x in test.split(1)])}
    cosines = {k: torch.nn.functional.cosine_similarity(v, reference) for k, v in results.items()}
    return {
        "encoder": f"{PRETRAINED_ENCODER.relative_to(ROOT)} (init_filters {encoder.init_filters})",
        "patch": _name(patch),
        "calibration_patches": len(calibration),
        "test_patches": len(test),
        "rows": [
            {"backend": f"ONNX Runtime CPU {k}", "min_cosine": float(c.min()), "mean_cosine": float(c.mean()),
             "max_abs_diff": float((results[k] - reference).abs().max()),
             "embedding_norm": float(reference.norm(dim=1).mean())}
            for k, c in cosines.items()
        ],
    }


def _name(patch: Sequence[int]) -> str:
    return "x".join(map(str, patch))


def encoder_rows(timed: list[dict], work: dict, peaks: dict) -> list[dict]:
    """Add GFLOP/s, percent of the device's peak, and speed-up and parity against the first (torch) row of the
    same device and patch."""
    reference = {}
    for row in timed:
        reference.setdefault((row["device"], row["patch"]), row)
    rows = []
    for row in timed:
        ref = reference[(row["device"], row["patch"])]
        gflops = work[row["patch"]]["flops"] / row["seconds"] / 1e9
        rows.append({
            "device": row["device"],
            "backend": row["backend"],
            "patch": row["patch"],
            "seconds": row["seconds"],
            "gflops": gflops,
            "percent_of_peak": 100 * gflops / peaks[row["device"]]["fp32_gflops"],
            "speedup": ref["seconds"] / row["seconds"],
            "max_abs_diff": float((row["output"].float().cpu() - ref["output"].float().cpu()).abs().max()),
            "cosine": cosine(row["output"], ref["output"]),
            "memory_bytes": row["memory_bytes"],
        })
    return rows


def segmentation_rows(timed: list[dict]) -> list[dict]:
    """Speed-up and voxel agreement against the first (torch fp32) row of the same device."""
    reference = {}
    for row in timed:
        reference.setdefault(row["device"], row)
    return [
        {
            "device": row["device"],
            "backend": row["backend"],
            "seconds": row["seconds"],
            "speedup": reference[row["device"]]["seconds"] / row["seconds"],
            "voxel_agreement": float((row["output"] == reference[row["device"]]["output"]).double().mean()),
            "memory_bytes": row["memory_bytes"],
        }
        for row in timed
    ]


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def markdown(report: dict) -> str:
    """The report as Markdown: machine, work per patch, encoder and segmentation tables, int8 on real CT."""
    m = report["machine"]
    lines = [
        f"# Inference speed: CT-FM encoder and end-to-end segmentation ({report['name']})",
        "",
        f"Run {report['date']} with `benchmarks/bench_inference.py` (repeats {report['repeats']}, "
        f"warm-up {report['warmup']}, {report['threads']} threads).",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} logical CPUs){', ' + m['gpu'] if m.get('gpu') else ''}; "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}, onnx {m['onnx']}. "
        f"Other processes used {m['others_cpu_percent']:.0f}% of the CPU time during the run "
        f"(load average before: {m['load_before']:.2f}).",
        "",
        "| device | fp32 peak (GFLOP/s, 4096² torch matmul; before / after) | ONNX Runtime 4096² MatMul (GFLOP/s) "
        "| copy bandwidth (GB/s, read + write) |",
        "|---|---|---|---|",
    ]
    for d, p in report["peaks"].items():
        ort_mm = f"{p['ort_matmul_gflops']:.0f} ({100 * p['ort_matmul_gflops'] / p['fp32_gflops']:.0f}% of peak)" \
            if "ort_matmul_gflops" in p else "n/a"
        lines.append(
            f"| {d} | {p['fp32_gflops']:.0f} ({p['fp32_gflops_before']:.0f} / {p['fp32_gflops_after']:.0f}) | "
            f"{ort_mm} | {p['copy_gbps']:.1f} |"
        )
    lines += [
        "",
        f"## Encoder embedding, one patch (init_filters {report['init_filters']}, random weights, batch 1)",
        "",
        "| patch | GFLOP | weights (MB) | layer outputs (MB) | fp32 floor at peak (s) |",
        "|---|---|---|---|---|",
    ]
    cpu_peak = report["peaks"]["cpu"]["fp32_gflops"]
    for patch, w in report["work"].items():
        lines.append(
            f"| {patch} | {w['flops'] / 1e9:.1f} | {w['weight_bytes'] / 1e6:.0f} | {w['activation_bytes'] / 1e6:.0f} | "
            f"{w['flops'] / 1e9 / cpu_peak:.2f} (CPU) |"
        )
    lines += [
        "",
        "| device | backend | patch | seconds | GFLOP/s | % of peak | speed-up | max abs diff | cosine "
        "| working memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['device']} | {r['backend']} | {r['patch']} | {r['seconds']:.3f} | {r['gflops']:.0f} | "
        f"{r['percent_of_peak']:.0f}% | {r['speedup']:.2f}x | {r['max_abs_diff']:.2e} | {r['cosine']:.6f} | "
        f"{_mib(r['memory_bytes'])} |"
        for r in report["encoder"]
    ]
    lines += [
        "",
        f"## End-to-end segmentation of `{SAMPLE_CT}` (ctfm_segmentation `inference.json`, shipped weights)",
        "",
        "| device | backend | seconds | speed-up | voxels agreeing with torch | working memory (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['device']} | {r['backend']} | {r['seconds']:.2f} | {r['speedup']:.2f}x | "
        f"{100 * r['voxel_agreement']:.4f}% | {_mib(r['memory_bytes'])} |"
        for r in report["segmentation"]
    ]
    q = report["int8_on_real_ct"]
    lines += [
        "",
        f"## int8 on real CT: {q['encoder']}, {q['patch']} patches",
        "",
        f"Calibrated on {q['calibration_patches']} patches of `{SAMPLE_CT}`, compared with torch fp32 on "
        f"{q['test_patches']} patches of the `example_ct_dicom` series (another patient).",
        "",
        "| backend | min cosine | mean cosine | max abs diff | mean embedding norm |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['backend']} | {r['min_cosine']:.6f} | {r['mean_cosine']:.6f} | {r['max_abs_diff']:.2e} | "
        f"{r['embedding_norm']:.3f} |"
        for r in q["rows"]
    ]
    lines += [
        "",
        "Peak: the higher of the measurements before and after the timings. GFLOP/s counts the fp32 encoder's "
        "FLOPs for every row, so int8 and fp16 rows can pass 100% of the fp32 peak. Backends are timed in "
        "interleaved rounds (one run of each per round); seconds are the median over rounds. Speed-up is over "
        "torch eager fp32 on the same device in this run; max abs diff, cosine and voxel agreement compare with "
        "it. Working memory: peak host RSS of the first call above the RSS before it (on a GPU: torch's allocator; "
        "n/a for ONNX Runtime and TensorRT, which allocate outside it). CPU time used by other processes during "
        "the run slows every row and lowers the peak measured after the timings.",
        "",
    ]
    return "\n".join(lines)


def cpu_seconds() -> tuple[float, float]:
    """``(all processes, this one)``: CPU seconds used so far, from ``/proc/stat`` (Linux) and ``os.times``."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    mine = os.times()
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), mine.user + mine.system


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count()}
    info.update(torch=torch.__version__, onnxruntime=ort.__version__, onnx=onnx.__version__)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(
    repeats: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    shapes: Sequence[Sequence[int]] = ((32, 128, 128), (96, 96, 96)),
    init_filters: int = 32,
    out: str = str(RESULTS),
) -> None:
    """Run the whole benchmark once; print the table and write ``inference_{cpu,gpu}.{json,md}`` into ``out``.

    Args:
        repeats: timed rounds, each running every backend once (the median is reported).
        warmup: untimed calls of each backend before them (at least the one that gives the output).
        threads: CPU threads for torch and ONNX Runtime; default torch's (one per physical core).
        shapes: encoder patch shapes ``(D, H, W)``, multiples of 16.
        init_filters: encoder width of the encoder rows; 32 is CT-FM.
        out: results folder.
    """
    threads = int(threads or torch.get_num_threads())
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    machine = dict(machine_info(), load_before=os.getloadavg()[0])
    start_wall, (start_all, start_mine) = time.perf_counter(), cpu_seconds()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    peaks_before = {d: measure_peak(torch.device(d), threads) for d in devices}
    encoder = CTFMEncoder(init_filters=init_filters).eval()
    work, encoder_timed, segmentation_timed = {}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        for patch in (tuple(int(s) for s in shape) for shape in shapes):
            work[_name(patch)] = count_work(init_filters, patch)
            for device in devices:
                if device == "cpu":
                    runs = encoder_cpu_runs(encoder, patch, threads, tmp)
                else:
                    runs = encoder_gpu_runs(encoder, patch, tmp)
                for row in time_interleaved(runs, repeats, warmup, device):
                    encoder_timed.append(dict(row, device=device, patch=_name(patch)))
                    print(f"{device:4s} {row['backend']:36s} {_name(patch):>10s} {row['seconds']:8.3f} s", flush=True)
        for device in devices:
            for row in time_interleaved(segmentation_runs(device, threads, tmp), repeats, warmup, device):
                segmentation_timed.append(dict(row, device=device))
                print(f"{device:4s} {row['backend']:36s} {'segment':>10s} {row['seconds']:8.3f} s", flush=True)
        int8_ct = int8_on_real_ct(threads, tmp)
    peaks = {}
    for d in devices:  # the higher of the two measurements: a busy spell must not flatter the percentages
        before, after = peaks_before[d], measure_peak(torch.device(d), threads)
        peaks[d] = {k: max(before[k], after[k]) for k in before}
        peaks[d].update(fp32_gflops_before=before["fp32_gflops"], fp32_gflops_after=after["fp32_gflops"])
    end_all, end_mine = cpu_seconds()
    capacity = (time.perf_counter() - start_wall) * os.cpu_count()
    machine["others_cpu_percent"] = 100 * max((end_all - start_all) - (end_mine - start_mine), 0) / capacity
    name = "inference_gpu" if len(devices) > 1 else "inference_cpu"
    name += "_openvino" if OPENVINO in ort.get_available_providers() else ""
    report = {
        "name": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "repeats": repeats,
        "warmup": warmup,
        "threads": threads,
        "init_filters": init_filters,
        "machine": machine,
        "peaks": peaks,
        "work": work,
        "encoder": encoder_rows(encoder_timed, work, peaks),
        "segmentation": segmentation_rows(segmentation_timed),
        "int8_on_real_ct": int8_ct,
    }
    text = markdown(report)
    print(text)
    with atomic_path(Path(out) / f"{name}.json") as tmp_json:
        tmp_json.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_path(Path(out) / f"{name}.md") as tmp_md:
        tmp_md.write_text(text)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
