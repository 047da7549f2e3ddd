"""The real head CT of Debian's ``invesalius-examples`` package: fetched into a cache, read as RAS HU.

The package (Debian main, GPL-2) ships ``usr/share/doc/invesalius-examples/examples/Cranium.inv3``, an InVesalius
3 project of a whole head ("ProMED CT 0051"). The CT is GPL-2 and is never part of this repository:
:func:`fetch_cranium` downloads it at run time into a cache outside the repository
(``$CTFM_DATA_DIR/invesalius``, default ``~/.cache/ctfm/data/invesalius``) and checks it against
:data:`CRANIUM_SHA256`; :func:`write_cranium_nifti` refuses a destination inside this package's repository.

What was verified on the real file (``invesalius-examples_3.1.99998-4_all.deb`` from Debian bookworm):

* ``Cranium.inv3`` is 18,719,455 bytes with sha256 :data:`CRANIUM_SHA256`; it is a gzipped tar of eleven regular
  files, all in one folder (``tmpocjcea/``): ``main.plist``, ``matrix.dat`` (the volume), two threshold masks
  (``mask_N.plist`` / ``mask_N.dat``), two surfaces (``surface_N.plist`` / ``surface_N.vtp``) and
  ``measurements.plist``. No links, no absolute or ``..`` names.
* ``main.plist`` is an XML property list: ``matrix`` = ``{"dtype": "int16", "filename": "matrix.dat",
  "shape": [108, 256, 256]}`` (slice, row, column); ``spacing`` = ``[0.9570312, 0.9570312, 1.5]`` mm as
  (x = along a row, i.e. column spacing; y = row spacing; z = slice spacing); ``orientation`` = 1 (axial);
  ``modality`` "CT"; ``name`` "ProMED CT 0051"; ``scalar_range`` [-1024, 3033] (the voxels themselves span
  -1024..2986 HU).
* ``matrix.dat`` is exactly 108 * 256 * 256 * 2 = 14,155,776 bytes of little-endian int16 HU in C order, no
  header.
* Slices run from inferior to superior: slice 2 cuts the teeth and the upper cervical spine, slice 15 the
  skull base (petrous bones, nasal cavity), slice 50 the orbital roofs and frontal horns, slice 100 a small
  vertex cap, slice 106 the last scalp voxels and slice 107 is air.
* Rows run from posterior to anterior (the flip of DICOM's row order): the face, nose and teeth lie at high row
  numbers, the occiput and the curved scanner table (up to ~1700 HU, which therefore is not part of the head)
  at low ones. In RAS mm (volume centre at 0) the air inside the head (sinuses, nasal cavity, pharynx) has its
  centre of mass at y = +39, z = -33 mm and the densest bone (> 1800 HU: teeth) at y = +62, z = -78 mm.
* Columns follow the usual DICOM order (towards the patient's left); nothing in the image can confirm it (a
  head is nearly symmetric and the project stores no patient orientation), so left and right are as trusted,
  not checked.

:func:`read_inv3` returns the volume as ``(X, Y, Z)`` float32 HU with axis 0 towards the patient's right, axis 1
anterior and axis 2 superior (the column axis reversed, rows and slices as stored), and a diagonal affine in mm
with the volume centre at world (0, 0, 0) -- the same conventions as :mod:`ctfm.phantom`; the project stores no
scanner origin. ``nib.Nifti1Image(image, affine)`` displays it the right way round.
"""

from __future__ import annotations

import logging
import os
import plistlib
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np

from ctfm.errors import CTFMError
from ctfm.files import atomic_path, sha256sum

__all__ = [
    "CRANIUM_MEMBER",
    "CRANIUM_NAME",
    "CRANIUM_SHA256",
    "DEB_PACKAGE",
    "cranium_cache_dir",
    "fetch_cranium",
    "read_inv3",
    "repository_root",
    "write_cranium_nifti",
]

logger = logging.getLogger("ctfm.invesalius")

