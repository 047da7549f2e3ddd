"""Try every bad input and fault case of the hardening issue against both bundles, as a user would, and tabulate.

    OMP_NUM_THREADS=1 python benchmarks/reliability_suite.py [--jobs 2] [--skip-ddp] [--workdir DIR]

Every case runs a command line: ``python -m ctfm.ct_io PATH...`` for input checks (several bad paths in one
call: one ``error:`` line per path), ``python -m monai.bundle run --config_file bundles/<b>/configs/<c>.json
...`` where the bundle path matters, ``ci/verify_bundle.py`` / ``ci/package_bundle.py`` for packaging, and
``benchmarks/reliability_kill_loop.py`` for crash safety. Each case asserts its exit status (1 for bad input,
0 for the "must still work" cases), that stderr holds exactly one line starting ``error: `` naming the offending
file (or id) and no ``Traceback``, and that nothing partial was left in the output folder (nothing at all, or
only the complete outputs of a good run). Bad inputs are built under a temporary folder the way
``tests/test_ct_io_integrity.py`` builds them.

Prints one row per case (case, command kind, expected, observed, held), writes
``benchmarks/results/reliability_cpu.{md,json}`` and exits 1 if any case did not hold. A case that does not
hold is recorded with what was seen; the library is not changed here.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "bundles" / "ctfm_pretrain"
SEGMENT = ROOT / "bundles" / "ctfm_segmentation"
RESULTS = ROOT / "benchmarks" / "results"
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ENV.pop("CTFM_TRACEBACK", None)

sys.path.insert(0, str(Path(__file__).parent))


@dataclass
class Row:
    case: str
    kind: str
    expected: str
    observed: str = ""
    held: bool = False
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


@dataclass
class Run:
    argv: list
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]

    def shell(self) -> str:
        return " ".join(_quote(a) for a in self.argv)


def _quote(arg) -> str:
    text = str(arg)
    return text if re.fullmatch(r"[\w@%+=:,./#-]+", text) else "'" + text.replace("'", "'\\''") + "'"


def run(argv, timeout=600, env=None, cwd=ROOT) -> Run:
    argv = [str(a) for a in argv]
    start = time.perf_counter()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env or ENV, cwd=cwd)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = -999, _text(exc.stdout), _text(exc.stderr) + f"\n[suite] timed out after {timeout} s"
    return Run(argv, rc, out, err, time.perf_counter() - start)


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def bundle(config: Path, **overrides) -> list[str]:
    return [PY, "-m", "monai.bundle", "run", "--config_file", str(config), *[f"--{k}={v}" for k, v in overrides.items()]]


def files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` (hidden ones included), relative, sorted; [] when it does not exist."""
    if not folder.exists():
        return []
    if folder.is_file():
        return ["<a file>"]
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(text: str, limit: int = 300) -> str:
    text = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def judge_error(r: Run, names: list[str], expect_rc: int = 1, outputs: Path | None = None,
                allowed_outputs: list[str] | None = None, words: list[str] = ()) -> tuple[bool, str, dict]:
    """Exit ``expect_rc``, exactly one ``error:`` line naming every one of ``names`` (and ``words``), no
    Traceback, and ``outputs`` holding nothing (or exactly ``allowed_outputs``)."""
    problems = []
    if r.rc != expect_rc:
        problems.append(f"exit {r.rc} (expected {expect_rc})")
    errors = r.error_lines
    if len(errors) != 1:
        problems.append(f"{len(errors)} 'error:' lines")
    else:
        for name in [*names, *words]:
            if str(name) not in errors[0]:
                problems.append(f"error line does not name {name}")
    if "Traceback" in r.stderr:
        problems.append("Traceback on stderr")
    left = files_under(outputs) if outputs is not None else []
    if outputs is not None and left != sorted(allowed_outputs or []):
        problems.append(f"output folder holds {left}")
    observed = f"exit {r.rc}; " + (errors[0] if len(errors) == 1 else f"stderr: {one_line(r.stderr)}")
    if outputs is not None:
        observed += f"; output folder: {left or 'empty'}"
    if "Traceback" in r.stdout:  # not part of the check (stderr is): MONAI's logger prints to stdout
        observed += f"; note: stdout (MONAI's log) holds {r.stdout.count('Traceback')} Traceback blocks"
    if problems:
        observed = "NOT HELD (" + "; ".join(problems) + "): " + observed
    details = {"command": r.shell(), "exit": r.rc, "stderr": r.stderr[-4000:], "seconds": round(r.seconds, 1),
               "stdout_tracebacks": r.stdout.count("Traceback")}
    return not problems, observed, details


