"""CT-FM's IDC selection: stand-in tables in IDC's real schemas exercise each filter; one run over the real index."""

import csv
import json
import subprocess
import sys

import idc_index_data
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from ctfm.errors import CTFMError
from ctfm.pretrain.idc_manifest import (
    CT_INDEX_COLUMNS,
    INDEX_COLUMNS,
    VOLUME_GEOMETRY_COLUMNS,
    counts_per_collection,
    format_report,
    select_series,
    write_selection,
)

BIGQUERY_TYPES = {"STRING": pa.string(), "FLOAT": pa.float64(), "INTEGER": pa.int64(), "BOOLEAN": pa.bool_()}

# uid: (collection, patient, modality, instances, size MB, SliceThickness mm, ImageType, unique_slice_positions)
# ImageType None: no ct_index row; unique None: no volume_geometry_index row.
AXIAL = ["ORIGINAL", "PRIMARY", "AXIAL"]
SERIES = {
    "1.1": ("alpha", "p1", "CT", 100, 500.0, 1.0, AXIAL, True),  # kept: 1 mm
    "1.2": ("alpha", "p2", "CT", 120, 600.0, 5.0, AXIAL, True),  # kept: 5 mm
    "1.3": ("alpha", "p2", "CT", 60, 30.0, 0.6, AXIAL, True),  # too thin
    "1.4": ("alpha", "p3", "CT", 60, 30.0, 7.0, AXIAL, True),  # too thick
    "1.5": ("alpha", "p3", "CT", 80, 40.0, 2.5, ["ORIGINAL", "PRIMARY", "LOCALIZER"], True),  # localizer
    "1.6": ("alpha", "p3", "CT", 80, 40.0, 2.5, AXIAL, False),  # duplicate slice positions
    "1.7": ("alpha", "p4", "CT", 50, 25.0, 2.0, AXIAL, True),  # 50 slices is not more than 50
    "1.8": ("alpha", "p4", "CT", 200, 100.0, None, None, True),  # not in ct_index (not CT Image Storage)
    "1.9": ("alpha", "p4", "CT", 90, 45.0, 3.0, AXIAL, None),  # not in volume_geometry_index
    "1.10": ("alpha", "p1", "CT", 70, 400.0, 2.0, AXIAL, True),  # kept
    "2.1": ("beta", "q1", "CT", 300, 1500.0, 3.0, AXIAL, True),  # kept
    "2.2": ("beta", "q1", "CT", 51, 25.5, 1.25, AXIAL, True),  # kept
    "2.3": ("beta", "q2", "CT", 10, 5.0, 3.0, AXIAL, True),  # too few slices
    "3.1": ("gamma", "r1", "MR", 100, 50.0, None, None, None),  # not CT
    "3.2": ("gamma", "r1", "SEG", 1, 1.0, None, None, None),  # not CT
}
KEPT = ["1.1", "1.10", "1.2", "2.1", "2.2"]  # sorted by collection, patient, study, series
OFFLINE_FUNNEL = [("series in the index", 15), ("Modality CT", 13), ("more than 50 slices", 11)]
FULL_FUNNEL = OFFLINE_FUNNEL + [
    ("slice thickness 1-5 mm", 8),
    ("no LOCALIZER image type", 7),
    ("no duplicate slice positions", 5),
]


def bucket_url(uid: str) -> str:
    return f"s3://idc-open-data/uuid-{uid.replace('.', '-')}/*"


def table_like(schema: pa.Schema, values: dict[str, list]) -> pa.Table:
    """A table with every column of ``schema``; those not in ``values`` are all null."""
    n = len(next(iter(values.values())))
    return pa.table({f.name: pa.array(values.get(f.name, [None] * n), type=f.type) for f in schema})


def idc_schema(index_name: str) -> pa.Schema:
    """The arrow schema of an idc-index table from the JSON schema ``idc-index-data`` ships."""
    fields = []
    for column in idc_index_data.INDEX_METADATA[index_name]["schema"]["columns"]:
        type_ = BIGQUERY_TYPES[column["type"]]
        fields.append(pa.field(column["name"], pa.list_(type_) if column["mode"] == "REPEATED" else type_))
    return pa.schema(fields)


