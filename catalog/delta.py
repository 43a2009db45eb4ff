"""Delta tables through delta-rs, written and read by Spark without the Delta jars.

Writes: Spark tasks write Parquet files into the table folder and return a small manifest;
the driver commits all of them (plus any removals) in one delta-rs transaction, so a job is
all-or-nothing and readers never see half of it. Files from failed task attempts are never
referenced by the log (``vacuum`` removes them).

Reads: a Python data source per table lists the table's *active* files at query time (never
``spark.read.parquet(dir)``, which would resurrect removed files) and streams them as Arrow.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition
from pyspark.sql.types import StructType

from dicomlake.catalog.columns import TABLE_COLUMN

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession


@dataclass(frozen=True)
class WrittenFile:
    """A Parquet file a task wrote and the driver may commit (Delta ``add`` action inputs)."""

    table: str
    path: str
    size: int
    rows: int
    modification_time: int
    keys: tuple[tuple[str, ...], ...] = ()

    def add_action(self) -> Any:
        """The delta-rs add action for this file."""
        from deltalake.transaction import AddAction

        return AddAction(self.path, self.size, {}, self.modification_time, True,
                         json.dumps({"numRecords": self.rows}))


@dataclass(frozen=True)
class TableTarget:
    """Where rows routed to ``key`` go, which columns they keep, which key columns to report.

    ``explode``: the target takes one row per element of this list-of-struct column of the
    rows routed to ``route`` (the struct's fields become columns beside the row's own), so a
    one-to-many table (``dicom.warnings``) is written in the same pass as its parent rows.
    """

    key: str
    path: str
    columns: tuple[str, ...]
    key_columns: tuple[str, ...] = ()
    explode: str | None = None
    route: str | None = None

    @property
    def route_key(self) -> str:
        """The ``_dicomlake_table`` value of the rows this target is written from."""
        return self.route or self.key


def _target_rows(part: pa.RecordBatch, target: TableTarget) -> pa.Table:
    """The rows of ``target`` in a batch already filtered to its route (exploded if asked)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.Table.from_batches([part])
    if target.explode is None:
        return table.select(list(target.columns))
    lists = table.column(target.explode).combine_chunks()
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists)
    own = [c for c in target.columns if c in table.column_names and c != target.explode]
    out = table.select(own).take(parents)
    for index, struct_field in enumerate(flat.type):
        if struct_field.name in target.columns:
            out = out.append_column(struct_field.name, flat.field(index))
    return out.select(list(target.columns))


def _target_frame(df: DataFrame, target: TableTarget) -> DataFrame:
    """``df`` shaped like the target's rows (to derive its schema without running a job)."""
    from pyspark.sql import functions as F

    if target.explode is None:
        return df.select(*target.columns)
    own = [c for c in target.columns if c in df.columns]
    exploded = df.select(*own, F.explode(target.explode).alias("_element"))
    return exploded.select(*own, "_element.*").select(*target.columns)


_MANIFEST_DDL = ("table string, path string, size long, rows long, modification_time long, "
                 "keys binary")
"""One row per written file. ``keys`` is an Arrow IPC stream of the file's key columns: a
task never turns its rows into Python objects to report them."""

PROGRESS_FOLDER = "_dicomlake_progress"
"""Where tasks leave their progress markers, inside the first target table's folder (the
driver sees that folder already: it commits and reads the files written there). Delta
ignores folders starting with ``_``; the driver removes the job's markers when it ends."""


class _Marker:
    """A task's running count of rows written, in a small file the driver polls.

    Named by the task's partition, so a retried attempt overwrites its predecessor's count.
    Best effort: a marker that cannot be written disables itself; the job never fails for
    progress.
    """

    def __init__(self, folder: str | None) -> None:
        import os

        from pyspark import TaskContext

        context = TaskContext.get()
        self._path = None if folder is None or context is None else os.path.join(
            folder, str(context.partitionId()))
        self._count = 0
        self._written_at = 0.0

    def add(self, rows: int) -> None:
        self._count += rows
        if time.monotonic() - self._written_at >= 0.2:
            self.flush()

    def flush(self) -> None:
        import os

        if self._path is None:
            return
        temporary = f"{self._path}.{uuid.uuid4().hex[:8]}"
        try:
            with open(temporary, "w") as out:
                out.write(str(self._count))
            os.replace(temporary, self._path)
        except OSError:
            self._path = None
        self._written_at = time.monotonic()


