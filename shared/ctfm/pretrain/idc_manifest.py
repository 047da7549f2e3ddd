"""CT-FM's pre-training data selection from Imaging Data Commons, as a download manifest.

CT-FM pre-trained on the public CT series of IDC with slice thickness 1-5 mm, more than 50 slices, no
duplicate slice positions and no LOCALIZER image type, and never published the list. This module rebuilds it
from IDC's series index (``idc_index.parquet`` shipped by the ``idc-index-data`` package, one row per series):

1. ``Modality == "CT"`` and ``instanceCount > 50`` -- from the offline index alone.
2. ``SliceThickness`` (mm) within [1, 5] and no ``LOCALIZER`` in ``ImageType`` -- from ``ct_index``.
3. ``unique_slice_positions`` -- from ``volume_geometry_index``.

``ct_index`` and ``volume_geometry_index`` are not shipped offline; ``idc-index`` downloads them
(``IDCClient().fetch_index("ct_index")``) from
``https://github.com/ImagingDataCommons/idc-index-data/releases/download/<version>/<name>.parquet``. Their
schemas ship in ``idc-index-data`` (``<name>_schema.json``): both hold one row per series, joined on
``SeriesInstanceUID``. A step whose table is not given is reported as not applied. Per-series rules (a table
with several rows per series is read the same way, every row must pass):

- a series without a ``ct_index`` row (not CT Image Storage, e.g. secondary captures or raw data labelled
  CT) or with a missing ``SliceThickness`` fails the thickness step;
- ``ImageType`` is a list in parquet; in a CSV any text holding ``LOCALIZER`` counts as a localizer;
- ``unique_slice_positions`` is a boolean (IDC computes it as distinct slice positions == instances); a series
  without a ``volume_geometry_index`` row fails, which includes every series with a LOCALIZER or MIP
  instance (IDC leaves those out of that table).

"Public": every series in the index lies in IDC's open buckets (``aws_bucket`` ``idc-open-data*``) and the
index has no access column, so nothing is filtered for access. ``license_short_name`` (CC BY, CC BY-NC,
NLM terms) is not filtered either; it is written to ``series.csv`` for whoever needs to choose.

Command line (both print the series per collection and what each filter step removed)::

    python -m ctfm.pretrain.idc_manifest counts [--ct_index PATH] [--volume_geometry_index PATH]
    python -m ctfm.pretrain.idc_manifest write --out DIR [--ct_index PATH] [--volume_geometry_index PATH]
        [--collections nlst,eay131] [--exclude_collections phantom_fda] [--limit N] [--seed 0]
        [--idc_index PATH]

``write`` leaves in ``DIR``: ``manifest.s5cmd`` (one ``cp s3://<bucket>/<crdc_series_uuid>/* .`` per
series, the manifest ``idc download`` and ``s5cmd run`` take), ``series.csv`` (the series list) and
``selection.json`` (options, index version, funnel). Tables may be parquet or CSV (``.csv``, ``.csv.gz``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import fire
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from ctfm.errors import CTFMError
from ctfm.files import atomic_path

__all__ = [
    "CT_INDEX_COLUMNS",
    "INDEX_COLUMNS",
    "MANIFEST_NAME",
    "MIN_SLICES_EXCLUSIVE",
    "SELECTION_JSON_NAME",
    "SERIES_CSV_NAME",
    "THICKNESS_RANGE_MM",
    "VOLUME_GEOMETRY_COLUMNS",
    "Funnel",
    "FunnelStep",
    "Selection",
    "collection_names",
    "column_as",
    "counts_per_collection",
    "default_index_path",
    "format_report",
    "manifest_lines",
    "read_table",
    "select_series",
    "thickness_and_localizer_per_series",
    "unique_positions_per_series",
    "write_selection",
]

#: Slice thickness range CT-FM kept, in mm, both ends included.
THICKNESS_RANGE_MM = (1.0, 5.0)
#: CT-FM kept series with more than this many slices (``instanceCount``).
MIN_SLICES_EXCLUSIVE = 50

#: Columns read from the series index; ``series.csv`` holds them (less Modality) in this order.
INDEX_COLUMNS = (
    "SeriesInstanceUID",
    "collection_id",
    "PatientID",
    "StudyInstanceUID",
    "instanceCount",
    "series_size_MB",
    "series_aws_url",
    "license_short_name",
    "Modality",
)
CT_INDEX_COLUMNS = ("SeriesInstanceUID", "SliceThickness", "ImageType")
VOLUME_GEOMETRY_COLUMNS = ("SeriesInstanceUID", "unique_slice_positions")

MANIFEST_NAME = "manifest.s5cmd"
SERIES_CSV_NAME = "series.csv"
SELECTION_JSON_NAME = "selection.json"


@dataclass(frozen=True)
class FunnelStep:
    """One filter step: its name and the series left after it (``None``: not applied, ``needs`` says why)."""

    name: str
    series_left: int | None
    needs: str = ""


@dataclass(frozen=True)
class Selection:
    """The selected series (one row per series, sorted by collection, patient, study, series) and the funnel."""

    series: pa.Table
    funnel: list[FunnelStep]
    provenance: dict


def default_index_path() -> Path:
    """The ``idc_index.parquet`` shipped by the installed ``idc-index-data`` package."""
    try:
        import idc_index_data
    except ImportError as err:
        raise CTFMError(
            "idc_index_data: not installed; pip install 'ctfm[data]' or pass --idc_index PATH"
        ) from err
    return Path(idc_index_data.IDC_INDEX_PARQUET_FILEPATH)


def read_table(path: str | os.PathLike, table_name: str, columns: tuple[str, ...]) -> pa.Table:
    """``columns`` of a parquet or CSV (``.csv``, ``.csv.gz``) table, in that order.

    Raises:
        CTFMError: the file is missing, unreadable, or lacks one of ``columns``.
    """
    path = Path(path)
    if not path.is_file():
        raise CTFMError(f"{path}: no such {table_name} file")
    is_csv = path.name.lower().endswith((".csv", ".csv.gz"))
    try:
        if is_csv:
            uids_as_text = pa_csv.ConvertOptions(column_types={"SeriesInstanceUID": pa.string()})
            table = pa_csv.read_csv(path, convert_options=uids_as_text)
        else:
            table = pq.read_table(path, columns=[c for c in columns if c in pq.read_schema(path).names])
    except (pa.ArrowException, OSError) as err:
        kind = "CSV" if is_csv else "parquet"
        raise CTFMError(f"{path}: not a readable {kind} {table_name} table ({str(err).splitlines()[0]})") from err
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise CTFMError(f"{path}: {table_name} lacks column(s) {', '.join(missing)} (needs {', '.join(columns)})")
    return table.select(list(columns))


def column_as(table: pa.Table, name: str, type_: pa.DataType, path: str | os.PathLike, table_name: str) -> pa.Array:
    """Column ``name`` cast to ``type_``, or a :class:`CTFMError` naming the file and the column."""
    try:
        return pc.cast(table[name], type_).combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise CTFMError(f"{path}: {table_name} column {name} is not {type_} ({str(err).splitlines()[0]})") from err


def thickness_and_localizer_per_series(path: str | os.PathLike) -> pa.Table:
    """From ``ct_index``: ``SeriesInstanceUID``, ``thickness_ok`` (every row 1-5 mm), ``localizer`` (any row).

    Per-series semantics hold for one row per series (IDC's layout) and for several rows per series alike.
    """
    table = read_table(path, "ct_index", CT_INDEX_COLUMNS)
    thickness_mm = column_as(table, "SliceThickness", pa.float64(), path, "ct_index")
    low, high = THICKNESS_RANGE_MM
    thickness_ok = pc.and_(pc.greater_equal(thickness_mm, low), pc.less_equal(thickness_mm, high))
    image_type = table["ImageType"].combine_chunks()
    if pa.types.is_list(image_type.type) or pa.types.is_large_list(image_type.type):
        image_type = pc.binary_join(image_type, "\\")
    elif not (pa.types.is_string(image_type.type) or pa.types.is_large_string(image_type.type)):
        image_type = column_as(table, "ImageType", pa.string(), path, "ct_index")
    localizer = pc.match_substring(image_type, "LOCALIZER", ignore_case=True)
    rows = pa.table({
        "SeriesInstanceUID": column_as(table, "SeriesInstanceUID", pa.string(), path, "ct_index"),
        "thickness_ok": pc.fill_null(thickness_ok, False),
        "localizer": pc.fill_null(localizer, False),
    })
    per_series = rows.group_by("SeriesInstanceUID").aggregate([("thickness_ok", "all"), ("localizer", "any")])
    return per_series.rename_columns(["SeriesInstanceUID", "thickness_ok", "localizer"])


def unique_positions_per_series(path: str | os.PathLike) -> pa.Table:
    """From ``volume_geometry_index``: ``SeriesInstanceUID``, ``unique_positions`` (true on every row)."""
    table = read_table(path, "volume_geometry_index", VOLUME_GEOMETRY_COLUMNS)
    rows = pa.table({
        "SeriesInstanceUID": column_as(table, "SeriesInstanceUID", pa.string(), path, "volume_geometry_index"),
        "unique_positions": pc.fill_null(
            column_as(table, "unique_slice_positions", pa.bool_(), path, "volume_geometry_index"), False
        ),
    })
    per_series = rows.group_by("SeriesInstanceUID").aggregate([("unique_positions", "all")])
    return per_series.rename_columns(["SeriesInstanceUID", "unique_positions"])


def collection_names(value, option: str) -> list[str]:
    """Collection ids from ``"a,b"``, ``["a", "b"]`` or ``("a", "b")`` (what fire passes); ``[]`` for ``None``."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise CTFMError(f"{option}: expected collection ids separated by commas, got {value!r}")
    return sorted({str(item).strip() for item in items if str(item).strip()})


class Funnel:
    """Applies filter steps to the series table and records how many series each leaves."""

    def __init__(self, series: pa.Table):
        self.series = series
        self.steps = [FunnelStep("series in the index", series.num_rows)]

    def keep(self, name: str, mask: pa.Array) -> None:
        """Keep the series where ``mask`` is true (null counts as false)."""
        self.series = self.series.filter(pc.fill_null(mask, False))
        self.steps.append(FunnelStep(name, self.series.num_rows))

    def keep_listed(self, name: str, series_uids: pa.Array, listed: bool = True) -> None:
        """Keep the series whose ``SeriesInstanceUID`` is in ``series_uids`` (``listed=False``: is not)."""
        is_listed = pc.is_in(self.series["SeriesInstanceUID"], value_set=series_uids)
        self.keep(name, is_listed if listed else pc.invert(is_listed))

    def skip(self, name: str, needs: str) -> None:
        """Record a step that could not be applied for want of ``needs``."""
        self.steps.append(FunnelStep(name, None, needs))

    def draw(self, limit: int, seed: int) -> None:
        """Keep ``limit`` series drawn at random with ``seed``; the draw ignores the index's row order."""
        by_uid = self.series.sort_by("SeriesInstanceUID")
        drawn = np.random.default_rng(seed).permutation(by_uid.num_rows)[:limit]
        self.series = by_uid.take(pa.array(np.sort(drawn)))
        self.steps.append(FunnelStep(f"random {limit:,} (seed {seed})", self.series.num_rows))


def select_series(
    idc_index: str | os.PathLike | None = None,
    ct_index: str | os.PathLike | None = None,
    volume_geometry_index: str | os.PathLike | None = None,
    collections=None,
    exclude_collections=None,
    limit: int | None = None,
    seed: int = 0,
) -> Selection:
    """CT-FM's selection from the series index ``idc_index`` (default: the one ``idc-index-data`` ships).

    ``collections`` / ``exclude_collections`` restrict the collection ids (``"a,b"`` or a list); ``limit``
    keeps that many series drawn at random with ``seed``.

    Raises:
        CTFMError: a table is missing or malformed, a collection id is not in the index, or ``limit`` is not a
            positive whole number.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise CTFMError(f"--limit: expected a positive whole number of series, got {limit!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CTFMError(f"--seed: expected a whole number, got {seed!r}")
    index_path = Path(idc_index) if idc_index is not None else default_index_path()
    funnel = Funnel(read_table(index_path, "idc_index", INDEX_COLUMNS))
    index_version = (funnel.series.schema.metadata or {}).get(b"idc_index_data_version", b"").decode()

    included = collection_names(collections, "--collections")
    excluded = collection_names(exclude_collections, "--exclude_collections")
    unknown = sorted(set(included + excluded) - set(pc.unique(funnel.series["collection_id"]).to_pylist()))
    if unknown:
        raise CTFMError(f"{index_path}: no collection {', '.join(unknown)} in this index")
    if included:
        funnel.keep(f"collections {', '.join(included)}", pc.is_in(funnel.series["collection_id"], pa.array(included)))
    if excluded:
        in_excluded = pc.is_in(funnel.series["collection_id"], pa.array(excluded))
        funnel.keep(f"without collections {', '.join(excluded)}", pc.invert(in_excluded))

    funnel.keep("Modality CT", pc.equal(funnel.series["Modality"], "CT"))
    instances = funnel.series["instanceCount"]
    funnel.keep(f"more than {MIN_SLICES_EXCLUSIVE} slices", pc.greater(instances, MIN_SLICES_EXCLUSIVE))
    low, high = THICKNESS_RANGE_MM
    thickness_step, localizer_step = f"slice thickness {low:g}-{high:g} mm", "no LOCALIZER image type"
    if ct_index is not None:
        ct = thickness_and_localizer_per_series(ct_index)
        funnel.keep_listed(thickness_step, ct.filter(ct["thickness_ok"])["SeriesInstanceUID"])
        funnel.keep_listed(localizer_step, ct.filter(ct["localizer"])["SeriesInstanceUID"], listed=False)
    else:
        funnel.skip(thickness_step, "--ct_index")
        funnel.skip(localizer_step, "--ct_index")
    if volume_geometry_index is not None:
        geometry = unique_positions_per_series(volume_geometry_index)
        unique = geometry.filter(geometry["unique_positions"])["SeriesInstanceUID"]
        funnel.keep_listed("no duplicate slice positions", unique)
    else:
        funnel.skip("no duplicate slice positions", "--volume_geometry_index")
    if limit is not None:
        funnel.draw(limit, seed)

    order = ("collection_id", "PatientID", "StudyInstanceUID", "SeriesInstanceUID")
    selected = funnel.series.sort_by([(name, "ascending") for name in order])
    urls = selected["series_aws_url"]
    url_ok = pc.fill_null(pc.and_(pc.starts_with(urls, "s3://"), pc.ends_with(urls, "/*")), False)
    if not pc.all(url_ok, min_count=0).as_py():
        raise CTFMError(f"{index_path}: series_aws_url is not s3://<bucket>/<crdc_series_uuid>/* for every series")
    provenance = {
        "idc_index": str(index_path.resolve()),
        "idc_index_data_version": index_version,
        "ct_index": None if ct_index is None else str(Path(ct_index).resolve()),
        "volume_geometry_index": None if volume_geometry_index is None else str(Path(volume_geometry_index).resolve()),
        "collections": included,
        "exclude_collections": excluded,
        "limit": limit,
        "seed": seed,
    }
    return Selection(selected, funnel.steps, provenance)


def counts_per_collection(series: pa.Table) -> list[tuple[str, int, int, float]]:
    """``(collection_id, series, patients, size in GB = 1e3 MB)`` per collection, most series first."""
    grouped = series.group_by("collection_id").aggregate(
        [("SeriesInstanceUID", "count"), ("PatientID", "count_distinct"), ("series_size_MB", "sum")]
    )
    rows = [
        (r["collection_id"], r["SeriesInstanceUID_count"], r["PatientID_count_distinct"], r["series_size_MB_sum"] / 1e3)
        for r in grouped.to_pylist()
    ]
    return sorted(rows, key=lambda row: (-row[1], row[0]))


def format_report(selection: Selection) -> str:
    """The per-collection table with a total line, then the funnel (series left and removed per step)."""
    per_collection = counts_per_collection(selection.series)
    width = max([len("collection"), len("total")] + [len(row[0]) for row in per_collection])
    lines = [f"{'collection':<{width}}  {'series':>9}  {'patients':>9}  {'size GB':>11}"]
    for name, n_series, n_patients, size_gb in per_collection:
        lines.append(f"{name:<{width}}  {n_series:>9,}  {n_patients:>9,}  {size_gb:>11,.1f}")
    patients = selection.series.group_by(["collection_id", "PatientID"]).aggregate([]).num_rows
    total_gb = (pc.sum(selection.series["series_size_MB"]).as_py() or 0.0) / 1e3
    lines.append(f"{'total':<{width}}  {selection.series.num_rows:>9,}  {patients:>9,}  {total_gb:>11,.1f}")

    step_width = max(len(step.name) for step in selection.funnel)
    lines += ["", f"{'filter step':<{step_width}}  {'series':>9}  {'removed':>9}"]
    previous = None
    for step in selection.funnel:
        if step.series_left is None:
            lines.append(f"{step.name:<{step_width}}  not applied: give {step.needs}")
            continue
        removed = "" if previous is None else f"{previous - step.series_left:,}"
        lines.append(f"{step.name:<{step_width}}  {step.series_left:>9,}  {removed:>9}")
        previous = step.series_left
    return "\n".join(lines)


def manifest_lines(series: pa.Table) -> list[str]:
    """``cp s3://<bucket>/<crdc_series_uuid>/* .`` per series: the index's ``series_aws_url``, as IDC writes it."""
    return [f"cp {url} ." for url in series["series_aws_url"].to_pylist()]


def write_selection(selection: Selection, out: str | os.PathLike) -> list[Path]:
    """Write ``manifest.s5cmd``, ``series.csv`` and ``selection.json`` into ``out``, each atomically.

    Returns the paths written. Same selection, same bytes.
    """
    out = Path(out)
    columns = [name for name in INDEX_COLUMNS if name != "Modality"]
    manifest_path, csv_path, json_path = out / MANIFEST_NAME, out / SERIES_CSV_NAME, out / SELECTION_JSON_NAME
    with atomic_path(manifest_path) as tmp:
        tmp.write_text("".join(line + "\n" for line in manifest_lines(selection.series)))
    with atomic_path(csv_path) as tmp:
        pa_csv.write_csv(selection.series.select(columns), tmp)
    record = {
        **selection.provenance,
        "series": selection.series.num_rows,
        "funnel": [{"step": s.name, "series_left": s.series_left} for s in selection.funnel],
    }
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return [manifest_path, csv_path, json_path]


def counts(
    ct_index: str | None = None,
    volume_geometry_index: str | None = None,
    collections=None,
    exclude_collections=None,
    limit: int | None = None,
    seed: int = 0,
    idc_index: str | None = None,
) -> None:
    """Print the series per collection (series, patients, size in GB) and what each filter step removed.

    Args:
        ct_index: IDC's ``ct_index`` table (parquet or CSV); applies the thickness and LOCALIZER steps.
        volume_geometry_index: IDC's ``volume_geometry_index`` table; applies the duplicate-position step.
        collections: keep only these collection ids, e.g. ``nlst,eay131``.
        exclude_collections: drop these collection ids.
        limit: keep this many series, drawn at random.
        seed: seed of that draw.
        idc_index: series index parquet (default: the one ``idc-index-data`` ships).
    """
    selection = select_series(idc_index, ct_index, volume_geometry_index, collections, exclude_collections, limit, seed)
    print(format_report(selection))


def write(
    out: str,
    ct_index: str | None = None,
    volume_geometry_index: str | None = None,
    collections=None,
    exclude_collections=None,
    limit: int | None = None,
    seed: int = 0,
    idc_index: str | None = None,
) -> None:
    """Print what ``counts`` prints; write manifest.s5cmd, series.csv and selection.json into ``out``.

    Download with ``idc download manifest.s5cmd`` or ``s5cmd --no-sign-request run manifest.s5cmd``. The other
    arguments are those of ``counts``.
    """
    selection = select_series(idc_index, ct_index, volume_geometry_index, collections, exclude_collections, limit, seed)
    print(format_report(selection))
    for path in write_selection(selection, out):
        print(f"wrote {path}")


if __name__ == "__main__":
    from ctfm.errors import install_excepthook

    install_excepthook()
    fire.Fire({"counts": counts, "write": write})
