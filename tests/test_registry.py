"""The model registry: publish is reproducible and refuses changed versions; download refuses every unsafe or
damaged archive with one line and leaves nothing behind; verify finds what was tampered with."""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

from ctfm.errors import CTFMError
from ctfm.registry import archive
from ctfm.registry.client import MARKER, download, list_bundles, verify
from ctfm.registry.index import INDEX, entry_key, read_index
from ctfm.registry.publish import publish

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ci"))
from http_server import serve  # noqa: E402
BUNDLES = sorted(p.parent.parent.name for p in (ROOT / "bundles").glob("*/configs/metadata.json"))
CTFM_VERSION = __import__("ctfm").__version__


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its sha256."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    """Every bundle of the repository published once (no ci checks: `make test` runs them on the same bundles)."""
    out = tmp_path_factory.mktemp("registry") / "zoo"
    assert publish(out) == [entry_key(n, json.loads((ROOT / "bundles" / n / "configs" / "metadata.json").read_text())["version"]) for n in BUNDLES]
    return out


def registry_copy(registry: Path, dest: Path) -> Path:
    shutil.copytree(registry, dest)
    return dest


# ---- publish


def test_publishing_the_same_commit_again_changes_nothing(registry):
    """The wheel, every zip, large file, page and Hugging Face folder and the index come out byte for byte the same
    (publish would refuse a zip or wheel of the same version with other bytes)."""
    before = tree(registry)
    publish(registry)
    assert tree(registry) == before


def test_another_clone_and_umask_publish_the_same_bytes(registry, tmp_path):
    """A fresh clone of the commit, published by another process under umask 002, gives the same registry: the
    bundles and the wheel are packed as committed, with fixed modes and times."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    script = f"import os; os.umask(0o002); from ctfm.registry.publish import publish; publish({str(tmp_path / 'reg')!r}, project={str(clone)!r})"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert tree(tmp_path / "reg") == tree(registry)


def test_the_index_has_the_model_zoo_shape_and_what_it_lacks(registry):
    index = json.loads((registry / INDEX).read_text())
    assert sorted(e["name"] for e in index.values()) == BUNDLES
    for key, entry in index.items():
        zip_path = registry / entry["source"]
        data = zip_path.read_bytes()
        assert entry["checksum"] == hashlib.md5(data).hexdigest() and entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["size"] == len(data) and key == f"{entry['name']}_v{entry['version']}"
        meta = json.loads(zipfile.ZipFile(zip_path).read(f"{entry['name']}/configs/metadata.json"))
        for field in ("monai_version", "pytorch_version", "numpy_version", "required_packages_version", "optional_packages"):
            assert entry[field] == meta[field]
        assert {f["path"] for f in entry["large_files"]} == {e["path"] for e in archive.large_file_entries(ROOT / "bundles" / entry["name"])}


def test_the_simple_index_serves_the_wheel_the_bundles_pin(registry):
    wheel = registry / "packages" / f"ctfm-{CTFM_VERSION}-py3-none-any.whl"
    page = (registry / "simple" / "ctfm" / "index.html").read_text()
    assert f'href="../../packages/{wheel.name}#sha256={hashlib.sha256(wheel.read_bytes()).hexdigest()}"' in page
    assert 'href="ctfm/"' in (registry / "simple" / "index.html").read_text()
    names = zipfile.ZipFile(wheel).namelist()
    assert "ctfm/registry/client.py" in names and "ctfm/sample_data/example_ct_sm.nii.gz" in names
    assert not [n for n in names if "__pycache__" in n or ".egg-info" in n]
    assert {e["required_packages_version"]["ctfm"] for e in read_index(registry).values()} == {CTFM_VERSION}


def test_the_hugging_face_folder_is_the_bundle_with_a_model_card(registry):
    for name in BUNDLES:
        folder = registry / "huggingface" / name
        zipped = zipfile.ZipFile(next((registry / "bundles").glob(f"{name}_v*.zip")))
        for member in zipped.namelist():
            assert (folder / member.split("/", 1)[1]).read_bytes() == zipped.read(member)
        card = (folder / "README.md").read_text()
        meta = json.loads((folder / "configs" / "metadata.json").read_text())
        assert card.startswith("---\nlibrary_name: monai\nlicense: mit\n") and f"| version | {meta['version']} |" in card
        assert "*.pt filter=lfs" in (folder / ".gitattributes").read_text()


