"""Triage dataset readers on small stand-ins in each published layout, splits and subsamples."""

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctfm.errors import CTFMError
from ctfm.triage.datasets import (
    CQ500_FINDINGS,
    CQ500_READERS,
    RSNA_FINDINGS,
    TriageCase,
    TriageDataset,
    label_fraction,
    load_split,
    read_cq500,
    read_csv_dataset,
    read_rsna,
    read_sinoct,
    read_triage_dataset,
    split_cases,
    subset,
)

CQ500_READ_FINDINGS = (
    "ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right", "ChronicBleed",
    "Fracture", "CalvarialFracture", "OtherFracture", "MassEffect", "MidlineShift",
)  # fmt: skip


def write_ct_slice(path: Path, *, patient: str, study: str, series: str, sop: str, z_mm: float, thickness_mm: float):
    """One 8x8 CT slice with the header fields the readers and ct_io look at."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.Modality = "CT"
    ds.PatientID = patient
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.ImagePositionPatient = [0.0, 0.0, float(z_mm)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = thickness_mm
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = np.zeros((8, 8), dtype=np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_ct_series(folder: Path, count: int, thickness_mm: float, patient: str = "P", study: str | None = None):
    """``count`` slices ``CT000000.dcm, ...`` of one new series in ``folder``."""
    study = study or generate_uid()
    series = generate_uid()
    for i in range(count):
        write_ct_slice(
            folder / f"CT{i:06d}.dcm",
            patient=patient,
            study=study,
            series=series,
            sop=generate_uid(),
            z_mm=i * thickness_mm,
            thickness_mm=thickness_mm,
        )


def write_nifti(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.int16), np.eye(4)), path)


# ------------------------------------------------------------------------------------------------------------
# CQ500


def write_reads(folder: Path, votes: dict[str, dict[str, tuple[int, int, int]]], drop: tuple[str, ...] = ()):
    """``reads.csv``: every finding 0 for every reader unless ``votes[study][finding]`` gives the three votes."""
    columns = ["name", "Category"] + [f"{r}:{f}" for r in CQ500_READERS for f in CQ500_READ_FINDINGS]
    columns = [c for c in columns if c not in drop]
    lines = [",".join(columns)]
    for name, study_votes in votes.items():
        values = {"name": name, "Category": "B1"}
        for k, reader in enumerate(CQ500_READERS):
            for f in CQ500_READ_FINDINGS:
                values[f"{reader}:{f}"] = str(study_votes.get(f, (0, 0, 0))[k])
        lines.append(",".join(values[c] for c in columns))
    (folder / "reads.csv").write_text("\n".join(lines) + "\n")


def study_folder(folder: Path, number: int) -> Path:
    return folder / f"CQ500CT{number} CQ500CT{number}" / "Unknown Study"


@pytest.fixture
def cq500(tmp_path) -> Path:
    root = tmp_path / "cq500"
    root.mkdir()
    write_reads(
        root,
        {
            "CQ500-CT-0": {"ICH": (1, 1, 0), "SDH": (1, 0, 0), "Fracture": (0, 1, 1)},
            "CQ500-CT-1": {},
            "CQ500-CT-12": {"ICH": (1, 1, 1), "SAH": (0, 0, 1)},
        },
    )
    write_ct_series(study_folder(root, 0) / "CT 5mm", 3, 5.0)
    write_ct_series(study_folder(root, 0) / "CT 0.625mm", 4, 0.625)
    write_ct_series(study_folder(root, 0) / "CT PLAIN THIN", 5, 0.625)
    write_ct_series(study_folder(root, 1) / "CT Thin Plain", 2, 1.0)
    # a study unpacked into one folder per zip file
    write_ct_series(root / "CQ500-CT-12" / "CQ500CT12 CQ500CT12" / "Unknown Study" / "CT 5mm", 2, 5.0)
    # a study folder reads.csv does not list: skipped
    write_ct_series(study_folder(root, 99) / "CT 5mm", 2, 5.0)
    return root


def test_cq500_majority_and_any_readers(cq500):
    majority = read_cq500(cq500)
    assert majority.findings == CQ500_FINDINGS
    assert majority.ids == ["CQ500-CT-0", "CQ500-CT-1", "CQ500-CT-12"]
    case = majority.cases[0]
    assert case.patient == "CQ500-CT-0"
    assert (case.labels["ICH"], case.labels["SDH"], case.labels["Fracture"]) == (1.0, 0.0, 1.0)
    any_reader = read_cq500(cq500, reader_rule="any")
    assert (any_reader.cases[0].labels["SDH"], any_reader.cases[2].labels["SAH"]) == (1.0, 1.0)
    assert majority.cases[2].labels["SAH"] == 0.0
    assert all(v == 0.0 for v in majority.cases[1].labels.values())
    items = majority.items()
    assert items[0]["label"] == [majority.cases[0].labels[f] for f in CQ500_FINDINGS]
    assert set(items[0]) == {"image", "label", "id", "patient"}
    chosen = read_cq500(cq500, findings=["ChronicBleed", "ICH"])
    assert chosen.findings == ("ChronicBleed", "ICH") and len(chosen.items()[0]["label"]) == 2


def test_cq500_series_rule(cq500):
    thinnest = read_cq500(cq500)
    # 0.625 mm twice: the series with more files wins
    assert Path(thinnest.cases[0].image) == study_folder(cq500, 0) / "CT PLAIN THIN"
    assert Path(thinnest.cases[0].image).is_absolute()
    assert Path(thinnest.cases[2].image).parent.parent.name == "CQ500CT12 CQ500CT12"
    assert Path(read_cq500(cq500, series_rule="thickest").cases[0].image).name == "CT 5mm"
    # the thinnest of the matching series: 'CT 0.625mm' over 'CT 5mm', never the unmatched 'CT PLAIN THIN'
    assert Path(read_cq500(cq500, series_rule=r"0\.625mm|thin plain|5mm").cases[0].image).name == "CT 0.625mm"
    with pytest.raises(CTFMError, match=r"CQ500CT12 CQ500CT12: no series folder matches series_rule 'thin'"):
        read_cq500(cq500, series_rule="thin")  # study 12 has only 'CT 5mm'


def test_cq500_bad_input(tmp_path, cq500):
    with pytest.raises(CTFMError, match=r"empty/reads.csv: no such file"):
        (tmp_path / "empty").mkdir()
        read_cq500(tmp_path / "empty")
    write_reads(cq500, {"CQ500-CT-0": {}}, drop=("R2:SDH",))
    with pytest.raises(CTFMError) as err:
        read_cq500(cq500)
    assert str(err.value) == (
        f"{cq500 / 'reads.csv'}: no column 'R2:SDH' (needed for finding SDH with reader_rule majority); has "
        + str(err.value).split("; has ", 1)[1]
    )
    with pytest.raises(CTFMError, match=r"reads.csv: no finding 'Tumour' in this CQ500 reads.csv"):
        read_cq500(cq500, findings=["Tumour"])
    write_reads(cq500, {"CQ500-CT-0": {"IVH": (0, 2, 0)}})
    with pytest.raises(CTFMError, match=r"reads.csv: row 1 \(CQ500-CT-0\): column 'R2:IVH' value '2' is not 0/1"):
        read_cq500(cq500)
    write_reads(cq500, {"CQ500-CT-0": {}, "CQ500-CT-7": {}})
    with pytest.raises(CTFMError, match=r"reads.csv: study CQ500-CT-7 has no image folder 'CQ500CT7 CQ500CT7'"):
        read_cq500(cq500)
    write_reads(cq500, {"CQ500-CT-0": {}})
    lines = (cq500 / "reads.csv").read_text().splitlines()
    (cq500 / "reads.csv").write_text("\n".join([lines[0], lines[1], lines[1]]) + "\n")
    with pytest.raises(CTFMError, match=r"reads.csv: study 'CQ500-CT-0' occurs twice \(rows 1 and 2\)"):
        read_cq500(cq500)
    (cq500 / "reads.csv").write_text(lines[0] + "\n")
    with pytest.raises(CTFMError, match=r"reads.csv: no rows, an empty dataset"):
        read_cq500(cq500)
    write_reads(cq500, {"CQ500-CT-5": {}})
    (cq500 / "CQ500CT5 CQ500CT5" / "Unknown Study" / "CT 5mm").mkdir(parents=True)
    with pytest.raises(CTFMError, match=r"CQ500CT5 CQ500CT5: no DICOM series folder"):
        read_cq500(cq500)
    with pytest.raises(CTFMError, match=r"reads.csv: reader_rule 'all'"):
        read_cq500(cq500, reader_rule="all")


# ------------------------------------------------------------------------------------------------------------
# RSNA


def write_rsna(root: Path, slices: list[dict], extra_rows: tuple[str, ...] = ()) -> None:
    """``stage_2_train/ID_<n>.dcm`` per slice and ``stage_2_train.csv`` rows for every slice with ``labels``."""
    shutil.rmtree(root / "stage_2_train", ignore_errors=True)
    rows = ["ID,Label"]
    for n, s in enumerate(slices):
        image = f"ID_{n:08x}"
        write_ct_slice(
            root / "stage_2_train" / f"{image}.dcm",
            patient=s["patient"],
            study=s["study"],
            series=s["series"],
            sop=generate_uid(),
            z_mm=5.0 * n,
            thickness_mm=5.0,
        )
        if s.get("labels") is not None:
            for subtype in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"):
                rows.append(f"{image}_{subtype},{s['labels'].get(subtype, 0)}")
    rows += extra_rows
    (root / "stage_2_train.csv").write_text("\n".join(rows) + "\n")


RSNA_SLICES = [
    # patient A, study SA with two series: S1 (3 slices, one with a subdural bleed) and S2 (2 slices, clean)
    {"patient": "A", "study": "1.2.9.1", "series": "1.2.9.1.1", "labels": {}},
    {"patient": "A", "study": "1.2.9.1", "series": "1.2.9.1.1", "labels": {"subdural": 1, "any": 1}},
    {"patient": "A", "study": "1.2.9.1", "series": "1.2.9.1.1", "labels": {}},
    {"patient": "A", "study": "1.2.9.1", "series": "1.2.9.1.2", "labels": {}},
    {"patient": "A", "study": "1.2.9.1", "series": "1.2.9.1.2", "labels": {}},
    # patient B, one series with an epidural bleed on one slice and a subarachnoid one on another
    {"patient": "B", "study": "1.2.9.2", "series": "1.2.9.2.1", "labels": {"epidural": 1, "any": 1}},
    {"patient": "B", "study": "1.2.9.2", "series": "1.2.9.2.1", "labels": {"subarachnoid": 1, "any": 1}},
]


def test_rsna_series_and_study_labels(tmp_path):
    root = tmp_path / "rsna"
    write_rsna(root, RSNA_SLICES)
    series = read_rsna(root)
    assert series.findings == RSNA_FINDINGS
    assert series.ids == ["1.2.9.1.1", "1.2.9.1.2", "1.2.9.2.1"]
    by_id = {c.id: c for c in series.cases}
    assert by_id["1.2.9.1.1"].labels == {f: float(f in ("subdural", "any")) for f in RSNA_FINDINGS}
    assert all(v == 0.0 for v in by_id["1.2.9.1.2"].labels.values())
    assert by_id["1.2.9.2.1"].labels == {f: float(f in ("epidural", "subarachnoid", "any")) for f in RSNA_FINDINGS}
    assert [c.patient for c in series.cases] == ["A", "A", "B"]

    # each case's folder holds exactly its series' files, as relative links to the slices
    originals = root / "stage_2_train"
    for case in series.cases:
        folder = Path(case.image)
        assert folder.parent == root / ".ctfm_series"
        names = sorted(os.listdir(folder))
        expected = sorted(f"ID_{n:08x}.dcm" for n, s in enumerate(RSNA_SLICES) if s["series"] == case.id)
        assert names == expected
        for name in names:
            assert (folder / name).is_symlink() and not os.path.isabs(os.readlink(folder / name))
            assert (folder / name).resolve() == (originals / name).resolve()
            assert pydicom.dcmread(folder / name, stop_before_pixels=True).SeriesInstanceUID == case.id

    study = read_rsna(root, level="study", findings=["any", "subdural"])
    assert study.ids == ["1.2.9.1", "1.2.9.2"]
    assert study.cases[0].labels == {"any": 1.0, "subdural": 1.0}
    assert Path(study.cases[0].image).name == "1.2.9.1.1"  # the study's series with most slices
    assert study.cases[0].patient == "A"

    # a second read takes the headers from the index and keeps the folders
    index = root / ".ctfm_series" / ".headers.csv"
    assert index.is_file()
    before = (index.stat().st_mtime_ns, Path(series.cases[0].image).stat().st_ino)
    assert read_rsna(root) == series
    assert (index.stat().st_mtime_ns, Path(series.cases[0].image).stat().st_ino) == before

    cache = tmp_path / "elsewhere"
    again = read_triage_dataset("rsna", root, cache_dir=cache)
    assert Path(again.cases[0].image).parent == cache
    assert (Path(again.cases[0].image) / "ID_00000000.dcm").resolve() == (originals / "ID_00000000.dcm").resolve()


def test_rsna_bad_input(tmp_path):
    root = tmp_path / "rsna"
    with pytest.raises(CTFMError, match=r"rsna/stage_2_train.csv: no such file"):
        read_rsna(root)
    # a slice file without any row
    write_rsna(root, [*RSNA_SLICES[:2], {**RSNA_SLICES[2], "labels": None}])
    with pytest.raises(CTFMError, match=r"stage_2_train/ID_00000002.dcm: slice has no row in .*stage_2_train.csv"):
        read_rsna(root)
    # a row for a missing file
    write_rsna(root, RSNA_SLICES[:2], extra_rows=("ID_deadbeef_any,0",))
    with pytest.raises(CTFMError, match=r"stage_2_train.csv: no row 'ID_deadbeef_epidural'"):
        read_rsna(root)
    with pytest.raises(
        CTFMError, match=r"stage_2_train.csv: image 'ID_deadbeef' is labelled but .*ID_deadbeef.dcm does not exist"
    ):
        read_rsna(root, findings="any")
    # not 0/1
    write_rsna(root, RSNA_SLICES[:2], extra_rows=("ID_00000000_any,2",))
    with pytest.raises(
        CTFMError, match=r"stage_2_train.csv: row 13 \(ID_00000000_any\): column 'Label' value '2' is not 0/1"
    ):
        read_rsna(root)
    # repeated rows: equal labels are dropped, different ones refused
    write_rsna(root, RSNA_SLICES[:2], extra_rows=("ID_00000000_any,0",))
    assert len(read_rsna(root)) == 1
    write_rsna(root, RSNA_SLICES[:2], extra_rows=("ID_00000000_any,1",))
    with pytest.raises(
        CTFMError, match=r"stage_2_train.csv: ID 'ID_00000000_any' occurs twice with different labels \(rows 6 and 13\)"
    ):
        read_rsna(root)
    write_rsna(root, RSNA_SLICES[:2], extra_rows=("nounderscore,1",))
    with pytest.raises(CTFMError, match=r"stage_2_train.csv: row 13: ID 'nounderscore' is not ID_<image id>_<subtype>"):
        read_rsna(root)
    write_rsna(root, RSNA_SLICES[:2])
    with pytest.raises(CTFMError, match=r"stage_2_train.csv: no finding 'hydrocephalus' in this RSNA csv"):
        read_rsna(root, findings=["hydrocephalus"])
    (root / "stage_2_train.csv").write_text("ID,Value\nID_00000000_any,0\n")
    with pytest.raises(CTFMError, match=r"stage_2_train.csv: no column 'Label'"):
        read_rsna(root)
    (root / "stage_2_train.csv").write_text("ID,Label\n")
    with pytest.raises(CTFMError, match=r"stage_2_train.csv: no rows, an empty dataset"):
        read_rsna(root)
    write_rsna(root, RSNA_SLICES[:2])
    with pytest.raises(CTFMError, match=r"rsna: level 'patient'"):
        read_rsna(root, level="patient")
    # one series, two patients
    write_rsna(root, [RSNA_SLICES[0], {**RSNA_SLICES[1], "patient": "Z"}])
    with pytest.raises(CTFMError, match=r"stage_2_train: series 1.2.9.1.1 holds slices of 2 patients"):
        read_rsna(root)


# ------------------------------------------------------------------------------------------------------------
# SinoCT-style and generic CSV


def test_sinoct(tmp_path):
    root = tmp_path / "sinoct"
    for name in ("scans/a.nii.gz", "scans/b.nii.gz", "scans/c.nii"):
        write_nifti(root / name)
    (root / "labels.csv").write_text(
        "image,patient_id,label\nscans/a.nii.gz,p1,normal\nscans/b.nii.gz,p1,Abnormal\nscans/c.nii,p2,1\n"
    )
    data = read_sinoct(root)
    assert data.findings == ("abnormal",)
    assert data.ids == ["scans/a", "scans/b", "scans/c"]
    assert [c.patient for c in data.cases] == ["p1", "p1", "p2"]
    assert [c.labels["abnormal"] for c in data.cases] == [0.0, 1.0, 1.0]
    assert data.cases[0].image == str(root / "scans/a.nii.gz")
    assert read_triage_dataset("SinoCT", root / "labels.csv") == data

    (root / "labels.csv").write_text("image,label\nscans/a.nii.gz,0\n")
    assert read_sinoct(root).cases[0].patient == "scans/a"
    (root / "labels.csv").write_text("image,label\nscans/a.nii.gz,maybe\n")
    with pytest.raises(
        CTFMError, match=r"labels.csv: row 1 \(scans/a\): column 'label' value 'maybe' is not 0/1/normal/abnormal"
    ):
        read_sinoct(root)
    (root / "labels.csv").write_text("image,label\nscans/missing.nii.gz,0\n")
    with pytest.raises(CTFMError, match=r"labels.csv: row 1: image 'scans/missing.nii.gz' does not exist"):
        read_sinoct(root)
    (root / "labels.csv").write_text("image,label\nscans/a.nii.gz,0\nscans/./a.nii.gz,1\n")
    with pytest.raises(CTFMError, match=r"labels.csv: image 'scans/a' occurs twice \(rows 1 and 2\)"):
        read_sinoct(root)
    (root / "labels.csv").write_text("image,abnormal\nscans/a.nii.gz,0\n")
    with pytest.raises(CTFMError, match=r"labels.csv: no column 'label'"):
        read_sinoct(root)
    (root / "labels.csv").write_text("image,label\nscans/a.nii.gz,0\n")
    with pytest.raises(CTFMError, match=r"labels.csv: no finding 'ICH' in this SinoCT-style labels.csv"):
        read_sinoct(root, findings=["ICH"])
    (root / "labels.csv").write_text("image,label\n")
    with pytest.raises(CTFMError, match=r"labels.csv: no rows"):
        read_sinoct(root)
    with pytest.raises(CTFMError, match=r"nowhere/labels.csv: no such file"):
        read_sinoct(tmp_path / "nowhere")


def test_csv_dataset(tmp_path):
    write_nifti(tmp_path / "ct" / "one.nii.gz")
    write_nifti(tmp_path / "ct" / "two.nrrd.nii")
    (tmp_path / "ct" / "series3").mkdir()
    absolute = tmp_path / "ct" / "one.nii.gz"
    csv = tmp_path / "meta" / "labels.csv"
    csv.parent.mkdir()
    csv.write_text(
        f"case,subject,image,ICH,SAH\nc1,s1,../ct/one.nii.gz,1,0\nc2,s1,{absolute},0,1\nc3,s2,../ct/series3,0,0\n"
    )
    data = read_csv_dataset(csv, patient_column="subject", id_column="case")
    assert data.findings == ("ICH", "SAH")
    assert data.ids == ["c1", "c2", "c3"]
    assert [c.patient for c in data.cases] == ["s1", "s1", "s2"]
    assert data.cases[0].image == data.cases[1].image == str(absolute)
    assert data.cases[2].image == str(tmp_path / "ct" / "series3")
    assert data.items()[1]["label"] == [0.0, 1.0]
    only = read_triage_dataset("csv", csv, findings=["SAH"], patient_column="subject", id_column="case")
    assert only.findings == ("SAH",)
    # columns named patient / id are found without being named
    csv.write_text("id,patient,image,ICH\nc1,s1,../ct/one.nii.gz,1\nc2,s1,../ct/series3,0\n")
    found = read_csv_dataset(csv)
    assert (found.findings, found.ids, [c.patient for c in found.cases]) == (("ICH",), ["c1", "c2"], ["s1", "s1"])

    csv.write_text("case,image,ICH\nc1,../ct/one.nii.gz,1\nc1,../ct/series3,0\n")
    with pytest.raises(CTFMError, match=r"labels.csv: case id 'c1' occurs twice \(rows 1 and 2\)"):
        read_csv_dataset(csv, id_column="case")
    csv.write_text("image,ICH\n../ct/one.nii.gz,yes\n")
    with pytest.raises(CTFMError, match=r"labels.csv: row 1 \(../ct/one\): column 'ICH' value 'yes' is not 0/1"):
        read_csv_dataset(csv)
    with pytest.raises(CTFMError, match=r"labels.csv: no column 'subject'"):
        read_csv_dataset(csv, patient_column="subject")
    with pytest.raises(CTFMError, match=r"labels.csv: no finding 'SDH' in this CSV \(has: ICH\)"):
        read_csv_dataset(csv, findings=["SDH"])
    csv.write_text("image\n../ct/one.nii.gz\n")
    with pytest.raises(CTFMError, match=r"labels.csv: no findings to read"):
        read_csv_dataset(csv)
    csv.write_text("image,ICH\n../ct/absent.nii.gz,1\n")
    with pytest.raises(CTFMError, match=r"labels.csv: row 1: image '../ct/absent.nii.gz' does not exist"):
        read_csv_dataset(csv)
    with pytest.raises(CTFMError, match=r"labels.csv: unknown triage dataset layout 'msd'"):
        read_triage_dataset("msd", csv)
    with pytest.raises(CTFMError, match=r"labels.csv: layout 'csv' takes no option 'level'"):
        read_triage_dataset("csv", csv, level="series")


# ------------------------------------------------------------------------------------------------------------
# Splits and subsamples


def synthetic_dataset(patients: int = 60, seed: int = 0) -> TriageDataset:
    """``patients`` patients of one or two cases; finding A in about 30% of patients, B in 4 patients only."""
    rng = np.random.default_rng(seed)
    cases = []
    for p in range(patients):
        a = float(rng.random() < 0.3)
        b = float(p in (3, 17, 29, 41))
        for k in range(1 + p % 2):
            cases.append(
                TriageCase(id=f"p{p}-c{k}", patient=f"p{p}", image=f"/data/p{p}-c{k}.nii.gz", labels={"A": a, "B": b})
            )
    return TriageDataset(findings=("A", "B"), cases=tuple(cases), source="synthetic")


def test_split_is_patient_level_stratified_and_seeded(tmp_path):
    data = synthetic_dataset()
    split = split_cases(data, seed=0)
    assert sorted(split) == ["test", "train", "validation"]
    assert sorted(i for ids in split.values() for i in ids) == sorted(data.ids)
    patient_of = {c.id: c.patient for c in data.cases}
    parts_of_patient = {}
    for part, ids in split.items():
        for i in ids:
            parts_of_patient.setdefault(patient_of[i], set()).add(part)
    assert all(len(parts) == 1 for parts in parts_of_patient.values())
    patients_in = {part: {patient_of[i] for i in ids} for part, ids in split.items()}
    assert abs(len(patients_in["train"]) - 42) <= 2 and len(patients_in["validation"]) >= 8
    for part, ids in split.items():
        labels = subset(data, ids).label_array()
        assert labels[:, 0].any() and (labels[:, 0] == 0).any(), part  # stratified on A
        assert labels[:, 1].any(), part  # B has 4 patients: one per part at least
    assert split_cases(data, seed=0) == split
    assert split_cases(data, seed=1) != split

    path = tmp_path / "splits" / "split.json"
    written = split_cases(data, seed=3, path=path)
    assert load_split(path) == written == json.loads(path.read_text())
    assert split_cases(data, seed=4, path=path) == written  # the file wins over the seed
    assert subset(data, written["test"]).ids == written["test"]

    small = subset(data, written["train"][:5])
    with pytest.raises(CTFMError, match=r"split.json: case '.*' \(.*\) is not in the dataset"):
        split_cases(small, path=path)
    path.write_text("{not json")
    with pytest.raises(CTFMError, match=r"split.json: not valid JSON"):
        load_split(path)
    path.write_text(json.dumps({"train": ["p0-c0"], "validation": ["p0-c0"], "test": []}))
    with pytest.raises(CTFMError, match=r"split.json: case 'p0-c0' is listed in train and validation"):
        load_split(path)
    path.write_text(json.dumps({"train": ["p1-c0"], "validation": ["p1-c1"], "test": []}))
    with pytest.raises(CTFMError, match=r"split.json: patient 'p1' has cases in both train and validation"):
        split_cases(data, path=path)
    with pytest.raises(CTFMError, match=r"synthetic: split fractions"):
        split_cases(data, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(CTFMError, match=r"synthetic: no case 'nope'"):
        subset(data, ["nope"])


def test_split_of_few_patients_fills_every_part():
    data = synthetic_dataset(patients=3)
    split = split_cases(data, fractions=(0.8, 0.1, 0.1))
    assert all(split[part] for part in split)
    with pytest.raises(CTFMError, match=r"cannot split an empty dataset"):
        split_cases(subset(data, []))


def test_label_fraction_keeps_positives_and_nests():
    data = synthetic_dataset(patients=100)
    small = label_fraction(data, 0.05, seed=0)
    labels = small.label_array()
    assert labels[:, 0].any() and (labels[:, 0] == 0).any()
    assert labels[:, 1].any() and (labels[:, 1] == 0).any()
    assert 7 <= len(small) <= 10  # 5% of 150 cases, plus the positives required
    larger = label_fraction(data, 0.3, seed=0)
    assert set(small.ids) <= set(larger.ids)
    assert abs(len(larger) - 45) <= 2
    rate = data.label_array()[:, 0].mean()
    assert abs(larger.label_array()[:, 0].mean() - rate) < 0.1
    assert label_fraction(data, 0.3, seed=0) == larger
    assert label_fraction(data, 0.3, seed=1) != larger
    assert label_fraction(data, 1.0, seed=0) == data
    with pytest.raises(CTFMError, match=r"synthetic: label fraction 0.0 is not in \(0, 1\]"):
        label_fraction(data, 0.0, seed=0)


def test_dataset_refuses_duplicate_ids():
    case = TriageCase(id="x", patient="p", image="/x.nii.gz", labels={"A": 1.0})
    with pytest.raises(CTFMError, match=r"somewhere: case id 'x' occurs twice"):
        TriageDataset(findings=("A",), cases=(case, case), source="somewhere")
