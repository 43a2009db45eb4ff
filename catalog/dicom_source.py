"""Spark Python data source ``dicom`` (alias ``zipdcm``): DICOM headers as rows.

Reads plain DICOM files and members of ZIP and tar archives (also nested, also compressed)
in place: a member is decompressed only up to the start of its pixel data where the format
allows, and nothing is extracted to disk. What each input is, and every fault, is decided by
the Spark-free :mod:`dicomlake.catalog.archives` and :mod:`dicomlake.catalog.preflight`,
shared with the stream and uploads; this module only turns their results into rows. Every
input becomes a row, or (mode PERMISSIVE) a row whose ``_corrupt_record`` says why it could
not be read or which documented rule skipped it (``_error_kind = 'skipped'``).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition
from pyspark.sql.pandas.types import from_arrow_schema, from_arrow_type
from pyspark.sql.types import StringType, StructField, StructType

from dicomlake.catalog import tables
from dicomlake.catalog.archives import Found, Limits
from dicomlake.catalog.errors import ErrorKind, HeaderError
from dicomlake.catalog.inputs import Source, plan_sources
from dicomlake.catalog.rows import Origin, error_message, instance_row, provenance

if TYPE_CHECKING:
    import pyarrow as pa


CORRUPT_RECORD = "_corrupt_record"
ERROR_KIND = "_error_kind"

PROVENANCE: StructType = from_arrow_schema(tables.provenance_schema())
"""The provenance columns (declared once, in :mod:`dicomlake.catalog.tables`)."""

WARNINGS_TYPE = from_arrow_type(tables.warnings_type())
"""Values that did not parse (kept as text in ``meta``, NULL in their typed column)."""


def dicom_schema(corrupt_record: str = CORRUPT_RECORD) -> StructType:
    """The schema of the ``dicom`` source: provenance, promoted columns, meta, warnings,
    error (the table columns come from the registry; the last three are the source's own)."""
    fields = [*PROVENANCE.fields, *from_arrow_schema(tables.header_schema()).fields,
              StructField("warnings", WARNINGS_TYPE),
              StructField(corrupt_record, StringType()),
              StructField(ERROR_KIND, StringType())]
    return StructType(fields)


class ParseMode(StrEnum):
    """What to do with an input that cannot be read (as Spark's JSON reader)."""

    PERMISSIVE = "PERMISSIVE"
    DROPMALFORMED = "DROPMALFORMED"
    FAILFAST = "FAILFAST"


def _positive_int(options: Mapping[str, str], key: str, default: int) -> int:
    raw = options.get(key.lower(), options.get(key))
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"dicom option '{key}' must be a positive integer, got {raw!r}")
    return value


_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _byte_size(options: Mapping[str, str], key: str, default: int) -> int:
    """A size in bytes, written as Spark writes them too (``134217728``, ``128m``, ``1g``)."""
    raw = options.get(key.lower(), options.get(key))
    if raw is None:
        return default
    match = _SIZE.match(raw)
    value = int(match[1]) * _UNITS[match[2].lower()] if match else 0
    if value <= 0:
        raise ValueError(f"dicom option '{key}' must be a positive size in bytes (e.g. "
                         f"134217728, 128m, 1g), got {raw!r}")
    return value


TASKS_PER_CORE = 2
"""Tasks planned per core when ``minPartitions`` is not given: more than one, so a slow
archive does not leave cores idle at the end of a job, few, because each task has a cost (a
Python task, a Parquet file per table when ingesting). Measured on 2,000 CT/MR files in 40
ZIPs, 2 cores, ingest in a warm session: 1, 2, 3, 4 tasks per core took 3.8, 4.0, 5.6 and
6.2 s (means of two runs on a loaded machine)."""