def test_a_version_cannot_be_published_twice_with_other_content(registry, tmp_path):
    reg = registry_copy(registry, tmp_path / "reg")
    before = tree(reg)
    bundle = tmp_path / "bundles" / "ctfm_segmentation"
    shutil.copytree(ROOT / "bundles" / "ctfm_segmentation", bundle, ignore=shutil.ignore_patterns("eval", "runs"))
    (bundle / "docs" / "README.md").write_text("changed without a new version\n")
    with pytest.raises(CTFMError, match="already published with other content; bump the version"):
        publish(reg, [bundle])
    assert tree(reg) == before
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    old = meta["version"]
    meta["version"], meta["changelog"] = "9.0.0", {"9.0.0": "new docs", **meta["changelog"]}
    meta_path.write_text(json.dumps(meta))
    assert publish(reg, [bundle]) == ["ctfm_segmentation_v9.0.0"]
    listed = list_bundles(reg)["ctfm_segmentation"]
    assert [e["version"] for e in listed] == [old, "9.0.0"]
    assert (reg / "bundles" / f"ctfm_segmentation_v{old}.zip").read_bytes() == (registry / "bundles" / f"ctfm_segmentation_v{old}.zip").read_bytes()
    assert download("ctfm_segmentation", reg, tmp_path / "new").version == "9.0.0"
    assert download("ctfm_segmentation", reg, tmp_path / "old", version=old).version == old
    assert verify(reg) == []


def test_a_bundle_pinning_a_ctfm_the_registry_does_not_serve_is_refused(registry, tmp_path):
    reg = registry_copy(registry, tmp_path / "reg")
    bundle = tmp_path / "ctfm_triage"
    shutil.copytree(ROOT / "bundles" / "ctfm_triage", bundle, ignore=shutil.ignore_patterns("eval", "runs", "cache"))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    meta["required_packages_version"]["ctfm"] = "0.0.1"
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CTFMError, match=f"requires ctfm 0.0.1, but the registry serves ctfm {CTFM_VERSION}"):
        publish(reg, [bundle])


def test_large_files_present_are_hosted_and_checked(registry, tmp_path):
    """After `download_large_files`, the published weights sit in the bundle: the registry hosts them, download
    fetches them with their sha256 checked, and a damaged hosted copy is refused."""
    reg = registry_copy(registry, tmp_path / "reg")
    bundle = tmp_path / "ctfm_pretrain"
    shutil.copytree(ROOT / "bundles" / "ctfm_pretrain", bundle, ignore=shutil.ignore_patterns("eval", "runs", "checkpoints"))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    meta["version"], meta["changelog"] = "9.0.0", {"9.0.0": "large files", **meta["changelog"]}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    weights = bundle / "models" / "ct_fm_feature_extractor" / "config.json"
    weights.parent.mkdir(parents=True)
    weights.write_text('{"init_filters": 32}')
    publish(reg, [bundle])
    entry = read_index(reg)["ctfm_pretrain_v9.0.0"]
    hosted = [f for f in entry["large_files"] if f["hosted"]]
    assert [f["path"] for f in hosted] == ["models/ct_fm_feature_extractor/config.json"]
    assert "ctfm_pretrain/models/ct_fm_feature_extractor/config.json" not in zipfile.ZipFile(reg / entry["source"]).namelist()
    got = download("ctfm_pretrain", reg, tmp_path / "dl")
    assert (got.path / "models/ct_fm_feature_extractor/config.json").read_bytes() == weights.read_bytes()
    assert "models/ct_fm_feature_extractor/model.safetensors" in got.not_fetched
    (reg / hosted[0]["source"]).write_text('{"init_filters": 64}')
    with pytest.raises(CTFMError, match="tampered or damaged large file"):
        download("ctfm_pretrain", reg, tmp_path / "dl2")
    assert not (tmp_path / "dl2").exists()  # nor the folder it made for it
    assert any("large file" in p for p in verify(reg))