#: The Debian package that ships the CT, and the file's path inside it.
DEB_PACKAGE = "invesalius-examples"
CRANIUM_MEMBER = "usr/share/doc/invesalius-examples/examples/Cranium.inv3"
CRANIUM_NAME = "Cranium.inv3"
#: sha256 of ``Cranium.inv3`` as shipped in ``invesalius-examples_3.1.99998-4_all.deb`` (18,719,455 bytes).
CRANIUM_SHA256 = "3b34f11f7c4f557f4c65cd6543c412a2f6ceb0cfecfd9c41184420e02d9b7e2a"

#: Volume sample types a project may declare (InVesalius writes numpy's names; stored little-endian).
_DTYPES = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("int8", "uint8", "int16", "uint16", "int32", "float32", "float64")
}
#: Limits that make a hostile or corrupt archive fail before it is read into memory.
_MAX_PLIST_BYTES = 1 << 20
_MAX_AXIS = 4096
_MAX_VOLUME_BYTES = 4 << 30
#: Members of any kind: more than this many, or a total size above _MAX_TOTAL_BYTES, is refused.
_MAX_MEMBERS = 10_000
_MAX_TOTAL_BYTES = 16 << 30
_APT_TIMEOUT_S = 900


def cranium_cache_dir() -> Path:
    """Where the CT is kept: ``$CTFM_DATA_DIR/invesalius``, default ``~/.cache/ctfm/data/invesalius``."""
    root = os.environ.get("CTFM_DATA_DIR") or Path.home() / ".cache" / "ctfm" / "data"
    return Path(root) / "invesalius"


def fetch_cranium(cache_dir: str | os.PathLike | None = None) -> Path:
    """The path of ``Cranium.inv3`` in ``cache_dir`` (default :func:`cranium_cache_dir`), downloaded if missing.

    A cached file is used when its sha256 is :data:`CRANIUM_SHA256` (one put there by hand is accepted too).
    Otherwise ``apt-get download invesalius-examples`` runs in a temporary folder (after ``apt-get update`` when
    apt does not know the package and this process is root), the ``.deb`` is unpacked with ``dpkg -x`` (or, without
    dpkg, read as the ``ar`` archive it is with Python's own tar reader) and the file is checked and moved into the
    cache atomically.

    Raises:
        CTFMError: apt-get missing or failing (no network, unknown package), an unreadable ``.deb``, a hash mismatch.
    """
    cache = Path(cache_dir) if cache_dir is not None else cranium_cache_dir()
    target = cache / CRANIUM_NAME
    if target.is_file():
        if sha256sum(target) == CRANIUM_SHA256:
            return target
        logger.warning("%s: sha256 differs from %s; downloading it again", target, CRANIUM_SHA256)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CTFMError(f"{cache}: cannot create the cache folder: {e.strerror or e}") from e
    with tempfile.TemporaryDirectory(prefix="ctfm-cranium-") as work:
        work = Path(work)
        deb = _apt_download(work)
        with atomic_path(target) as tmp:
            _extract_from_deb(deb, work, tmp)
            digest = sha256sum(tmp)
            if digest != CRANIUM_SHA256:
                raise CTFMError(f"{deb.name}: {CRANIUM_NAME} has sha256 {digest}, expected {CRANIUM_SHA256}")
    return target