@pytest.fixture
def idc_tables(tmp_path):
    """Paths of stand-in ``idc_index``, ``ct_index`` and ``volume_geometry_index`` parquet files."""
    uids = list(SERIES)
    rows = list(SERIES.values())
    index = table_like(
        pq.read_schema(idc_index_data.IDC_INDEX_PARQUET_FILEPATH),
        {
            "SeriesInstanceUID": uids,
            "collection_id": [r[0] for r in rows],
            "PatientID": [r[1] for r in rows],
            "StudyInstanceUID": [f"9.{r[1]}" for r in rows],
            "Modality": [r[2] for r in rows],
            "instanceCount": [r[3] for r in rows],
            "series_size_MB": [r[4] for r in rows],
            "license_short_name": ["CC BY 4.0"] * len(rows),
            "aws_bucket": ["idc-open-data"] * len(rows),
            "series_aws_url": [bucket_url(uid) for uid in uids],
        },
    )
    in_ct = [uid for uid, r in SERIES.items() if r[6] is not None]
    in_ct = in_ct + ["1.10"]  # a second row for one series: per-series reading must not double count
    ct_index = table_like(
        idc_schema("ct_index"),
        {
            "SeriesInstanceUID": in_ct,
            "SliceThickness": [SERIES[uid][5] for uid in in_ct],
            "ImageType": [SERIES[uid][6] for uid in in_ct],
        },
    )
    in_geometry = [uid for uid, r in SERIES.items() if r[7] is not None]
    geometry = table_like(
        idc_schema("volume_geometry_index"),
        {"SeriesInstanceUID": in_geometry, "unique_slice_positions": [SERIES[uid][7] for uid in in_geometry]},
    )
    paths = {}
    for name, table in [("idc_index", index), ("ct_index", ct_index), ("volume_geometry_index", geometry)]:
        paths[name] = tmp_path / f"{name}.parquet"
        pq.write_table(table, paths[name])
    return paths


def funnel_of(selection) -> list[tuple[str, int | None]]:
    return [(step.name, step.series_left) for step in selection.funnel]


def test_required_columns_are_in_idc_schemas():
    assert set(INDEX_COLUMNS) <= set(pq.read_schema(idc_index_data.IDC_INDEX_PARQUET_FILEPATH).names)
    assert set(CT_INDEX_COLUMNS) <= set(idc_schema("ct_index").names)
    assert set(VOLUME_GEOMETRY_COLUMNS) <= set(idc_schema("volume_geometry_index").names)


def test_offline_selection_is_ct_with_more_than_50_slices(idc_tables):
    selection = select_series(idc_tables["idc_index"])
    assert funnel_of(selection) == OFFLINE_FUNNEL + [
        ("slice thickness 1-5 mm", None),
        ("no LOCALIZER image type", None),
        ("no duplicate slice positions", None),
    ]
    assert counts_per_collection(selection.series) == [("alpha", 9, 4, 1.785), ("beta", 2, 1, 1.5255)]
    report = format_report(selection)
    assert "not applied: give --ct_index" in report and "not applied: give --volume_geometry_index" in report


def test_full_filter_keeps_1_and_5_mm_and_drops_the_rest(idc_tables):
    selection = select_series(idc_tables["idc_index"], idc_tables["ct_index"], idc_tables["volume_geometry_index"])
    assert funnel_of(selection) == FULL_FUNNEL
    assert selection.series["SeriesInstanceUID"].to_pylist() == KEPT
    assert counts_per_collection(selection.series) == [("alpha", 3, 2, 1.5), ("beta", 2, 1, 1.5255)]
    words = [line.split() for line in format_report(selection).splitlines()]
    assert words[:4] == [
        ["collection", "series", "patients", "size", "GB"],
        ["alpha", "3", "2", "1.5"],
        ["beta", "2", "1", "1.5"],
        ["total", "5", "3", "3.0"],
    ]
    assert words[-3:] == [
        ["slice", "thickness", "1-5", "mm", "8", "3"],
        ["no", "LOCALIZER", "image", "type", "7", "1"],
        ["no", "duplicate", "slice", "positions", "5", "2"],
    ]


def test_ct_index_as_csv_with_text_image_type(idc_tables, tmp_path):
    ct_index = pq.read_table(idc_tables["ct_index"])
    image_type = ["\\".join(values) for values in ct_index["ImageType"].to_pylist()]
    csv_path = tmp_path / "ct_index.csv"
    pa_csv.write_csv(ct_index.drop_columns(["ImageType", "ScanOptions", "ConvolutionKernel"]).append_column(
        "ImageType", pa.array(image_type)), csv_path)
    selection = select_series(idc_tables["idc_index"], csv_path, idc_tables["volume_geometry_index"])
    assert funnel_of(selection) == FULL_FUNNEL


def test_collections_and_exclusions(idc_tables):
    only_beta = select_series(idc_tables["idc_index"], collections="beta")
    assert set(only_beta.series["collection_id"].to_pylist()) == {"beta"}
    assert funnel_of(only_beta)[1] == ("collections beta", 3)
    without_alpha = select_series(idc_tables["idc_index"], exclude_collections=("alpha", "gamma"))
    assert without_alpha.series["SeriesInstanceUID"].to_pylist() == ["2.1", "2.2"]
    only_mr = select_series(idc_tables["idc_index"], collections="gamma")
    assert only_mr.series.num_rows == 0
    assert format_report(only_mr).splitlines()[1].split() == ["total", "0", "0", "0.0"]
    with pytest.raises(CTFMError, match=r"idc_index.parquet: no collection delta in this index"):
        select_series(idc_tables["idc_index"], collections="beta,delta")


