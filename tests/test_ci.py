"""The bundle checks in ci/ pass on the real bundles and catch what MONAI and the model zoo would reject."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ci"))
from check_integration import agreement, with_identifiers  # noqa: E402
from package_bundle import package  # noqa: E402
from verify_bundle import verify  # noqa: E402

BUNDLES = sorted(p for p in (ROOT / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_every_bundle_verifies(bundle):
    assert verify(bundle) == []


@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    copy = tmp_path / "ctfm_pretrain"
    shutil.copytree(ROOT / "bundles" / "ctfm_pretrain", copy, ignore=shutil.ignore_patterns("checkpoints", "runs"))
    return copy


def edit_metadata(bundle: Path, change) -> None:
    path = bundle / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def test_version_missing_from_changelog(bundle_copy):
    edit_metadata(bundle_copy, lambda m: m.update(version="9.9.9"))
    assert any("version 9.9.9 is not in changelog" in p for p in verify(bundle_copy))


def test_pred_key_and_schema_fields(bundle_copy):
    def change(meta):
        meta["network_data_format"]["outputs"] = {"embedding": meta["network_data_format"]["outputs"]["pred"]}
        del meta["authors"]

    edit_metadata(bundle_copy, change)
    problems = verify(bundle_copy)
    assert any("outputs has no 'pred'" in p for p in problems)
    assert any("'authors' is a required property" in p for p in problems)


def test_broken_reference_and_missing_file(bundle_copy):
    config = bundle_copy / "configs" / "train.json"
    config.write_text(config.read_text().replace('"@optimizer"', '"@optimiser"', 1))
    (bundle_copy / "docs" / "README.md").unlink()
    problems = verify(bundle_copy)
    assert any("reference @optimiser does not resolve" in p for p in problems)
    assert any("missing docs/README.md" in p for p in problems)


def test_override_config_is_checked_on_its_base(bundle_copy):
    multi = bundle_copy / "configs" / "multi_gpu_train.json"
    multi.write_text(multi.read_text().replace("@train#dataset", "@train#datasett"))
    assert any("multi_gpu_train.json: reference @train#datasett" in p for p in verify(bundle_copy))


def test_package_excludes_training_by_products(bundle_copy, tmp_path):
    (bundle_copy / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (bundle_copy / "models" / "checkpoints" / "checkpoint_iteration=1.pt").write_bytes(b"x")
    archive = package(bundle_copy, tmp_path / "dist")
    assert archive.name == "ctfm_pretrain_v0.1.0.zip"
    names = zipfile.ZipFile(archive).namelist()
    assert "ctfm_pretrain/configs/metadata.json" in names and "ctfm_pretrain/large_files.yml" in names
    assert not [n for n in names if "checkpoints" in n]


def test_cli_exits_non_zero_on_a_bad_bundle(bundle_copy):
    edit_metadata(bundle_copy, lambda m: m.update(version="9.9.9"))
    proc = subprocess.run([sys.executable, str(ROOT / "ci" / "verify_bundle.py"), str(bundle_copy)], capture_output=True, text=True)
    assert proc.returncode == 1 and "9.9.9" in proc.stderr


# ---- check_integration.py: the parts that run without MONAI Label or MONAI Deploy ----


def test_integration_check_fills_the_sample_series_empty_identifiers(tmp_path):
    import pydicom

    from ctfm.sample_data import sample_path

    series = sample_path("example_ct_dicom")
    copy = with_identifiers(series, tmp_path / "study")
    before = {p.name: pydicom.dcmread(p) for p in series.iterdir()}
    after = {p.name: pydicom.dcmread(p) for p in copy.iterdir()}
    assert sorted(after) == sorted(before)
    assert all(d.get("StudyInstanceUID") == "" for d in before.values())  # why the check needs it
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
        assert len({str(d[name].value) for d in after.values()}) == 1 and str(next(iter(after.values()))[name].value)
    assert len({str(d.SOPInstanceUID) for d in after.values()}) == len(after)
    for name, dataset in after.items():
        assert dataset.PixelData == before[name].PixelData and dataset.SeriesNumber == 1
        assert dataset.file_meta.MediaStorageSOPInstanceUID == dataset.SOPInstanceUID


def test_integration_check_compares_label_maps_in_one_orientation(tmp_path):
    import nibabel as nib
    import numpy as np

    labels = np.zeros((6, 5, 4), np.uint8)
    labels[1:3, 2:4, 1:3], labels[4, 0, 0] = 5, 1
    ras = nib.Nifti1Image(labels, np.diag([2.0, 2.0, 3.0, 1.0]))
    lps = nib.Nifti1Image(labels[::-1, ::-1].copy(), ras.affine @ np.array(
        [[-1, 0, 0, 5], [0, -1, 0, 4], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float))
    nib.save(ras, tmp_path / "a.nii.gz"), nib.save(lps, tmp_path / "b.nii.gz")
    assert agreement(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz") == (1.0, labels.size, 2)
    labels[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(labels, ras.affine), tmp_path / "c.nii.gz")
    assert agreement(tmp_path / "c.nii.gz", tmp_path / "b.nii.gz") == (1 - 1 / labels.size, labels.size, 3)
