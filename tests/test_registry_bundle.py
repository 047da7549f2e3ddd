"""End to end through a loopback HTTP registry: publish, list, download with our client (and with MONAI's
``download --url``), then run the downloaded segmentation bundle from another directory: it labels the sample CT
exactly as the bundle in the repository does."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_runs import ENV

from ctfm.registry.client import MARKER
from ctfm.registry.publish import publish

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ci"))
from http_server import serve  # noqa: E402
CT = "example_ct_sm.nii.gz"


def run(cmd, cwd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV, cwd=cwd, **kwargs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def segment(bundle: Path, out: Path, cwd: Path) -> np.ndarray:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle), "--datalist", CT, "--output_dir", str(out), "--write_preview", "False"]
    proc = run(cmd, cwd)
    assert str(bundle / "models" / "model.pt") in proc.stdout + proc.stderr  # its own weights, never a clone's
    return np.asarray(nib.load(str(out / CT.replace(".nii.gz", "_seg.nii.gz"))).dataobj)


def test_a_bundle_downloaded_from_an_http_registry_runs_like_the_repository_one(tmp_path):
    registry = tmp_path / "registry"
    publish(registry)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with serve(registry) as url:
        listed = run([sys.executable, "-m", "ctfm.registry", "list", "--registry", url], elsewhere).stdout
        assert [line.split("\t")[0] for line in listed.splitlines()] == sorted(
            p.parent.parent.name for p in (ROOT / "bundles").glob("*/configs/metadata.json"))
        got = run([sys.executable, "-m", "ctfm.registry", "download", "ctfm_segmentation", "--registry", url,
                   "--bundle_dir", str(tmp_path / "bundles")], elsewhere).stdout.strip()
        index = json.loads((registry / "model_info.json").read_text())
        entry = next(e for e in index.values() if e["name"] == "ctfm_segmentation")
        run([sys.executable, "-m", "monai.bundle", "download", "--name", "ctfm_segmentation", "--url",
             url + entry["source"], "--bundle_dir", str(tmp_path / "monai")], elsewhere)
    downloaded = Path(got)
    assert downloaded == tmp_path / "bundles" / "ctfm_segmentation"
    ours = sorted(p.relative_to(downloaded).as_posix() for p in downloaded.rglob("*") if p.is_file())
    monais = sorted(p.relative_to(tmp_path / "monai" / "ctfm_segmentation").as_posix()
                    for p in (tmp_path / "monai" / "ctfm_segmentation").rglob("*") if p.is_file())
    assert ours == sorted(monais + [MARKER])  # MONAI unpacks the same zip (unverified)
    assert sorted(zipfile.ZipFile(registry / entry["source"]).namelist()) == [f"ctfm_segmentation/{p}" for p in monais]

    labels = segment(downloaded, tmp_path / "out_downloaded", elsewhere)
    reference = segment(ROOT / "bundles" / "ctfm_segmentation", tmp_path / "out_repo", ROOT)
    assert labels.shape == reference.shape and np.array_equal(labels, reference)
    assert len(np.unique(labels)) > 3  # a real label map, not an empty one
    assert not (ROOT / "bundles" / "ctfm_segmentation" / "eval" / CT.replace(".nii.gz", "_seg.nii.gz")).exists()
