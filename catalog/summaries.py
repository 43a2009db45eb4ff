"""``dicom.series`` and ``dicom.studies`` kept up to date from the rows of one batch.

Both the batch ingest and the stream call :func:`update_summaries` after committing
``dicom.instances``. Only the series and studies a batch touched are aggregated again, from
one filtered scan of ``dicom.instances``; their rows are replaced in one Delta commit per
table, so the summaries are fresh as soon as the instances are, without a Spark job and
without rewriting the whole table. The module imports neither pyspark nor pyflink: the
stream runs it in its own interpreter (pyarrow 16 there), the ingest in the main one.

Aggregation rules (what the Spark SQL rebuild of earlier versions defined):

- one row per non-NULL ``series_instance_uid`` / ``study_instance_uid``;
- ``first(x)`` is the value of the series' (study's) instance with the smallest ``path``,
  NULL included, so the row does not depend on file or task order and all ``first`` columns
  of a row come from the same instance;
- ``study_date`` is the minimum non-NULL date; ``instances`` counts rows; ``bytes`` sums
  ``file_size`` (NULL when no instance has one); a study's ``series`` counts distinct
  non-NULL series UIDs and ``modalities`` lists its distinct non-NULL modalities, sorted.

Concurrency: each commit records the Delta application transaction
``dicomlake.summaries`` (version = the ``dicom.instances`` version it was computed from).
Two summary commits racing on one table therefore conflict in delta-rs instead of the older
computation silently overwriting the newer one; the loser opens the table again, scans the
latest instances and retries.
"""

from __future__ import annotations

import bisect
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomlake.catalog import tables

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["SERIES", "STUDIES", "TouchedKeys", "catch_up", "update_summaries"]

SERIES, STUDIES = tables.SERIES.name, tables.STUDIES.name
APP_ID = "dicomlake.summaries"
"""Delta application transaction id every summary commit carries (see module docstring)."""
FILE_ROWS = 4096
"""Most rows per summary file: replacing one key rewrites at most this many rows."""
COMMIT_ATTEMPTS = 8


