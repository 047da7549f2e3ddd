"""ctfm_retrieval run as a user runs it: extract.json on a folder with a corrupt CT (resumable, also after SIGKILL,
and sharded under torchrun), index.json + query.json for a CT, an id and a region, the command line, probe.json on
the sample CTs and evaluate.json on 3D-MIR / OrganMNIST3D stand-ins, each from a copied bundle in another folder."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ctfm.phantom import body_phantom, write_phantom_nifti
from ctfm.sample_data import sample_path

from bundle_runs import ENV, bundle_runner, error_line  # noqa: E402
from conftest import body_phantoms  # noqa: E402
from test_retrieval import MIR_HEADER, write_organmnist  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "ctfm_retrieval"
#: CT-FM's 3D-MIR recipe without patch overlap on a coarse grid, on the CPU in fp32 (fast, the same on every machine)
FAST = {"overlap": 0.0, "spacing": "[6,4,4]", "device": "$torch.device('cpu')"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A copy of the bundle (no results), as a user has it after a download."""
    copy = tmp_path_factory.mktemp("bundle") / "ctfm_retrieval"
    shutil.copytree(BUNDLE, copy, ignore=shutil.ignore_patterns("eval", "store", "index", "*.onnx*"))
    return copy


@pytest.fixture(scope="module")
def cts(tmp_path_factory) -> Path:
    """The small sample CT, the DICOM series, and a truncated NIfTI."""
    folder = tmp_path_factory.mktemp("cts")
    shutil.copy(sample_path("example_ct_sm.nii.gz"), folder / "small.nii.gz")
    shutil.copytree(sample_path("example_ct_dicom"), folder / "series")
    data = sample_path("example_ct_sm.nii.gz").read_bytes()
    (folder / "corrupt.nii.gz").write_bytes(data[: len(data) // 2])
    return folder


@pytest.fixture(scope="module")
def extracted(bundle, cts):
    """The first extract.json run: the corrupt CT is reported, the two others are stored and merged."""
    run = bundle_runner(bundle / "configs")
    proc = run(["extract.json"], check=False, cwd="/", dataset_dir=cts, **FAST)
    return run, proc


def store_folder(bundle: Path) -> Path:
    (folder,) = [p for p in (bundle / "store").iterdir() if p.is_dir()]
    return folder


def test_extract_reports_the_corrupt_ct_and_stores_the_others(bundle, extracted):
    run, proc = extracted
    line = error_line(proc)
    assert "1 of 3 scans could not be embedded" in line and "corrupt" in line
    store = store_folder(bundle)
    table = pd.read_csv(store / "table.csv")
    assert sorted(table["id"]) == ["series", "small"] and (table["dim"] == 128).all() and (table["n_patches"] > 0).all()
    failed = pd.read_csv(store / "failed.csv")
    assert failed["id"].tolist() == ["corrupt"] and "corrupt.nii.gz" in failed["error"].iloc[0]
    assert sorted(p.name for p in store.glob(".*")) == []  # no temporary left behind


def test_a_rerun_embeds_nothing_new(bundle, cts, extracted):
    run, _ = extracted
    before = {p.name: p.stat().st_mtime_ns for p in store_folder(bundle).glob("*-*.safetensors")}
    again = run(["extract.json"], check=False, cwd="/", dataset_dir=cts, **FAST)
    assert "0 embedded, 2 already stored, 1 failed" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in store_folder(bundle).glob("*-*.safetensors")} == before


def test_killed_mid_run_it_resumes(tmp_path, bundle):
    data = tmp_path / "cts"
    data.mkdir()
    for i in range(3):
        write_phantom_nifti(data / f"body_{i}.nii.gz", tmp_path / f"label_{i}.nii.gz", body_phantom(shape=(48, 48, 24), seed=i))
    store = tmp_path / "store"
    configs = str(bundle / "configs" / "extract.json")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, f"--dataset_dir={data}", f"--store_dir={store}",
           "--overlap=0.0"]  # the 3 mm grid: a scan takes seconds, so the kill lands mid-run
    killed = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 600
    while time.time() < deadline and not list(store.glob("*/*-*.safetensors")) and killed.poll() is None:
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = len(list(store.glob("*/*-*.safetensors")))
    assert 1 <= done <= 3
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{3 - done} embedded, {done} already stored, 0 failed" in proc.stdout
    assert len(pd.read_csv(next(store.glob("*/table.csv")))) == 3


def test_index_and_query_by_ct_id_and_region(bundle, cts, extracted):
    run, _ = extracted
    out = bundle / "eval" / "query"
    for level in ("scan", "patch"):
        proc = run(["extract.json", "index.json"], cwd="/", dataset_dir=cts, index_level=level, **FAST)
        assert f"{level} embeddings of 128 dims, cosine, exact (flat)" in proc.stdout
    run(["extract.json", "query.json"], cwd="/", dataset_dir=cts, query_image=cts / "small.nii.gz", k=2, **FAST)
    hits = pd.read_csv(out / "small_hits.csv")
    assert hits["id"].tolist() == ["series"]  # the stored scan of the query's own file is left out
    assert (out / "small_hits.png").stat().st_size > 10_000
    run(["extract.json", "query.json"], cwd="/", dataset_dir=cts, query_image=cts / "small.nii.gz",
        query_mask=sample_path("example_seg.nii.gz"), query_label=5, k=2, **FAST)
    region = pd.read_csv(out / "small_region_hits.csv")
    assert list(region.columns) == ["rank", "score", "id", "source", "patch", "x_mm", "y_mm", "z_mm"] and len(region) >= 1
    assert set(region["id"]) == {"series"}  # places in the other scans only
    assert (out / "small_region_hits.png").is_file()


