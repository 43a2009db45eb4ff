"""The ingest job: archives and files into ``dicom.instances`` / ``errors`` / ``warnings`` /
``series`` / ``studies``, one atomic Delta commit per table.

Change detection uses only metadata: a source (archive or plain file) whose fingerprint
(central directory names/sizes/CRCs, or size and mtime) is already fully in the tables is
skipped without opening a member. A changed source replaces all of its rows. Every input ends
as exactly one row in ``instances`` or ``errors`` (documented skips are ``errors`` rows of
kind ``skipped``, so they are counted too): inputs found = rows written + errors recorded,
and every input the plan listed is among them.
"""

from __future__ import annotations

import datetime as dt
import pickle
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dicomlake.catalog import tables
from dicomlake.catalog.delta import (
    TABLE_COLUMN,
    TableTarget,
    WrittenFile,
    commit,
    read_columns,
    write_tasks,
)
from dicomlake.catalog.dicom_source import (
    CORRUPT_RECORD,
    ERROR_KIND,
    TASKS_PER_CORE,
    DicomDataSourceReader,
    DicomOptions,
    ParseMode,
    dicom_schema,
    plan_partitions,
)
from dicomlake.catalog.duplicates import find_duplicates
from dicomlake.catalog.errors import ErrorKind
from dicomlake.catalog.inputs import Source, plan_sources
from dicomlake.catalog.summaries import SERIES, STUDIES, TouchedKeys, update_summaries
from dicomlake.catalog.warehouse import Warehouse
from dicomlake.session import default_parallelism

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import SparkSession

SCHEMA = "dicom"
INSTANCES, ERRORS, WARNINGS = "instances", "errors", "warnings"

INSTANCE_COLUMNS: tuple[str, ...] = tables.INSTANCES.columns
ERROR_COLUMNS: tuple[str, ...] = tables.ERRORS.columns
WARNING_COLUMNS: tuple[str, ...] = tables.WARNINGS.columns
"""``dicom.warnings``: one row per value that did not parse. ``value`` is the raw text, which
may identify a patient: the table is PHI like ``dicom.instances``."""

STAGES: tuple[str, ...] = ("plan", "read+write", "commit", "summaries", "register")
"""An ingest's stages, in order: list sources and decide what to read; read headers and
write Parquet files (Spark tasks); find duplicates and commit each table; update the
series/studies summaries; make the tables queryable by name in the session (skipped when
the caller does not ask for it)."""


class IngestProgress(Protocol):
    """What an ingest tells a progress display (the CLI draws a bar per stage)."""

    def stage(self, name: str, files: int) -> None:
        """A stage of :data:`STAGES` starts; it will process ``files`` files (0: unknown)."""

    def advance(self, files: int) -> None:
        """``files`` more files are done in the current stage."""


@dataclass
class IngestResult:
    """What one ingest did.

    ``files_planned`` is what the plan listed (each member of a listed ZIP, each plain
    file); reading finds more when an input is itself an archive, so ``files_seen`` (every
    input found, = rows written + errors recorded, documented skips included) is at least
    that. ``unaccounted`` names any source that produced fewer records than it was planned
    with: it must stay empty.
    """

    sources: int = 0
    sources_skipped: int = 0
    files_planned: int = 0
    files_seen: int = 0
    rows_written: int = 0
    errors_recorded: int = 0
    skipped: int = 0
    warnings: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    unaccounted: list[str] = field(default_factory=list)

    @property
    def balanced(self) -> bool:
        """The accounting every ingest must satisfy: nothing planned went missing."""
        return (not self.unaccounted
                and self.files_seen == self.rows_written + self.errors_recorded
                and self.files_seen >= self.files_planned)