@dataclass(frozen=True)
class _Summary:
    """How one summary table (declared in :mod:`dicomlake.catalog.tables`) is aggregated."""

    spec: tables.TableSpec
    firsts: tuple[str, ...]
    """Columns taken from the key's instance with the smallest path."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def key(self) -> str:
        return self.spec.keys[0]


_SUMMARIES = (
    _Summary(tables.SERIES, ("study_instance_uid", "patient_id", "modality",
                             "body_part_examined", "series_number", "series_description",
                             "manufacturer", "rows", "columns")),
    _Summary(tables.STUDIES, ("patient_id", "patient_name", "study_description",
                              "accession_number")),
)


INSTANCE_COLUMNS: tuple[str, ...] = (
    "path", "series_instance_uid", "study_instance_uid", "patient_id", "patient_name",
    "modality", "body_part_examined", "series_number", "series_description", "manufacturer",
    "study_date", "study_description", "accession_number", "file_size", "rows", "columns")
"""The ``dicom.instances`` columns the summaries are made of (the only ones scanned)."""


@dataclass(frozen=True)
class TouchedKeys:
    """Series and study UIDs whose summary rows must be computed again."""

    series: frozenset[str] = frozenset()
    studies: frozenset[str] = frozenset()

    @classmethod
    def of_rows(cls, rows: pa.Table | pa.RecordBatch) -> TouchedKeys:
        """The keys of instance rows (added, removed or refused); other columns are ignored."""
        import pyarrow.compute as pc

        def keys(column: str) -> frozenset[str]:
            if column not in rows.column_names:
                return frozenset()
            return frozenset(pc.unique(rows.column(column)).drop_null().to_pylist())

        return cls(keys("series_instance_uid"), keys("study_instance_uid"))

    def __or__(self, other: TouchedKeys) -> TouchedKeys:
        return TouchedKeys(self.series | other.series, self.studies | other.studies)

    def of(self, table: _Summary) -> frozenset[str]:
        """The touched keys of one summary table."""
        return self.series if table.name == SERIES else self.studies


def update_summaries(warehouse_path: str | Path,
                     changed: TouchedKeys | pa.Table | pa.RecordBatch | None = None, *,
                     everything: bool = False) -> dict[str, int]:
    """Bring ``dicom.series`` and ``dicom.studies`` up to date for what one batch changed.

    Call it after the batch's ``dicom.instances`` commit. ``changed`` is either the
    batch's instance rows as Arrow (only ``series_instance_uid`` and ``study_instance_uid``
    are read: pass the committed rows, and for a re-ingest also the rows it removed) or the
    :class:`TouchedKeys` themselves. Every touched series and study is aggregated again
    from ``dicom.instances`` (one filtered scan of the columns needed); its row is replaced,
    or deleted when no instance is left. Cost grows with the batch (plus that scan), not with
    the summary tables.

    A summary table that does not exist yet (a new lake, or one made by an older version)
    is built from all of ``dicom.instances``; ``everything=True`` rebuilds both that way.

    Returns:
        table name -> new Delta version, for the tables that got a commit (none when nothing
        changed or ``dicom.instances`` does not exist).
    """
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    if not DeltaTable.is_deltatable(str(tables.INSTANCES.path(warehouse_path))):
        return {}
    if changed is None:
        touched = TouchedKeys()
    elif isinstance(changed, TouchedKeys):
        touched = changed
    else:
        touched = TouchedKeys.of_rows(changed)
    versions: dict[str, int] = {}
    attempt = 0
    todo = list(_SUMMARIES)
    while todo:
        attempt += 1
        # The summary tables are opened BEFORE instances are read: a summary commit made
        # after this point, from instances we do not see, makes ours conflict.
        plans = [plan for table in todo
                 if (plan := _Plan.of(table, warehouse_path, touched, everything)).needed]
        if not plans:
            break
        instances = DeltaTable(str(tables.INSTANCES.path(warehouse_path)))
        rows = _scan_instances(instances, plans)
        todo = []
        for plan in plans:
            try:
                version = plan.commit(rows, instances.version())
            except DeltaError as exc:
                if not plan.lost_race(exc) or attempt == COMMIT_ATTEMPTS:
                    raise
                todo.append(plan.table)  # again, from the newer tables
                continue
            if version is not None:
                versions[plan.table.name] = version
        if todo:
            time.sleep(0.05 * attempt)
    return versions


def catch_up(warehouse_path: str | Path) -> dict[str, int]:
    """Update the summaries for instance commits they have not seen.

    A writer that dies between its ``dicom.instances`` commit and its summary commit leaves
    those rows out of ``series``/``studies``, and a replay does not bring them back (the
    records are already committed). Each summary commit records the instances version it
    saw (:data:`APP_ID`); the keys of the files added or removed since the oldest such
    version are updated here. A writer calls this when it starts.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    inst_path = str(tables.INSTANCES.path(warehouse_path))
    if not DeltaTable.is_deltatable(inst_path):
        return {}
    seen: list[int | None] = []
    for table in _SUMMARIES:
        path = str(table.spec.path(warehouse_path))
        seen.append(DeltaTable(path).transaction_version(APP_ID)
                    if DeltaTable.is_deltatable(path) else None)
    instances = DeltaTable(inst_path)
    if None in seen:
        return update_summaries(warehouse_path, everything=True)
    oldest = min(v for v in seen if v is not None)
    if oldest >= instances.version():
        return {}
    try:
        before = set(DeltaTable(inst_path, version=oldest).file_uris())
    except DeltaError:  # that version's log was cleaned up: no diff to take
        return update_summaries(warehouse_path, everything=True)
    now = set(instances.file_uris())
    changed = sorted(before ^ now)
    keys = ["series_instance_uid", "study_instance_uid"]
    rows = [pq.read_table(uri, columns=keys) for uri in changed]
    if not rows:
        return {}
    return update_summaries(warehouse_path, pa.concat_tables(rows))


