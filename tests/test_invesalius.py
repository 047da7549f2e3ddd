"""ctfm.invesalius: InVesalius projects read as RAS HU, unsafe archives refused, the real CT fetched and checked.

The unit tests build tiny synthetic projects (a gzipped tar with a ``main.plist`` of the real file's keys and a raw
int16 volume). The real CT (GPL-2, never stored in the repository) is fetched by the slow test into the cache,
and that test is skipped when ``apt-get download`` cannot run here.
"""

import hashlib
import io
import os
import plistlib
import subprocess
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from ctfm import invesalius
from ctfm.errors import CTFMError
from ctfm.invesalius import CRANIUM_MEMBER, CRANIUM_SHA256, fetch_cranium, read_inv3, write_cranium_nifti

FOLDER = "tmpabcdef"


def project_plist(shape=(4, 5, 6), dtype="int16", spacing=(0.8, 0.8, 2.0), **overrides) -> dict:
    """A main.plist with the keys the real Cranium.inv3 has (values of a tiny test volume)."""
    plist = {
        "annotations": {},
        "date": "2024-01-01T00:00:00.000000",
        "format_version": 1,
        "invesalius_version": "test",
        "masks": {},
        "matrix": {"dtype": dtype, "filename": "matrix.dat", "shape": list(shape)},
        "measurements": "measurements.plist",
        "modality": "CT",
        "name": "synthetic",
        "orientation": 1,
        "scalar_range": [-1024, 3000],
        "spacing": list(spacing),
        "surfaces": {},
        "window_level": 40.0,
        "window_width": 80.0,
    }
    plist.update(overrides)
    return plist


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind=tarfile.REGTYPE, target: str = "", size=None):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def make_inv3(path: Path, volume=None, plist=None, raw=None, extra=()) -> Path:
    """Write a synthetic project: ``volume`` (slice, row, column) int16, its plist, optional extra members."""
    if volume is None:
        volume = np.arange(4 * 5 * 6, dtype="<i2").reshape(4, 5, 6)
    if plist is None:
        plist = project_plist(shape=volume.shape)
    with tarfile.open(path, "w:gz") as tar:
        add_member(tar, f"{FOLDER}/main.plist", plistlib.dumps(plist))
        add_member(tar, f"{FOLDER}/matrix.dat", volume.astype("<i2").tobytes() if raw is None else raw)
        add_member(tar, f"{FOLDER}/measurements.plist", plistlib.dumps({}))
        for args in extra:
            add_member(tar, *args)
    return path


def test_reads_the_volume_in_ras_order_with_a_centred_diagonal_affine(tmp_path):
    volume = np.full((4, 5, 6), -1000, "<i2")  # (slice, row, column)
    volume[1, 2, 3] = 500  # a marker
    volume[3, 0, 0] = 7  # the last slice, first row, first column
    image, affine = read_inv3(make_inv3(tmp_path / "p.inv3", volume))
    assert image.shape == (6, 5, 4) and image.dtype == np.float32 and image.flags.c_contiguous
    assert image[6 - 1 - 3, 2, 1] == 500  # columns reversed (towards the right), rows and slices as stored
    assert image[5, 0, 3] == 7
    assert (image == 500).sum() == 1
    np.testing.assert_allclose(np.diag(affine), [0.8, 0.8, 2.0, 1.0])
    np.testing.assert_allclose(affine[:3, :3] @ ((np.array(image.shape) - 1) / 2) + affine[:3, 3], 0.0)
    assert "".join(nib.orientations.aff2axcodes(affine)) == "RAS"


def test_world_directions_of_the_stored_axes(tmp_path):
    """Higher column -> patient's left (smaller x), higher row -> anterior, higher slice -> superior."""
    volume = np.zeros((3, 3, 3), "<i2")
    _, affine = read_inv3(make_inv3(tmp_path / "p.inv3", volume))

    def world(slice_, row, column):
        ijk = np.array([3 - 1 - column, row, slice_])
        return affine[:3, :3] @ ijk + affine[:3, 3]

    base = world(1, 1, 1)
    assert world(1, 1, 2)[0] < base[0]
    assert world(1, 2, 1)[1] > base[1]
    assert world(2, 1, 1)[2] > base[2]