# ---- bad inputs, built as tests/test_ct_io_integrity.py builds them ----


def sample_dir() -> Path:
    from ctfm.sample_data import sample_dir as sd

    return Path(sd())


def phantom_nifti(path: Path, dtype=np.float32, offset=0.0, scaled=True) -> Path:
    from ctfm.phantom import body_phantom

    image = body_phantom(shape=(40, 36, 24), spacing=(8.0, 8.0, 8.0), seed=1).image
    voxels = image if dtype == np.float32 else (image + offset).round().astype(dtype)
    nifti = nib.Nifti1Image(voxels, np.diag([8.0, 8, 8, 1]))
    if not scaled:
        nifti.header.set_slope_inter(1.0, 0.0)
    nib.save(nifti, path)
    return path


def header_only_nifti(path: Path, shape, dtype=np.int16) -> Path:
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_zooms((1.0,) * len(shape))
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    block = header.binaryblock + b"\0" * 4
    path.write_bytes(gzip.compress(block, mtime=0) if path.name.endswith(".gz") else block)
    return path


def dicom_by_position(series: Path) -> list[Path]:
    return sorted(series.iterdir(), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))


def copy_series(folder: Path, files, prefix="", **changes) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for source in files:
        target = folder / f"{prefix}{source.name}"
        if changes:
            ds = pydicom.dcmread(source)
            for k, v in changes.items():
                setattr(ds, k, v)
            ds.save_as(target)
        else:
            shutil.copyfile(source, target)
        out.append(target)
    return out


