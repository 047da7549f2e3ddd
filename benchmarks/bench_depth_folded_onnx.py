"""Could ONNX Runtime (CPU) run the CT-FM encoder faster as 2-D convolutions? An experiment, not a product path.

ONNX Runtime's CPU provider runs a 3-D ``Conv`` as im2col + its SGEMM (its own 4096² MatMul reaches about 3/4
of the torch matmul peak here, see ``bench_inference.py``) but a 2-D ``Conv`` with its NCHWc direct kernels,
which come close to the peak. A 3x3x3 convolution is the sum of three 3x3 convolutions over depth-shifted
slices:

    y[d] = conv_0(x[s*d - 1]) + conv_1(x[s*d]) + conv_2(x[s*d + 1])      (stride s, zero outside the volume)

so with the depth axis folded into the batch axis, ``(B, C, D, H, W)`` -> ``(B*D, C, H, W)``, the encoder becomes
2-D convolutions, 2-D batch norms (the same statistics over the same voxels), activations and additions: the
same weights and arithmetic, float rounding aside. For each patch shape this prints, from one run: seconds and
percent of the fp32 peak of the graph ``ctfm.export`` writes (3-D) and of the folded one, their max abs
difference from torch, and where each spends its time (ONNX Runtime's profiler, per operator type; profiling
adds overhead, so its sums exceed the timed seconds). Writes ``results/depth_folded_onnx_cpu.{md,json}``.

Why it is not the export: in fp32 it runs 1.2-1.3x faster than the 3-D graph (70-83 % of the peak measured in
the same run, depending on the run: this machine's measured peak itself moves between about 300 and 365
GFLOP/s), but its int8 QDQ copy runs at about 95 % of peak against about 155 % for the 3-D graph's (ONNX
Runtime's int8 3-D convolution is im2col + int8 GEMM, which this CPU runs fast, while the folded graph adds
quantize / dequantize around every shift), and its effect on the CUDA and TensorRT providers is unmeasured.
Exporting it for fp32 CPU use only would need a second export path, and ONNX Runtime's OpenVINO provider runs
the unchanged 3-D graph faster still (about 100 % of peak, ``results/inference_cpu_openvino.md``); see
``results/depth_folded_onnx_cpu.md``.
Tried and slower, so not measured here: stacking the three shifted slices as channels of one 3x3 convolution
(the Concat costs more than the two extra convolution calls save).

    python benchmarks/bench_depth_folded_onnx.py --threads 2 --repeats 5
"""

from __future__ import annotations

import collections
import datetime
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort
import torch
import torch.nn.functional as F
from bench_inference import RESULTS, count_work, machine_info, measure_peak, median_seconds
from monai.networks.nets.segresnet_ds import SegResBlock
from torch import nn

from ctfm.networks.encoder import CTFMEncoder, check_spatial_size
from ctfm.export import export_onnx, quantize_onnx, smooth_random_patches
from ctfm.files import atomic_path

#: ONNX Runtime operators that do the convolutions (fp32, fused, int8).
CONV_OPS = ("Conv", "FusedConv", "QLinearConv")


class DepthFoldedConv(nn.Module):
    """A bias-free ``Conv3d`` with a 3x3x3 kernel, padding 1 and the same stride on every axis, as three
    ``Conv2d`` on depth-folded maps.

    ``forward(x, depth)`` takes ``(B*depth, C_in, H, W)`` and returns ``(B*depth_out, C_out, H_out, W_out)``
    with ``depth_out = depth // stride``.
    """

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        if (
            tuple(conv.kernel_size) != (3, 3, 3)
            or tuple(conv.padding) != (1, 1, 1)
            or conv.bias is not None
            or len(set(conv.stride)) != 1
            or set(conv.dilation) != {1}
            or conv.groups != 1
        ):
            raise ValueError(f"only bias-free 3x3x3 convolutions with padding 1 and equal strides fold, got {conv}")
        self.stride = conv.stride[0]
        c_out, c_in = conv.weight.shape[:2]
        self.taps = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, self.stride, 1, bias=False) for _ in range(3))
        for k, tap in enumerate(self.taps):
            tap.weight = nn.Parameter(conv.weight.detach()[:, :, k].clone())

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        channels, height, width = (int(n) for n in x.shape[1:])
        padded = F.pad(x.reshape(-1, depth, channels, height, width), (0, 0, 0, 0, 0, 0, 1, 1))
        depth_out = depth // self.stride
        below, above = (
            padded[:, k : k + self.stride * depth_out : self.stride].reshape(-1, channels, height, width)
            for k in (0, 2)
        )
        # a stride-1 centre tap reads x itself: no copy, and ONNX Runtime keeps x in its blocked layout
        centre = x if self.stride == 1 else padded[:, 1 : 1 + self.stride * depth_out : self.stride].reshape(
            -1, channels, height, width
        )
        return self.taps[0](below) + self.taps[1](centre) + self.taps[2](above)