@dataclass(frozen=True)
class _Plan:
    """One summary table's update: the table as opened, and the keys to replace (None:
    all of them, when the table is rebuilt)."""

    table: _Summary
    path: Path
    target: Any
    keys: frozenset[str] | None

    @classmethod
    def of(cls, table: _Summary, warehouse_path: str | Path, touched: TouchedKeys,
           everything: bool) -> _Plan:
        from deltalake import DeltaTable

        path = table.spec.path(warehouse_path)
        target = DeltaTable(str(path)) if DeltaTable.is_deltatable(str(path)) else None
        rebuild = everything or target is None
        return cls(table, path, target, None if rebuild else touched.of(table))

    @property
    def needed(self) -> bool:
        return self.keys is None or bool(self.keys)

    def where(self) -> Any:
        """The instances this update aggregates (a pyarrow dataset expression)."""
        import pyarrow as pa
        import pyarrow.dataset as ds

        column = ds.field(self.table.key)
        if self.keys is None:
            return column.is_valid()
        return column.isin(pa.array(sorted(self.keys), pa.string()))

    def commit(self, rows: pa.Table, instances_version: int) -> int | None:
        summary = _aggregate(self.table, rows.filter(self.where()))
        return _commit(self.path, self.table, self.target, summary, self.keys,
                       instances_version)

    def lost_race(self, exc: Exception) -> bool:
        """Whether a failed commit lost to a concurrent summary commit (or to another
        process creating the table): then it is done again from the newer state."""
        from deltalake import DeltaTable
        from deltalake.exceptions import CommitFailedError

        return isinstance(exc, CommitFailedError) or (
            self.target is None and DeltaTable.is_deltatable(str(self.path)))


def _scan_instances(instances: Any, plans: list[_Plan]) -> pa.Table:
    """ONE scan of ``dicom.instances``: the needed columns of the rows any plan needs."""
    import functools
    import operator

    from dicomlake.catalog.snapshots import read_table

    where = functools.reduce(operator.or_, (plan.where() for plan in plans))
    # delta-rs scan, not to_pyarrow_dataset: the latter's filesystem handler aborts the
    # process at exit now and then (delta-rs 1.6.6, "terminate called without an active
    # exception"), which a CLI run would report as a crash
    return read_table(instances, INSTANCE_COLUMNS).filter(where)


def _aggregate(table: _Summary, rows: pa.Table) -> pa.Table:
    """One summary row per key of ``rows`` (instance rows), sorted by key, in the table's
    schema. ``rows`` must hold every instance of each of its keys."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = rows.filter(pc.is_valid(rows.column(table.key))).sort_by("path")
    first = pc.ScalarAggregateOptions(skip_nulls=False)
    specs: list[tuple[Any, ...]] = [(c, "first", first) for c in table.firsts]
    specs += [("study_date", "min"), ([], "count_all"), ("file_size", "sum")]
    if table.name == STUDIES:
        specs.append(("series_instance_uid", "count_distinct"))
    # use_threads=False: "first" must follow the path order of the sorted rows.
    grouped = rows.group_by(table.key, use_threads=False).aggregate(specs)
    grouped = grouped.sort_by(table.key)
    keys = grouped.column(table.key)
    out: dict[str, Any] = {table.key: keys}
    for c in table.firsts:
        out[c] = grouped.column(f"{c}_first")
    out["study_date"] = grouped.column("study_date_min")
    out["instances"] = grouped.column("count_all")
    out["bytes"] = grouped.column("file_size_sum")
    if table.name == STUDIES:
        out["series"] = grouped.column("series_instance_uid_count_distinct")
        out["modalities"] = _modalities(rows, keys)
    schema = table.spec.schema
    return pa.table([pc.cast(out[f.name], f.type) for f in schema], schema=schema)


def _modalities(rows: pa.Table, studies: pa.ChunkedArray) -> pa.ChunkedArray:
    """Sorted distinct non-NULL modalities of each study in ``studies`` ([] when none)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pairs = (rows.group_by(["study_instance_uid", "modality"]).aggregate([])
             .filter(pc.is_valid(pc.field("modality")))
             .sort_by([("study_instance_uid", "ascending"), ("modality", "ascending")]))
    lists = pairs.group_by("study_instance_uid", use_threads=False).aggregate(
        [("modality", "list")])
    found = pc.index_in(studies, value_set=lists.column("study_instance_uid"))
    values = lists.column("modality_list").take(found)
    return pc.fill_null(values, pa.scalar([], values.type))