def build_bad_inputs(work: Path) -> dict[str, tuple[str, Path, list[str]]]:
    """case name -> (description, path, words the error line must hold)."""
    bad = work / "bad"
    bad.mkdir(parents=True)
    series = sample_dir() / "example_ct_dicom"
    ordered = dicom_by_position(series)
    cases = {}

    p = phantom_nifti(bad / "flipped.nii.gz")
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid: mid + 2000] = bytes(b ^ 0xFF for b in data[mid: mid + 2000])
    p.write_bytes(bytes(data))
    cases["gzip CRC failure (2,000 bytes flipped mid-stream)"] = (p, ["gzip data damaged"])

    p = phantom_nifti(bad / "cut.nii.gz")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    cases["truncated .nii.gz (cut in half)"] = (p, ["compressed stream ends early"])

    p = phantom_nifti(bad / "nogeom.nii")
    data = bytearray(p.read_bytes())
    data[80:84] = struct.pack("<f", 0.0)
    data[252:256] = struct.pack("<hh", 0, 0)
    p.write_bytes(bytes(data))
    cases["NIfTI pixdim 0, no qform/sform"] = (p, ["missing geometry"])

    folder = bad / "dicom_cut"
    copies = copy_series(folder, sorted(series.iterdir()))
    victim = copies[7]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    cases["DICOM series with one slice cut in half"] = (folder, ["truncated or corrupt DICOM file", str(victim)])

    folder = bad / "dicom_two_series"
    copy_series(folder, ordered)
    copy_series(folder, ordered, prefix="b_", SeriesNumber=7, ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    cases["two anonymised series in one folder (2nd copy: SeriesNumber, orientation)"] = (folder, ["folder holds 2 DICOM series"])

    folder = bad / "dicom_rows"
    copy_series(folder, ordered[:6])
    copy_series(folder, ordered[:6], prefix="c_", Rows=256)  # header only; UIDs still empty
    cases["two anonymised series in one folder (2nd copy: Rows)"] = (folder, ["folder holds 2 DICOM series", "Rows"])

    folder = bad / "dicom_gap"
    copy_series(folder, ordered[:9] + ordered[10:])
    cases["DICOM series with a missing slice (gap)"] = (folder, ["gap in the series", "1 slice(s) missing"])

    p = phantom_nifti(bad / "shifted.nii.gz", np.uint16, offset=1024.0, scaled=False)
    cases["uint16 CT stored as HU+1024, no rescale intercept"] = (p, ["air is not near -1000 HU"])

    p = bad / "int8.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8), np.int8), np.eye(4), dtype=np.int8), p)
    cases["int8 voxels"] = (p, ["voxel type int8"])

    p = header_only_nifti(bad / "huge20000.nii", (20000, 20000, 20000))
    cases["20000^3 voxel header"] = (p, ["20000x20000x20000", "MAX_VOXELS"])
    return cases


# ---- the cases ----


def ct_io_cases(work: Path, cases) -> list[Row]:
    paths = [p for p, _ in cases.values()]
    r = run([PY, "-m", "ctfm.ct_io", *paths])
    rows = []
    for name, (path, words) in cases.items():
        mine = [line for line in r.error_lines if line.startswith(f"error: {path}: ")]
        problems = []
        if r.rc != 1:
            problems.append(f"exit {r.rc}")
        if len(mine) != 1:
            problems.append(f"{len(mine)} error lines for this path")
        elif not all(w in mine[0] for w in words):
            problems.append(f"error line lacks {[w for w in words if w not in mine[0]]}")
        if "Traceback" in r.stderr:
            problems.append("Traceback printed")
        if len(r.error_lines) != len(paths):
            problems.append(f"{len(r.error_lines)} error lines for {len(paths)} bad paths")
        observed = f"exit {r.rc}; " + (mine[0] if len(mine) == 1 else one_line(r.stderr))
        if problems:
            observed = "NOT HELD (" + "; ".join(problems) + "): " + observed
        rows.append(Row(name, "ct_io CLI", "exit 1, one error line naming the path", observed, not problems,
                        r.seconds / len(paths), {"command": "python -m ctfm.ct_io <all bad paths>", "exit": r.rc}))
    return rows


def huge_header_case(work: Path) -> Row:
    path = header_only_nifti(work / "bad" / "big1000.nii.gz", (1000, 1000, 1000))
    probe = textwrap.dedent(f"""
        import resource, subprocess, sys, time
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "ctfm.ct_io", {str(path)!r}], capture_output=True, text=True)
        print(r.returncode, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        sys.stderr.write(r.stderr)
    """)
    r = run([PY, "-c", probe])
    try:
        rc, seconds, rss_kb = r.stdout.split()
        rc, seconds, rss_kb = int(rc), float(seconds), int(rss_kb)
    except ValueError:
        rc, seconds, rss_kb = r.rc, r.seconds, -1
    inner = Run([PY, "-m", "ctfm.ct_io", path], rc, "", r.stderr, seconds)
    held, observed, details = judge_error(inner, [path], words=["1000x1000x1000"])
    problems = []
    if not seconds < 20:
        problems.append(f"wall {seconds:.1f} s >= 20 s")
    if not 0 < rss_kb < 1024 * 1024:
        problems.append(f"peak RSS {rss_kb} KB")
    observed += f"; wall {seconds:.1f} s, peak RSS {rss_kb / 1024:.0f} MB ({path.stat().st_size}-byte file)"
    if problems:
        observed = "NOT HELD (" + "; ".join(problems) + "): " + observed
    return Row("1000^3 voxel header in an ~80-byte .nii.gz (fresh child: wall, peak RSS)", "ct_io CLI",
               "exit 1, one error line, wall < 20 s, peak RSS < 1 GB", observed, held and not problems, seconds, details)


def good_inputs_case() -> Row:
    nifti, dicom = sample_dir() / "example_ct.nii.gz", sample_dir() / "example_ct_dicom"
    r = run([PY, "-m", "ctfm.ct_io", nifti, dicom])
    lines = r.stdout.strip().splitlines()
    ok = r.rc == 0 and not r.error_lines and "Traceback" not in r.stderr and len(lines) == 2
    ok = ok and lines[0].startswith(f"{nifti}: 122x101x112") and lines[1].startswith(f"{dicom}: 512x512x20")
    observed = f"exit {r.rc}; " + " / ".join(lines)
    return Row("sample NIfTI and DICOM series still read (must still work)", "ct_io CLI", "exit 0, two summary lines",
               observed if ok else "NOT HELD: " + observed + " " + one_line(r.stderr), ok, r.seconds,
               {"command": r.shell(), "exit": r.rc, "stderr": r.stderr[-2000:]})


def encoder4(work: Path, nan: bool = False) -> Path:
    from ctfm.networks import CTFMEncoder

    torch.manual_seed(0)
    state = CTFMEncoder(init_filters=4).state_dict()
    path = work / ("encoder4_nan.pt" if nan else "encoder4.pt")
    if nan:
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")
    torch.save(state, path)
    return path


def pretrain_inference(work: Path, out: Path, **overrides) -> list[str]:
    base = {"init_filters": 4, "ckpt_path": work / "encoder4.pt", "roi_size": "[32,64,64]", "output_dir": out,
            "dataset_dir": sample_dir(), "datalist": "example_ct_sm.nii.gz"}
    return bundle(PRETRAIN / "configs" / "inference.json", **{**base, **overrides})


def seg_inference(out: Path, config: Path = SEGMENT / "configs" / "inference.json", **overrides) -> list[str]:
    base = {"output_dir": out, "dataset_dir": sample_dir(), "datalist": "example_ct_sm.nii.gz",
            "write_preview": False, "write_dicom_seg": False}
    return bundle(config, **{**base, **overrides})


def bundle_bad_input_cases(work: Path, cases) -> list:
    """(name, kind, expected, thunk) for the bad inputs given to a bundle run."""
    items = list(cases.items())
    gz_name, (gz_path, gz_words) = items[0]  # gzip CRC
    cut_name, (cut_path, cut_words) = items[1]  # truncated
    two_name, (two_path, two_words) = items[4]  # two series

    def seg_crc():
        out = work / "out_seg_crc"
        r = run(seg_inference(out, dataset_dir=gz_path.parent, datalist=gz_path.name))
        return judge_error(r, [gz_path], outputs=out, words=gz_words)

    def pre_cut():
        out = work / "out_pre_cut"
        r = run(pretrain_inference(work, out, dataset_dir=cut_path.parent, datalist=cut_path.name))
        return judge_error(r, [cut_path], outputs=out, words=cut_words)

    def seg_two():
        out = work / "out_seg_two"
        r = run(seg_inference(out, dataset_dir=two_path.parent, datalist=two_path.name))
        return judge_error(r, [two_path], outputs=out, words=two_words)

    exp = "exit 1, one error line naming the input, output folder empty"
    return [
        (f"{gz_name} via segmentation inference", "bundle run (segmentation inference)", exp, seg_crc),
        (f"{cut_name} via pretrain embedding inference", "bundle run (pretrain inference)", exp, pre_cut),
        (f"{two_name} via segmentation inference", "bundle run (segmentation inference)", exp, seg_two),
    ]


def collision_cases(work: Path) -> list[Row]:
    """TotalSegmentator layout s1/ct.nii.gz, s2/ct.nii.gz -> s1/ct_seg.nii.gz, s2/ct_seg.nii.gz; then another s1/ct."""
    rows = []
    data, other, out = work / "totalseg", work / "other", work / "out_collide"
    for folder in (data / "s1", data / "s2", other / "s1"):
        folder.mkdir(parents=True)
        shutil.copyfile(sample_dir() / "example_ct_sm.nii.gz", folder / "ct.nii.gz")
    r = run(seg_inference(out, dataset_dir=data, datalist="*/ct.nii.gz"))
    want = ["s1/ct_seg.nii.gz", "s2/ct_seg.nii.gz"]
    left = files_under(out)
    ok = r.rc == 0 and left == want and not r.error_lines and "Traceback" not in r.stderr
    if ok:
        for f in want:
            try:
                ok = ok and nib.load(out / f).shape == nib.load(data / "s1" / "ct.nii.gz").shape
            except Exception:  # noqa: BLE001
                ok = False
    observed = f"exit {r.rc}; outputs {left}"
    rows.append(Row("TotalSegmentator layout s1/ct.nii.gz + s2/ct.nii.gz: two distinct outputs (must still work)",
                    "bundle run (segmentation inference)", f"exit 0, outputs exactly {want}, complete label maps",
                    observed if ok else "NOT HELD: " + observed + "; " + one_line(r.stderr), ok, r.seconds,
                    {"command": r.shell(), "exit": r.rc, "stderr": r.stderr[-3000:]}))
    before = {f: sha256(out / f) for f in left}
    r2 = run(seg_inference(out, dataset_dir=other, datalist="s1/ct.nii.gz"))
    after = {f: sha256(out / f) for f in files_under(out)}
    held, observed, details = judge_error(r2, [other / "s1" / "ct.nii.gz"], outputs=out, allowed_outputs=left,
                                          words=["output of another input"])
    same = before == after and bool(before)
    if not same:
        held, observed = False, "NOT HELD (existing outputs changed): " + observed
    observed += "; existing outputs byte-identical" if same else ""
    rows.append(Row("second run, other input of the same name (other/s1/ct.nii.gz) into the same output folder",
                    "bundle run (segmentation inference)", "exit 1, one error line naming the input, existing outputs byte-identical",
                    observed, held, r2.seconds, details))
    return rows


def damaged_weights_case(work: Path):
    copy = work / "seg_copy" / "ctfm_segmentation"
    shutil.copytree(SEGMENT, copy, ignore=shutil.ignore_patterns("eval", "runs", "checkpoints", "*.onnx", "*.ts"))
    model = copy / "models" / "model.pt"
    data = bytearray(model.read_bytes())
    mid = len(data) // 2
    n = 200 * 1024
    data[mid: mid + n // 2] = bytes(b ^ 0xFF for b in data[mid: mid + n // 2])
    data[mid + n // 2: mid + n] = bytes(n // 2)
    model.write_bytes(bytes(data))
    out = work / "out_seg_badweights"
    r = run(seg_inference(out, config=copy / "configs" / "inference.json"))
    return judge_error(r, [model], outputs=out, words=["sha256"])


def nan_weights_case(work: Path):
    nan = encoder4(work, nan=True)
    out = work / "out_pre_nan"
    r = run(pretrain_inference(work, out, ckpt_path=nan))
    return judge_error(r, [nan], outputs=out, words=["NaN"])


def verify_nothex_case(work: Path):
    copy = work / "verify_copy" / "ctfm_pretrain"
    shutil.copytree(PRETRAIN, copy, ignore=shutil.ignore_patterns("eval", "runs", "checkpoints", "*.onnx", "*.ts"))
    yml = copy / "large_files.yml"
    text, n = re.subn(r'hash_val: "[^"]*"', 'hash_val: "nothex"', yml.read_text(), count=1)
    yml.write_text(text)
    r = run([PY, "ci/verify_bundle.py", copy])
    ok = r.rc == 1 and "nothex" in (r.stdout + r.stderr) and "Traceback" not in r.stderr and n == 1
    lines = [line for line in (r.stdout + r.stderr).splitlines() if "nothex" in line]
    observed = f"exit {r.rc}; " + (lines[0].strip() if lines else one_line(r.stdout + r.stderr))
    return ok, observed if ok else "NOT HELD: " + observed, {"command": r.shell(), "exit": r.rc,
                                                             "output": (r.stdout + r.stderr)[-3000:]}


def package_symlink_case(work: Path):
    copy = work / "package_copy" / "ctfm_pretrain"
    shutil.copytree(PRETRAIN, copy, ignore=shutil.ignore_patterns("eval", "runs", "checkpoints", "*.onnx", "*.ts"))
    outside = work / "package_copy" / "secret.txt"
    outside.write_text("not part of the bundle")
    link = copy / "docs" / "extra.md"
    link.symlink_to(outside)
    dist = work / "dist"
    r = run([PY, "ci/package_bundle.py", copy, "--out", dist])
    both = r.stdout + r.stderr
    named = [line for line in both.splitlines() if str(link) in line and "symlink" in line]
    left = files_under(dist)
    ok = r.rc != 0 and bool(named) and "Traceback" not in both and not left
    observed = f"exit {r.rc}; " + (named[0].strip() if named else one_line(both)) + f"; dist: {left or 'empty'}"
    return ok, observed if ok else "NOT HELD: " + observed, {"command": r.shell(), "exit": r.rc, "output": both[-3000:]}


def one_line_cases(work: Path) -> list:
    def unwritable():
        blocker = work / "a_regular_file"
        blocker.write_text("x")
        out = blocker / "out"
        r = run(seg_inference(out))
        held, observed, details = judge_error(r, [blocker])
        if not (blocker.is_file() and blocker.read_text() == "x"):
            held, observed = False, "NOT HELD (the blocking file changed): " + observed
        return held, observed, details

    def misspelt():
        out = work / "out_misspelt"
        r = run(seg_inference(out, dataset_dirr=sample_dir()))
        return judge_error(r, ["--dataset_dirr"], outputs=out)

    def wrong_type():
        out = work / "out_roi_abc"
        r = run(pretrain_inference(work, out, roi_size="abc"))
        return judge_error(r, ["roi_size"], outputs=out)

    def labels_out_of_range():
        ct = sample_dir() / "example_ct_sm.nii.gz"
        image = nib.load(ct)
        labels = np.zeros(image.shape, np.uint8)
        labels[tuple(slice(s // 4, s // 2) for s in image.shape)] = 200
        folder = work / "seg_train_data"
        folder.mkdir()
        label = folder / "labels200.nii.gz"
        nib.save(nib.Nifti1Image(labels, image.affine, image.header), label)
        listing = folder / "datalist.json"
        listing.write_text(json.dumps({"training": [{"image": str(ct), "label": str(label)}]}))
        run_dir = work / "seg_train_run"
        r = run(bundle(SEGMENT / "configs" / "train.json", init_filters=4, crop_size="[16,64,64]", num_workers=0,
                       encoder_weights=work / "encoder4.pt", dataset_dir=listing, bundle_root=run_dir,
                       epoch_length=2, max_epochs=1, val_interval=100))
        held, observed, details = judge_error(r, [label], words=["200"])
        ckpts = files_under(run_dir / "models")
        if ckpts:
            held, observed = False, f"NOT HELD (left {ckpts} in the run's models/): " + observed
        return held, observed, details

    exp = "exit 1, one error line naming the {}"
    return [
        ("unwritable output folder (--output_dir under a regular file)", "bundle run (segmentation inference)",
         exp.format("blocking file"), unwritable),
        ("misspelt config id --dataset_dirr", "bundle run (segmentation inference)", exp.format("id"), misspelt),
        ("config id of the wrong type --roi_size abc", "bundle run (pretrain inference)", exp.format("id roi_size"), wrong_type),
        ("label value 200 outside the 118 classes in a training datalist", "bundle run (segmentation train)",
         exp.format("label file"), labels_out_of_range),
    ]


def kill_loop_cases(work: Path) -> list[Row]:
    import reliability_kill_loop as kl
    from ctfm.engine import latest_checkpoint

    rows = []
    kill_dir = work / "kill_loop"
    r = run([PY, "benchmarks/reliability_kill_loop.py", "--kills", "2", "--seed", "0", "--epoch-length", "6",
             "--max-epochs", "2", "--interval", "3", "--workdir", kill_dir], timeout=480)
    table = r.stdout
    ckpts = kill_dir / "killed" / "models" / "checkpoints"
    temps = kl.temporaries(ckpts)
    killed = table.count("SIGKILL")
    ok = r.rc == 0 and not temps and killed >= 1 and "bit-identical" in table
    weight_line = next((line for line in table.splitlines() if "max |dW|" in line), "no weight comparison printed")
    observed = f"exit {r.rc}; {killed} SIGKILLs; temporaries after the final start: {temps or 'none'}; {weight_line}"
    rows.append(Row("SIGKILL during pretrain training, then restart (kill loop: 2 kills, 6x2 iterations)",
                    "kill loop (pretrain train)", "no .tmp after the next start; final weights bit-identical to a straight run",
                    observed if ok else "NOT HELD: " + observed + " " + one_line(r.stderr), ok, r.seconds,
                    {"command": r.shell(), "exit": r.rc, "table": table[-3000:], "stderr": r.stderr[-2000:]}))

    # truncated newest checkpoint: copy the straight run, cut its newest checkpoint, resume: falls back, ends equal
    straight = kill_dir / "straight"
    t0 = time.perf_counter()
    if not (straight / "models" / "checkpoints").is_dir():
        rows.append(Row("truncated newest checkpoint falls back to the previous one", "bundle run (pretrain train)",
                        "one warning line, resumes from the previous checkpoint, final weights equal", "NOT RUN: no straight run", False))
        return rows
    reference = torch.load(latest_checkpoint(straight / "models" / "checkpoints"), weights_only=True)["network"]
    resumed = work / "fallback"
    shutil.copytree(straight, resumed)
    folder = resumed / "models" / "checkpoints"
    newest = latest_checkpoint(folder)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    r = run(kl.command(resumed, 6, 2, 3))
    warnings = [line for line in (r.stderr + r.stdout).splitlines() if "unreadable checkpoint" in line]
    final = latest_checkpoint(folder)
    same = False
    if final is not None and final.name == newest.name:
        try:
            weights = torch.load(final, weights_only=True)["network"]
            same = all(torch.equal(weights[k], v) for k, v in reference.items())
        except Exception:  # noqa: BLE001
            same = False
    temps = kl.temporaries(folder)
    ok = r.rc == 0 and len(warnings) == 1 and same and "Traceback" not in r.stderr and not temps
    observed = (f"exit {r.rc}; {len(warnings)} warning line(s): {warnings[0].strip() if warnings else '-'}; "
                f"final {final.name if final else None} weights {'bit-identical' if same else 'DIFFERENT'} to the straight run; "
                f"files now: {sorted(p.name for p in folder.iterdir())}")
    rows.append(Row("truncated newest checkpoint: resume falls back to the previous one", "bundle run (pretrain train)",
                    "exit 0, one warning line, final weights equal to the uninterrupted run",
                    observed if ok else "NOT HELD: " + observed, ok, time.perf_counter() - t0,
                    {"command": " ".join(map(str, kl.command(resumed, 6, 2, 3))), "exit": r.rc, "stderr": r.stderr[-3000:]}))
    return rows


def ddp_hang_case(work: Path, timeout_s: int = 20) -> Row:
    """torchrun 2 CPU workers, CTFM_DDP_TIMEOUT_S=20, SIGSTOP one worker once training has started."""
    import reliability_kill_loop as kl

    root = work / "ddp"
    overrides = {**kl.SMALL, "epoch_length": 200, "max_epochs": 1, "checkpoint_interval": 1000, "bundle_root": root}
    configs = f"['{PRETRAIN / 'configs' / 'train.json'}','{PRETRAIN / 'configs' / 'multi_gpu_train.json'}']"
    argv = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "-m", "monai.bundle", "run",
            "--config_file", configs, *[f"--{k}={v}" for k, v in overrides.items()]]
    env = {**ENV, "CTFM_DDP_TIMEOUT_S": str(timeout_s)}
    log = work / "ddp.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    stopped_at, victim, note = None, None, ""
    try:
        while proc.poll() is None and time.perf_counter() - t0 < 120:
            time.sleep(1)
            kids = _children(proc.pid)
            text = log.read_text(errors="replace")
            # training has started once ignite logs an epoch / iteration (or after 45 s of start-up)
            if len(kids) >= 2 and (re.search(r"Epoch\[|Epoch: |iteration", text) or time.perf_counter() - t0 > 45):
                time.sleep(3)
                victim = kids[-1]
                os.kill(victim, signal.SIGSTOP)
                stopped_at = time.perf_counter()
                break
        if stopped_at is None:
            note = "no worker to stop (job ended or did not start)"
        try:
            rc = proc.wait(timeout=180 if stopped_at else 5)
        except subprocess.TimeoutExpired:
            rc = None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if victim is not None:
            try:
                os.kill(victim, signal.SIGCONT)
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
    ended = time.perf_counter() - (stopped_at or t0)
    text = log.read_text(errors="replace")
    errors = [line[line.index("error: "):][:200] for line in text.splitlines() if "error: " in line]
    budget = timeout_s + 30 + 15  # collective timeout + torchrun's SIGTERM->SIGKILL grace (30 s) + margin
    ok = stopped_at is not None and rc is not None and rc != 0 and ended <= budget
    observed = (f"{note}exit {rc}; ended {ended:.0f} s after SIGSTOP (bound {budget} s = timeout {timeout_s} + grace 30 + 15); "
                f"worker error lines: {errors[:2] or 'none'}")
    return Row(f"DDP hang: torchrun 2 workers, CTFM_DDP_TIMEOUT_S={timeout_s}, SIGSTOP one worker after training starts",
               "torchrun (pretrain multi_gpu_train)", "job ends non-zero within timeout + torchrun grace",
               observed if ok else "NOT HELD: " + observed, ok, time.perf_counter() - t0,
               {"command": " ".join(_quote(a) for a in argv), "exit": rc, "log_tail": text[-4000:]})


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


# ---- report ----


def markdown(rows: list[Row], meta: dict) -> str:
    held = sum(r.held for r in rows)
    lines = [
        "# Reliability suite (CPU)",
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}; total wall {meta['wall_s']:.0f} s.",
        "",
        f"**{held} of {len(rows)} cases held.**",
        "",
        "| # | case | command kind | expected | observed | held | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        obs = r.observed.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {i} | {r.case} | {r.kind} | {r.expected} | {obs} | {'yes' if r.held else '**no**'} | {r.seconds:.1f} |")
    lines.append("")
    bad = [r for r in rows if not r.held]
    if bad:
        lines += ["## Cases that did not hold", ""]
        for r in bad:
            lines += [f"### {r.case}", "", "```", r.details.get("command", ""), f"exit {r.details.get('exit')}",
                      (r.details.get("stderr") or r.details.get("output") or r.details.get("log_tail") or "").strip()[-3000:], "```", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="bundle runs at once (independent cases)")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--skip-kill-loop", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/")
    args = parser.parse_args()
    t_start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ctfm_reliability."))
    work.mkdir(parents=True, exist_ok=True)
    encoder4(work)

    cases = build_bad_inputs(work)
    rows: list[Row] = [good_inputs_case()]
    rows += ct_io_cases(work, cases)
    rows.append(huge_header_case(work))

    tasks = bundle_bad_input_cases(work, cases)
    tasks += [
        ("200 KB flipped/zeroed in a copy of ctfm_segmentation/models/model.pt", "bundle run (segmentation inference, bundle copy)",
         "exit 1, one error line naming model.pt (sha256), output folder empty", lambda: damaged_weights_case(work)),
        ("NaN tensor in a --ckpt_path state dict", "bundle run (pretrain inference)",
         "exit 1, one error line naming the file, output folder empty", lambda: nan_weights_case(work)),
        ('ci/verify_bundle.py on a copy whose large_files.yml has hash_val: "nothex"', "ci/verify_bundle.py",
         "exit 1, names the bad hash_val", lambda: verify_nothex_case(work)),
        ("ci/package_bundle.py on a bundle copy with a symlink inside", "ci/package_bundle.py",
         "exit non-zero naming the symlink, no zip written", lambda: package_symlink_case(work)),
    ]
    tasks += one_line_cases(work)

    def do(task):
        name, kind, expected, thunk = task
        t0 = time.perf_counter()
        try:
            held, observed, details = thunk()
        except Exception as exc:  # noqa: BLE001 - a suite bug is a case that did not run, not a crash
            held, observed, details = False, f"NOT RUN (suite error {type(exc).__name__}: {exc})", {}
        return Row(name, kind, expected, observed, held, time.perf_counter() - t0, details)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows += list(pool.map(do, tasks))
    with ThreadPoolExecutor(max_workers=1) as pool:  # collision runs are sequential by nature
        rows += pool.submit(collision_cases, work).result()

    if not args.skip_kill_loop:
        rows += kill_loop_cases(work)
    if args.skip_ddp:
        rows.append(Row("DDP hang (torchrun, SIGSTOP one worker)", "torchrun", "job ends non-zero within timeout + grace",
                        "SKIPPED (--skip-ddp)", True))
    else:
        rows.append(ddp_hang_case(work))

    wall = time.perf_counter() - t_start
    meta = {"command": "OMP_NUM_THREADS=1 python benchmarks/reliability_suite.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"), "wall_s": round(wall, 1), "workdir": str(work),
            "python": platform.python_version(), "torch": torch.__version__}
    held = sum(r.held for r in rows)
    width = max(len(r.case) for r in rows)
    print(f"{'case':<{width}}  held  observed")
    for r in rows:
        print(f"{r.case:<{width}}  {'yes ' if r.held else 'NO  '}  {r.observed}")
    print(f"\n{held} of {len(rows)} cases held; wall {wall:.0f} s; work folder {work}")
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "reliability_cpu.md").write_text(markdown(rows, meta))
        (RESULTS / "reliability_cpu.json").write_text(json.dumps(
            {**meta, "cases": len(rows), "held": held, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0 if held == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
