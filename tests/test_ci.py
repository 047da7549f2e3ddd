"""The bundle checks in ci/ pass on the real bundles and catch what MONAI and the model zoo would reject."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ci"))
from check_integration import agreement, with_identifiers  # noqa: E402
from ctfm.registry.archive import ZIP_DATE_TIME  # noqa: E402
import verify_bundle  # noqa: E402
from package_bundle import package  # noqa: E402
from verify_bundle import (  # noqa: E402
    SCHEMAS,
    check_large_files,
    check_metadata,
    monai_verify_metadata,
    spatial_dims,
    verify,
)

PRETRAIN_VERSION = json.loads((ROOT / "bundles" / "ctfm_pretrain" / "configs" / "metadata.json").read_text())["version"]
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
    assert archive.name == f"ctfm_pretrain_v{PRETRAIN_VERSION}.zip"
    names = zipfile.ZipFile(archive).namelist()
    assert "ctfm_pretrain/configs/metadata.json" in names and "ctfm_pretrain/large_files.yml" in names
    assert not [n for n in names if "checkpoints" in n]


def test_cli_exits_non_zero_on_a_bad_bundle(bundle_copy):
    edit_metadata(bundle_copy, lambda m: m.update(version="9.9.9"))
    proc = subprocess.run([sys.executable, str(ROOT / "ci" / "verify_bundle.py"), str(bundle_copy)], capture_output=True, text=True)
    assert proc.returncode == 1 and "9.9.9" in proc.stderr


# ---- the real metadata schema, offline


def test_stored_schema_is_the_recorded_file():
    (name, sha256), = SCHEMAS.items()
    path = ROOT / "ci" / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    assert sha256 in (ROOT / "ci" / "SCHEMAS.md").read_text()
    assert json.loads(path.read_text())["$schema"] == "https://json-schema.org/draft/2019-09/schema"
    assert not (ROOT / "ci" / "meta_schema.json").exists()  # the hand-written approximation is gone


def test_real_schema_violations_are_found(bundle_copy):
    def change(meta):
        del meta["copyright"]  # required by meta_schema_20240725
        meta["references"] = "one string"  # the schema wants an array of strings
        meta["network_data_format"]["inputs"]["image"]["num_channels"] = "one"

    edit_metadata(bundle_copy, change)
    problems = check_metadata(bundle_copy)
    assert any("'copyright' is a required property" in p for p in problems)
    assert any("$.references: 'one string' is not of type 'array'" in p for p in problems)
    assert any("$.network_data_format.inputs.image" in p for p in problems)  # not a number/string/tensor (anyOf)
    assert any("num_channels 'one' is not a positive int" in p for p in problems)


def test_schema_url_must_name_a_stored_schema(bundle_copy):
    edit_metadata(bundle_copy, lambda m: m.update(schema="https://example.org/meta_schema_20990101.json"))
    assert any("is not one stored in ci/" in p for p in check_metadata(bundle_copy))
    edit_metadata(bundle_copy, lambda m: m.update(schema="https://project-monai.github.io/schema/meta_schema_20240725.json"))
    assert not [p for p in check_metadata(bundle_copy) if "schema" in p]


def test_monai_verify_metadata_runs_offline(tmp_path):
    bundle = tmp_path / "ctfm_pretrain"
    (bundle / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "bundles" / "ctfm_pretrain" / "configs" / "metadata.json", bundle / "configs")
    assert monai_verify_metadata(bundle) == []  # its proxy refuses connections: this passed without a download
    edit_metadata(bundle, lambda m: m.pop("authors"))
    (problem,) = monai_verify_metadata(bundle)
    assert "monai.bundle verify_metadata failed" in problem and "'authors' is a required property" in problem


def test_spatial_shape_expressions():
    assert spatial_dims(["16*n", 8, "2**p", "*", "32**p*n"], n=2, p=3, any_=5) == (32, 8, 8, 5, 32768 * 2)
    for bad in (["16*m"], ["__import__('os')"], [1.5], ["16/n"], ["n-1"]):
        with pytest.raises((ValueError, SyntaxError)):
            spatial_dims(bad, n=1, p=1)


def test_bad_data_format_is_found(bundle_copy):
    def change(meta):
        meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = ["16*m", 16, 16]
        meta["network_data_format"]["outputs"]["pred"]["dtype"] = "complex-ish"

    edit_metadata(bundle_copy, change)
    problems = check_metadata(bundle_copy)
    assert any("inputs.image.spatial_shape ['16*m', 16, 16]" in p for p in problems)
    assert any("outputs.pred.dtype 'complex-ish'" in p for p in problems)


def test_full_checks_stay_out_of_the_default_path(tmp_path, monkeypatch):
    bundle = tmp_path / "ctfm_pretrain"
    (bundle / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "bundles" / "ctfm_pretrain" / "configs" / "metadata.json", bundle / "configs")
    calls = []
    monkeypatch.setattr(verify_bundle, "FULL_CHECKS", (lambda b: calls.append(b) or ["full check ran"],))
    assert "full check ran" not in verify(bundle)
    assert not calls
    assert "full check ran" in verify(bundle, full=True) and calls == [bundle]


# ---- large_files.yml


def write_large_files(bundle: Path, entries: list[dict]) -> None:
    import yaml

    (bundle / "large_files.yml").write_text(yaml.safe_dump({"large_files": entries}))


def test_large_files_hash_val_must_be_a_digest_of_its_type(bundle_copy):
    url = "https://huggingface.co/x/y/resolve/main/"
    ok = [
        {"path": "models/a.bin", "url": url + "a", "hash_val": "", "hash_type": "sha256"},
        {"path": "models/b.bin", "url": url + "b", "hash_val": hashlib.md5(b"b").hexdigest(), "hash_type": "md5"},
        {"path": "models/c.bin", "url": url + "c", "hash_val": hashlib.sha1(b"c").hexdigest(), "hash_type": "SHA1"},
        {"path": "models/d.bin", "url": url + "d", "hash_val": hashlib.sha256(b"d").hexdigest(), "hash_type": "sha256"},
    ]
    write_large_files(bundle_copy, ok)
    assert check_large_files(bundle_copy) == []
    bad = [
        {"path": "models/e.bin", "url": url + "e", "hash_val": "nothex", "hash_type": "sha256"},
        {"path": "models/f.bin", "url": url + "f", "hash_val": hashlib.md5(b"f").hexdigest(), "hash_type": "sha256"},
        {"path": "models/g.bin", "url": url + "g", "hash_val": "", "hash_type": "crc32"},
        {"path": "models/h.bin", "url": url + "h", "hash_val": hashlib.sha256(b"h").hexdigest().upper(), "hash_type": "sha256"},
        {"path": "../outside.bin", "url": "ftp://example.org/i", "hash_val": "", "hash_type": "md5"},
        {"path": "models/j.bin", "url": url + "j", "hash_type": "md5"},
    ]
    write_large_files(bundle_copy, ok + bad)
    problems = check_large_files(bundle_copy)
    assert len(problems) == 7, problems
    assert any("models/e.bin: hash_val 'nothex' is not a hex digest" in p for p in problems)
    assert any("models/f.bin: hash_val has 32 hex digits, a sha256 digest has 64" in p for p in problems)
    assert any("models/g.bin: hash_type 'crc32' is not one MONAI supports" in p for p in problems)
    assert any("models/h.bin: hash_val must be lower case" in p for p in problems)
    assert any("../outside.bin: path must be relative and inside the bundle" in p for p in problems)
    assert any("url 'ftp://example.org/i' is not http(s)" in p for p in problems)
    assert any("models/j.bin lacks hash_val" in p for p in problems)
    assert any("hash_val 'nothex'" in p for p in verify(bundle_copy))


# ---- reproducible packaging


def small_bundle_copy(dest: Path, mtime: float, reverse: bool) -> Path:
    """ctfm_pretrain without its weights (a small stand-in), files created in either order, all at ``mtime``."""
    bundle = dest / "ctfm_pretrain"
    shutil.copytree(ROOT / "bundles" / "ctfm_pretrain", bundle, ignore=shutil.ignore_patterns("models", "checkpoints", "runs"))
    names = ["models/model.pt", "models/encoder_hf/config.json", "models/encoder_hf/model.safetensors", "scripts/run.sh"]
    for name in reversed(names) if reverse else names:
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_bytes(name.encode() * 100)
    (bundle / "scripts" / "run.sh").chmod(0o755 if reverse else 0o775)
    if not reverse:  # exports git ignores, present in one working tree only
        (bundle / "models" / "model_embedding.onnx").write_bytes(b"onnx")
        (bundle / "models" / "model.ts").write_bytes(b"ts")
    (bundle / "LICENSE").chmod(0o600 if reverse else 0o664)
    for path in [bundle, *bundle.rglob("*")]:
        os.utime(path, (mtime, mtime))
    return bundle


def test_package_is_byte_for_byte_reproducible(tmp_path):
    first = package(small_bundle_copy(tmp_path / "a", 1_000_000_000, False), tmp_path / "dist_a", check=False)
    second = package(small_bundle_copy(tmp_path / "b", 1_700_000_000, True), tmp_path / "dist_b", check=False)
    assert first.name == second.name == f"ctfm_pretrain_v{PRETRAIN_VERSION}.zip"
    assert hashlib.sha256(first.read_bytes()).hexdigest() == hashlib.sha256(second.read_bytes()).hexdigest()
    infos = zipfile.ZipFile(first).infolist()
    names = [i.filename for i in infos]
    assert names == sorted(names) and not [n for n in names if n.endswith("/")]
    assert "ctfm_pretrain/scripts/run.sh" in names and "ctfm_pretrain/configs/metadata.json" in names
    for info in infos:
        assert info.date_time == ZIP_DATE_TIME and info.compress_type == zipfile.ZIP_DEFLATED and info.extra == b""
        assert info.external_attr >> 16 == (0o100755 if info.filename.endswith("run.sh") else 0o100644), info.filename


def test_package_prints_the_sha256(tmp_path, capsys, monkeypatch):
    """``package_bundle.py`` prints ``<sha256>  <zip>``, the format ``sha256sum -c`` checks."""
    import package_bundle

    bundle = small_bundle_copy(tmp_path / "a", 1_000_000_000, False)
    monkeypatch.setattr(package_bundle, "package", lambda b, out: package(b, out, check=False))
    assert package_bundle.main([str(bundle), "--out", str(tmp_path / "dist")]) == 0
    digest, archive = capsys.readouterr().out.split()
    assert digest == hashlib.sha256(Path(archive).read_bytes()).hexdigest()


def test_symlinks_in_a_bundle_are_refused(tmp_path):
    bundle = small_bundle_copy(tmp_path / "a", 1_000_000_000, False)
    outside = tmp_path / "secret.txt"
    outside.write_text("not part of the bundle")
    (bundle / "docs" / "extra.md").symlink_to(outside)
    (bundle / "models" / "linked").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(SystemExit) as refused:
        package(bundle, tmp_path / "dist", check=False)
    message = str(refused.value)
    assert f"{bundle / 'docs' / 'extra.md'}: symlink inside the bundle" in message
    assert f"{bundle / 'models' / 'linked'}: symlink inside the bundle" in message
    assert not (tmp_path / "dist" / f"ctfm_pretrain_v{PRETRAIN_VERSION}.zip").exists()
    assert any("docs/extra.md: symlink inside the bundle" in p for p in verify(bundle))


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


def test_package_leaves_out_what_large_files_yml_lists(tmp_path):
    """After `monai.bundle download_large_files` the published weights sit in models/<name>/: the zip leaves them to
    the registry's large_files.yml instead of packing hundreds of MB."""
    bundle = small_bundle_copy(tmp_path / "a", 1_000_000_000, False)
    downloaded = bundle / "models" / "ct_fm_feature_extractor" / "model.safetensors"
    downloaded.parent.mkdir(parents=True)
    downloaded.write_bytes(b"published weights")
    names = zipfile.ZipFile(package(bundle, tmp_path / "dist", check=False)).namelist()
    assert "ctfm_pretrain/large_files.yml" in names and "ctfm_pretrain/models/model.pt" in names
    assert not [n for n in names if "ct_fm_feature_extractor" in n]