def _existing_counts(warehouse: Warehouse) -> Counter[tuple[str, str]]:
    """(source, fingerprint) -> rows already stored for it across instances and errors."""
    counts: Counter[tuple[str, str]] = Counter()
    for table in (INSTANCES, ERRORS):
        data = read_columns(warehouse.table_path(SCHEMA, table),
                            ["source", "source_fingerprint"])
        counts.update(zip(data.column("source").to_pylist(),
                          data.column("source_fingerprint").to_pylist(), strict=True))
    return counts


def _is_stored(source: Source, counts: Counter[tuple[str, str]]) -> bool:
    """Unchanged and fully stored: at least the planned records under this fingerprint
    (archives found inside add more). Faulty sources are tried again, skips are not."""
    readable = source.error is None or source.error[0] is ErrorKind.SKIPPED
    return readable and counts[(source.path, source.fingerprint)] >= source.input_count


def _rewrite(table_path: Path, rel: str, keep: Callable[[pa.Table], pa.Array],
             schema: pa.Schema) -> WrittenFile | None:
    """Rewrite one file keeping the rows ``keep`` selects; None if nothing is left."""
    import pyarrow.parquet as pq

    data = pq.read_table(table_path / rel)
    data = data.filter(keep(data))
    if data.num_rows == 0:
        return None
    name = f"part-rewrite-{uuid.uuid4().hex}.parquet"
    pq.write_table(data.cast(schema), table_path / name, compression="zstd")
    st = (table_path / name).stat()
    return WrittenFile(table_path.name, name, st.st_size, data.num_rows, int(st.st_mtime * 1000))


def _replace_sources(table_path: Path, replaced: set[str],
                     schema: pa.Schema) -> tuple[list[str], list[WrittenFile]]:
    """Files to remove, and rewritten files to add, so no row of ``replaced`` sources stays."""
    import pyarrow as pa
    import pyarrow.compute as pc

    data = read_columns(table_path, ["source"])
    removes: list[str] = []
    adds: list[WrittenFile] = []
    by_file: dict[str, set[str]] = {}
    for src, rel in zip(data.column("source").to_pylist(), data.column("_file").to_pylist(),
                        strict=True):
        by_file.setdefault(rel, set()).add(src)
    keep_set = pa.array(sorted(replaced), pa.string())
    for rel, sources in by_file.items():
        if not sources & replaced:
            continue
        removes.append(rel)
        if not sources <= replaced:
            kept = _rewrite(table_path, rel,
                            lambda t: pc.invert(pc.is_in(t.column("source"), keep_set)), schema)
            if kept is not None:
                adds.append(kept)
    return removes, adds


def _find_duplicates(warehouse: Warehouse, written: list[WrittenFile],
                     replaced: set[str]) -> dict[str, str]:
    """New instance path -> message, for rows that lose under the shared duplicate rule
    (:mod:`dicomlake.catalog.duplicates`); rows of replaced sources are not "stored"."""
    existing = read_columns(warehouse.table_path(SCHEMA, INSTANCES),
                            ["sop_instance_uid", "path", "source"])
    stored: dict[str, tuple[str, str]] = {}
    for uid, path, src in zip(existing.column("sop_instance_uid").to_pylist(),
                              existing.column("path").to_pylist(),
                              existing.column("source").to_pylist(), strict=True):
        if uid is not None and src not in replaced:
            stored.setdefault(uid, (path, src))
    new = [(path, uid, src) for f in written if f.table == INSTANCES
           for uid, path, src, *_ in f.keys]
    return {new[i][0]: message for i, message in find_duplicates(stored, new).items()}