def test_a_large_file_whose_hash_differs_from_large_files_yml_is_not_published(tmp_path, registry):
    reg = registry_copy(registry, tmp_path / "reg")
    bundle = tmp_path / "ctfm_triage"
    shutil.copytree(ROOT / "bundles" / "ctfm_triage", bundle, ignore=shutil.ignore_patterns("eval", "runs", "cache"))
    yml = bundle / "large_files.yml"
    yml.write_text(yml.read_text().replace('hash_val: ""', 'hash_val: "' + "0" * 64 + '"', 1))
    (bundle / "models" / "ct_fm_feature_extractor").mkdir(parents=True)
    (bundle / "models" / "ct_fm_feature_extractor" / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(CTFMError, match="differs from large_files.yml's 0000"):
        publish(reg, [bundle])


# ---- download over HTTP; verify


def test_download_over_http_unpacks_every_bundle_as_published(registry, tmp_path):
    with serve(registry) as url:
        assert sorted(list_bundles(url)) == BUNDLES
        got = {name: download(name, url, tmp_path / "dl") for name in BUNDLES}
        assert verify(url) == []
    index = read_index(registry)
    for name, done in got.items():
        zipped = zipfile.ZipFile(registry / index[entry_key(name, done.version)]["source"])
        files = sorted(p.relative_to(done.path).as_posix() for p in done.path.rglob("*") if p.is_file())
        assert files == sorted([m.split("/", 1)[1] for m in zipped.namelist()] + [MARKER])
        assert all((done.path / m.split("/", 1)[1]).read_bytes() == zipped.read(m) for m in zipped.namelist())
        assert json.loads((done.path / MARKER).read_text())["sha256"] == index[entry_key(name, done.version)]["sha256"]
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == BUNDLES  # no temporaries left


def test_an_existing_bundle_folder_is_never_overwritten(registry, tmp_path):
    target = tmp_path / "dl" / "ctfm_triage"
    (target / "eval").mkdir(parents=True)
    (target / "eval" / "mine.csv").write_text("a user's results")
    with pytest.raises(CTFMError, match=r"ctfm_triage: exists \(not from this registry\); remove it or choose another --bundle_dir"):
        download("ctfm_triage", registry, tmp_path / "dl")
    assert tree(tmp_path / "dl") == {"ctfm_triage/eval/mine.csv": hashlib.sha256(b"a user's results").hexdigest()}
    first = download("ctfm_triage", registry, tmp_path / "other")
    again = download("ctfm_triage", registry, tmp_path / "other")
    assert again.already_there and again.path == first.path


def test_verify_finds_a_tampered_zip_and_a_wrong_index_hash(registry, tmp_path):
    reg = registry_copy(registry, tmp_path / "reg")
    index = json.loads((reg / INDEX).read_text())
    seg, tri = (next(k for k in index if k.startswith(n)) for n in ("ctfm_segmentation", "ctfm_triage"))
    data = bytearray((reg / index[seg]["source"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (reg / index[seg]["source"]).write_bytes(bytes(data))
    index[tri]["sha256"] = "f" * 64
    (reg / INDEX).write_text(json.dumps(index))
    problems = verify(reg)
    assert len(problems) == 2 and all("tampered or damaged bundle zip" in p for p in problems)
    for name in ("ctfm_segmentation", "ctfm_triage"):
        with pytest.raises(CTFMError, match="differs from the index's .*: tampered or damaged bundle zip; nothing unpacked"):
            download(name, reg, tmp_path / "dl")
    assert not (tmp_path / "dl").exists()


# ---- unsafe archives, on crafted registries


def crafted_registry(folder: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]], name: str = "evil") -> Path:
    """A registry holding one bundle zip with exactly ``members``; the index matches the zip (hash and size), so
    that only the member checks can refuse it."""
    zip_path = folder / "bundles" / f"{name}_v1.0.0.zip"
    zip_path.parent.mkdir(parents=True)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of a duplicate name, which is the point of one case
        z.writestr(f"{name}/configs/metadata.json", json.dumps({"version": "1.0.0"}))
        for info, data in members:
            z.writestr(info, data)
    data = zip_path.read_bytes()
    index = {f"{name}_v1.0.0": {"name": name, "version": "1.0.0", "source": f"bundles/{zip_path.name}",
                                 "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "large_files": []}}
    (folder / INDEX).write_text(json.dumps(index))
    return folder


def symlink_member(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


UNSAFE = {
    "zip-slip": ([("evil/../../escaped.txt", b"outside")], "is outside its folder"),
    "absolute path": ([("/tmp/escaped_absolute.txt", b"outside")], "absolute or non-POSIX path"),
    "backslash": ([("evil\\..\\escaped.txt", b"outside")], "absolute or non-POSIX path"),
    "outside the bundle folder": ([("other/configs/inference.json", b"{}")], "is not under the bundle folder evil/"),
    "symlink": ([(symlink_member("evil/models/model.pt", "/etc/passwd"), b"/etc/passwd")], "is a symlink"),
    "duplicate": ([("evil/a.txt", b"1"), ("evil/a.txt", b"2")], "appears twice"),
    "zip bomb": ([("evil/models/zeros.bin", bytes(64 << 20))], "a zip bomb"),
    "file and folder": ([("evil/models", b"a file"), ("evil/models/model.pt", b"weights")], "is both a file and a folder"),
    "case collision": ([("evil/Model.pt", b"1"), ("evil/model.pt", b"2")], "appears twice"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archives_are_refused_and_leave_nothing(case, tmp_path):
    members, message = UNSAFE[case]
    reg = crafted_registry(tmp_path / "reg", members)
    dest = tmp_path / "dest" / "bundles"
    with pytest.raises(CTFMError, match=message) as refused:
        download("evil", reg, dest)
    assert "\n" not in str(refused.value) and str(reg / "bundles" / "evil_v1.0.0.zip") in str(refused.value)
    assert not (tmp_path / "dest").exists()  # no bundle folder, no temporary, not the folders made for them
    assert not list(tmp_path.rglob("escaped*")) and not Path("/tmp/escaped_absolute.txt").exists()
    assert any(message in p for p in verify(reg))


def test_a_member_that_inflates_beyond_its_declared_size_stops_there(tmp_path):
    """The header's sizes can lie: zipfile stops at the declared size, then fails the CRC."""
    reg = crafted_registry(tmp_path / "reg", [("evil/data.bin", b"x" * 4096)])
    zip_path = reg / "bundles" / "evil_v1.0.0.zip"
    data = bytearray(zip_path.read_bytes())
    with zipfile.ZipFile(zip_path) as z:
        info = z.getinfo("evil/data.bin")
    # shrink the declared size (central directory and local header) to 16 bytes
    for offset in (i for i in range(len(data) - 4) if data[i:i + 4] in (b"PK\x01\x02", b"PK\x03\x04")):
        field = offset + (24 if data[offset + 2] == 1 else 22)
        if int.from_bytes(data[field:field + 4], "little") == info.file_size:
            data[field:field + 4] = (16).to_bytes(4, "little")
    zip_path.write_bytes(bytes(data))
    index = json.loads((reg / INDEX).read_text())
    index["evil_v1.0.0"].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (reg / INDEX).write_text(json.dumps(index))
    with pytest.raises(CTFMError, match="not a readable zip"):
        download("evil", reg, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_the_command_line_refuses_in_one_line(tmp_path):
    reg = crafted_registry(tmp_path / "reg", UNSAFE["zip-slip"][0])
    cmd = [sys.executable, "-m", "ctfm.registry", "download", "evil", "--bundle_dir", str(tmp_path / "dest")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CTFM_REGISTRY": str(reg)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {reg / 'bundles' / 'evil_v1.0.0.zip'}: member 'evil/../../escaped.txt' is outside its folder ('..' or an empty part)"]
    assert not (tmp_path / "dest").exists()
    proc = subprocess.run([sys.executable, "-m", "ctfm.registry", "list"], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "CTFM_REGISTRY"})
    assert proc.returncode == 1 and proc.stderr.strip() == "error: no registry: pass --registry URL_OR_DIR or set CTFM_REGISTRY"


def test_the_integration_check_takes_its_bundle_from_a_registry_download(registry, tmp_path, monkeypatch):
    from check_integration import BUNDLE, from_registry

    monkeypatch.setenv("CTFM_REGISTRY", str(registry))
    bundle = from_registry(None, tmp_path)
    assert bundle == tmp_path / "bundles" / BUNDLE and (bundle / "configs" / "inference.json").is_file()
    assert json.loads((bundle / MARKER).read_text())["registry"] == str(registry)


def test_an_index_cannot_point_outside_the_registry_or_over_the_zip(tmp_path):
    """The index is data from the server: sources must lie inside the registry, and a large file may not replace a
    member of the checked zip (or the marker)."""
    reg = crafted_registry(tmp_path / "reg", [("evil/configs/inference.json", b"{}")])
    index = json.loads((reg / INDEX).read_text())
    (reg / "files").mkdir()
    (reg / "files" / "meta.json").write_text('{"version": "6.6.6"}')
    digest = hashlib.sha256(b'{"version": "6.6.6"}').hexdigest()
    cases = {
        "source": ({"source": "/etc/hostname"}, "not a path inside the registry"),
        "url source": ({"source": "file:///etc/hostname"}, "not a path inside the registry"),
        "large path": ({"large_files": [{"path": "../x", "hosted": False}]}, "whose path is not inside the bundle"),
        "large source": ({"large_files": [{"path": "models/x", "hosted": True, "source": "/etc/hostname",
                                           "sha256": digest, "size": 20}]}, "without a source inside the registry"),
        "over the zip": ({"large_files": [{"path": "configs/metadata.json", "hosted": True, "source": "files/meta.json",
                                           "sha256": digest, "size": 20}]}, "would replace a file of the bundle zip"),
        "over the marker": ({"large_files": [{"path": MARKER, "hosted": True, "source": "files/meta.json",
                                              "sha256": digest, "size": 20}]}, "would replace a file of the bundle zip"),
    }
    for case, (change, message) in cases.items():
        (reg / INDEX).write_text(json.dumps({k: {**v, **change} for k, v in index.items()}))
        with pytest.raises(CTFMError, match=message):
            download("evil", reg, tmp_path / "dest" / case)
        assert not (tmp_path / "dest").exists(), case  # not even the bundle_dir it would have created