# ---- declared packages (ci/check_packages.py)


def test_every_package_the_code_imports_must_be_declared(bundle_copy):
    from check_packages import check_packages, imported_distributions

    always, sometimes = imported_distributions(bundle_copy)
    assert {"onnxruntime-gpu", "nibabel", "safetensors"} <= always  # imported whenever ctfm.export / ct_io load
    assert {"idc-index-data", "pyarrow"} <= sometimes  # only `python -m ctfm.pretrain.idc_manifest`
    assert check_packages(bundle_copy) == []

    def drop(meta):
        del meta["required_packages_version"]["onnxruntime-gpu"]
        del meta["optional_packages"]["python -m ctfm.pretrain.idc_manifest"]

    edit_metadata(bundle_copy, drop)
    meta_path = bundle_copy / "configs" / "metadata.json"
    assert check_packages(bundle_copy) == [
        f"{meta_path}: required_packages_version lacks onnxruntime-gpu, which the bundle's code imports at load time",
        f"{meta_path}: neither required_packages_version nor optional_packages names idc-index-data, which the bundle's code can import",
    ]  # (pyarrow, imported there too, comes with mlflow, an optional package)


def test_optional_packages_version_is_refused_and_ctfm_must_be_the_built_version(bundle_copy):
    def change(meta):
        meta["optional_packages_version"] = {"tensorrt": "10.3.0"}
        meta["required_packages_version"]["ctfm"] = "0.0.1"
        meta["optional_packages"]["configs/inference_trt.json"]["tensorrt"] = "latest"

    edit_metadata(bundle_copy, change)
    problems = check_metadata(bundle_copy)
    assert any("optional_packages_version is MONAI's deprecated name of required_packages_version" in p for p in problems)
    assert any("requires ctfm 0.0.1, but this repository builds ctfm" in p for p in problems)
    assert any("tensorrt 'latest' is neither a version nor a version range" in p for p in problems)