@dataclass(frozen=True)
class DicomOptions:
    """The ``dicom`` source's options, parsed and checked once (values arrive as strings).

    The packing defaults come from measured rates (2026-11-30, one core of a loaded 2-core
    machine): a ZIP member's header 0.6-0.8 ms, a plain file's (open included) 0.5-0.7 ms,
    a ``.tar.gz`` streamed at 45-51 MB/s. So 2048 members (~1.4 s) are worth ~70 MB of
    stream (``maxPartitionBytes`` 128 MiB, Spark's own default) and opening a source ~30 KB
    (``openCostInBytes`` 64 KiB, which also covers reading a bigger central directory).
    """

    paths: tuple[str, ...]
    mode: ParseMode = ParseMode.PERMISSIVE
    corrupt_record: str = CORRUPT_RECORD
    members_per_partition: int = 2048
    max_partition_bytes: int = 128 << 20
    open_cost_in_bytes: int = 64 << 10
    min_partitions: int = field(default_factory=lambda: TASKS_PER_CORE * (os.cpu_count() or 1))
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> DicomOptions:
        """Validate raw options; raises ValueError naming the option and the rule."""
        opts = {k.lower(): v for k, v in options.items()}
        paths: list[str] = []
        if "paths" in opts:
            paths = list(json.loads(opts["paths"]))
        elif "path" in opts:
            paths = [opts["path"]]
        if not paths:
            raise ValueError(
                "dicom needs at least one path: spark.read.format('dicom').load('/data/*.zip')"
            )
        mode_raw = opts.get("mode", "PERMISSIVE").upper()
        try:
            mode = ParseMode(mode_raw)
        except ValueError:
            allowed = ", ".join(m.value for m in ParseMode)
            raise ValueError(
                f"dicom option 'mode' is {mode_raw!r}; it must be one of: {allowed}"
            ) from None
        defaults = cls(paths=tuple(paths))
        return cls(
            paths=tuple(paths),
            mode=mode,
            corrupt_record=opts.get("columnnameofcorruptrecord", CORRUPT_RECORD),
            members_per_partition=_positive_int(opts, "membersPerPartition",
                                                defaults.members_per_partition),
            max_partition_bytes=_byte_size(opts, "maxPartitionBytes",
                                           defaults.max_partition_bytes),
            open_cost_in_bytes=_byte_size(opts, "openCostInBytes", defaults.open_cost_in_bytes),
            min_partitions=_positive_int(opts, "minPartitions", defaults.min_partitions),
            limits=Limits(
                max_member_bytes=_byte_size(opts, "maxMemberBytes", 16 << 30),
                max_ratio=_positive_int(opts, "maxCompressionRatio", 1000),
                max_header_bytes=_byte_size(opts, "maxHeaderBytes", 64 << 20),
                max_nested_bytes=_byte_size(opts, "maxNestedArchiveBytes", 1 << 30),
            ),
        )


@dataclass(frozen=True)
class SourceSlice:
    """What one task reads of one source: a plain file, a whole ZIP, or some of its members.

    ``source.members`` holds only the members of this slice (a split archive's slices do not
    each carry the whole listing to their tasks); ``inputs`` is the whole source's planned
    input count, which every row records as ``source_members``.
    """

    source: Source
    inputs: int = 1


@dataclass(frozen=True)
class DicomInputPartition(InputPartition):
    """One Spark task: slices of one or more sources."""

    slices: tuple[SourceSlice, ...]


@dataclass(frozen=True)
class _Piece:
    """A slice with its planning weight: inputs to parse and bytes that may be read whole."""

    slice: SourceSlice
    members: int
    nbytes: int


def _whole_bytes(source: Source) -> int:
    """Bytes a task may have to read of ``source`` as a stream: a plain file may be a tar or
    a compressed file, read through; a listed ZIP's members are read only up to their pixel
    data, so they weigh by number, not size (as does a source that is only an error)."""
    return source.size if not source.is_zip and source.error is None else 0


def _pieces(source: Source, max_members: int) -> list[_Piece]:
    """``source`` as slices of at most ``max_members`` (only a listed ZIP can be split, at
    member boundaries)."""
    members = source.members
    if not source.is_zip or source.error is not None or not members:
        return [_Piece(SourceSlice(source, source.input_count), 1, _whole_bytes(source))]
    return [_Piece(SourceSlice(replace(source, members=members[start:start + max_members]),
                               source.input_count), len(members[start:start + max_members]), 0)
            for start in range(0, len(members), max_members)]