def test_nifti_round_trip_keeps_orientation(tmp_path):
    volume = np.zeros((4, 5, 6), "<i2")
    volume[0, 4, 5] = 100  # inferior, anterior, left
    image, affine = read_inv3(make_inv3(tmp_path / "p.inv3", volume))
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "p.nii.gz")
    loaded = nib.load(tmp_path / "p.nii.gz")
    ijk = np.argwhere(np.asarray(loaded.dataobj) == 100)[0]
    x, y, z = nib.affines.apply_affine(loaded.affine, ijk)
    assert x < 0 and y > 0 and z < 0


def test_other_members_are_ignored(tmp_path):
    extra = [
        (f"{FOLDER}/mask_0.dat", b"\x00" * 100),
        (f"{FOLDER}/surface_0.vtp", b"<VTKFile/>"),
        (f"{FOLDER}/sub", b"", tarfile.DIRTYPE),
    ]
    image, _ = read_inv3(make_inv3(tmp_path / "p.inv3", extra=extra))
    assert image.shape == (6, 5, 4)


def one_line_error(path, match):
    with pytest.raises(CTFMError, match=match) as info:
        read_inv3(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize(
    "extra, match",
    [
        ([("../evil", b"x")], "unsafe member name '../evil'"),
        ([(f"{FOLDER}/../../evil", b"x")], "unsafe member name"),
        ([("/etc/evil", b"x")], "unsafe member name '/etc/evil'"),
        ([(f"{FOLDER}/link", b"", tarfile.SYMTYPE, "/etc/passwd")], "link member"),
        ([(f"{FOLDER}/hard", b"", tarfile.LNKTYPE, f"{FOLDER}/matrix.dat")], "link member"),
        ([(f"{FOLDER}/fifo", b"", tarfile.FIFOTYPE)], "special file member"),
        ([(f"{FOLDER}/matrix.dat", b"\0" * 240)], "twice"),
    ],
)
def test_refuses_unsafe_archives(tmp_path, extra, match):
    one_line_error(make_inv3(tmp_path / "p.inv3", extra=extra), match)


def test_refuses_a_symlinked_volume(tmp_path):
    path = tmp_path / "p.inv3"
    with tarfile.open(path, "w:gz") as tar:
        add_member(tar, f"{FOLDER}/main.plist", plistlib.dumps(project_plist()))
        add_member(tar, f"{FOLDER}/matrix.dat", b"", tarfile.SYMTYPE, "/dev/zero")
    one_line_error(path, "link member")


def test_refuses_a_truncated_or_oversized_volume(tmp_path):
    full = np.zeros((4, 5, 6), "<i2").tobytes()
    one_line_error(
        make_inv3(tmp_path / "short.inv3", raw=full[:-2]), r"has 238 bytes, but shape \[4, 5, 6\] of int16 needs 240"
    )
    one_line_error(make_inv3(tmp_path / "long.inv3", raw=full + b"\0\0"), "needs 240")


def test_refuses_a_truncated_gzip_stream(tmp_path):
    path = make_inv3(
        tmp_path / "p.inv3", volume=np.random.default_rng(0).integers(-1000, 1000, (8, 16, 16)).astype("<i2")
    )
    data = path.read_bytes()
    cut = tmp_path / "cut.inv3"
    cut.write_bytes(data[: len(data) // 2])
    one_line_error(cut, "not a readable InVesalius project|truncated")


@pytest.mark.parametrize("key", ["matrix", "spacing"])
def test_refuses_a_plist_without_a_needed_entry(tmp_path, key):
    plist = project_plist()
    del plist[key]
    one_line_error(make_inv3(tmp_path / "p.inv3", plist=plist), f"no '{key}' entry")


@pytest.mark.parametrize("key", ["dtype", "filename", "shape"])
def test_refuses_a_matrix_without_a_needed_entry(tmp_path, key):
    plist = project_plist()
    del plist["matrix"][key]
    one_line_error(make_inv3(tmp_path / "p.inv3", plist=plist), f"'matrix' has no '{key}' entry")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"matrix": {"dtype": "object", "filename": "matrix.dat", "shape": [4, 5, 6]}}, "dtype 'object'"),
        ({"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": [4, 5]}}, "shape"),
        ({"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": [4, 5, 0]}}, "shape"),
        ({"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": [5000, 5000, 5000]}}, "shape"),
        ({"matrix": {"dtype": "int16", "filename": "../matrix.dat", "shape": [4, 5, 6]}}, "not a plain file name"),
        ({"matrix": {"dtype": "int16", "filename": "other.dat", "shape": [4, 5, 6]}}, "not in the archive"),
        ({"spacing": [1.0, 1.0]}, "spacing"),
        ({"spacing": [1.0, -1.0, 1.0]}, "spacing"),
        ({"orientation": 2}, "only axial"),
    ],
)
def test_refuses_bad_plist_values(tmp_path, change, match):
    one_line_error(make_inv3(tmp_path / "p.inv3", plist=project_plist(**change)), match)