def _apt_download(work: Path) -> Path:
    """``apt-get download invesalius-examples`` into ``work``; the path of the ``.deb``."""
    if shutil.which("apt-get") is None:
        raise CTFMError(
            f"{DEB_PACKAGE}: apt-get not found; on a Debian/Ubuntu machine run `apt-get download {DEB_PACKAGE}`, "
            f"unpack it with `dpkg -x` and put {CRANIUM_NAME} into {cranium_cache_dir()}"
        )

    def download() -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                ["apt-get", "download", DEB_PACKAGE],
                check=False,
                cwd=work,
                capture_output=True,
                text=True,
                timeout=_APT_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as e:
            raise CTFMError(f"{DEB_PACKAGE}: apt-get download took over {_APT_TIMEOUT_S} s") from e

    result = download()
    if result.returncode != 0 and "Unable to locate package" in result.stderr + result.stdout:
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            raise CTFMError(f"{DEB_PACKAGE}: apt does not know the package; run `sudo apt-get update` and try again")
        logger.info("apt does not know %s; running apt-get update", DEB_PACKAGE)
        try:
            update = subprocess.run(
                ["apt-get", "update"], check=False, capture_output=True, text=True, timeout=_APT_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as e:
            raise CTFMError(f"{DEB_PACKAGE}: apt-get update took over {_APT_TIMEOUT_S} s") from e
        if update.returncode != 0:
            raise CTFMError(f"{DEB_PACKAGE}: apt-get update failed: {_last_line(update)}")
        result = download()
    if result.returncode != 0:
        raise CTFMError(f"{DEB_PACKAGE}: apt-get download failed: {_last_line(result)}")
    debs = sorted(work.glob(f"{DEB_PACKAGE}_*.deb"))
    if len(debs) != 1:
        raise CTFMError(f"{DEB_PACKAGE}: apt-get download left {[p.name for p in work.iterdir()]} instead of one .deb")
    return debs[0]


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or [f"exit status {result.returncode}"])[-1]


def _extract_from_deb(deb: Path, work: Path, dest: Path) -> None:
    """Write the ``.deb``'s :data:`CRANIUM_MEMBER` to ``dest``, with ``dpkg -x`` or Python's ar/tar reading."""
    if shutil.which("dpkg") is not None:
        unpacked = work / "unpacked"
        result = subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=False, capture_output=True, text=True)
        source = unpacked / CRANIUM_MEMBER
        if result.returncode != 0:
            raise CTFMError(f"{deb.name}: dpkg -x failed: {_last_line(result)}")
        if not source.is_file() or source.is_symlink():
            raise CTFMError(f"{deb.name}: no regular file {CRANIUM_MEMBER} in the package")
        shutil.move(source, dest)
        return
    _extract_without_dpkg(deb, dest)