class DepthFoldedEncoder(nn.Module):
    """:class:`CTFMEncoder`'s pooled embedding on depth-folded maps: ``(B, C_in, D, H, W)`` -> ``(B, embedding_dim)``.

    D, H, W divisible by 16. The fold is exact with the encoder's batch norms in eval mode (fp32 rounding aside).
    """

    def __init__(self, encoder: CTFMEncoder):
        super().__init__()
        if encoder.head_module is not None:
            raise ValueError("an encoder with a head_module does not fold")
        self.conv_init = DepthFoldedConv(encoder.conv_init)
        self.levels = nn.ModuleList()
        for layer in encoder.layers:
            blocks = nn.ModuleList(_FoldedBlock(block) for block in layer["blocks"])
            down = layer["downsample"]
            self.levels.append(nn.ModuleDict({
                "blocks": blocks,
                "downsample": DepthFoldedConv(down) if isinstance(down, nn.Conv3d) else nn.Identity(),
            }))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_spatial_size(x.shape[2:])
        channels, depth, height, width = (int(n) for n in x.shape[1:])  # static: only the batch axis may vary
        y = self.conv_init(x.transpose(1, 2).reshape(-1, channels, height, width), depth)
        for level in self.levels:
            for block in level["blocks"]:
                y = block(y, depth)
            if isinstance(level["downsample"], DepthFoldedConv):
                y = level["downsample"](y, depth)
                depth //= level["downsample"].stride
        return y.reshape(-1, depth, *(int(n) for n in y.shape[1:])).mean(dim=(1, 3, 4))  # (B, D, C, H, W) -> (B, C)


class _FoldedBlock(nn.Module):
    """MONAI's ``SegResBlock`` (norm, act, conv, norm, act, conv, plus the input) on depth-folded maps."""

    def __init__(self, block: SegResBlock):
        super().__init__()
        self.norm1, self.norm2 = _batch_norm_2d(block.norm1), _batch_norm_2d(block.norm2)
        self.act1, self.act2 = block.act1, block.act2
        self.conv1, self.conv2 = DepthFoldedConv(block.conv1), DepthFoldedConv(block.conv2)

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        y = self.conv1(self.act1(self.norm1(x)), depth)
        return x + self.conv2(self.act2(self.norm2(y)), depth)