def _stats(data: pa.Table, key: str) -> str:
    """Delta file statistics with the exact (untruncated) key range, so later updates can
    skip files that cannot hold a touched key."""
    import pyarrow.compute as pc

    bounds = pc.min_max(data.column(key)).as_py()
    return json.dumps({"numRecords": data.num_rows, "minValues": {key: bounds["min"]},
                       "maxValues": {key: bounds["max"]}, "nullCount": {key: 0}})


def _write_files(path: Path, table: _Summary, data: pa.Table) -> list[Any]:
    """Write ``data`` (sorted by key) as files of at most FILE_ROWS rows; their add actions."""
    import pyarrow.parquet as pq
    from deltalake.transaction import AddAction

    path.mkdir(parents=True, exist_ok=True)
    adds = []
    for start in range(0, data.num_rows, FILE_ROWS):
        part = data.slice(start, FILE_ROWS)
        name = f"part-summary-{uuid.uuid4().hex}.parquet"
        pq.write_table(part, path / name, compression="zstd")
        st = (path / name).stat()
        adds.append(AddAction(name, st.st_size, {}, int(st.st_mtime * 1000), True,
                              _stats(part, table.key)))
    return adds


def _files_holding(path: Path, target: Any, table: _Summary, keys: frozenset[str],
                   ) -> list[str]:
    """Active files that hold a row of ``keys``: files whose key range (from the log's
    statistics) may contain one are opened, and only their key column is read."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    wanted = sorted(keys)
    wanted_array = pa.array(wanted, pa.string())
    actions = pa.table(target.get_add_actions(flatten=True))
    names = actions.column_names
    low = actions.column(f"min.{table.key}").to_pylist() if f"min.{table.key}" in names \
        else [None] * actions.num_rows
    high = actions.column(f"max.{table.key}").to_pylist() if f"max.{table.key}" in names \
        else [None] * actions.num_rows
    holding = []
    for rel, lo, hi in zip(actions.column("path").to_pylist(), low, high, strict=True):
        if lo is not None and hi is not None and \
                bisect.bisect_right(wanted, hi) == bisect.bisect_left(wanted, lo):
            continue  # no touched key falls inside this file's range
        stored = pq.read_table(path / rel, columns=[table.key]).column(table.key)
        if pc.any(pc.is_in(stored, value_set=wanted_array)).as_py():
            holding.append(rel)
    return holding


def _commit(path: Path, table: _Summary, target: Any, summary: pa.Table,
            keys: frozenset[str] | None, instances_version: int) -> int | None:
    """Replace ``keys`` (all rows when None) by ``summary`` in ONE commit; the new version,
    or None when there was nothing to change."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from deltalake import CommitProperties, DeltaTable, Schema, Transaction
    from deltalake.transaction import RemoveAction, create_table_with_add_actions

    schema = table.spec.schema
    if keys is None:
        removes = [] if target is None else [
            str(p) for p in pa.table(target.get_add_actions(flatten=True)).column("path")
            .to_pylist()]
        if not removes and summary.num_rows == 0 and target is not None:
            return None
        data = summary
    else:
        removes = _files_holding(path, target, table, keys)
        if not removes and summary.num_rows == 0:
            return None  # touched keys that never had a row and still have none
        # What the rewritten files keep besides the touched keys joins the new rows, so
        # replacing keys does not leave ever more small files behind.
        wanted = pa.array(sorted(keys), pa.string())
        kept = [pq.read_table(path / rel).cast(schema) for rel in removes]
        kept = [t.filter(pc.invert(pc.is_in(t.column(table.key), value_set=wanted)))
                for t in kept]
        data = pa.concat_tables([*kept, summary]).sort_by(table.key)
    adds = _write_files(path, table, data)
    props = CommitProperties(custom_metadata={"dicomlake.operation": "SUMMARY"},
                             app_transactions=[Transaction(APP_ID, instances_version)])
    if target is None:
        create_table_with_add_actions(str(path), Schema.from_arrow(schema), adds,
                                      mode="error", commit_properties=props)
        return DeltaTable(str(path)).version()
    now = int(time.time() * 1000)
    target.create_write_transaction(
        [*adds, *(RemoveAction(rel, True, now) for rel in removes)], mode="append",
        schema=schema, commit_properties=props)
    target.update_incremental()
    return int(target.version())