def test_command_line_index_info_and_queries(bundle, cts, extracted, tmp_path):
    store = store_folder(bundle)
    cli = [sys.executable, "-m", "ctfm.retrieval"]
    proc = subprocess.run([*cli, "index", str(store), str(tmp_path / "idx"), "--kind", "hnsw"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0 and "2 scan embeddings of 128 dims, cosine, HNSW" in proc.stdout, proc.stderr
    proc = subprocess.run([*cli, "query", str(tmp_path / "idx"), "--store", str(store), "--id", "series", "--out", str(tmp_path / "q")],
                          capture_output=True, text=True, env=ENV, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[1].split(",")[2] == "small" and (tmp_path / "q" / "series_hits.png").is_file()  # itself left out
    settings = ["--set", *[f"{k}={v}" for k, v in FAST.items()]]
    proc = subprocess.run([*cli, "query", str(tmp_path / "idx"), "--bundle", str(bundle), "--image", str(cts / "small.nii.gz"),
                           "--box", "0", "0", "0", "10", "10", "10", *settings], capture_output=True, text=True, env=ENV, cwd="/")
    assert proc.returncode == 1 and "a scan index; a region query needs a patch index" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run([*cli, "query", str(tmp_path / "idx"), "--store", str(store), "--id", "nope"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: ") and "no stored embedding for 'nope'" in proc.stderr


def test_torchrun_shards_then_merges_once(bundle, cts, tmp_path):
    data = tmp_path / "cts"
    data.mkdir()
    for i in range(3):
        write_phantom_nifti(data / f"body_{i}.nii.gz", tmp_path / f"label_{i}.nii.gz", body_phantom(shape=(48, 48, 24), seed=i))
    run = bundle_runner(bundle / "configs")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone")
    proc = run(["extract.json"], runner=torchrun, cwd="/", dataset_dir=data, store_dir=tmp_path / "store", **FAST)
    assert "rank 1" in proc.stderr  # its own progress bar  # the second rank had its own slice
    table = pd.read_csv(next((tmp_path / "store").glob("*/table.csv")))
    assert sorted(table["id"]) == ["body_0", "body_1", "body_2"]


def test_probe_compares_with_a_random_encoder(bundle, tmp_path):
    """probe.json on two body phantoms with their label maps (the sample-CT run is committed under eval/probe/)."""
    items = body_phantoms(tmp_path)
    run = bundle_runner(bundle / "configs")
    run(["extract.json", "probe.json"], cwd="/", probe_data=json.dumps(items), dataset_dir=tmp_path, crops_per_organ=3,
        organs="['liver','spleen','aorta']", search_structures="['heart','liver','spleen']", crop_size="[16,32,32]",
        roi_size="[16,32,32]", min_organ_voxels=20, occlusion_mask="[8,16,16]", **FAST)
    out = bundle / "eval" / "probe"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["encoders"]) == {"pretrained", "random"} and metrics["scans"] == ["body_0", "body_1"]
    for e in metrics["encoders"].values():
        assert e["clustering"]["crops"] == 18 and 0 <= e["clustering"]["nmi"] <= 1
        assert e["semantic_search"]["pairs"] == 4 and e["semantic_search"]["structures_absent"] == ["heart"]
        assert set(e["test_retest_cosine"]) == {"resampled", "shifted", "rotated", "noised", "different scans"}
    for name in ("clustering_tsne.png", "saliency_pretrained.png", "saliency_random.png", "summary.md", "test_retest.csv", "semantic_search.csv"):
        assert (out / name).is_file(), name


def test_evaluate_on_3dmir_and_organmnist_stand_ins(bundle, tmp_path):
    images = tmp_path / "Task03_Liver" / "imagesTr"
    images.mkdir(parents=True)
    lines = MIR_HEADER
    for i, (group, flag) in enumerate([(2, 1), (-1, 0), (3, 1), (-1, 0)]):
        write_phantom_nifti(images / f"liver_{i}.nii.gz", tmp_path / f"label_{i}.nii.gz", body_phantom(shape=(48, 48, 24), seed=10 + i))
        lines += f'liver_{i}.nii.gz,liver,1.0,1,{group},{flag},"c",b,c\n'
    (tmp_path / "liver_labels_and_captions.csv").write_text(lines)
    npz = write_organmnist(tmp_path / "organmnist3d.npz")
    run = bundle_runner(bundle / "configs")
    proc = run(["extract.json", "evaluate.json"], cwd="/", mir_labels=f"['{tmp_path / 'liver_labels_and_captions.csv'}']",
               mir_images_dir=tmp_path, organmnist_npz=npz, store_dir=tmp_path / "store", **FAST)
    table = pd.read_csv(bundle / "eval" / "retrieval" / "metrics.csv")
    assert sorted(set(zip(table["encoder"], table["benchmark"], table["target"]))) == [
        (e, b, t) for e in ("pretrained", "random") for b, t in (("3D-MIR", "lesion_flag"), ("3D-MIR", "lesion_group"), ("OrganMNIST3D", "organ"))]
    assert ((table["P@1"] >= 0) & (table["P@1"] <= 1)).all() and (table.loc[table["benchmark"] == "3D-MIR", "queries"] == 4).all()
    assert "pretrained OrganMNIST3D organ" in proc.stdout and (bundle / "eval" / "retrieval" / "metrics.md").is_file()
    nothing = run(["extract.json", "evaluate.json"], check=False, cwd="/")
    assert "nothing to evaluate" in error_line(nothing)
