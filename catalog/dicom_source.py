"""Spark Python data source ``dicom`` (alias ``zipdcm``): DICOM headers as rows.

Reads plain DICOM files and members of ZIP archives in place: a member is decompressed only
up to the start of its pixel data, and nothing is extracted to disk. Every input becomes a
row, or (mode PERMISSIVE) a row whose ``_corrupt_record`` says why it could not be read.
"""

from __future__ import annotations

import datetime as dt
import json
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import IO, TYPE_CHECKING, Any

from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition
from pyspark.sql.types import (
    ArrayType,
    DateType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from dicomlake.catalog.columns import PROMOTED, promoted_values
from dicomlake.catalog.errors import ErrorKind, HeaderError
from dicomlake.catalog.inputs import (
    DICOM_SUFFIXES,
    Source,
    describe,
    expand_paths,
    is_member_candidate,
)

if TYPE_CHECKING:
    import pyarrow as pa


CORRUPT_RECORD = "_corrupt_record"
ERROR_KIND = "_error_kind"

_KIND_TYPES = {"str": StringType(), "name": StringType(), "date": DateType(),
               "int": IntegerType(), "float": DoubleType(), "floats": ArrayType(DoubleType())}

PROVENANCE = StructType([
    StructField("path", StringType(), False),
    StructField("source", StringType(), False),
    StructField("source_fingerprint", StringType(), False),
    StructField("source_members", IntegerType(), False),
    StructField("archive", StringType()),
    StructField("member", StringType()),
    StructField("file_size", LongType()),
    StructField("compressed_size", LongType()),
    StructField("crc32", LongType()),
    StructField("modified", TimestampType()),
])


def dicom_schema(corrupt_record: str = CORRUPT_RECORD) -> StructType:
    """The schema of the ``dicom`` source: provenance, promoted columns, meta, error."""
    fields = list(PROVENANCE.fields)
    fields += [StructField(name, _KIND_TYPES[kind]) for name, _, kind in PROMOTED]
    fields += [
        StructField("transfer_syntax_uid", StringType()),
        StructField("pixel_data_offset", LongType()),
        StructField("pixel_data_length", LongType()),
        StructField("meta", StringType()),
        StructField(corrupt_record, StringType()),
        StructField(ERROR_KIND, StringType()),
    ]
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
    max_member_bytes: int = 16 << 30
    max_ratio: int = 1000
    max_header_bytes: int = 64 << 20

    @classmethod
    def parse(cls, options: dict[str, str]) -> DicomOptions:
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
            max_member_bytes=_positive_int(opts, "maxMemberBytes", 16 << 30),
            max_ratio=_positive_int(opts, "maxCompressionRatio", 1000),
            max_header_bytes=_positive_int(opts, "maxHeaderBytes", 64 << 20),
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


@dataclass
class _Input:
    """Provenance of one input while it is being read."""

    path: str
    source: Source
    archive: str | None
    member: str | None
    file_size: int | None
    compressed_size: int | None
    crc32: int | None
    modified: dt.datetime | None


class DicomDataSourceReader(DataSourceReader):
    """Plans partitions on the driver and reads headers in tasks."""

    def __init__(self, options: DicomOptions, schema: StructType) -> None:
        self.options = options
        self.schema = schema

    def partitions(self) -> list[DicomInputPartition]:
        sources = [describe(p) for p in expand_paths(self.options.paths)]
        return plan_partitions(sources, self.options)

    def read(self, partition: DicomInputPartition) -> Iterator[pa.RecordBatch]:
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
        warnings.simplefilter("ignore")  # pydicom warns per odd element; errors are rows
        for piece in partition.slices:
            source = piece.source
            if source.error is not None:
                kind, message = source.error
                inp = _Input(source.path, source, source.path if source.is_zip else None,
                             None, source.size or None, None, None, None)
                yield from self._error(inp, kind, message)
            elif source.is_zip:
                yield from self._zip_rows(piece)
            else:
                yield from self._file_row(source)

    def _base(self, inp: _Input) -> dict[str, Any]:
        return {
            "path": inp.path, "source": inp.source.path,
            "source_fingerprint": inp.source.fingerprint,
            "source_members": inp.source.input_count, "archive": inp.archive,
            "member": inp.member, "file_size": inp.file_size,
            "compressed_size": inp.compressed_size, "crc32": inp.crc32,
            "modified": inp.modified,
        }

    def _error(self, inp: _Input, kind: ErrorKind, message: str) -> Iterator[dict[str, Any]]:
        where = f"archive {inp.archive} member {inp.member}" if inp.member else inp.path
        full = message if inp.path in message else f"{where}: {message}"
        if self.options.mode is ParseMode.FAILFAST:
            raise HeaderError(kind, f"dicom (mode FAILFAST): {full}")
        if self.options.mode is ParseMode.PERMISSIVE:
            row = self._base(inp)
            row[self.options.corrupt_record] = full
            row[ERROR_KIND] = kind.value
            yield row

    def _parse(self, inp: _Input, fp: IO[bytes], dicom_name: bool) -> Iterator[dict[str, Any]]:
        # Imported here: planning workers never parse, and pydicom costs 0.5 s to import.
        from dicomlake.catalog.header import read_header

        if inp.file_size == 0:
            yield from self._error(inp, ErrorKind.EMPTY, "file is empty (0 bytes)")
            return
        try:
            prefix = fp.read(132)
            has_preamble = prefix[128:132] == b"DICM"
            if not has_preamble and not dicom_name:
                raise HeaderError(ErrorKind.NOT_DICOM,
                                  "not a DICOM file (no DICM marker at byte 128)")
            fp.seek(0)
            header = read_header(fp, uri=inp.path, size=inp.file_size,
                                 has_preamble=has_preamble,
                                 max_header_bytes=self.options.max_header_bytes)
            row = self._base(inp)
            row.update(promoted_values(header))
        except HeaderError as exc:
            yield from self._error(inp, exc.kind, str(exc))
            return
        except (zlib.error, zipfile.BadZipFile, EOFError) as exc:
            yield from self._error(inp, ErrorKind.BAD_ARCHIVE,
                                   f"compressed data is corrupt ({exc})")
            return
        except NotImplementedError as exc:
            yield from self._error(inp, ErrorKind.BAD_ARCHIVE, f"cannot decompress: {exc}")
            return
        yield row

    def _zip_rows(self, piece: SourceSlice) -> Iterator[dict[str, Any]]:
        source = piece.source
        opts = self.options
        try:
            zf = zipfile.ZipFile(source.path)
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            inp = _Input(source.path, source, source.path, None, source.size, None, None, None)
            yield from self._error(inp, ErrorKind.BAD_ARCHIVE,
                                   f"archive {source.path} cannot be opened ({exc})")
            return
        with zf:
            infos = [i for i in zf.infolist() if is_member_candidate(i)]
            for info in infos[piece.start:piece.stop]:
                inp = _Input(f"{source.path}!/{info.filename}", source, source.path,
                             info.filename, info.file_size, info.compress_size, info.CRC,
                             dt.datetime(*info.date_time, tzinfo=dt.UTC))
                ratio = info.file_size / max(info.compress_size, 1)
                if info.flag_bits & 0x1:
                    yield from self._error(inp, ErrorKind.ENCRYPTED,
                                           "member is encrypted; decrypt the archive first")
                elif info.file_size > opts.max_member_bytes or (
                    info.file_size > 1 << 20 and ratio > opts.max_ratio
                ):
                    yield from self._error(
                        inp, ErrorKind.TOO_LARGE,
                        f"declared size {info.file_size} bytes (compression ratio {ratio:.0f}:1) "
                        f"exceeds maxMemberBytes={opts.max_member_bytes} or "
                        f"maxCompressionRatio={opts.max_ratio} (possible zip bomb)",
                    )
                else:
                    try:
                        fp = zf.open(info)
                    except (NotImplementedError, zipfile.BadZipFile, RuntimeError) as exc:
                        yield from self._error(inp, ErrorKind.BAD_ARCHIVE,
                                               f"member cannot be opened ({exc})")
                        continue
                    with fp:
                        name = info.filename.lower()
                        yield from self._parse(inp, fp, name.endswith(DICOM_SUFFIXES))

    def _file_row(self, source: Source) -> Iterator[dict[str, Any]]:
        inp = _Input(source.path, source, None, None, source.size, None, None,
                     dt.datetime.fromtimestamp(source.mtime_ns / 1e9, tz=dt.UTC))
        try:
            fp = open(source.path, "rb")
        except OSError as exc:
            yield from self._error(inp, ErrorKind.UNREADABLE,
                                   f"cannot open {source.path}: {exc.strerror}")
            return
        with fp:
            yield from self._parse(inp, fp, True)


class DicomDataSource(DataSource):
    """DICOM headers from ZIP archives and plain files, one row per instance.

    Name: ``dicom`` (also ``zipdcm``)

    Schema: provenance (``path``, ``source``, ``archive``, ``member``, ``file_size``,
    ``compressed_size``, ``crc32``, ``modified``, ``source_fingerprint``,
    ``source_members``), typed columns for the common tags (UIDs, ``modality``,
    ``study_date`` as DATE, ``rows``, ``pixel_spacing`` ...), ``meta`` (the whole header as
    PS3.18 DICOM JSON; binary values over 64 bytes as ``BulkDataURI`` references),
    ``pixel_data_offset``/``pixel_data_length``, and ``_corrupt_record``/``_error_kind``.

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