def _split_duplicates(table_dir: Path, errors_dir: Path, written: list[WrittenFile],
                      duplicates: dict[str, str], schemas: dict[str, pa.Schema],
                      ) -> list[WrittenFile]:
    """Move duplicate rows from freshly written instance files into an errors file."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    dup_paths = pa.array(sorted(duplicates), pa.string())
    result: list[WrittenFile] = []
    moved: list[pa.Table] = []
    for f in written:
        if f.table != INSTANCES or not any(path in duplicates for _, path, *_ in f.keys):
            result.append(f)
            continue
        data = pq.read_table(table_dir / f.path)
        is_dup = pc.is_in(data.column("path"), dup_paths)
        moved.append(data.filter(is_dup))
        kept_mask = pc.invert(is_dup)

        def keep(_rows: pa.Table, mask: pa.Array = kept_mask) -> pa.Array:
            return mask  # bound now: the loop moves on to the next file

        kept = _rewrite(table_dir, f.path, keep, schemas[INSTANCES])
        (table_dir / f.path).unlink()
        if kept is not None:
            kept_keys = tuple(k for k in f.keys if k[1] not in duplicates)
            result.append(WrittenFile(INSTANCES, kept.path, kept.size, kept.rows,
                                      kept.modification_time, kept_keys))
    rows = pa.concat_tables(moved)
    errors = rows.select([c for c in ERROR_COLUMNS if c in rows.column_names
                          and c not in ("error_kind", "error", "ingested_at")])
    n = errors.num_rows
    errors = errors.append_column("error_kind", pa.array([ErrorKind.DUPLICATE.value] * n))
    errors = errors.append_column(
        "error", pa.array([duplicates[p] for p in errors.column("path").to_pylist()]))
    errors = errors.append_column(
        "ingested_at", pa.array([dt.datetime.now(dt.UTC)] * n, pa.timestamp("us", tz="UTC")))
    name = f"part-duplicates-{uuid.uuid4().hex}.parquet"
    errors_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(errors.cast(schemas[ERRORS]), errors_dir / name, compression="zstd")
    st = (errors_dir / name).stat()
    keys = tuple((ErrorKind.DUPLICATE.value, src) for src in errors.column("source").to_pylist())
    result.append(WrittenFile(ERRORS, name, st.st_size, n, int(st.st_mtime * 1000), keys))
    return result


def _unaccounted(sources: list[Source], written: list[WrittenFile]) -> list[str]:
    """Sources that produced fewer records than the plan listed for them."""
    got: Counter[str] = Counter()
    for f in written:
        if f.table == INSTANCES:
            got.update(key[2] for key in f.keys)
        elif f.table == ERRORS:
            got.update(key[1] for key in f.keys)
    return [f"{s.path}: {got[s.path]} of {s.input_count} inputs recorded"
            for s in sources if got[s.path] < s.input_count]


class _IngestRows:
    """Runs in a task: one planned partition's rows (the ``dicom`` source's reader), with
    the columns the ingest adds (``ingested_at``, ``error``, ``error_kind``, the table each
    row goes to) added as Arrow columns."""

    def __init__(self, options: DicomOptions, ingested_at: dt.datetime,
                 reader: type[DicomDataSourceReader]) -> None:
        self.options = options
        self.ingested_at = ingested_at
        self.reader = reader

    def __call__(self, payload: bytes) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa
        import pyarrow.compute as pc

        reader = self.reader(self.options, dicom_schema())
        at = pa.scalar(self.ingested_at, pa.timestamp("us", tz="UTC"))
        for batch in reader.read(pickle.loads(payload)):
            corrupt = batch.column(CORRUPT_RECORD)
            route = pc.if_else(pc.is_null(corrupt), INSTANCES, ERRORS)
            yield pa.RecordBatch.from_arrays(
                [*batch.columns, pa.repeat(at, batch.num_rows), corrupt,
                 batch.column(ERROR_KIND), route],
                names=[*batch.schema.names, "ingested_at", "error", "error_kind",
                       TABLE_COLUMN])


WORKER_MODULES = ("pyarrow.compute", "pyarrow.parquet", "dicomlake.catalog.ingest",
                  "dicomlake.catalog.archives", "dicomlake.catalog.header")
"""What an ingest task imports before its first row (``header`` brings pydicom, the slow
one): a process that starts a session to ingest warms its workers with these
(:func:`dicomlake.session.warm_workers`)."""


class _Stages:
    """Times each stage and tells the progress display when one starts and what is done
    (called from the progress watcher's thread too, hence the lock)."""

    def __init__(self, progress: IngestProgress | None) -> None:
        self.seconds: dict[str, float] = {}
        self._progress = progress
        self._current: str | None = None
        self._since = time.perf_counter()
        self._done = 0
        self._lock = threading.Lock()

    def start(self, name: str, files: int = 0) -> None:
        with self._lock:
            self.end()
            self._current, self._since, self._done = name, time.perf_counter(), 0
            if self._progress is not None:
                self._progress.stage(name, files)

    def advance(self, files: int) -> None:
        with self._lock:
            if files <= 0:
                return
            self._done += files
            if self._progress is not None:
                self._progress.advance(files)

    def complete(self, files: int) -> None:
        """The stage has done ``files`` in all: report what was not reported yet."""
        self.advance(files - self._done)

    def end(self) -> None:
        if self._current is not None:
            self.seconds[self._current] = time.perf_counter() - self._since
            self._current = None


def _read_and_write(spark: SparkSession, sources: list[Source], targets: list[TableTarget],
                    stages: _Stages, files: int,
                    reader: type[DicomDataSourceReader]) -> list[WrittenFile]:
    """The one Spark job: each task reads its planned partition's headers and writes them
    as Parquet files, rows never leaving Python; progress comes from the tasks' markers."""
    slots = default_parallelism(spark)
    options = DicomOptions(paths=tuple(s.path for s in sources), mode=ParseMode.PERMISSIVE,
                           min_partitions=TASKS_PER_CORE * slots)
    partitions = plan_partitions(sources, options)
    payloads = [pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL) for p in partitions]
    schemas = {t.key: tables.spec(t.key).schema for t in targets}
    produce = _IngestRows(options, dt.datetime.now(dt.UTC), reader)
    stages.start("read+write", files)
    written = write_tasks(spark, payloads, produce, targets, schemas, progress=stages.advance)
    # where the driver could not see the tasks' markers (a remote Connect server), the bar
    # catches up here, from the manifest
    stages.complete(sum(f.rows for f in written if f.table in (INSTANCES, ERRORS)))
    return written


