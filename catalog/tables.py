"""The table registry: every ``dicom.*`` table declared once (name, Arrow schema, keys).

Batch jobs (Spark tasks), the stream's writer (Flink venv, no pyspark), the de-identified
twins and the SQL service all write and read these tables. When each declared its own column
list, DDL string or Spark struct, the copies drifted; here each table has one Arrow schema,
and Spark schemas and DDL are derived from it. The module imports only pyarrow (lazily), so
every interpreter can use it.

``keys`` are the columns that identify a row (what duplicate checks and incremental updates
match on); ``phi`` marks tables that may hold protected health information; ``has_twin``
marks the tables with a de-identified twin in ``dicom_deid`` (:data:`TWINS`, written by
:mod:`dicomlake.catalog.deid`, which decides per column what the twin keeps: identifiers
are dropped, pseudonymised or generalised, so even tables without PHI of their own, such as
``embeddings``, get a twin keyed by pseudonymous UIDs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from dicomlake.catalog.columns import PROMOTED

if TYPE_CHECKING:
    import os

    import pyarrow as pa

SCHEMA = "dicom"
"""The database holding the lake's tables (``<warehouse>/dicom/<table>``)."""
DEID_SCHEMA = "dicom_deid"
"""The database of the de-identified twins analysts query."""


@dataclass(frozen=True)
class TableSpec:
    """One table: where it lives, its columns and what identifies a row."""

    name: str
    keys: tuple[str, ...]
    phi: bool
    doc: str
    _schema: Callable[[], pa.Schema]
    partition_by: tuple[str, ...] = ()
    database: str = SCHEMA
    has_twin: bool = True

    @property
    def qualified(self) -> str:
        """``dicom.<name>``, as SQL names it."""
        return f"{self.database}.{self.name}"

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema every writer appends with."""
        return self._schema()

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.schema.names)

    def path(self, warehouse: str | os.PathLike[str]) -> Path:
        """``<warehouse>/<database>/<name>`` (whether or not the table exists yet)."""
        return Path(warehouse) / self.database / self.name

    def twin(self) -> TableSpec:
        """The same table in the de-identified database (its columns are chosen by deid)."""
        return TableSpec(self.name, self.keys, False, f"De-identified twin of {self.qualified}.",
                         self._schema, self.partition_by, DEID_SCHEMA, has_twin=False)


def _utc() -> pa.DataType:
    import pyarrow as pa

    return pa.timestamp("us", tz="UTC")


def _kind_type(kind: str) -> pa.DataType:
    import pyarrow as pa

    return {"str": pa.string(), "name": pa.string(), "date": pa.date32(),
            "int": pa.int32(), "float": pa.float64(),
            "floats": pa.list_(pa.float64())}[kind]


@cache
def provenance_schema() -> pa.Schema:
    """Where an input came from: the first columns of ``instances`` and ``errors``."""
    import pyarrow as pa

    return pa.schema([
        pa.field("path", pa.string(), False),
        pa.field("source", pa.string(), False),
        pa.field("source_fingerprint", pa.string(), False),
        pa.field("source_members", pa.int32(), False),
        ("archive", pa.string()), ("member", pa.string()), ("member_index", pa.int32()),
        ("file_size", pa.int64()), ("compressed_size", pa.int64()), ("crc32", pa.int64()),
        ("modified", _utc()),
    ])


@cache
def warnings_type() -> pa.DataType:
    """One header's values that did not parse (kept as text in ``meta``)."""
    import pyarrow as pa

    return pa.list_(pa.struct([("tag", pa.string()), ("keyword", pa.string()),
                               ("value", pa.string()), ("reason", pa.string())]))


@cache
def header_schema() -> pa.Schema:
    """What the header of one instance becomes (promoted columns, pixel location, meta)."""
    import pyarrow as pa

    return pa.schema([*((name, _kind_type(kind)) for name, _, kind in PROMOTED),
                      ("transfer_syntax_uid", pa.string()),
                      ("pixel_data_offset", pa.int64()), ("pixel_data_length", pa.int64()),
                      ("meta", pa.string())])


@cache
def _instances() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([*provenance_schema(), *header_schema(),
                      pa.field("ingested_at", _utc(), False)])


@cache
def _errors() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([*provenance_schema(), ("error_kind", pa.string()),
                      ("error", pa.string()), pa.field("ingested_at", _utc(), False)])


@cache
def _warnings() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([*((n, pa.string()) for n in ("path", "source", "sop_instance_uid", "tag",
                                                   "keyword", "value", "reason")),
                      pa.field("ingested_at", _utc(), False)])


