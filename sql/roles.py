"""One Spark session per role, each holding only what its role may see.

``spark.newSession()`` shares the engine (and Spark's persistent catalog) but has its own
temporary views, functions and Python data sources. The service uses that as the isolation
boundary (Trino's system access control and Unity Catalog's grants, by construction):

* ``admin`` queries the session the server was built with: every table, every function.
* ``clinician`` gets a new session holding a temporary view per lake table outside the
  admin-only ``system`` schema, the image functions in clinician scope (images by id) and the
  service's metadata views.
* ``analyst`` gets a new session holding views of the de-identified ``dicom_deid`` tables
  only, the image functions in analyst scope (searching and filtering the twins) and the
  metadata views. Raw tables' data sources are never registered there, so even a catalog
  entry of a raw table cannot be read or described from it.

In no session does Spark read files named in SQL (``spark.sql.runSQLOnFiles`` is off), and
non-admin statements pass :class:`~dicomlake.sql.guard.PlanGuard` before they are analysed.
Over Spark Connect (``sc://``) the service cannot create or inspect such sessions (there is
no JVM to ask), so it serves admins only there.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dicomlake.catalog.deid import DEID_SCHEMA
from dicomlake.session import is_connect
from dicomlake.sql import errors as E
from dicomlake.sql.errors import QueryError
from dicomlake.sql.guard import Allowance, PlanGuard, builtin_functions
from dicomlake.sql.users import Role

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from dicomlake.config import Settings

HIDDEN_PREFIX = "__dl_"
"""Names the service makes for itself (views, databases); never listed to users."""
RELATION_PREFIX = "__dl_rel__"
"""Temporary views of lake tables in non-admin sessions: ``__dl_rel__<schema>__<table>``."""
METADATA_PREFIX = "__dl_md__"
"""Temporary views of the service's metadata (catalogs, columns, ...): ``__dl_md__<kind>``."""

ADMIN_ONLY_SCHEMAS = frozenset({"system"})
"""Lake schemas only admins may see or read (``system.audit_log``)."""

FUNCTION_GROUPS = frozenset({
    "agg_funcs", "array_funcs", "bitwise_funcs", "collection_funcs", "conditional_funcs",
    "conversion_funcs", "datetime_funcs", "generator_funcs", "hash_funcs", "json_funcs",
    "lambda_funcs", "map_funcs", "math_funcs", "predicate_funcs", "sketch_funcs",
    "string_funcs", "struct_funcs", "window_funcs", "url_funcs", "variant_funcs",
    "vector_funcs", "st_funcs",
})
"""Spark built-in function groups non-admins may call. Left out: ``misc_funcs`` (reflection,
``input_file_name``, the OS user), ``xml_funcs``, ``csv_funcs``, ``avro_funcs`` and
``protobuf_funcs`` (parsers that can load schemas or descriptor files)."""
EXTRA_FUNCTIONS = frozenset({"typeof", "uuid", "monotonically_increasing_id", "raise_error",
                             "assert_true", "current_catalog", "current_database",
                             "current_schema", "dicom_thumbnail", "image_embedding",
                             "pq_encode", "pq_distance"})
"""Allowed names outside those groups (the image functions are each session's own)."""
TABLE_FUNCTIONS = frozenset({"range", "image_knn", "explode", "explode_outer", "inline",
                             "inline_outer", "posexplode", "posexplode_outer", "stack",
                             "json_tuple"})
"""Functions non-admins may use in ``FROM``."""


def role_database(role: Role) -> str:
    """The hidden catalog database holding a role's tables (readable from its session only:
    their data sources are registered nowhere else; listings leave ``__dl_`` names out)."""
    return f"{HIDDEN_PREFIX}{role.value}"


def relation_view(schema: str, table: str) -> str:
    """The temporary view of ``schema.table`` in a non-admin session."""
    return f"{RELATION_PREFIX}{schema}__{table}"


def metadata_view(kind: str) -> str:
    """The temporary view holding one metadata table."""
    return f"{METADATA_PREFIX}{kind}"


def readable(role: Role, schema: str) -> bool:
    """May ``role`` read the lake tables of ``schema``?"""
    if role is Role.ADMIN:
        return True
    if role is Role.CLINICIAN:
        return schema not in ADMIN_ONLY_SCHEMAS
    return schema == DEID_SCHEMA


