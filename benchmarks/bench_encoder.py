"""How fast the CT-FM encoder embeds one patch, against the fp32 peak measured on the same machine in the same run.

Measured, in order:

1. the machine: fp32 peak (median of several 4096x4096 ``torch`` matmuls, GFLOP/s) and copy bandwidth (a 1 GiB
   host or device-to-device copy, bytes read + written per second, GB/s), per device;
2. the work: encoder FLOPs per patch (``torch.utils.flop_counter.FlopCounterMode`` on the meta device), bytes
   of weights and of all layer outputs;
3. the time to embed one patch ``(1, 1, D, H, W)`` -> ``(1, 512)``: torch eager fp32, ONNX Runtime CPU fp32,
   ONNX Runtime CPU int8 (static QDQ); on a GPU also torch fp32 (TF32 off), torch AMP fp16, ONNX Runtime CUDA
   and TensorRT fp16. After ``warmup`` untimed calls, ``repeats`` rounds time each backend once in turn (so a
   busy spell on a shared machine hits all alike); the median per backend is reported;
4. the peak again, keeping the higher of the two figures.

Each row reports seconds, achieved GFLOP/s (fp32-equivalent FLOPs over seconds), percent of the device's
measured fp32 peak, speed-up over torch eager on the same device, max abs difference from torch fp32 and cosine
similarity of the embeddings. Results go to ``<out>/encoder_cpu.{json,md}`` (``encoder_gpu`` on a GPU
machine), written atomically. Random weights (seeded); speed does not depend on their values.

    python benchmarks/bench_encoder.py --repeats 3 --threads 2
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

import onnx
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from ctfm.encoder import CTFMEncoder
from ctfm.export import (
    OnnxRuntimeModule,
    export_onnx,
    quantize_onnx,
    smooth_random_patches,
    trt_compile_encoder,
)
from ctfm.files import atomic_path

RESULTS = Path(__file__).resolve().parent / "results"


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


def measure_peak(device: torch.device, repeats: int = 5) -> dict:
    """fp32 matmul peak (GFLOP/s, 4096x4096, TF32 off) and 1 GiB copy bandwidth (GB/s, read + write) of ``device``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = 4096
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    matmul = median_seconds(lambda: a @ b, repeats, warmup=2, sync=sync)
    del a, b
    src = torch.ones(2**28, device=device)  # 1 GiB of float32
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src), repeats, warmup=1, sync=sync)
    del src, dst
    return {"fp32_gflops": 2 * n**3 / matmul / 1e9, "copy_gbps": 2 * 2**30 / copy_s / 1e9}


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


def time_interleaved(
    runs: dict[str, Callable[[], torch.Tensor]], repeats: int, warmup: int, sync: Callable[[], None] = lambda: None
) -> list[dict]:
    """Median seconds and output of each run; rounds time every run once, so a busy spell hits them alike.

    The first of the ``max(warmup, 1)`` untimed calls gives the output (and builds lazy engines).
    """
    outputs = {name: run() for name, run in runs.items()}
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
    return [{"backend": n, "seconds": statistics.median(times[n]), "output": outputs[n]} for n in runs]


def cpu_runs(encoder: CTFMEncoder, patch: tuple[int, ...], threads: int, work: str) -> dict:
    """torch eager fp32 (first: the reference), ONNX Runtime CPU fp32 and int8, each embedding one patch."""
    x = smooth_random_patches(1, 1, patch, seed=1)
    fp32_path = export_onnx(encoder, Path(work) / f"encoder_{_name(patch)}.onnx", patch)
    calibration = [smooth_random_patches(1, 1, patch, seed=100 + i) for i in range(4)]
    int8_path = quantize_onnx(fp32_path, fp32_path.with_suffix(".int8.onnx"), calibration)
    fp32, int8 = (OnnxRuntimeModule(p, ["CPUExecutionProvider"], threads) for p in (fp32_path, int8_path))

    def eager():
        with torch.inference_mode():
            return encoder.embed(x)

    return {
        "torch eager fp32": eager,
        "ONNX Runtime CPU fp32": lambda: fp32(x),
        "ONNX Runtime CPU int8 (static QDQ)": lambda: int8(x),
    }


def gpu_runs(encoder: CTFMEncoder, patch: tuple[int, ...], work: str) -> dict:
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


def _name(patch: Sequence[int]) -> str:
    return "x".join(map(str, patch))


def finish_rows(timed: list[dict], work: dict, peaks: dict) -> list[dict]:
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
        })
    return rows