def _extract_without_dpkg(deb: Path, dest: Path) -> None:
    """A ``.deb`` is an ``ar`` archive whose ``data.tar.*`` member holds the files; copy the one member out."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise CTFMError(f"{deb.name}: not a Debian package (no ar header)")
        while True:
            header = f.read(60)
            if len(header) < 60:
                raise CTFMError(f"{deb.name}: no data.tar member")
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            try:
                size = int(header[48:58].decode("ascii").strip())
            except ValueError as e:
                raise CTFMError(f"{deb.name}: corrupt ar member header") from e
            start = f.tell()
            if name.startswith("data.tar"):
                suffix = name[len("data.tar") :]
                modes = {"": "r:", ".gz": "r:gz", ".xz": "r:xz", ".bz2": "r:bz2"}
                if suffix not in modes:
                    raise CTFMError(f"{deb.name}: {name} cannot be read without dpkg; install dpkg")
                with tempfile.TemporaryFile() as data:
                    _copy_bytes(f, data, size)
                    data.seek(0)
                    _copy_tar_member(deb, data, modes[suffix], dest)
                return
            f.seek(start + size + (size % 2))


def _copy_bytes(src, dst, size: int) -> None:
    left = size
    while left:
        chunk = src.read(min(left, 1 << 20))
        if not chunk:
            raise CTFMError(f"{getattr(src, 'name', 'archive')}: truncated")
        dst.write(chunk)
        left -= len(chunk)


def _copy_tar_member(deb: Path, data, mode: str, dest: Path) -> None:
    try:
        with tarfile.open(fileobj=data, mode=mode) as tar:
            for member in tar:
                if PurePosixPath(member.name).as_posix().lstrip("./") == CRANIUM_MEMBER:
                    if not member.isfile():
                        raise CTFMError(f"{deb.name}: {CRANIUM_MEMBER} is not a regular file")
                    with tar.extractfile(member) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
                    return
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as e:
        raise CTFMError(f"{deb.name}: unreadable data archive: {_first_line(e)}") from e
    raise CTFMError(f"{deb.name}: no {CRANIUM_MEMBER} in the package")


def read_inv3(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(image, affine)`` of an InVesalius project's volume: ``(X, Y, Z)`` float32 HU and a 4x4 voxel -> RAS mm.

    Axis 0 runs towards the patient's right, axis 1 anterior, axis 2 superior; the affine is diagonal (the spacing)
    with the volume centre at world (0, 0, 0). The stored volume is (slice, row, column) with slices inferior to
    superior, rows posterior to anterior and columns towards the left (see the module docstring for what was
    checked); only axial projects (``orientation`` 1, or none) are read.

    Only ``main.plist`` and the volume it names are read. The whole archive is refused if any member has an
    absolute name or a ``..`` part, is a link or anything but a regular file or folder, comes twice, or has a size
    out of proportion (a plist over 1 MiB, a volume over 4 GiB, more than 16 GiB in all); the volume member must be
    exactly ``prod(shape) * itemsize`` bytes.

    Raises:
        CTFMError: one line naming ``path`` and the problem.
    """
    path = Path(path)
    try:
        with tarfile.open(path, "r:*") as tar:
            members = _checked_members(path, tar)
            plist_member = _find_plist(path, members)
            folder = PurePosixPath(plist_member.name).parent
            plist = _read_plist(path, tar, plist_member)
            dtype, shape, spacing, filename = _volume_entry(path, plist)
            volume_name = (folder / filename).as_posix()
            volume_member = next((m for m in members if PurePosixPath(m.name).as_posix() == volume_name), None)
            if volume_member is None or not volume_member.isfile():
                raise CTFMError(f"{path}: the volume {volume_name} named in main.plist is not in the archive")
            expected = int(np.prod(shape)) * dtype.itemsize
            if volume_member.size != expected:
                raise CTFMError(
                    f"{path}: {volume_name} has {volume_member.size} bytes, but shape {list(shape)} of {dtype.name} "
                    f"needs {expected}"
                )
            with tar.extractfile(volume_member) as f:
                raw = f.read(expected + 1)
    except CTFMError:
        raise
    except FileNotFoundError as e:
        raise CTFMError(f"{path}: no such file") from e
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise CTFMError(f"{path}: not a readable InVesalius project (gzipped tar): {_first_line(e)}") from e
    if len(raw) != expected:
        raise CTFMError(f"{path}: {volume_name} is truncated ({len(raw)} of {expected} bytes)")
    volume = np.frombuffer(raw, dtype).reshape(shape)  # (slice, row, column)
    image = np.ascontiguousarray(volume.transpose(2, 1, 0)[::-1], dtype=np.float32)  # (R, A, S)
    n = np.asarray(image.shape, float)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(n - 1) / 2 * np.asarray(spacing)
    return image, affine


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0].rstrip(":") if lines else type(exc).__name__