@dataclass
class RoleSession:
    """The Spark session of one role and what its statements may name."""

    role: Role
    spark: SparkSession
    functions: frozenset[str] = frozenset()
    _views: dict[str, str] = field(default_factory=dict)
    """Relation view name -> the catalog table it reads (whose data source is registered in
    this session only): what the analysed plan names in its ``RelationV2`` line."""
    _metadata: set[str] = field(default_factory=set)
    _guard: PlanGuard | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def guarded(self) -> bool:
        return self.role is not Role.ADMIN

    def sync(self, tables: dict[tuple[str, str], str]) -> None:
        """Make the session hold a view for exactly these tables (``(schema, table) -> path``)
        and nothing else; re-made when a table's path or schema changed.

        Each view is SQL text over a catalog table of a hidden per-role database, read through
        a data source registered in this session only. A view ``USING`` the source directly
        would keep the files it listed when it was made (Spark reuses that source instance);
        the catalog table is resolved afresh by every query, so appends show at once.
        """
        database = role_database(self.role)
        with self._lock:
            wanted = {relation_view(s, t): (s, t, p) for (s, t), p in tables.items()}
            self.spark.sql(f"CREATE DATABASE IF NOT EXISTS `{database}`")
            for view in set(self._views) - set(wanted):
                self.spark.catalog.dropTempView(view)
                self.spark.sql(f"DROP TABLE IF EXISTS `{database}`.`{view}`")
                del self._views[view]
            for view, (schema, table, path) in wanted.items():
                source = _source_class(self.role, schema, table, path)
                self.spark.dataSource.register(source)
                self.spark.sql(f"DROP TABLE IF EXISTS `{database}`.`{view}`")
                self.spark.sql(f"CREATE TABLE `{database}`.`{view}` USING {source.source_name}")
                self.spark.sql(f"CREATE OR REPLACE TEMPORARY VIEW `{view}` AS "
                               f"SELECT * FROM `{database}`.`{view}`")
                self._views[view] = f"spark_catalog.{database}.{view}"
            self._update_guard()

    def add_metadata_view(self, name: str) -> None:
        with self._lock:
            self._metadata.add(name)
            self._update_guard()

    def _update_guard(self) -> None:
        if not self.guarded:
            return
        views = frozenset(self._views) | frozenset(self._metadata)
        self._guard = PlanGuard(self.spark, Allowance(
            role=self.role.value, views=frozenset(v.lower() for v in views),
            sources=frozenset(self._views.values()), functions=self.functions,
            table_functions=TABLE_FUNCTIONS))

    def dataframe(self, sql: str) -> DataFrame:
        """The analysed DataFrame of ``sql`` in this session (checked first for non-admins).

        Non-admin statements are parsed once by this session's parser, checked, and analysed
        from that very plan; commands never run (they would run on analysis).

        Raises:
            QueryError: the guard refused the statement.
        """
        from pyspark.sql import DataFrame

        if not self.guarded:
            return self.spark.sql(sql)
        guard = self._guard
        assert guard is not None
        plan = guard.parse(sql)
        jss = self.spark._jsparkSession
        jvm = self.spark._jvm
        assert jvm is not None  # a classic session (guarded ones are) always has its JVM
        of_rows = jvm.org.apache.spark.sql.classic.Dataset.ofRows
        if plan.getClass().getSimpleName() == "ExplainCommand":
            guard.check_analyzed(of_rows(jss, plan.logicalPlan()).queryExecution().analyzed())
            return DataFrame(of_rows(jss, plan), self.spark)
        jdf = of_rows(jss, plan)
        guard.check_analyzed(jdf.queryExecution().analyzed())
        return DataFrame(jdf, self.spark)


class RoleSessions:
    """The admin session and one new session per other role, made at server start."""

    def __init__(self, spark: SparkSession, settings: Settings) -> None:
        from dicomlake.udfs import ANALYST_SCOPE, CLINICIAN_SCOPE, register_functions

        self.remote = is_connect(spark)
        self._sessions: dict[Role, RoleSession] = {Role.ADMIN: RoleSession(Role.ADMIN, spark)}
        if self.remote:
            return
        _no_sql_on_files(spark)
        functions = builtin_functions(spark, FUNCTION_GROUPS, EXTRA_FUNCTIONS)
        for role, scope in ((Role.CLINICIAN, CLINICIAN_SCOPE), (Role.ANALYST, ANALYST_SCOPE)):
            session = spark.newSession()
            _no_sql_on_files(session)
            register_functions(session, settings, scope=scope)
            self._sessions[role] = RoleSession(role, session, functions)

    def get(self, role: Role) -> RoleSession:
        """The session of ``role``.

        Raises:
            QueryError: the role cannot be served here (Spark Connect).
        """
        found = self._sessions.get(role)
        if found is None:
            raise QueryError(
                E.PERMISSION_DENIED,
                f"Access Denied: this server runs on Spark Connect, where it cannot isolate "
                f"role '{role.value}' in a session of its own; only admins are served")
        return found

    def guarded(self) -> list[RoleSession]:
        """The non-admin sessions (none over Spark Connect)."""
        return [s for r, s in self._sessions.items() if r is not Role.ADMIN]

    def admin(self) -> Any:
        return self._sessions[Role.ADMIN].spark


def _source_class(role: Role, schema: str, table: str, path: str) -> type[Any]:
    """A data source reading one table, named for the role: Spark refuses to register in a
    new session a name its parent session registered (the admin's ``dicomlake_<s>_<t>``)."""
    from dicomlake.catalog.delta import DeltaTableDataSource

    return type(f"Delta_{role.value}_{schema}_{table}", (DeltaTableDataSource,), {
        "table_path": path, "source_name": f"dicomlake_{role.value}_{schema}_{table}",
        "__module__": __name__})


def _no_sql_on_files(spark: SparkSession) -> None:
    """``SELECT * FROM text.`/etc/hostname``` and the like: refused in every session."""
    spark.conf.set("spark.sql.runSQLOnFiles", "false")
