"""The catalog as Trino clients see it: catalogs, ``information_schema``, ``system.jdbc``.

Trino names tables ``catalog.schema.table``; the lake has one catalog (``dicomlake``) whose
schemas are Spark databases, plus Trino's ``system`` catalog for what JDBC tools and
SQLAlchemy query (``system.jdbc.*``, ``system.metadata.table_comments``). A snapshot of
schemas, tables and columns is taken from the Spark session (and new warehouse tables are
registered first, so tables ingested by another process appear without a restart) and
published as small in-memory Spark views; metadata queries are then ordinary Spark SQL over
those views, so ``WHERE``, ``LIKE`` and joins behave as clients expect.

Each role's metadata views live in that role's own Spark session (:mod:`.roles`) and list
only what the role may read: analysts see ``dicom_deid``, clinicians every lake schema but the
admin-only ``system``, admins everything.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyspark.sql import types as T

from dicomlake.sql.roles import HIDDEN_PREFIX, metadata_view, readable, relation_view
from dicomlake.sql.types import trino_type
from dicomlake.sql.users import Role

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyspark.sql import SparkSession

    from dicomlake.sql.roles import RoleSessions

CATALOG = "dicomlake"
"""The Trino catalog name of the lake."""
SYSTEM_CATALOG = "system"
INFORMATION_SCHEMA = "information_schema"

_JDBC_TYPES = {"boolean": 16, "tinyint": -6, "smallint": 5, "integer": 4, "bigint": -5,
               "real": 7, "double": 8, "decimal": 3, "varchar": 12, "char": 1,
               "varbinary": -3, "date": 91, "timestamp": 93, "timestamp with time zone": 2014,
               "array": 2003, "json": 1111, "map": 2000, "row": 2000}

# view name -> (DDL of its columns); rows are built by _rows_for
VIEW_COLUMNS: dict[str, str] = {
    "catalogs": "catalog_name string",
    "schemata": "catalog_name string, schema_name string",
    "tables": "table_catalog string, table_schema string, table_name string, table_type string",
    "columns": ("table_catalog string, table_schema string, table_name string, "
                "column_name string, ordinal_position bigint, column_default string, "
                "is_nullable string, data_type string, comment string, extra_info string"),
    "views": ("table_catalog string, table_schema string, table_name string, "
              "view_owner string, view_definition string, security_type string"),
    "table_comments": ("catalog_name string, schema_name string, table_name string, "
                       "comment string"),
    "jdbc_catalogs": "table_cat string",
    "jdbc_schemas": "table_schem string, table_catalog string",
    "jdbc_tables": ("table_cat string, table_schem string, table_name string, "
                    "table_type string, remarks string, type_cat string, type_schem string, "
                    "type_name string, self_referencing_col_name string, "
                    "ref_generation string"),
    "jdbc_columns": ("table_cat string, table_schem string, table_name string, "
                     "column_name string, data_type bigint, type_name string, "
                     "column_size bigint, buffer_length bigint, decimal_digits bigint, "
                     "num_prec_radix bigint, nullable bigint, remarks string, "
                     "column_def string, sql_data_type bigint, sql_datetime_sub bigint, "
                     "char_octet_length bigint, ordinal_position bigint, is_nullable string, "
                     "scope_catalog string, scope_schema string, scope_table string, "
                     "source_data_type bigint, is_autoincrement string, "
                     "is_generatedcolumn string"),
    "jdbc_table_types": "table_type string",
    "jdbc_types": ("type_name string, data_type bigint, precision bigint, "
                   "literal_prefix string, literal_suffix string, create_params string, "
                   "nullable bigint, case_sensitive boolean, searchable bigint, "
                   "unsigned_attribute boolean, fixed_prec_scale boolean, "
                   "auto_increment boolean, local_type_name string, minimum_scale bigint, "
                   "maximum_scale bigint, sql_data_type bigint, sql_datetime_sub bigint, "
                   "num_prec_radix bigint"),
}

SYSTEM_TABLES: dict[tuple[str, str], str] = {
    ("jdbc", "catalogs"): "jdbc_catalogs",
    ("jdbc", "schemas"): "jdbc_schemas",
    ("jdbc", "tables"): "jdbc_tables",
    ("jdbc", "columns"): "jdbc_columns",
    ("jdbc", "table_types"): "jdbc_table_types",
    ("jdbc", "types"): "jdbc_types",
    ("metadata", "table_comments"): "table_comments",
}
"""``system.<schema>.<table>`` -> metadata view."""

INFORMATION_SCHEMA_TABLES = ("schemata", "tables", "columns", "views")


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    data_type: T.DataType
    nullable: bool
    comment: str | None


@dataclass(frozen=True)
class TableInfo:
    schema: str
    name: str
    columns: tuple[ColumnInfo, ...]
    is_view: bool = False


view_name = metadata_view


def view_columns(kind: str) -> list[str]:
    """The public column names of a metadata view."""
    return [part.strip().split()[0] for part in VIEW_COLUMNS[kind].split(",")]


def _sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _jdbc_type(type_name: str) -> int:
    base = type_name.split("(", 1)[0].strip()
    if base.startswith("timestamp"):
        base = "timestamp with time zone" if "with time zone" in type_name else "timestamp"
    return _JDBC_TYPES.get(base, 1111)


def _column_size(data_type: T.DataType) -> int | None:
    if isinstance(data_type, T.DecimalType):
        return data_type.precision
    if isinstance(data_type, (T.StringType, T.BinaryType)):
        return 2147483647
    sizes = {T.ByteType: 3, T.ShortType: 5, T.IntegerType: 10, T.LongType: 19,
             T.FloatType: 24, T.DoubleType: 53, T.DateType: 10}
    for spark_type, size in sizes.items():
        if isinstance(data_type, spark_type):
            return size
    return None


class LakeCatalog:
    """Snapshot of the lake's tables, published to each role's session as views.

    Checking for change is cheap (a glob of the warehouse folder, plus a flag set after
    admin DDL), so it runs on every lookup; the full re-read (Spark catalog calls on the admin
    session) runs only when something changed, on a miss, or every ``full_refresh_seconds``
    in the background. Each non-admin session then gets a view per table its role may read
    (and loses views of tables that went away); metadata views are (re)built per role on
    first use after a change, from that role's tables only.
    """

    def __init__(self, sessions: RoleSessions, warehouse_root: Path, *,
                 full_refresh_seconds: float = 60.0,
                 maintain: Callable[[], object] | None = None) -> None:
        self.sessions = sessions
        self.spark = sessions.admin()
        self.warehouse_root = Path(warehouse_root)
        self.full_refresh_seconds = full_refresh_seconds
        self.maintain = maintain
        """Called before each background re-read (the server refreshes the twins there)."""
        self._lock = threading.RLock()
        self._tables: dict[tuple[str, str], TableInfo] = {}
        self._schemas: list[str] = []
        self._registered: set[tuple[str, str]] = set()
        self._warehouse_tables: list[tuple[str, str]] | None = None
        self._stale = True
        self._taken_at = 0.0
        self._fingerprint: object = None
        self._version = 0
        self._built: dict[tuple[Role, str], int] = {}
        self._stop = threading.Event()

    def start_background_refresh(self) -> LakeCatalog:
        """Re-read the catalog every ``full_refresh_seconds`` off the request path."""
        def run() -> None:
            while not self._stop.wait(self.full_refresh_seconds):
                try:
                    if self.maintain is not None:
                        self.maintain()
                    self.refresh(force=True)
                except Exception:  # keep serving the last good snapshot
                    logging.getLogger(__name__).exception("catalog refresh failed")

        threading.Thread(target=run, name="dicomlake-catalog", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    # -- snapshot ---------------------------------------------------------------------------

    def _take(self) -> tuple[list[str], dict[tuple[str, str], TableInfo]]:
        from dicomlake.catalog.warehouse import Warehouse

        warehouse = Warehouse(self.warehouse_root)
        for key in warehouse.tables():
            if key not in self._registered:
                warehouse.register(self.spark, only=key)
                self._registered.add(key)
        schemas = sorted(db.name for db in self.spark.catalog.listDatabases()
                         if not db.name.startswith(HIDDEN_PREFIX))
        tables: dict[tuple[str, str], TableInfo] = {}
        for schema in schemas:
            for table in self.spark.catalog.listTables(schema):
                if table.isTemporary:
                    continue
                fqn = f"`{schema}`.`{table.name}`"
                try:
                    struct = self.spark.table(fqn).schema
                except Exception:  # a broken table must not hide the others
                    continue
                cols = tuple(ColumnInfo(f.name, f.dataType, f.nullable,
                                        f.metadata.get("comment")) for f in struct.fields)
                tables[(schema, table.name)] = TableInfo(schema, table.name, cols,
                                                         table.tableType == "VIEW")
        return schemas, tables

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the catalog if the warehouse changed, after DDL, or when forced."""
        from dicomlake.catalog.warehouse import Warehouse

        with self._lock:
            warehouse = Warehouse(self.warehouse_root)
            listed = warehouse.tables()
            if not force and not self._stale and listed == self._warehouse_tables:
                return
            schemas, tables = self._take()
            fingerprint = (tuple(schemas), tuple(
                (k, tuple((c.name, c.data_type.simpleString()) for c in t.columns))
                for k, t in sorted(tables.items())))
            changed = fingerprint != self._fingerprint
            if changed:
                self._fingerprint = fingerprint
                self._version += 1
            self._schemas, self._tables = schemas, tables
            self._warehouse_tables = listed
            self._stale = False
            self._taken_at = time.monotonic()
            if changed:
                for session in self.sessions.guarded():
                    session.sync({key: str(warehouse.table_path(*key)) for key in listed
                                  if key in tables and readable(session.role, key[0])})

    def invalidate(self) -> None:
        """Mark the snapshot stale (after DDL) so the next use re-reads the catalog."""
        with self._lock:
            self._stale = True

    # -- lookups ----------------------------------------------------------------------------

    def _visible(self, role: Role) -> dict[tuple[str, str], TableInfo]:
        """The tables ``role`` may read: admins everything Spark knows; others lake tables."""
        if role is Role.ADMIN:
            return self._tables
        self.sessions.get(role)  # refuses roles this server cannot isolate
        listed = set(self._warehouse_tables or ())
        return {k: t for k, t in self._tables.items()
                if k in listed and readable(role, k[0])}

    def schemas(self, role: Role) -> list[str]:
        self.refresh()
        if role is Role.ADMIN:
            return list(self._schemas)
        return sorted({schema for schema, _ in self._visible(role)})

    def table(self, schema: str, name: str, role: Role) -> TableInfo | None:
        """The table if it exists and ``role`` may read it (re-reads on a miss)."""
        if not readable(role, schema):
            return None
        self.refresh()
        found = self._visible(role).get((schema, name))
        if found is None:
            self.refresh(force=True)
            found = self._visible(role).get((schema, name))
        return found

    def relation(self, schema: str, name: str, role: Role) -> tuple[str, ...]:
        """The name a role's Spark SQL reads ``schema.name`` by: the catalog table for admins,
        the role session's own view for everyone else."""
        if role is Role.ADMIN:
            return (schema, name)
        return (relation_view(schema, name),)

    def spark_has_table(self, schema: str, name: str) -> bool:
        """Does Spark's catalog hold ``schema.name``? (An admin may read tables the snapshot
        leaves out, such as those of hidden databases.) Asked of the catalog by name, so a
        schema that is also a data source name is never read as a file query."""
        def quoted(part: str) -> str:
            return "`" + part.replace("`", "``") + "`"

        try:
            return bool(self.spark.catalog.tableExists(f"{quoted(schema)}.{quoted(name)}"))
        except Exception:  # a name Spark cannot even parse is no table
            return False

    def has_schema(self, schema: str, role: Role) -> bool:
        if schema == INFORMATION_SCHEMA:
            return True
        if schema in self.schemas(role):
            return True
        self.refresh(force=True)
        return schema in self.schemas(role)

    # -- views ------------------------------------------------------------------------------

    def metadata_view(self, kind: str, role: Role) -> str:
        """Name of the up-to-date metadata view ``kind`` in ``role``'s session."""
        self.refresh()
        name = view_name(kind)
        session = self.sessions.get(role)
        with self._lock:
            if self._built.get((role, name)) != self._version:
                self._build_metadata_view(kind, name, session.spark, role)
                session.add_metadata_view(name)
                self._built[(role, name)] = self._version
        return name

    def _build_metadata_view(self, kind: str, name: str, spark: SparkSession,
                             role: Role) -> None:
        # SQL VALUES rather than createDataFrame: no Python-side type conversion machinery
        # (which imports optional packages) and no job; the rows are few.
        fields = [part.strip().split() for part in VIEW_COLUMNS[kind].split(",")]
        tables = sorted(self._visible(role).values(), key=lambda t: (t.schema, t.name))
        schemas = self._schemas if role is Role.ADMIN else sorted({t.schema for t in tables})
        rows = self._rows_for(kind, schemas, tables)
        casts = ", ".join(f"CAST(c{i} AS {t.upper()}) AS `{n}`" for i, (n, t) in enumerate(fields))
        if rows:
            values = ", ".join("(" + ", ".join(_sql_literal(v) for v in row) + ")"
                               for row in rows)
            aliases = ", ".join(f"c{i}" for i in range(len(fields)))
            body = f"SELECT {casts} FROM VALUES {values} AS t({aliases})"
        else:
            nulls = ", ".join(f"NULL AS c{i}" for i in range(len(fields)))
            body = f"SELECT {casts} FROM (SELECT {nulls}) WHERE false"
        spark.sql(f"CREATE OR REPLACE TEMPORARY VIEW `{name}` AS {body}")

    def _rows_for(self, kind: str, schemas: list[str],
                  tables: list[TableInfo]) -> list[tuple[Any, ...]]:
        lake_schemas = [*schemas, INFORMATION_SCHEMA]
        system_schemas = ["information_schema", "jdbc", "metadata"]
        system_tables = [(s, t) for (s, t) in SYSTEM_TABLES]
        if kind == "catalogs":
            return [(CATALOG,), (SYSTEM_CATALOG,)]
        if kind == "schemata":
            return ([(CATALOG, s) for s in lake_schemas]
                    + [(SYSTEM_CATALOG, s) for s in system_schemas])
        if kind == "tables":
            rows: list[tuple[Any, ...]] = [
                (CATALOG, t.schema, t.name, "VIEW" if t.is_view else "BASE TABLE")
                for t in tables]
            return rows + [(SYSTEM_CATALOG, s, t, "BASE TABLE") for s, t in system_tables]
        if kind == "columns":
            return [(CATALOG, t.schema, t.name, c.name, i, None,
                     "YES" if c.nullable else "NO", trino_type(c.data_type)[0], c.comment, None)
                    for t in tables for i, c in enumerate(t.columns, start=1)]
        if kind == "views":
            return [(CATALOG, t.schema, t.name, None, "", "DEFINER") for t in tables
                    if t.is_view]
        if kind == "table_comments":
            return [(CATALOG, t.schema, t.name, None) for t in tables]
        if kind == "jdbc_catalogs":
            return [(CATALOG,), (SYSTEM_CATALOG,)]
        if kind == "jdbc_schemas":
            return ([(s, CATALOG) for s in lake_schemas]
                    + [(s, SYSTEM_CATALOG) for s in system_schemas])
        if kind == "jdbc_tables":
            rows = [(CATALOG, t.schema, t.name, "VIEW" if t.is_view else "TABLE", "", None,
                     None, None, None, None) for t in tables]
            return rows + [(SYSTEM_CATALOG, s, t, "TABLE", "", None, None, None, None, None)
                           for s, t in system_tables]
        if kind == "jdbc_columns":
            out = []
            for t in tables:
                for i, c in enumerate(t.columns, start=1):
                    name = trino_type(c.data_type)[0]
                    digits = c.data_type.scale if isinstance(c.data_type, T.DecimalType) else None
                    out.append((CATALOG, t.schema, t.name, c.name, _jdbc_type(name), name,
                                _column_size(c.data_type), None, digits, 10, int(c.nullable),
                                c.comment, None, None, None, None, i,
                                "YES" if c.nullable else "NO", None, None, None, None, "NO",
                                "NO"))
            return out
        if kind == "jdbc_table_types":
            return [("TABLE",), ("VIEW",)]
        if kind == "jdbc_types":
            return [(name, code, None, None, None, None, 1, name in ("varchar", "char"), 3,
                     False, False, False, None, 0, 0, None, None, 10)
                    for name, code in sorted(_JDBC_TYPES.items())]
        raise KeyError(kind)