def _even_target(total: int, cap: int, min_partitions: int) -> int:
    """Members per task: ``total`` spread over ``min_partitions`` tasks, or, when that would
    exceed ``cap``, over the smallest multiple of ``min_partitions`` tasks that keeps each
    within it. Spark's rule (tasks of exactly ``cap`` and one remainder) leaves the last
    wave of a job on fewer cores: 10,032 members at 2,048 on 2 cores is 5 full tasks and a
    part, so three waves for 2.5 waves of work; spread over 8 tasks it is 4 even waves."""
    per_wave = max(1, math.ceil(total / min_partitions))
    if per_wave <= cap:
        return per_wave
    waves = math.ceil(total / (cap * min_partitions))
    return max(1, math.ceil(total / (waves * min_partitions)))


def plan_partitions(sources: list[Source], options: DicomOptions) -> list[DicomInputPartition]:
    """Pack sources into tasks the way Spark's file sources pack files.

    Each task holds at most a target of members (``membersPerPartition``) and of bytes
    (``maxPartitionBytes``: sources read whole; every slice after the first in a task also
    costs ``openCostInBytes``, so many tiny files do not make one enormous task). The targets
    shrink so that the work spreads over at least ``minPartitions`` tasks when there is
    enough of it (Spark's bytes-per-core rule, for members too). Archives bigger than a
    target are split into member ranges; smaller sources are packed together, biggest
    first, each task filled until the next slice would overflow it (Spark's next-fit over
    splits sorted by size).
    """
    if not sources:
        return []
    open_cost = options.open_cost_in_bytes
    total_members = sum(max(s.input_count, 1) for s in sources)
    total_bytes = sum(_whole_bytes(s) + open_cost for s in sources)
    target_members = _even_target(total_members, options.members_per_partition,
                                  options.min_partitions)
    target_bytes = min(options.max_partition_bytes,
                       max(open_cost, math.ceil(total_bytes / options.min_partitions)))
    pieces = [p for s in sources for p in _pieces(s, target_members)]
    pieces.sort(key=lambda p: max(p.members / target_members, p.nbytes / target_bytes),
                reverse=True)  # stable: equal pieces keep the sources' (path) order
    parts: list[DicomInputPartition] = []
    current: list[SourceSlice] = []
    members = nbytes = 0
    for piece in pieces:
        if current and (members + piece.members > target_members
                        or nbytes + piece.nbytes > target_bytes):
            parts.append(DicomInputPartition(tuple(current)))
            current, members, nbytes = [], 0, 0
        current.append(piece.slice)
        members += piece.members
        nbytes += piece.nbytes + open_cost
    parts.append(DicomInputPartition(tuple(current)))
    return parts


BATCH_ROWS = 256
"""Rows per Arrow batch a task yields: small enough that progress moves and memory stays
flat, big enough that per-batch costs vanish."""


def _batch(rows: list[dict[str, Any]], names: list[str], schema: pa.Schema) -> pa.RecordBatch:
    """Rows (dicts that may lack columns) as one batch: one list per column, then Arrow."""
    import pyarrow as pa

    return pa.RecordBatch.from_arrays(
        [pa.array([row.get(name) for row in rows], type=field.type)
         for name, field in zip(names, schema, strict=True)], schema=schema)


class DicomDataSourceReader(DataSourceReader):
    """Plans partitions on the driver and reads headers in tasks."""

    def __init__(self, options: DicomOptions, schema: StructType) -> None:
        self.options = options
        self.schema = schema

    def partitions(self) -> list[DicomInputPartition]:
        return plan_partitions(plan_sources(self.options.paths), self.options)

    # Spark passes back only what partitions() planned; its stub types the base's argument
    # as InputPartition, which a subclass may not narrow
    def read(self, partition: DicomInputPartition) -> Iterator[pa.RecordBatch]:  # type: ignore[override]
        """The partition's rows as Arrow batches, each column built in one pass."""
        from pyspark.sql.pandas.types import to_arrow_schema

        arrow_schema = to_arrow_schema(self.schema, timezone="UTC")
        names = arrow_schema.names
        rows: list[dict[str, Any]] = []
        for row in self._rows(partition):
            rows.append(row)
            if len(rows) == BATCH_ROWS:
                yield _batch(rows, names, arrow_schema)
                rows = []
        if rows:
            yield _batch(rows, names, arrow_schema)

    def _rows(self, partition: DicomInputPartition) -> Iterator[dict[str, Any]]:
        # Imported here: planning workers never parse, and pydicom costs 0.5 s to import.
        from dicomlake.catalog.archives import read_source

        warnings.simplefilter("ignore")  # pydicom warns per odd element; errors are rows
        opts = self.options
        for piece in partition.slices:
            origin = Origin(piece.source.path, piece.source.fingerprint, piece.inputs)
            for found in read_source(piece.source, limits=opts.limits):
                row = self._row(origin, found)
                if row is not None:
                    yield row

    def _row(self, origin: Origin, found: Found) -> dict[str, Any] | None:
        if found.header is not None:
            return instance_row(origin, found)
        assert found.error is not None
        kind, full = found.error[0], error_message(found)
        mode = self.options.mode
        if mode is ParseMode.FAILFAST and kind is not ErrorKind.SKIPPED:
            raise HeaderError(kind, f"dicom (mode FAILFAST): {full}")
        if mode is not ParseMode.PERMISSIVE:
            return None
        row = provenance(origin, found)
        row[self.options.corrupt_record] = full
        row[ERROR_KIND] = kind.value
        return row