class _FileSink:
    """Inside a task: routes Arrow batches to one Parquet file per target table, and
    describes the files written (the manifest) when closed. Everything stays columnar."""

    def __init__(self, targets: dict[str, TableTarget], job_id: str,
                 schemas: dict[str, pa.Schema], marker: _Marker) -> None:
        self._targets = targets
        self._job_id = job_id
        self._schemas = schemas
        self._marker = marker
        self._writers: dict[str, tuple[Any, str]] = {}
        self._rows: dict[str, int] = {}
        self._keys: dict[str, list[pa.Table]] = {}

    def write(self, batch: pa.RecordBatch) -> None:
        import os

        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if batch.num_rows == 0:
            return
        route = batch.column(TABLE_COLUMN)
        for key, target in self._targets.items():
            part = batch.filter(pc.equal(route, target.route_key))
            if part.num_rows == 0:
                continue
            table = _target_rows(part, target)
            if table.num_rows == 0:
                continue
            table = table.cast(self._schemas[key])
            if key not in self._writers:
                name = f"part-{self._job_id}-{uuid.uuid4().hex}.parquet"
                os.makedirs(target.path, exist_ok=True)
                self._writers[key] = (pq.ParquetWriter(os.path.join(target.path, name),
                                                       self._schemas[key],
                                                       compression="zstd"), name)
                self._rows[key] = 0
                self._keys[key] = []
            self._writers[key][0].write_table(table)
            self._rows[key] += table.num_rows
            if target.key_columns:
                self._keys[key].append(table.select(list(target.key_columns)))
        self._marker.add(batch.num_rows)

    def close(self) -> Iterator[pa.RecordBatch]:
        import os

        import pyarrow as pa

        self._marker.flush()
        out: dict[str, list[Any]] = {c.split()[0]: [] for c in _MANIFEST_DDL.split(", ")}
        for key, (writer, name) in self._writers.items():
            writer.close()
            st = os.stat(os.path.join(self._targets[key].path, name))
            out["table"].append(key)
            out["path"].append(name)
            out["size"].append(st.st_size)
            out["rows"].append(self._rows[key])
            out["modification_time"].append(int(st.st_mtime * 1000))
            out["keys"].append(_ipc(pa.concat_tables(self._keys[key]))
                               if self._keys[key] else b"")
        if out["table"]:
            yield pa.RecordBatch.from_pydict(out)