def _batch_norm_2d(norm: nn.Module) -> nn.BatchNorm2d:
    if not isinstance(norm, nn.BatchNorm3d):
        raise ValueError(f"only batch norm folds over depth, got {norm}")
    folded = nn.BatchNorm2d(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
    folded.load_state_dict(norm.state_dict())
    return folded.train(norm.training)


def export_folded(encoder: CTFMEncoder, path: Path, x: torch.Tensor) -> Path:
    """The embedding graph of :class:`DepthFoldedEncoder` (fixed shape; batch 1 is all this benchmark runs)."""
    torch.onnx.export(DepthFoldedEncoder(encoder).eval(), x, str(path), input_names=["image"],
                      output_names=["embedding"], opset_version=17, dynamo=False)
    return path


def operator_seconds(session_path: Path, x: torch.Tensor, threads: int) -> dict[str, float]:
    """Seconds per ONNX Runtime operator type for one run (after one warm-up), from its profiler."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(session_path.with_suffix(""))
    session = ort.InferenceSession(str(session_path), options, providers=["CPUExecutionProvider"])
    inputs = {session.get_inputs()[0].name: x.numpy()}
    session.run(None, inputs)
    session.run(None, inputs)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 2e6  # microseconds over two runs
    return dict(per_op.most_common())


def main(repeats: int = 3, threads: int = 2, shapes: Sequence[Sequence[int]] = ((32, 128, 128), (96, 96, 96)),
         init_filters: int = 32, out: str = str(RESULTS)) -> None:
    """Time the 3-D and the folded ONNX graphs of the encoder embedding, fp32 and int8; print and write the table."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    encoder = CTFMEncoder(init_filters=init_filters).eval()
    for module in encoder.modules():  # non-trivial statistics, so the norms are checked too
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    peak = measure_peak(torch.device("cpu"), threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for patch in (tuple(int(s) for s in shape) for shape in shapes):
            flops = count_work(init_filters, patch)["flops"]
            x = smooth_random_patches(1, 1, patch, seed=1)
            with torch.inference_mode():
                reference = encoder.embed(x)
            graphs = {"3-D convolutions (ctfm.export)": export_onnx(encoder, Path(tmp) / "conv3d.onnx", patch),
                      "2-D, depth folded": export_folded(encoder, Path(tmp) / "folded.onnx", x)}
            calibration = [smooth_random_patches(1, 1, patch, seed=100 + i) for i in range(4)]
            for name, path in list(graphs.items()):
                graphs[f"{name}, int8 QDQ"] = quantize_onnx(path, path.with_suffix(".int8.onnx"), calibration)
            sessions = {}
            for name, path in graphs.items():
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for name, session in sessions.items():
                feed = {session.get_inputs()[0].name: x.numpy()}
                output = torch.from_numpy(session.run(None, feed)[0])
                seconds = median_seconds(lambda s=session, f=feed: s.run(None, f), repeats, warmup=1)
                per_op = operator_seconds(graphs[name], x, threads)
                rows.append({
                    "patch": "x".join(map(str, patch)), "graph": name, "seconds": seconds,
                    "percent_of_peak": 100 * flops / seconds / 1e9 / peak["fp32_gflops"],
                    "max_abs_diff": float((output - reference).abs().max()),
                    "conv_share": sum(per_op.get(op, 0.0) for op in CONV_OPS),
                    "operators": per_op,
                })
                percent = rows[-1]["percent_of_peak"]
                print(f"{rows[-1]['patch']:>10s} {name:44s} {seconds:7.3f} s {percent:5.1f}% of peak", flush=True)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "threads": threads,
              "repeats": repeats, "init_filters": init_filters, "machine": machine_info(), "peak": peak, "rows": rows}
    lines = [
        "# CT-FM encoder in ONNX Runtime (CPU): 3-D convolutions vs depth-folded 2-D convolutions",
        "",
        f"Run {report['date']} with `benchmarks/bench_depth_folded_onnx.py` ({threads} threads, median of {repeats}); "
        f"init_filters {init_filters}, random weights; {report['machine']['cpu']}, onnxruntime "
        f"{report['machine']['onnxruntime']}. fp32 peak {peak['fp32_gflops']:.0f} GFLOP/s (torch matmul), ONNX "
        f"Runtime's own MatMul {peak['ort_matmul_gflops']:.0f} GFLOP/s.",
        "",
        "| patch | graph | seconds | % of peak | max abs diff to torch | convolution seconds (profiler) "
        "| other operators (profiler, s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        others = ", ".join(f"{op} {s:.3f}" for op, s in r["operators"].items() if op not in CONV_OPS and s >= 0.005)
        lines.append(f"| {r['patch']} | {r['graph']} | {r['seconds']:.3f} | {r['percent_of_peak']:.0f}% | "
                     f"{r['max_abs_diff']:.1e} | {r['conv_share']:.3f} | {others} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with atomic_path(Path(out) / "depth_folded_onnx_cpu.json") as tmp_json:
        tmp_json.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_path(Path(out) / "depth_folded_onnx_cpu.md") as tmp_md:
        tmp_md.write_text(text)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