def markdown(report: dict) -> str:
    """The report as Markdown: machine, work per patch, results table."""
    m = report["machine"]
    lines = [
        f"# CT-FM encoder embedding speed ({report['name']})",
        "",
        f"Run {report['date']} with `benchmarks/bench_encoder.py` (repeats {report['repeats']}, "
        f"warm-up {report['warmup']}, "
        f"{report['threads']} threads); encoder init_filters {report['init_filters']}, random weights, batch 1.",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} logical CPUs){', ' + m['gpu'] if m.get('gpu') else ''}; "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}, onnx {m['onnx']}. "
        f"Other processes used {m['others_cpu_percent']:.0f}% of the CPU time during the run "
        f"(load average before: {m['load_before']:.2f}).",
        "",
        "| device | fp32 peak (GFLOP/s, 4096² matmul; before / after) | copy bandwidth (GB/s, read + write) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {d} | {p['fp32_gflops']:.0f} ({p['fp32_gflops_before']:.0f} / {p['fp32_gflops_after']:.0f}) | "
        f"{p['copy_gbps']:.1f} |"
        for d, p in report["peaks"].items()
    ]
    lines += ["", "| patch | GFLOP | weights (MB) | layer outputs (MB) | fp32 floor at peak (s) |"]
    lines += ["|---|---|---|---|---|"]
    cpu_peak = report["peaks"]["cpu"]["fp32_gflops"]
    for patch, w in report["work"].items():
        lines.append(
            f"| {patch} | {w['flops'] / 1e9:.1f} | {w['weight_bytes'] / 1e6:.0f} | {w['activation_bytes'] / 1e6:.0f} | "
            f"{w['flops'] / 1e9 / cpu_peak:.2f} (CPU) |"
        )
    lines += [
        "",
        "| device | backend | patch | seconds | GFLOP/s | % of peak | speed-up | max abs diff | cosine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['device']} | {r['backend']} | {r['patch']} | {r['seconds']:.3f} | {r['gflops']:.0f} | "
        f"{r['percent_of_peak']:.0f}% | "
        f"{r['speedup']:.2f}x | {r['max_abs_diff']:.2e} | {r['cosine']:.6f} |"
        for r in report["rows"]
    ]
    lines += [
        "",
        "Peak: the higher of the measurements before and after the timings. GFLOP/s counts the fp32 encoder's "
        "FLOPs for every row, so int8 and fp16 rows can pass 100% of the fp32 peak. Backends are timed in "
        "interleaved rounds (one run of each per round); seconds are the median over rounds. Speed-up is over "
        "torch eager fp32 on the same device in this run; max abs diff and cosine compare with it. CPU time used "
        "by other processes during the run slows every row and lowers the peak measured after the timings.",
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
    """Run the whole benchmark once; print the table and write ``encoder_{cpu,gpu}.{json,md}`` into ``out``.

    Args:
        repeats: timed rounds per shape, each running every backend once (the median is reported).
        warmup: untimed calls of each backend before them.
        threads: CPU threads for torch and ONNX Runtime; default torch's (one per physical core).
        shapes: patch shapes ``(D, H, W)``, multiples of 16.
        init_filters: encoder width; 32 is CT-FM.
        out: results folder.
    """
    threads = int(threads or torch.get_num_threads())
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    machine = dict(machine_info(), load_before=os.getloadavg()[0])
    start_wall, (start_all, start_mine) = time.perf_counter(), cpu_seconds()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    peaks_before = {d.type: measure_peak(d) for d in devices}
    encoder = CTFMEncoder(init_filters=init_filters).eval()
    work, timed = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for patch in (tuple(int(s) for s in shape) for shape in shapes):
            work[_name(patch)] = count_work(init_filters, patch)
            for device in devices:
                if device.type == "cpu":
                    runs, sync = cpu_runs(encoder, patch, threads, tmp), (lambda: None)
                else:
                    runs, sync = gpu_runs(encoder, patch, tmp), torch.cuda.synchronize
                for row in time_interleaved(runs, repeats, warmup, sync):
                    timed.append(dict(row, device=device.type, patch=_name(patch)))
                    print(f"{device.type:4s} {row['backend']:36s} {_name(patch):>10s} {row['seconds']:8.3f} s")
    peaks = {}
    for d in devices:  # the higher of the two measurements: a busy spell must not flatter the percentages
        before, after = peaks_before[d.type], measure_peak(d)
        peaks[d.type] = {k: max(before[k], after[k]) for k in before}
        peaks[d.type].update(fp32_gflops_before=before["fp32_gflops"], fp32_gflops_after=after["fp32_gflops"])
    rows = finish_rows(timed, work, peaks)
    end_all, end_mine = cpu_seconds()
    capacity = (time.perf_counter() - start_wall) * os.cpu_count()
    machine["others_cpu_percent"] = 100 * max((end_all - start_all) - (end_mine - start_mine), 0) / capacity
    name = "encoder_gpu" if len(devices) > 1 else "encoder_cpu"
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
        "rows": rows,
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