def _ipc(table: pa.Table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as stream:
        stream.write_table(table)
    return sink.getvalue().to_pybytes()


def _written(rows: list[Any]) -> list[WrittenFile]:
    """The manifest rows a job collected, as files to commit (keys as tuples of values)."""
    import pyarrow as pa

    files = []
    for r in rows:
        keys: tuple[tuple[Any, ...], ...] = ()
        if r["keys"]:
            table = pa.ipc.open_stream(pa.py_buffer(r["keys"])).read_all()
            keys = tuple(zip(*(c.to_pylist() for c in table.columns), strict=True))
        files.append(WrittenFile(r["table"], r["path"], r["size"], r["rows"],
                                 r["modification_time"], keys))
    return files


def _file_writer(targets: dict[str, TableTarget], job_id: str, schemas: dict[str, pa.Schema],
                 markers: str | None) -> Callable[[Iterator[pa.RecordBatch]],
                                                 Iterator[pa.RecordBatch]]:
    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        sink = _FileSink(targets, job_id, schemas, _Marker(markers))
        for batch in batches:
            sink.write(batch)
        yield from sink.close()

    return write


def _task_writer(payloads: list[bytes], produce: Callable[[bytes], Iterator[pa.RecordBatch]],
                 targets: dict[str, TableTarget], job_id: str, schemas: dict[str, pa.Schema],
                 markers: str | None) -> Callable[[Iterator[pa.RecordBatch]],
                                                  Iterator[pa.RecordBatch]]:
    def write(ids: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        sink = _FileSink(targets, job_id, schemas, _Marker(markers))
        for batch in ids:
            for task in batch.column(0).to_pylist():
                for rows in produce(payloads[task]):
                    sink.write(rows)
        yield from sink.close()

    return write


class ProgressWatch:
    """On the driver: sums the markers of a job's tasks while it runs and reports the rows
    done since the last report. Where the driver cannot see the tasks' folder, it reports
    nothing (callers finish their bar from the manifest); it never fails the job."""

    def __init__(self, folder: Path, report: Callable[[int], None] | None) -> None:
        self.folder = folder
        self._report = report
        self._reported = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def reported(self) -> int:
        """Rows reported so far."""
        return self._reported

    def __enter__(self) -> ProgressWatch:
        if self._report is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError:
                self._report = None
            else:
                self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import shutil

        if self._report is not None:
            self._stop.set()
            self._thread.join()
            self._poll()
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()  # only when no other job's markers are left
        except OSError:
            pass

    @property
    def markers(self) -> str | None:
        """The folder tasks write to, or None when nobody is watching."""
        return None if self._report is None else str(self.folder)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._poll()

    def _poll(self) -> None:
        done = 0
        try:
            for marker in self.folder.iterdir():
                if marker.name.isdigit():
                    try:
                        done += int(marker.read_text() or 0)
                    except (OSError, ValueError):
                        continue  # replaced while read: the next poll sees it
        except OSError:
            return
        if done > self._reported and self._report is not None:
            self._report(done - self._reported)
            self._reported = done


def _job(targets: list[TableTarget]) -> tuple[str, Path]:
    """A new job's id and its progress-marker folder."""
    job_id = f"{int(time.time())}-{uuid.uuid4().hex[:8]}"
    return job_id, Path(targets[0].path) / PROGRESS_FOLDER / job_id


def write_files(df: DataFrame, targets: list[TableTarget], *,
                progress: Callable[[int], None] | None = None) -> list[WrittenFile]:
    """Write ``df``'s rows as Parquet files into their target tables; commit nothing.

    Rows are routed by the ``_dicomlake_table`` column when there are several targets. The
    returned files are what :func:`commit` needs; if the job fails nothing is referenced.
    ``progress`` is called with the number of rows written since its last call, as tasks
    write them (from the tasks' markers; classic and Spark Connect sessions alike).
    """
    from pyspark.sql import functions as F

    if TABLE_COLUMN not in df.columns:
        if len(targets) != 1:
            raise ValueError("write_files needs a _dicomlake_table column for several targets")
        df = df.withColumn(TABLE_COLUMN, F.lit(targets[0].key))
    by_key = {t.key: t for t in targets}
    schemas = {t.key: target_schema(df, t) for t in targets}
    job_id, folder = _job(targets)
    with ProgressWatch(folder, progress) as watch:
        manifest = df.mapInArrow(_file_writer(by_key, job_id, schemas, watch.markers),
                                 _MANIFEST_DDL).collect()
    return _written(manifest)


def write_tasks(spark: SparkSession, payloads: list[bytes],
                produce: Callable[[bytes], Iterator[pa.RecordBatch]],
                targets: list[TableTarget], schemas: dict[str, pa.Schema], *,
                progress: Callable[[int], None] | None = None) -> list[WrittenFile]:
    """Run one Spark task per payload: ``produce(payload)`` yields its rows (with a
    ``_dicomlake_table`` column), which the same task writes as Parquet files; commit nothing.

    This is how a job that computes its rows in Python writes them once: the rows never
    travel to the JVM and back, no planner process starts for a data source, and the
    driver's plan decides exactly what each task does. ``produce`` and the payloads travel
    with the task (``produce`` must be importable on the workers, e.g. a module-level class);
    each task decodes only its own payload. ``progress`` as in :func:`write_files`.
    """
    if not payloads:
        return []
    by_key = {t.key: t for t in targets}
    job_id, folder = _job(targets)
    with ProgressWatch(folder, progress) as watch:
        tasks = spark.range(0, len(payloads), 1, len(payloads))
        manifest = tasks.mapInArrow(
            _task_writer(payloads, produce, by_key, job_id, schemas, watch.markers),
            _MANIFEST_DDL).collect()
    return _written(manifest)


def arrow_schema_of(df: DataFrame, columns: list[str] | tuple[str, ...]) -> pa.Schema:
    """The Arrow schema files for these columns of ``df`` are written with."""
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(df.select(*columns).schema, timezone="UTC")


def target_schema(df: DataFrame, target: TableTarget) -> pa.Schema:
    """The Arrow schema of ``target``'s files when written from ``df``."""
    return arrow_schema_of(_target_frame(df, target), target.columns)


def commit(table_path: str | Path, schema: pa.Schema, adds: list[WrittenFile],
           removes: list[str] | None = None, *, operation: str = "WRITE",
           create_empty: bool = False) -> int | None:
    """Commit added files and removed file paths as ONE Delta transaction.

    Creates the table on first use (with ``create_empty``, also when there is nothing to
    add, so ``dicom.errors`` and ``dicom.warnings`` exist from the first ingest). Returns the new
    version, or None when there was nothing to commit to an existing table (no new commit
    is made, so re-running an unchanged ingest leaves no trace).
    """
    from deltalake import CommitProperties, DeltaTable, Schema
    from deltalake.transaction import RemoveAction, create_table_with_add_actions

    table_path = str(table_path)
    exists = DeltaTable.is_deltatable(table_path)
    if not adds and not removes and (exists or not create_empty):
        return None
    actions = [f.add_action() for f in adds]
    props = CommitProperties(custom_metadata={"dicomlake.operation": operation})
    if not exists:
        Path(table_path).mkdir(parents=True, exist_ok=True)
        create_table_with_add_actions(table_path, Schema.from_arrow(schema), actions,
                                      mode="append", commit_properties=props)
        return DeltaTable(table_path).version()
    now = int(time.time() * 1000)
    actions += [RemoveAction(p, True, now) for p in removes or []]
    table = DeltaTable(table_path)
    _add_new_columns(table, schema)
    table.create_write_transaction(actions, mode="append", schema=schema,
                                   commit_properties=props)
    table.update_incremental()
    return table.version()


def _add_new_columns(table: Any, schema: pa.Schema) -> None:
    """Add the columns a newer dicomlake writes (e.g. ``member_index``) to a table made by
    an older one: a commit alone would keep the old schema and drop them silently."""
    import pyarrow as pa
    from deltalake import Schema

    have = set(pa.schema(table.schema().to_arrow()).names)
    missing = [f.with_nullable(True) for f in schema if f.name not in have]
    if missing:
        table.alter.add_columns(list(Schema.from_arrow(pa.schema(missing)).fields))


def active_files(table_path: str | Path) -> list[str]:
    """Paths (as the log holds them) of the table's current files ([] if it does not exist)."""
    from dicomlake.catalog.snapshots import FollowedTable

    table = FollowedTable(table_path).table()
    return [] if table is None else _paths_of(table)


def read_columns(table_path: str | Path, columns: list[str]) -> pa.Table:
    """Selected columns of a table's current rows, with the file each row came from
    (``_file``, as :func:`active_files` names it).

    ``_file`` is NULL for a table whose files do not hold its rows as they are (deletion
    vectors, column mapping, partitions; see :func:`~dicomlake.catalog.snapshots.plain`):
    its rows are read through delta-rs, and none of its files may be rewritten by hand.
    """
    import pyarrow as pa

    from dicomlake.catalog.snapshots import FollowedTable, plain, read_files, read_table

    table = FollowedTable(table_path).table()
    if table is None:
        return pa.table({c: pa.array([], pa.string()) for c in [*columns, "_file"]})
    if not plain(table):
        data = read_table(table, columns)
        return data.append_column("_file", pa.nulls(data.num_rows, pa.string()))
    return read_files(table, _paths_of(table), columns, file_column="_file")


def _paths_of(table: Any) -> list[str]:
    """Paths (as the log holds them) of an open table's current files."""
    import pyarrow as pa

    return [str(p) for p in pa.table(table.get_add_actions()).column("path").to_pylist()]


@dataclass(frozen=True)
class DeltaFilesPartition(InputPartition):
    """What one task reads: some data files of a plain table (paths as the log holds them,
    read with the table's Arrow schema ``file_schema``), or, with ``scan_version``, that
    whole version of a table only delta-rs can read (deletion vectors, column mapping)."""

    paths: tuple[str, ...] = ()
    file_schema: Any = None  # pa.Schema
    scan_version: int | None = None


class DeltaTableReader(DataSourceReader):
    """Streams a table's current rows as Arrow batches (files listed by delta-rs)."""

    TARGET_BYTES = 128 << 20

    def __init__(self, table_path: str, schema: StructType) -> None:
        self.table_path = table_path
        self.schema = schema

    def partitions(self) -> list[DeltaFilesPartition]:
        import pyarrow as pa

        from dicomlake.catalog.snapshots import FollowedTable, plain, schema_of

        table = FollowedTable(self.table_path).table()
        if table is None:
            return []
        if not plain(table):
            return [DeltaFilesPartition(scan_version=table.version())]
        file_schema = schema_of(table)
        actions = pa.table(table.get_add_actions())
        parts: list[DeltaFilesPartition] = []
        group: list[str] = []
        size = 0
        for rel, nbytes in zip(actions.column("path").to_pylist(),
                               actions.column("size_bytes").to_pylist(), strict=True):
            group.append(str(rel))
            size += nbytes
            if size >= self.TARGET_BYTES:
                parts.append(DeltaFilesPartition(tuple(group), file_schema))
                group, size = [], 0
        if group:
            parts.append(DeltaFilesPartition(tuple(group), file_schema))
        return parts

    # pyspark types the argument as the base InputPartition; Spark hands back our own
    def read(self, partition: DeltaFilesPartition) -> Iterator[pa.RecordBatch]:  # type: ignore[override]
        import pyarrow as pa
        from pyspark.sql.pandas.types import to_arrow_schema

        target = to_arrow_schema(self.schema, timezone="UTC")
        for batch in self._batches(partition, target.names):
            if batch.num_rows:
                # Spark insists on its exact Arrow types (list field names, tz, widths).
                yield from pa.Table.from_batches([batch]).cast(target).to_batches()

    def _batches(self, partition: DeltaFilesPartition, columns: list[str],
                 ) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa
        from deltalake import DeltaTable

        from dicomlake.catalog.snapshots import files_dataset, locate_files, schema_of, table_uri

        # A table without files plans no partitions; Spark then still reads one partition of
        # its own (a plain InputPartition), which holds no rows.
        version = getattr(partition, "scan_version", None)
        if version is not None:
            table = DeltaTable(table_uri(self.table_path), version=version)
            yield from pa.RecordBatchReader.from_stream(table.scan(columns=columns),
                                                        schema=schema_of(table, columns))
            return
        paths = getattr(partition, "paths", ())
        if not paths:
            return
        filesystem, files = locate_files(table_uri(self.table_path), list(paths))
        dataset = files_dataset(files, partition.file_schema, filesystem)
        yield from dataset.to_batches(columns=columns, batch_size=4096)


class DeltaTableDataSource(DataSource):
    """Base of the per-table sources: each subclass knows its table path and its name.

    Spark drops options given to ``CREATE TABLE ... USING <python source>``, so the table path
    cannot be an option; a small subclass per table carries it as a class attribute.
    """

    table_path: ClassVar[str] = ""
    source_name: ClassVar[str] = ""

    @classmethod
    def name(cls) -> str:
        return cls.source_name

    def schema(self) -> StructType:
        import pyarrow as pa
        from deltalake import DeltaTable
        from pyspark.sql.pandas.types import from_arrow_schema

        return from_arrow_schema(pa.schema(DeltaTable(self.table_path).schema().to_arrow()))

    def reader(self, schema: StructType) -> DeltaTableReader:
        return DeltaTableReader(self.table_path, schema)


def table_source_class(schema: str, table: str, path: str) -> type[DeltaTableDataSource]:
    """A data source class bound to one table (registered under ``dicomlake_<schema>_<table>``)."""
    return type(
        f"Delta_{schema}_{table}",
        (DeltaTableDataSource,),
        {"table_path": path, "source_name": f"dicomlake_{schema}_{table}", "__module__": __name__},
    )