def test_refuses_files_that_are_not_projects(tmp_path):
    (tmp_path / "junk.inv3").write_bytes(b"not a tar at all" * 10)
    one_line_error(tmp_path / "junk.inv3", "not a readable InVesalius project")
    path = tmp_path / "noplist.inv3"
    with tarfile.open(path, "w:gz") as tar:
        add_member(tar, f"{FOLDER}/matrix.dat", b"\0" * 240)
    one_line_error(path, "no main.plist")
    path = tmp_path / "badplist.inv3"
    with tarfile.open(path, "w:gz") as tar:
        add_member(tar, f"{FOLDER}/main.plist", b"<plist><dict><key>broken")
    one_line_error(path, "not a property list")
    with pytest.raises(CTFMError, match="no such file"):
        read_inv3(tmp_path / "missing.inv3")


# --- fetching, without the network ---------------------------------------------------------------------------------


def fake_deb(path: Path, payload: bytes) -> Path:
    """A minimal ``.deb`` (an ar archive) whose data.tar.xz holds ``payload`` at CRANIUM_MEMBER."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        add_member(tar, "./usr/share/doc/invesalius-examples/", b"", tarfile.DIRTYPE)
        add_member(tar, f"./{CRANIUM_MEMBER}", payload)
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b"x" * 3), ("data.tar.xz", data.getvalue())]
    out = bytearray(b"!<arch>\n")
    for name, content in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n".encode()
        out += content + (b"\n" if len(content) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """fetch_cranium with apt-get replaced by a fake .deb holding b"fake cranium" and no dpkg."""
    payload = b"fake cranium"
    deb = fake_deb(tmp_path / "invesalius-examples_0_all.deb", payload)

    def download(work):
        target = Path(work) / deb.name
        target.write_bytes(deb.read_bytes())
        return target

    monkeypatch.setattr(invesalius, "_apt_download", download)
    real_which = invesalius.shutil.which
    monkeypatch.setattr(invesalius.shutil, "which", lambda name: None if name == "dpkg" else real_which(name))
    return payload


def test_fetch_without_dpkg_reads_the_deb_and_caches_atomically(offline, monkeypatch, tmp_path):
    monkeypatch.setattr(invesalius, "CRANIUM_SHA256", hashlib.sha256(offline).hexdigest())
    cache = tmp_path / "cache"
    path = fetch_cranium(cache)
    assert path == cache / "Cranium.inv3" and path.read_bytes() == offline
    assert sorted(p.name for p in cache.iterdir()) == ["Cranium.inv3"]  # no temporaries left
    monkeypatch.setattr(invesalius, "_apt_download", lambda work: pytest.fail("downloaded again"))
    assert fetch_cranium(cache) == path  # the cached copy is used


def test_fetch_refuses_a_hash_mismatch_and_leaves_nothing(offline, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(CTFMError, match=f"expected {CRANIUM_SHA256}") as info:
        fetch_cranium(cache)
    assert "\n" not in str(info.value)
    assert list(cache.iterdir()) == []


def test_fetch_replaces_a_corrupt_cached_copy(offline, monkeypatch, tmp_path):
    monkeypatch.setattr(invesalius, "CRANIUM_SHA256", hashlib.sha256(offline).hexdigest())
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "Cranium.inv3").write_bytes(b"corrupt")
    assert fetch_cranium(cache).read_bytes() == offline


def test_default_cache_follows_ctfm_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CTFM_DATA_DIR", str(tmp_path))
    assert invesalius.cranium_cache_dir() == tmp_path / "invesalius"
    monkeypatch.delenv("CTFM_DATA_DIR")
    assert invesalius.cranium_cache_dir() == Path.home() / ".cache" / "ctfm" / "data" / "invesalius"


def test_fetch_without_apt_get_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(invesalius.shutil, "which", lambda name: None)
    with pytest.raises(CTFMError, match="apt-get not found") as info:
        fetch_cranium(tmp_path / "cache")
    assert "\n" not in str(info.value)


def test_fetch_asks_for_apt_get_update_when_not_root(monkeypatch, tmp_path):
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        if command == ["apt-get", "update"]:
            return subprocess.CompletedProcess(command, 0, "", "")
        return subprocess.CompletedProcess(command, 100, "", "E: Unable to locate package invesalius-examples\n")

    monkeypatch.setattr(invesalius.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(invesalius.subprocess, "run", run)
    monkeypatch.setattr(invesalius.os, "geteuid", lambda: 1000)
    with pytest.raises(CTFMError, match="run `sudo apt-get update`"):
        fetch_cranium(tmp_path / "cache")
    assert calls == [["apt-get", "download", "invesalius-examples"]]
    monkeypatch.setattr(invesalius.os, "geteuid", lambda: 0)  # as root: update, then the second download fails
    calls.clear()
    with pytest.raises(CTFMError, match="apt-get download failed: E: Unable to locate package"):
        fetch_cranium(tmp_path / "cache")
    assert calls == [
        ["apt-get", "download", "invesalius-examples"],
        ["apt-get", "update"],
        ["apt-get", "download", "invesalius-examples"],
    ]


def test_write_cranium_nifti_refuses_the_repository():
    repo = Path(invesalius.__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        pytest.skip("not running from a git checkout")
    with pytest.raises(CTFMError, match="GPL-2"):
        write_cranium_nifti(repo / "tests" / "cranium.nii.gz")
    assert not (repo / "tests" / "cranium.nii.gz").exists()


# --- the real CT -------------------------------------------------------------------------------------------------


def real_cranium() -> Path:
    """The real Cranium.inv3 in the cache, fetched if needed; the test is skipped where apt-get cannot fetch it."""
    try:
        return fetch_cranium()
    except CTFMError as e:
        if "sha256" in str(e):
            raise
        pytest.skip(f"the InVesalius CT cannot be fetched here: {e}")


@pytest.mark.slow
def test_the_real_cranium_ct(tmp_path):
    path = real_cranium()
    assert invesalius.sha256sum(path) == CRANIUM_SHA256
    image, affine = read_inv3(path)
    assert image.shape == (256, 256, 108) and image.dtype == np.float32
    np.testing.assert_allclose(np.diag(affine), [0.9570312, 0.9570312, 1.5, 1.0], rtol=1e-6)
    assert image.min() == -1024 and 2900 <= image.max() <= 3033

    world = {axis: affine[axis, axis] * np.arange(n) + affine[axis, 3] for axis, n in enumerate(image.shape)}

    def centre(mask):
        return np.array([world[a][round(c)] for a, c in enumerate(ndi.center_of_mass(mask))])

    head = image > -300
    labels, _ = ndi.label(head)
    head = labels == np.bincount(labels.ravel())[1:].argmax() + 1
    area = head.sum((0, 1))  # per axial slice, inferior to superior
    top = np.nonzero(area)[0].max()
    assert area[top - 5 : top + 1].mean() < 0.3 * area[:60].mean()  # the vertex: a small cap at the top
    filled = np.stack([ndi.binary_fill_holes(head[:, :, k]) for k in range(head.shape[2])], axis=2)
    air = filled & (image < -400)  # sinuses, nasal cavity, pharynx: low and in front
    x, y, z = centre(air)
    assert y > 20 and z < -10
    x, y, z = centre(head & (image > 1800))  # the densest bone, the teeth: lowest and most anterior
    assert y > 40 and z < -50
    assert abs(x) < 20

    out = write_cranium_nifti(tmp_path / "cranium.nii.gz")
    loaded = nib.load(out)
    assert "".join(nib.orientations.aff2axcodes(loaded.affine)) == "RAS"
    np.testing.assert_array_equal(np.asarray(loaded.dataobj), image)
    assert os.path.getsize(out) > 1_000_000