class DicomDataSource(DataSource):
    """DICOM headers from ZIP archives and plain files, one row per instance.

    Name: ``dicom`` (also ``zipdcm``)

    Schema: provenance (``path``, ``source``, ``archive``, ``member``, ``member_index``,
    ``file_size``,
    ``compressed_size``, ``crc32``, ``modified``, ``source_fingerprint``,
    ``source_members``), typed columns for the common tags (UIDs, ``modality``,
    ``study_date`` as DATE, ``rows``, ``pixel_spacing`` ...), ``meta`` (the whole header as
    PS3.18 DICOM JSON; binary values over 64 bytes as ``BulkDataURI`` references),
    ``pixel_data_offset``/``pixel_data_length``, ``warnings`` (values that did not parse:
    tag, keyword, value, reason), and ``_corrupt_record``/``_error_kind``.

    Options:
        path / paths: files, folders (recursive) and globs; ``load([...])`` for several.
        mode: PERMISSIVE (default; bad inputs give a row with ``_corrupt_record``),
            DROPMALFORMED (bad inputs dropped) or FAILFAST (first bad input fails the job).
        columnNameOfCorruptRecord: name of the error column (default ``_corrupt_record``).
        membersPerPartition: at most this many members (or plain files) per task; bigger
            archives are split into member ranges, smaller ones packed together
            (default 2048).
        maxPartitionBytes: at most this many bytes per task of sources that may be read
            whole (plain files: a tar or compressed file is streamed through), as Spark's
            ``spark.sql.files.maxPartitionBytes`` (default 128m; ``134217728``, ``1g`` ...).
            Members of a ZIP are read only up to their pixel data: they count by number.
        openCostInBytes: what opening one more source is worth in bytes when packing, as
            ``spark.sql.files.openCostInBytes`` (default 64k).
        minPartitions: spread the work over at least this many tasks when there is enough
            of it, so every core gets a few (default 2 per core of the planning machine;
            ``dicomlake ingest`` passes 2 x Spark's default parallelism).
        maxMemberBytes: declared member size limit (default 16 GiB).
        maxCompressionRatio: declared/compressed size limit for members over 1 MiB
            (default 1000).
        maxHeaderBytes: stop reading a header after this many bytes (default 64 MiB).
        maxNestedArchiveBytes: a ZIP inside a ZIP is read into memory; larger ones are an
            error (default 1 GiB).

    Example:
        >>> df = spark.read.format("dicom").load("/data/archives/*.zip")
        >>> df.where("modality = 'CT'").select("path", "rows", "columns").show()
    """

    @classmethod
    def name(cls) -> str:
        return "dicom"

    def schema(self) -> StructType:
        return dicom_schema(DicomOptions.parse(self.options).corrupt_record)

    def reader(self, schema: StructType) -> DicomDataSourceReader:
        return DicomDataSourceReader(DicomOptions.parse(self.options), schema)


class ZipdcmDataSource(DicomDataSource):
    """The ``dicom`` source under the name people coming from zipdcm already type."""

    @classmethod
    def name(cls) -> str:
        return "zipdcm"