def _touched_keys(table_dir: Path, files: list[str],
                  sources: set[str] | None = None) -> TouchedKeys:
    """Series and study UIDs of the rows of these instance files (only rows of ``sources``
    when given): what the summaries must recompute. Reads two or three columns of the
    batch's own files, never the whole table."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    columns = ["series_instance_uid", "study_instance_uid"]
    touched = TouchedKeys()
    for rel in files:
        rows = pq.read_table(table_dir / rel,
                             columns=columns if sources is None else [*columns, "source"])
        if sources is not None:
            rows = rows.filter(pc.is_in(rows.column("source"),
                                        value_set=pa.array(sorted(sources), pa.string())))
        touched |= TouchedKeys.of_rows(rows)
    return touched


def ingest(spark: SparkSession, warehouse: Warehouse, paths: Iterable[str], *,
           force: bool = False, progress: IngestProgress | None = None,
           register: bool = True,
           reader: type[DicomDataSourceReader] = DicomDataSourceReader) -> IngestResult:
    """Ingest files, folders and globs into the warehouse.

    Args:
        spark: a session from :func:`dicomlake.build_session` (classic or Spark Connect).
        warehouse: where the ``dicom`` tables live.
        paths: archives, DICOM files, folders (recursive) and globs.
        force: re-read sources even when their fingerprint is already stored.
        progress: told when each of :data:`STAGES` starts and how many files it has done.
        register: make the tables queryable by name in ``spark`` (this warehouse's, should
            the session know another's); a process that ends after the ingest, like the
            CLI, has no use for it, and in a fresh session it costs a Python planner
            process per new table.
        reader: what reads a planned partition's rows in the tasks; the ``dicom`` source's
            reader. ``dicomlake bench ingest`` passes the zipdcm method's here, so the two
            are compared through the same tasks, writer, commits and summaries.
    """
    started = time.perf_counter()
    stages = _Stages(progress)
    result = IngestResult()
    stages.start("plan")
    sources = plan_sources(paths)
    counts = _existing_counts(warehouse)
    to_read = [s for s in sources if force or not _is_stored(s, counts)]
    result.sources = len(sources)
    result.sources_skipped = len(sources) - len(to_read)
    result.files_planned = sum(s.input_count for s in to_read)
    if not to_read:
        stages.end()
        result.stage_seconds = stages.seconds
        result.seconds = time.perf_counter() - started
        return result

    dirs = {t: warehouse.table_path(SCHEMA, t) for t in (INSTANCES, ERRORS, WARNINGS)}
    targets = [
        TableTarget(INSTANCES, str(dirs[INSTANCES]), INSTANCE_COLUMNS,
                    key_columns=("sop_instance_uid", "path", "source")),
        TableTarget(ERRORS, str(dirs[ERRORS]), ERROR_COLUMNS,
                    key_columns=("error_kind", "source")),
        TableTarget(WARNINGS, str(dirs[WARNINGS]), WARNING_COLUMNS, explode="warnings",
                    route=INSTANCES),
    ]
    schemas = {t.key: tables.spec(t.key).schema for t in targets}
    written = _read_and_write(spark, to_read, targets, stages, result.files_planned, reader)
    result.files_seen = sum(f.rows for f in written if f.table in (INSTANCES, ERRORS))

    stages.start("commit", result.files_seen)
    replaced = {s.path for s in to_read}
    # before duplicates leave the new files: their series are touched too
    touched = _touched_keys(dirs[INSTANCES], [f.path for f in written if f.table == INSTANCES])
    duplicates = _find_duplicates(warehouse, written, replaced)
    if duplicates:
        written = _split_duplicates(dirs[INSTANCES], dirs[ERRORS], written, duplicates,
                                    schemas)
    result.duplicates = len(duplicates)
    result.rows_written = sum(f.rows for f in written if f.table == INSTANCES)
    result.errors_recorded = sum(f.rows for f in written if f.table == ERRORS)

    # instances last: a reader that sees a row also sees its errors' and warnings' commits
    for table in (ERRORS, WARNINGS, INSTANCES):
        removes, rewritten = _replace_sources(dirs[table], replaced, schemas[table])
        if table == INSTANCES:
            touched |= _touched_keys(dirs[INSTANCES], removes, replaced)
        adds = [f for f in written if f.table == table] + rewritten
        version = commit(dirs[table], schemas[table], adds, removes, operation="INGEST",
                         create_empty=True)
        if version is not None:
            result.versions[table] = version
        if table != WARNINGS:
            stages.advance(sum(f.rows for f in written if f.table == table))
    result.warnings = sum(f.rows for f in written if f.table == WARNINGS)
    result.unaccounted = _unaccounted(to_read, written)

    # Only the series and studies this run touched are recomputed (the tables are built
    # from all instances when missing, e.g. in a lake made by an older version).
    stages.start("summaries", result.rows_written)
    result.versions.update(update_summaries(warehouse.root, touched))
    stages.complete(result.rows_written)
    if register:
        stages.start("register")
        for table in (ERRORS, WARNINGS, INSTANCES, SERIES, STUDIES):
            if (SCHEMA, table) in warehouse.tables():
                warehouse.register(spark, only=(SCHEMA, table))
    stages.end()
    kinds = Counter(key[0] for f in written if f.table == ERRORS for key in f.keys)
    result.skipped = kinds.get(ErrorKind.SKIPPED.value, 0)
    result.error_kinds = dict(sorted(kinds.items()))
    result.stage_seconds = stages.seconds
    result.seconds = time.perf_counter() - started
    return result

