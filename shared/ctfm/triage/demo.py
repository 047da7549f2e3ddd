"""The triage bundle's demo data, generated on first use into a cache (never into the repository).

**Phantom set** (:func:`demo_dir`): seeded head phantoms (:func:`ctfm.phantom.head_phantom`) with synthetic
haemorrhages (:mod:`ctfm.lesions`), known answers, in the generic CSV layout of :mod:`ctfm.triage.datasets`::

    <dir>/imagesTr/head_000.nii.gz ...   train.csv   (image, patient, one 0/1 column per finding)
    <dir>/imagesTs/head_test_000.nii.gz  test.csv    dataset.json (MSD layout: "training", "test")

The test set is what training never saw: other anatomy seeds, another acquisition grid (3 x 3 x 5 mm instead of
3.5 x 3.5 x 4 mm), smaller parenchymal bleeds (6-12 mm instead of 14-40 mm), thinner subdurals (3-5 mm instead of
6-15 mm), and more cases with two lesion types at once.

**Real head CT** (:func:`real_head_dir`): the InVesalius example head CT (Debian ``invesalius-examples``, GPL-2,
fetched by :mod:`ctfm.invesalius`), as it is and with each kind of synthetic lesion inserted (the subdural case also
as a DICOM series), plus a ``labels.csv``; written to the cache only. It is not a normal head: a bone defect of
about 25 x 45 mm in the right frontal bone has low-density brain under it, so "no finding" there means "no
inserted bleed".

Both folders are written atomically under a lock, so parallel processes (torchrun ranks) wait for one writer.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

from ctfm.errors import CTFMError
from ctfm.files import atomic_path
from ctfm.lesions import LESION_KINDS, head_masks, lesion_case
from ctfm.phantom import head_phantom

__all__ = ["DEMO_VERSION", "FINDINGS", "data_cache_dir", "demo_dir", "real_head_dir", "write_phantom_set"]

FINDINGS = ("haemorrhage", *LESION_KINDS)
#: Bumped whenever the generated data changes, so a cache of an older version is never read as this one.
DEMO_VERSION = 1
N_TRAIN, N_TEST = 80, 40
#: Lesion kinds per case, cycled through the seeds: 40 % of training cases are normal.
TRAIN_PATTERN = ((), ("intraparenchymal",), (), ("subdural",), ("intraventricular",), (), ("intraparenchymal",),
                 ("subdural",), (), ("intraventricular", "subdural"))
TEST_PATTERN = ((), ("intraparenchymal",), ("subdural",), (), ("intraventricular",), ("intraparenchymal", "subdural"),
                (), ("intraventricular", "intraparenchymal"))
TRAIN_RANGES = {"intraparenchymal": {"size_mm": (14.0, 40.0)}, "subdural": {"size_mm": (6.0, 15.0)}}
TEST_RANGES = {"intraparenchymal": {"size_mm": (6.0, 12.0)}, "subdural": {"size_mm": (3.0, 5.0)}}
TRAIN_GRID = {"shape": (64, 64, 48), "spacing": (3.5, 3.5, 4.0)}
TEST_GRID = {"shape": (80, 80, 40), "spacing": (3.0, 3.0, 5.0)}


def data_cache_dir() -> Path:
    """``$CTFM_DATA_DIR``, default ``~/.cache/ctfm/data``."""
    return Path(os.environ.get("CTFM_DATA_DIR") or Path.home() / ".cache" / "ctfm" / "data")


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def demo_dir(dest: str | os.PathLike | None = None) -> Path:
    """The phantom demo set's folder (default ``<data cache>/triage_demo_v<N>``), generated if missing (about
    15 s); returns it."""
    root = Path(dest) if dest is not None else data_cache_dir() / f"triage_demo_v{DEMO_VERSION}"
    if (root / "dataset.json").is_file():
        return root
    with _locked(root):
        if not (root / "dataset.json").is_file():
            with atomic_path(root, is_dir=True) as tmp:
                write_phantom_set(tmp)
    return root


def write_phantom_set(folder: str | os.PathLike, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    """Write the phantom set (``n_train`` + ``n_test`` cases; the defaults are the demo's) into ``folder``."""
    folder = Path(folder)
    sections = {}
    for section, subdir, prefix, n, offset, pattern, ranges, grid in (
        ("training", "imagesTr", "head", n_train, 0, TRAIN_PATTERN, TRAIN_RANGES, TRAIN_GRID),
        ("test", "imagesTs", "head_test", n_test, 10_000, TEST_PATTERN, TEST_RANGES, TEST_GRID),
    ):
        rows = []
        for i in range(n):
            seed = offset + i
            phantom = head_phantom(grid["shape"], grid["spacing"], seed=seed)
            masks = head_masks(phantom.image, phantom.affine, labels=phantom.labels)
            image, _, findings = lesion_case(phantom.image, phantom.affine, pattern[i % len(pattern)], seed, masks, ranges)
            name = f"{subdir}/{prefix}_{i:03d}.nii.gz"
            _write_ct(folder / name, image, phantom.affine)
            rows.append({"image": name, "patient": f"{prefix}_{i:03d}", **{f: int(findings[f]) for f in FINDINGS}})
        _write_labels(folder / ("train.csv" if section == "training" else "test.csv"), rows)
        sections[section] = [{"image": r["image"], "label": [r[f] for f in FINDINGS]} for r in rows]
    about = {
        "name": "ctfm_triage phantom demo set",
        "description": "seeded head phantoms with synthetic haemorrhages (ctfm.triage.demo); labels are known answers",
        "version": DEMO_VERSION,
        "findings": list(FINDINGS),
        "labels": {str(i): f for i, f in enumerate(FINDINGS)},
        **sections,
    }
    (folder / "dataset.json").write_text(json.dumps(about, indent=2) + "\n")
    return folder


def _write_ct(path: Path, image: np.ndarray, affine: np.ndarray) -> None:
    """int16 HU NIfTI with the affine as qform and sform, as a scanner export would be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nifti = nib.Nifti1Image(np.clip(np.round(image), -1024, 3071).astype(np.int16), affine)
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    nib.save(nifti, path)


def _write_labels(path: Path, rows: Sequence[Mapping]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


#: The real-CT cases: name -> lesion kinds inserted (each with its own seed).
REAL_CASES = {
    "cranium": (),
    "cranium_intraparenchymal": ("intraparenchymal",),
    "cranium_subdural": ("subdural",),
    "cranium_intraventricular": ("intraventricular",),
}
#: ... also written as a DICOM series (``<name>_dicom/``).
REAL_DICOM_CASE = "cranium_subdural"


def real_head_dir(dest: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The real head CT, as it is and with synthetic lesions, as NIfTI + ``labels.csv`` (generic CSV layout) in
    ``dest`` (default ``<data cache>/triage_real_v<N>``); fetched and generated if missing.

    Raises:
        CTFMError: the CT cannot be fetched (see :func:`ctfm.invesalius.fetch_cranium`).
    """
    from ctfm.dicom_series import write_ct_series
    from ctfm.invesalius import fetch_cranium, read_inv3, repository_root

    root = Path(dest) if dest is not None else data_cache_dir() / f"triage_real_v{DEMO_VERSION}"
    repo = repository_root()
    if repo is not None and root.resolve().is_relative_to(repo):
        raise CTFMError(f"{root}: inside the repository {repo}; the InVesalius CT (GPL-2) must stay out of it")
    if (root / "labels.csv").is_file():
        return root
    with _locked(root):
        if not (root / "labels.csv").is_file():
            image, affine = read_inv3(fetch_cranium(cache_dir))
            masks = head_masks(image, affine)
            with atomic_path(root, is_dir=True) as tmp:
                rows = []
                for seed, (name, kinds) in enumerate(REAL_CASES.items()):
                    case, _, findings = lesion_case(image, affine, kinds, 20_000 + seed, masks)
                    _write_ct(tmp / f"{name}.nii.gz", case, affine)
                    rows.append({"image": f"{name}.nii.gz", "patient": "cranium", **{f: int(findings[f]) for f in FINDINGS}})
                    if name == REAL_DICOM_CASE:
                        write_ct_series(case, affine, tmp / f"{name}_dicom", patient_id="cranium", seed=seed)
                        rows.append({"image": f"{name}_dicom", "patient": "cranium", **{f: int(findings[f]) for f in FINDINGS}})
                _write_labels(tmp / "labels.csv", rows)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ctfm.triage.demo phantoms|real [--dest DIR]``: make the demo set and print its folder."""
    import argparse

    from ctfm.errors import install_excepthook

    install_excepthook()
    parser = argparse.ArgumentParser(prog="python -m ctfm.triage.demo", description="The triage bundle's demo data.")
    parser.add_argument("which", choices=["phantoms", "real"], help="the phantom set, or the real head CT with bleeds")
    parser.add_argument("--dest", default=None, help="folder to write (default: the data cache)")
    args = parser.parse_args(argv)
    print(demo_dir(args.dest) if args.which == "phantoms" else real_head_dir(args.dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
