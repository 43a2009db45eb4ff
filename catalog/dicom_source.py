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
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
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


def _positive_int(options: dict[str, str], key: str, default: int) -> int:
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


@dataclass(frozen=True)
class DicomOptions:
    """The ``dicom`` source's options, parsed and checked once (values arrive as strings)."""

    paths: tuple[str, ...]
    mode: ParseMode = ParseMode.PERMISSIVE
    corrupt_record: str = CORRUPT_RECORD
    members_per_partition: int = 5000
    files_per_partition: int = 256
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
        return cls(
            paths=tuple(paths),
            mode=mode,
            corrupt_record=opts.get("columnnameofcorruptrecord", CORRUPT_RECORD),
            members_per_partition=_positive_int(opts, "membersPerPartition", 5000),
            files_per_partition=_positive_int(opts, "filesPerPartition", 256),
            limits=Limits(
                max_member_bytes=_positive_int(opts, "maxMemberBytes", 16 << 30),
                max_ratio=_positive_int(opts, "maxCompressionRatio", 1000),
                max_header_bytes=_positive_int(opts, "maxHeaderBytes", 64 << 20),
                max_nested_bytes=_positive_int(opts, "maxNestedArchiveBytes", 1 << 30),
            ),
        )


@dataclass(frozen=True)
class SourceSlice:
    """Members ``[start, stop)`` of one source (plain files have one member)."""

    source: Source
    start: int = 0
    stop: int = 1


@dataclass(frozen=True)
class DicomInputPartition(InputPartition):
    """One Spark task: an archive, a member range of a big archive, or a group of files."""

    slices: tuple[SourceSlice, ...]


def plan_partitions(sources: list[Source], options: DicomOptions) -> list[DicomInputPartition]:
    """One partition per archive; big archives split; plain files grouped."""
    parts: list[DicomInputPartition] = []
    loose: list[SourceSlice] = []
    for source in sources:
        if source.is_zip and source.error is None:
            n = len(source.members)
            step = options.members_per_partition
            for start in range(0, max(n, 1), step):
                piece = SourceSlice(source, start, min(n, start + step))
                parts.append(DicomInputPartition((piece,)))
        else:
            loose.append(SourceSlice(source))
    for i in range(0, len(loose), options.files_per_partition):
        parts.append(DicomInputPartition(tuple(loose[i:i + options.files_per_partition])))
    return parts


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
        import pyarrow as pa
        from pyspark.sql.pandas.types import to_arrow_schema

        arrow_schema = to_arrow_schema(self.schema, timezone="UTC")
        names = arrow_schema.names
        columns: dict[str, list[Any]] = {name: [] for name in names}
        batch_rows = 256
        count = 0
        for row in self._rows(partition):
            for name in names:
                columns[name].append(row.get(name))
            count += 1
            if count == batch_rows:
                yield pa.RecordBatch.from_pydict(columns, schema=arrow_schema)
                columns = {name: [] for name in names}
                count = 0
        if count:
            yield pa.RecordBatch.from_pydict(columns, schema=arrow_schema)

    def _rows(self, partition: DicomInputPartition) -> Iterator[dict[str, Any]]:
        # Imported here: planning workers never parse, and pydicom costs 0.5 s to import.
        from dicomlake.catalog.archives import read_source

        warnings.simplefilter("ignore")  # pydicom warns per odd element; errors are rows
        opts = self.options
        for piece in partition.slices:
            origin = Origin(piece.source.path, piece.source.fingerprint,
                            piece.source.input_count)
            for found in read_source(piece.source, piece.start, piece.stop, opts.limits):
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
        membersPerPartition: split archives with more members than this (default 5000).
        filesPerPartition: plain files per task (default 256).
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