def test_limit_draws_a_seeded_subset(idc_tables):
    tables = (idc_tables["idc_index"], idc_tables["ct_index"], idc_tables["volume_geometry_index"])
    first = select_series(*tables, limit=2, seed=3)
    again = select_series(*tables, limit=2, seed=3)
    uids = first.series["SeriesInstanceUID"].to_pylist()
    assert len(uids) == 2 and set(uids) <= set(KEPT)
    assert uids == again.series["SeriesInstanceUID"].to_pylist()
    assert funnel_of(first)[-1] == ("random 2 (seed 3)", 2)
    assert select_series(*tables, limit=50).series.num_rows == 5
    for bad in (0, -1, True, 2.5):
        with pytest.raises(CTFMError, match="--limit"):
            select_series(*tables, limit=bad)


def test_written_manifest_series_list_and_record(idc_tables, tmp_path):
    selection = select_series(idc_tables["idc_index"], idc_tables["ct_index"], idc_tables["volume_geometry_index"])
    manifest, series_csv, record = write_selection(selection, tmp_path / "out")
    assert manifest.read_text().splitlines() == [f"cp {bucket_url(uid)} ." for uid in KEPT]
    with open(series_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["SeriesInstanceUID"] for row in rows] == KEPT
    assert list(rows[0]) == [c for c in INDEX_COLUMNS if c != "Modality"]
    assert rows[0]["PatientID"] == "p1" and rows[0]["instanceCount"] == "100" and rows[0]["series_size_MB"] == "500"
    saved = json.loads(record.read_text())
    assert saved["series"] == 5
    assert [(s["step"], s["series_left"]) for s in saved["funnel"]] == FULL_FUNNEL

    first = [path.read_bytes() for path in (manifest, series_csv, record)]
    again = select_series(idc_tables["idc_index"], idc_tables["ct_index"], idc_tables["volume_geometry_index"])
    write_selection(again, tmp_path / "out")
    assert [path.read_bytes() for path in (manifest, series_csv, record)] == first
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.s5cmd", "selection.json", "series.csv"]


def test_bad_tables_name_the_file_and_the_problem(idc_tables, tmp_path):
    index = idc_tables["idc_index"]
    with pytest.raises(CTFMError, match=r"missing.parquet: no such ct_index file"):
        select_series(index, tmp_path / "missing.parquet")
    no_thickness = tmp_path / "no_thickness.parquet"
    pq.write_table(pq.read_table(idc_tables["ct_index"]).drop_columns(["SliceThickness"]), no_thickness)
    with pytest.raises(CTFMError, match=r"no_thickness.parquet: ct_index lacks column\(s\) SliceThickness"):
        select_series(index, no_thickness)
    not_parquet = tmp_path / "geometry.parquet"
    not_parquet.write_text("not a table")
    with pytest.raises(CTFMError, match=r"geometry.parquet: not a readable parquet volume_geometry_index table"):
        select_series(index, volume_geometry_index=not_parquet)
    text_thickness = tmp_path / "ct_index.csv"
    text_thickness.write_text("SeriesInstanceUID,SliceThickness,ImageType\n1.1,thin,AXIAL\n")
    with pytest.raises(CTFMError, match=r"ct_index.csv: ct_index column SliceThickness is not double"):
        select_series(index, text_thickness)


def test_command_line_reports_bad_input_on_one_line(idc_tables, tmp_path):
    command = [sys.executable, "-m", "ctfm.pretrain.idc_manifest", "write", "--out", str(tmp_path / "out")]
    good = subprocess.run(
        command + ["--idc_index", str(idc_tables["idc_index"]), "--ct_index", str(idc_tables["ct_index"])],
        capture_output=True, text=True, check=True,
    )
    assert ["total", "7", "5", "3.1"] in [line.split() for line in good.stdout.splitlines()]
    assert (tmp_path / "out" / "manifest.s5cmd").read_text().count("cp s3://") == 7
    bad = subprocess.run(
        command + ["--idc_index", str(idc_tables["idc_index"]), "--volume_geometry_index", str(tmp_path / "no.csv")],
        capture_output=True, text=True,
    )
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'no.csv'}: no such volume_geometry_index file"]


def test_real_offline_index():
    """idc-index-data 25.0.5: 178,517 CT series with more than 50 slices, NLST the largest collection."""
    selection = select_series()
    assert dict(funnel_of(selection))["more than 50 slices"] == 178_517
    assert counts_per_collection(selection.series)[:3] == [
        pytest.approx(("nlst", 130_232, 26_246, 10_986.4), abs=0.1),
        pytest.approx(("eay131", 9_218, 2_313, 711.3), abs=0.1),
        pytest.approx(("phantom_fda", 4_432, 7, 782.2), abs=0.1),
    ]