@cache
def _series() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        ("series_instance_uid", pa.string()), ("study_instance_uid", pa.string()),
        ("patient_id", pa.string()), ("modality", pa.string()),
        ("body_part_examined", pa.string()), ("series_number", pa.int32()),
        ("series_description", pa.string()), ("manufacturer", pa.string()),
        ("study_date", pa.date32()), pa.field("instances", pa.int64(), False),
        ("bytes", pa.int64()), ("rows", pa.int32()), ("columns", pa.int32()),
    ])


@cache
def _studies() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        ("study_instance_uid", pa.string()), ("patient_id", pa.string()),
        ("patient_name", pa.string()), ("study_date", pa.date32()),
        ("study_description", pa.string()), ("accession_number", pa.string()),
        pa.field("modalities", pa.list_(pa.field("element", pa.string(), False)), False),
        pa.field("series", pa.int64(), False), pa.field("instances", pa.int64(), False),
        ("bytes", pa.int64()),
    ])


@cache
def _embeddings() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([("sop_instance_uid", pa.string()), ("frame", pa.int32()),
                      ("embedding", pa.list_(pa.float32())), ("model_id", pa.string()),
                      ("model_version", pa.string()), ("thumbnail", pa.binary()),
                      ("embedded_at", _utc())])


@cache
def _pixel_errors() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([*((n, pa.string()) for n in ("sop_instance_uid", "path", "error_kind",
                                                   "error", "model_id", "model_version")),
                      ("embedded_at", _utc())])


@cache
def _codes() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([("sop_instance_uid", pa.string()), ("frame", pa.int32()),
                      ("codebook_version", pa.int32()), ("list_id", pa.int32()),
                      ("code", pa.binary())])


@cache
def _codebooks() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([("version", pa.int32()), ("model_id", pa.string()),
                      ("model_version", pa.string()), ("dim", pa.int32()), ("m", pa.int32()),
                      ("ksub", pa.int32()), ("nlist", pa.int32()), ("trained_on", pa.int64()),
                      ("created_at", _utc()), ("centroids", pa.binary()),
                      ("coarse", pa.binary())])


INSTANCES = TableSpec("instances", ("sop_instance_uid",), True,
                      "One row per DICOM instance: provenance, promoted columns, meta.",
                      _instances)
ERRORS = TableSpec("errors", ("path",), True,
                   "One row per input that is not an instance (and why), skips included.",
                   _errors)
WARNINGS = TableSpec("warnings", ("path", "tag"), True,
                     "One row per header value that did not parse (raw text kept).",
                     _warnings)
SERIES = TableSpec("series", ("series_instance_uid",), True,
                   "One row per series, aggregated from instances.", _series)
STUDIES = TableSpec("studies", ("study_instance_uid",), True,
                    "One row per study, aggregated from instances.", _studies)
EMBEDDINGS = TableSpec("embeddings", ("sop_instance_uid", "frame", "model_version"), False,
                       "One CNN feature vector (and thumbnail) per frame and model.",
                       _embeddings)
PIXEL_ERRORS = TableSpec("pixel_errors", ("sop_instance_uid", "model_version"), True,
                         "Instances whose pixels could not be decoded for a model.",
                         _pixel_errors)
CODES = TableSpec("codes", ("sop_instance_uid", "frame", "codebook_version"), False,
                  "PQ codes of the embedded code store.", _codes)
CODEBOOKS = TableSpec("codebooks", ("version",), False,
                      "Every trained PQ codebook version; the newest is current (centroids "
                      "only: every role reads it, so it has no twin).", _codebooks,
                      has_twin=False)

TABLES: dict[str, TableSpec] = {t.name: t for t in (
    INSTANCES, ERRORS, WARNINGS, SERIES, STUDIES, EMBEDDINGS, PIXEL_ERRORS, CODES, CODEBOOKS)}
"""Every table of the ``dicom`` database, by name."""

TWINS: dict[str, TableSpec] = {t.name: t.twin() for t in TABLES.values() if t.has_twin}
"""The de-identified twins (``dicom_deid.<name>``) analysts query, by name."""


def spec(name: str) -> TableSpec:
    """The declared table ``name``; a clear error for a name the lake does not have."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"{SCHEMA} has no table {name!r}; tables: {', '.join(TABLES)}") from None


def create_missing(warehouse: str | os.PathLike[str], names: tuple[str, ...] | None = None,
                   ) -> list[str]:
    """Create the named tables (default: all) that do not exist yet, empty, with their
    declared schemas; returns the ones created. Writers that only append (the stream) call
    this first, so they never have to guess a schema."""
    from deltalake import DeltaTable, Schema
    from deltalake.transaction import create_table_with_add_actions

    created = []
    for name in names or tuple(TABLES):
        table = spec(name)
        path = table.path(warehouse)
        if DeltaTable.is_deltatable(str(path)):
            continue
        path.mkdir(parents=True, exist_ok=True)
        create_table_with_add_actions(str(path), Schema.from_arrow(table.schema), [],
                                      mode="append")
        created.append(name)
    return created