def _checked_members(path: Path, tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members, total, seen = [], 0, set()
    for member in tar:
        if len(members) >= _MAX_MEMBERS:
            raise CTFMError(f"{path}: more than {_MAX_MEMBERS} archive members")
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts or "\\" in member.name:
            raise CTFMError(f"{path}: refusing an archive with the unsafe member name {member.name!r}")
        if not (member.isfile() or member.isdir()):
            kind = "link" if member.issym() or member.islnk() else "special file"
            raise CTFMError(f"{path}: refusing an archive with the {kind} member {member.name!r}")
        if member.isfile() and name.as_posix() in seen:
            raise CTFMError(f"{path}: refusing an archive with the member {member.name!r} twice")
        seen.add(name.as_posix())
        total += member.size
        if member.size > _MAX_VOLUME_BYTES or total > _MAX_TOTAL_BYTES:
            raise CTFMError(f"{path}: member {member.name!r} makes the archive implausibly large ({total} bytes)")
        members.append(member)
    return members


def _find_plist(path: Path, members: list[tarfile.TarInfo]) -> tarfile.TarInfo:
    found = [
        m
        for m in members
        if m.isfile() and PurePosixPath(m.name).name == "main.plist" and len(PurePosixPath(m.name).parts) <= 2
    ]
    if len(found) != 1:
        what = "no main.plist" if not found else f"{len(found)} main.plist members"
        raise CTFMError(f"{path}: not an InVesalius project: {what}")
    if found[0].size > _MAX_PLIST_BYTES:
        raise CTFMError(f"{path}: main.plist is {found[0].size} bytes, implausibly large")
    return found[0]


def _read_plist(path: Path, tar: tarfile.TarFile, member: tarfile.TarInfo) -> dict:
    with tar.extractfile(member) as f:
        data = f.read(_MAX_PLIST_BYTES + 1)
    try:
        plist = plistlib.loads(data)
    except Exception as e:  # plistlib raises InvalidFileException, ExpatError, ValueError, ...
        raise CTFMError(f"{path}: main.plist is not a property list: {_first_line(e)}") from e
    if not isinstance(plist, dict):
        raise CTFMError(f"{path}: main.plist is not a dictionary")
    return plist


def _volume_entry(path: Path, plist: dict) -> tuple[np.dtype, tuple[int, int, int], tuple[float, float, float], str]:
    """Checked ``(dtype, shape (slice, row, column), spacing (x, y, z), file name)`` of main.plist's volume."""
    for key in ("matrix", "spacing"):
        if key not in plist:
            raise CTFMError(f"{path}: main.plist has no '{key}' entry")
    matrix = plist["matrix"]
    if not isinstance(matrix, dict):
        raise CTFMError(f"{path}: main.plist's 'matrix' is not a dictionary")
    for key in ("dtype", "filename", "shape"):
        if key not in matrix:
            raise CTFMError(f"{path}: main.plist's 'matrix' has no '{key}' entry")
    orientation = plist.get("orientation", 1)
    if orientation != 1:
        raise CTFMError(f"{path}: orientation {orientation!r} in main.plist; only axial projects (1) are read")
    dtype = _DTYPES.get(matrix["dtype"]) if isinstance(matrix["dtype"], str) else None
    if dtype is None:
        raise CTFMError(f"{path}: volume dtype {matrix['dtype']!r} is not one of {', '.join(_DTYPES)}")
    shape = matrix["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= _MAX_AXIS for n in shape)
    ):
        raise CTFMError(f"{path}: volume shape {shape!r} is not three sizes in 1..{_MAX_AXIS}")
    if int(np.prod(shape)) * dtype.itemsize > _MAX_VOLUME_BYTES:
        raise CTFMError(f"{path}: volume shape {shape} is implausibly large")
    spacing = plist["spacing"]
    if (
        not isinstance(spacing, list)
        or len(spacing) != 3
        or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < 100 for s in spacing)
    ):
        raise CTFMError(f"{path}: spacing {spacing!r} is not three sizes in mm")
    filename = matrix["filename"]
    if not isinstance(filename, str) or not filename or "/" in filename or "\\" in filename or filename in (".", ".."):
        raise CTFMError(f"{path}: volume file name {filename!r} is not a plain file name")
    return dtype, tuple(int(n) for n in shape), tuple(float(s) for s in spacing), filename


def write_cranium_nifti(dest: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch the CT (:func:`fetch_cranium`), read it (:func:`read_inv3`) and write it to ``dest`` as NIfTI, atomically.

    float32 HU with the RAS affine as qform and sform; a ``.gz`` suffix compresses. The CT is GPL-2: a ``dest``
    inside this package's repository is refused.
    """
    dest = Path(dest)
    repo = repository_root()
    if repo is not None and dest.resolve().is_relative_to(repo):
        raise CTFMError(f"{dest}: inside the repository {repo}; the InVesalius CT (GPL-2) must stay out of it")
    image, affine = read_inv3(fetch_cranium(cache_dir))
    nifti = nib.Nifti1Image(image, affine)
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    nifti.header["descrip"] = b"ProMED CT 0051, invesalius-examples, GPL-2"
    with atomic_path(dest) as tmp:
        nib.save(nifti, tmp)
    return dest


def repository_root() -> Path | None:
    """The git work tree this source file lies in, if any (``shared/ctfm/invesalius.py`` -> the repository)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / ".git").exists():
            return parent
    return None
