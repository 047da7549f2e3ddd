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
