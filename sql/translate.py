"""Trino SQL in, a plan out: Spark SQL to run, or an answer the service gives itself.

This is the translator layer (Kyuubi's ``KyuubiTrinoOperationTranslator``): it never touches
HTTP and never runs a Spark job. It

* answers session statements itself (``USE``, ``SET/RESET SESSION``, ``PREPARE``,
  ``EXECUTE [IMMEDIATE] ... USING``, ``DEALLOCATE PREPARE``, transactions),
* turns metadata statements (``SHOW CATALOGS/SCHEMAS/TABLES/COLUMNS``, ``DESCRIBE``) into
  Spark SQL over the metadata views of :mod:`dicomlake.sql.metadata`,
* parses everything else with sqlglot's Trino dialect, resolves ``catalog.schema.table``
  names against what the user's role may read (``information_schema`` and ``system.*`` to
  the role's metadata views, lake tables to the role session's views) and writes Spark SQL.

What a statement may *do* is not decided here: the role's Spark session judges the Spark SQL
on Spark's own parsed plan (:mod:`.guard`), so a statement sqlglot reads as a query but Spark
runs as a write (``SELECT ... INTO``) is refused there. Errors carry the line and column in the
text the client sent.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlglot
from pyspark.sql import types as T
from sqlglot import exp
from sqlglot.errors import ErrorLevel, ParseError, SqlglotError

from dicomlake.sql import errors as E
from dicomlake.sql.errors import QueryError
from dicomlake.sql.metadata import (
    CATALOG,
    INFORMATION_SCHEMA,
    INFORMATION_SCHEMA_TABLES,
    SYSTEM_CATALOG,
    SYSTEM_TABLES,
    view_columns,
)
from dicomlake.sql.session import SESSION_PROPERTIES, ClientSession, SessionChanges, parse_duration
from dicomlake.sql.users import Principal, Role

if TYPE_CHECKING:
    from dicomlake.sql.metadata import LakeCatalog

logging.getLogger("sqlglot").setLevel(logging.ERROR)

READ_STATEMENTS = (exp.Select, exp.Union, exp.Intersect, exp.Except, exp.Values,
                   exp.Subquery)
"""Statements that return rows (whether one may run is Spark's plan's to say, see .guard)."""

SERVER_ANSWERED = ("current_user", "session_user", "user")
"""Functions Spark would answer with the server's OS account; the service answers them with
the SQL user instead."""

_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][\w$@-]*)'
_QNAME = rf"{_IDENT}(?:\s*\.\s*{_IDENT}){{0,2}}"
_STRING = r"'(?:[^']|'')*'"
_LIKE = rf"(?:\s+LIKE\s+(?P<like>{_STRING})(?:\s+ESCAPE\s+{_STRING})?)?"


def _re(pattern: str) -> re.Pattern[str]:
    return re.compile(rf"^\s*{pattern}\s*$", re.IGNORECASE | re.DOTALL)


@dataclass
class Plan:
    """What to do for one statement."""

    kind: str
    """``spark`` (run ``spark_sql``), ``local`` (``columns``/``rows`` are the answer) or
    ``describe_output`` (analyse ``spark_sql`` and describe its columns)."""
    spark_sql: str | None = None
    is_query: bool = False
    update_type: str | None = None
    columns: list[tuple[str, T.DataType]] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    changes: SessionChanges = field(default_factory=SessionChanges)
    rename: dict[str, str] = field(default_factory=dict)
    output: list[str] | None = None
    """How the query's select list names its result (:func:`output_items`), for
    :func:`trino_names`."""
    reads_audit_log: bool = False
    changes_catalog: bool = False
    timeout_seconds: float | None = None


def _unquote_ident(text: str) -> str:
    text = text.strip()
    if text.startswith('"'):
        return text[1:-1].replace('""', '"')
    return text.lower()


def _split_qname(text: str) -> list[str]:
    return [_unquote_ident(p) for p in re.findall(_IDENT, text)]


def _unquote_string(text: str) -> str:
    return text[1:-1].replace("''", "'")


def _lit(value: str) -> str:
    return exp.Literal.string(value).sql("spark")


def _position(sql: str, node: exp.Expr | None) -> tuple[int | None, int | None]:
    """1-based line and column of ``node`` in ``sql`` (from sqlglot's token positions)."""
    if node is None:
        return None, None
    ident = node if isinstance(node, exp.Identifier) else node.find(exp.Identifier)
    meta = getattr(ident, "meta", None) or {}
    start = meta.get("start")
    if start is None and isinstance(node, exp.Func):  # function names carry no position
        name = node.name if isinstance(node, exp.Anonymous) else node.sql_name()
        found = re.search(rf"\b{re.escape(name)}\s*\(", sql, re.IGNORECASE)
        start = found.start() if found else None
    if start is None:
        return None, None
    line = sql.count("\n", 0, start) + 1
    column = start - (sql.rfind("\n", 0, start) + 1) + 1
    return line, column


def _first_position(sql: str, parts: list[exp.Expr]) -> tuple[int | None, int | None]:
    """Position of the earliest of several identifiers (a qualified name's start)."""
    found = [p for p in (_position(sql, part) for part in parts) if p[0] is not None]
    return min(found, default=(None, None))


def _start_position(sql: str, node: exp.Expr) -> tuple[int | None, int | None]:
    """1-based line and column where ``node`` begins in ``sql``: the earliest token position
    sqlglot recorded on it or anything inside it."""
    starts = [n.meta["start"] for n in node.walk() if isinstance(n.meta.get("start"), int)]
    if not starts:
        return None, None
    start = min(starts)
    return sql.count("\n", 0, start) + 1, start - (sql.rfind("\n", 0, start) + 1) + 1


def _name_parts(text: str) -> list[str]:
    """``a.b`` or Spark's ```a`.`b``` as its parts (internal view names already made
    public by :func:`~dicomlake.sql.engine.public_message`)."""
    if "`" in text:
        return [p.replace("``", "`") for p in re.findall(r"`((?:[^`]|``)*)`", text)]
    return [p for p in text.split(".") if p]


KEEP, STAR, UNNAMED = "keep", "star", "unnamed"
"""What each select-list item of a query names: its own name (an alias or a column
reference), the columns a ``*`` expands to, or nothing (Trino then says ``_colN``)."""


def output_items(tree: exp.Expr) -> list[str] | None:
    """:data:`KEEP`, :data:`STAR` or :data:`UNNAMED` for each item of the select list that
    names a query's result: the outermost query's, the first branch's of a set operation (CTE
    and subquery bodies name nothing). A bare ``VALUES`` list names nothing. None when the
    statement is no query."""
    node = tree
    while isinstance(node, (exp.Subquery, exp.SetOperation)):
        node = node.this
    if isinstance(node, exp.Values) and node.expressions:
        return [UNNAMED] * len(node.expressions[0].expressions)
    if not isinstance(node, exp.Select):
        return None
    items = []
    for item in node.expressions:
        if isinstance(item, exp.Star) or (isinstance(item, exp.Column)
                                          and isinstance(item.this, exp.Star)):
            items.append(STAR)
        elif isinstance(item, (exp.Alias, exp.Dot)) or (isinstance(item, exp.Column) and not (
                not item.table and isinstance(item.this, exp.Identifier)
                and not item.this.quoted and item.name.lower() in SERVER_ANSWERED)):
            items.append(KEEP)  # a.b.c (Dot) is a struct column's field, named c
        else:
            items.append(UNNAMED)
    return items


def _first_select(node: exp.Expr) -> exp.Expr:
    while isinstance(node, (exp.Subquery, exp.SetOperation, exp.CTE)):
        node = node.this
    return node


def name_inner_columns(tree: exp.Expr) -> None:
    """Alias the unnamed items of derived tables and CTE bodies ``_colN`` (N their place),
    so a ``*`` over them shows Trino's names rather than Spark's (``count(1)``). The
    outermost select list is left as written; :func:`trino_names` names its columns."""
    top = _first_select(tree)
    for holder in list(tree.find_all(exp.Subquery, exp.CTE)):
        select = _first_select(holder)
        if select is top or not isinstance(select, exp.Select):
            continue
        for i, (item, kind) in enumerate(zip(list(select.expressions),
                                             output_items(select) or [], strict=False)):
            if kind == UNNAMED:
                item.replace(exp.alias_(item.copy(), f"_col{i}", quoted=True))


def trino_names(columns: list[str], items: list[str] | None) -> list[str]:
    """The result's column names as Trino gives them: an unnamed column is ``_colN``, N its
    0-based place in the result (after ``*`` expanded). Spark's names are kept where the
    items cannot be matched to the columns (more than one ``*``)."""
    if not items or UNNAMED not in items:
        return columns
    stars = items.count(STAR)
    width = len(columns) - (len(items) - 1)
    if stars > 1 or (stars == 0 and len(items) != len(columns)) or width < 0:
        return columns
    names: list[str] = []
    for item in items:
        if item == STAR:
            names.extend(columns[len(names):len(names) + width])
        else:
            names.append(columns[len(names)] if item == KEEP else f"_col{len(names)}")
    return names


def _timestamps_without_zone(tree: exp.Expr) -> None:
    """Trino's ``timestamp`` has no time zone: Spark's ``TIMESTAMP_NTZ``, not its
    ``TIMESTAMP`` (an instant, Trino's ``timestamp with time zone``)."""
    for node in tree.find_all(exp.DataType):
        if node.this == exp.DataType.Type.TIMESTAMP:
            node.set("this", exp.DataType.Type.TIMESTAMPNTZ)
            node.set("expressions", [])


def _tables_named(tree: exp.Expr, parts: list[str]) -> exp.Table | None:
    want = [p.lower() for p in parts]
    for table in tree.find_all(exp.Table):
        have = [p.name.lower() for p in table.parts]
        if have[-len(want):] == want[-len(have):]:
            return table
    return None


def _column_named(tree: exp.Expr, parts: list[str]) -> exp.Column | None:
    want = [p.lower() for p in parts]
    for column in tree.find_all(exp.Column):
        if [p.name.lower() for p in column.parts] == want:
            return column
    return None


def _function_named(tree: exp.Expr, name: str) -> exp.Func | None:
    for func in tree.find_all(exp.Func):
        written = func.name if isinstance(func, exp.Anonymous) else func.sql_name()
        if written.lower() == name.lower():
            return func
    return None


def _squeeze(text: str) -> str:
    return re.sub(r"[\s`\"]", "", text).lower()


def _node_of_fragment(tree: exp.Expr, fragment: str) -> exp.Expr | None:
    """The node of the client's statement that became ``fragment`` of the translated Spark
    SQL (the piece Spark blamed), found by translating each node the same way."""
    want = _squeeze(fragment)
    if not want:
        return None
    for count, node in enumerate(tree.walk()):
        if count > 5000:
            break
        if isinstance(node, (exp.Identifier, exp.Literal)) or node is tree:
            continue
        try:
            if _squeeze(node.sql(dialect="spark", identify=True)) == want:
                return node
        except SqlglotError:
            continue
    return None


_SPARK_TYPE_NAMES = {"INT": "INTEGER", "STRING": "VARCHAR", "FLOAT": "REAL", "BYTE": "TINYINT",
                     "SHORT": "SMALLINT", "LONG": "BIGINT", "BINARY": "VARBINARY"}
_LOCATED = (E.TABLE_NOT_FOUND, E.COLUMN_NOT_FOUND, E.FUNCTION_NOT_FOUND, E.TYPE_MISMATCH,
            E.SCHEMA_NOT_FOUND, E.GENERIC_USER_ERROR)
"""Analysis errors, which Trino locates in the statement (run-time errors it does not)."""


def client_error(error: QueryError, sql: str, session: ClientSession) -> QueryError:
    """An engine error in Trino's words and at its place in the text the client sent.

    The engine saw the translated Spark SQL, so its names (internal views, Spark's spelling
    of functions) and positions are not the client's: the object it names (or the piece of
    SQL it blames) is looked up in the client's own parsed statement instead. Messages
    carry Trino's wording: ``Table 'c.s.t' does not exist``, ``Column 'x' cannot be
    resolved``, ``Function 'f' not registered``, ``Division by zero``.
    """
    if error.line is not None:
        return error
    try:
        tree: exp.Expr | None = sqlglot.parse_one(sql, read="trino")
    except SqlglotError:
        tree = None
    params, code = error.params, error.code
    node: exp.Expr | None = None
    if code is E.TABLE_NOT_FOUND and params.get("relationName"):
        from dicomlake.sql.engine import public_message

        parts = _name_parts(public_message(params["relationName"]))
        qualifier = [(session.catalog or CATALOG).lower(), session.schema or ""]
        name = ".".join([*qualifier[:max(0, 3 - len(parts))], *parts])
        error.message = f"Table '{name}' does not exist"
        node = _tables_named(tree, parts) if tree is not None and parts else None
    elif code is E.COLUMN_NOT_FOUND and (params.get("objectName") or params.get("fieldName")):
        parts = _name_parts(params.get("objectName") or params["fieldName"])
        error.message = f"Column '{'.'.join(parts)}' cannot be resolved"
        node = _column_named(tree, parts) if tree is not None else None
    elif code is E.FUNCTION_NOT_FOUND and params.get("routineName"):
        name = _name_parts(params["routineName"])[-1].lower()
        error.message = f"Function '{name}' not registered"
        node = _function_named(tree, name) if tree is not None else None
    elif code is E.DIVISION_BY_ZERO:
        error.message = "Division by zero"
    elif code is E.INVALID_CAST_ARGUMENT and params.get("expression"):
        target = params.get("targetType", "").strip('"')
        error.message = (f"Cannot cast {params['expression']} to "
                         f"{_SPARK_TYPE_NAMES.get(target, target)}")
    error.args = (error.message,)
    if code not in _LOCATED or tree is None:
        return error
    if node is None and error.fragment:
        node = _node_of_fragment(tree, error.fragment)
    if node is None:
        return error
    return error.at(*_start_position(sql, node))


def _hint(schema: str, principal: Principal) -> str:
    """What an analyst looking for a raw table should read instead."""
    from dicomlake.catalog.deid import DEID_SCHEMA, RAW_SCHEMA

    if principal.role is Role.ANALYST and schema == RAW_SCHEMA:
        return f"; analysts read the de-identified tables in schema {DEID_SCHEMA}"
    return ""


def _syntax_error(sql: str, exc: ParseError) -> QueryError:
    detail = exc.errors[0] if exc.errors else {}
    line, col = detail.get("line"), detail.get("col")
    description = str(detail.get("description", exc)).split(" but got <Token")[0]
    highlight = detail.get("highlight")
    if highlight:
        description += f" near '{highlight}'"
        if isinstance(col, int):
            col = max(1, col - len(highlight) + 1)
    prefix = f"line {line}:{col}: " if line else ""
    return QueryError(E.SYNTAX_ERROR, f"{prefix}{description}", line=line, column=col)


class Translator:
    """Plans Trino statements for one lake catalog."""

    def __init__(self, catalog: LakeCatalog, *, server_version: str,
                 max_timeout_seconds: float) -> None:
        self.catalog = catalog
        self.server_version = server_version
        self.max_timeout_seconds = max_timeout_seconds
        self._handlers: list[tuple[re.Pattern[str], Any]] = [
            (_re(r"USE\s+(?P<name>" + _QNAME + ")"), self._use),
            (_re(r"SHOW\s+CATALOGS" + _LIKE), self._show_catalogs),
            (_re(rf"SHOW\s+SCHEMAS(?:\s+(?:FROM|IN)\s+(?P<name>{_IDENT}))?" + _LIKE),
             self._show_schemas),
            (_re(rf"SHOW\s+TABLES(?:\s+(?:FROM|IN)\s+(?P<name>{_QNAME}))?" + _LIKE),
             self._show_tables),
            (_re(rf"SHOW\s+COLUMNS\s+(?:FROM|IN)\s+(?P<name>{_QNAME})" + _LIKE),
             self._show_columns),
            (_re(r"SHOW\s+SESSION" + _LIKE), self._show_session),
            (_re(rf"SET\s+SESSION\s+(?P<name>{_QNAME})\s*=\s*(?P<value>.+)"),
             self._set_session),
            (_re(rf"RESET\s+SESSION\s+(?P<name>{_QNAME})"), self._reset_session),
            (_re(rf"PREPARE\s+(?P<name>{_IDENT})\s+FROM\s+(?P<body>.+)"), self._prepare),
            (_re(rf"EXECUTE\s+IMMEDIATE\s+(?P<body>{_STRING})(?:\s+USING\s+(?P<params>.+))?"),
             self._execute_immediate),
            (_re(rf"EXECUTE\s+(?P<name>{_IDENT})(?:\s+USING\s+(?P<params>.+))?"),
             self._execute),
            (_re(rf"DEALLOCATE\s+PREPARE\s+(?P<name>{_IDENT})"), self._deallocate),
            (_re(rf"DESCRIBE\s+OUTPUT\s+(?P<name>{_IDENT})"), self._describe_output),
            (_re(rf"DESCRIBE\s+INPUT\s+(?P<name>{_IDENT})"), self._describe_input),
            (_re(rf"(?:DESCRIBE|DESC)\s+(?P<name>{_QNAME})"), self._show_columns),
            (_re(r"START\s+TRANSACTION(?:\s+.*)?"), self._start_transaction),
            (_re(r"(?:COMMIT|ROLLBACK)(?:\s+WORK)?"), self._end_transaction),
            (_re(r"EXPLAIN\s+(?:ANALYZE\s+)?(?:\([^)]*\)\s*)?(?P<body>.+)"), self._explain),
        ]

    # -- entry point ------------------------------------------------------------------------

    def plan(self, sql: str, session: ClientSession, principal: Principal) -> Plan:
        """Plan one statement.

        Raises:
            QueryError: syntax errors, unknown objects, permission and translation failures.
        """
        text = sql.strip()
        while text.endswith(";"):
            text = text[:-1].rstrip()
        if not text:
            raise QueryError(E.SYNTAX_ERROR, "line 1:1: the statement is empty", line=1,
                             column=1)
        for pattern, handler in self._handlers:
            match = pattern.match(text)
            if match:
                return handler(match, text, session, principal)
        return self._statement(text, session, principal)

    # -- names ------------------------------------------------------------------------------

    def _catalog_of(self, name: str | None, session: ClientSession) -> str:
        catalog = (name or session.catalog or CATALOG).lower()
        if catalog not in (CATALOG, SYSTEM_CATALOG):
            raise QueryError(E.CATALOG_NOT_FOUND, f"Catalog '{catalog}' does not exist")
        return catalog

    def _schema_of(self, parts: list[str], session: ClientSession,
                   principal: Principal) -> tuple[str, str]:
        if len(parts) == 2:
            catalog, schema = self._catalog_of(parts[0], session), parts[1]
        elif len(parts) == 1:
            catalog, schema = self._catalog_of(None, session), parts[0]
        else:
            catalog = self._catalog_of(None, session)
            if not session.schema:
                raise QueryError(E.MISSING_SCHEMA_NAME,
                                 "Schema must be specified when session schema is not set")
            schema = session.schema
        exists = (schema in ("information_schema", "jdbc", "metadata")
                  if catalog == SYSTEM_CATALOG
                  else self.catalog.has_schema(schema, principal.role))
        if not exists:
            raise QueryError(E.SCHEMA_NOT_FOUND, f"Schema '{catalog}.{schema}' does not exist")
        return catalog, schema

    # -- session statements -----------------------------------------------------------------

    def _local(self, update_type: str, changes: SessionChanges | None = None) -> Plan:
        return Plan("local", update_type=update_type, changes=changes or SessionChanges())

    def _use(self, m: re.Match[str], text: str, session: ClientSession,
             principal: Principal) -> Plan:
        parts = _split_qname(m["name"])
        if len(parts) > 2:
            raise QueryError(E.SYNTAX_ERROR, "USE takes 'schema' or 'catalog.schema'",
                             line=1, column=1)
        catalog, schema = self._schema_of(parts, session, principal)
        return self._local("USE", SessionChanges(set_catalog=catalog, set_schema=schema))

    def _set_session(self, m: re.Match[str], text: str, session: ClientSession,
                     principal: Principal) -> Plan:
        name = ".".join(_split_qname(m["name"]))
        if name not in SESSION_PROPERTIES:
            raise QueryError(E.INVALID_SESSION_PROPERTY,
                             f"Session property '{name}' does not exist; known: "
                             f"{', '.join(sorted(SESSION_PROPERTIES))}")
        raw = m["value"].strip()
        value = _unquote_string(raw) if raw.startswith("'") else raw
        parse_duration(value)
        return self._local("SET SESSION", SessionChanges(set_session={name: value}))

    def _reset_session(self, m: re.Match[str], text: str, session: ClientSession,
                       principal: Principal) -> Plan:
        name = ".".join(_split_qname(m["name"]))
        return self._local("RESET SESSION", SessionChanges(clear_session=[name]))

    def _show_session(self, m: re.Match[str], text: str, session: ClientSession,
                      principal: Principal) -> Plan:
        rows = [[name, session.properties.get(name, ""), "", "varchar", doc]
                for name, doc in sorted(SESSION_PROPERTIES.items())]
        string: T.DataType = T.StringType()
        cols = [("Name", string), ("Value", string), ("Default", string), ("Type", string),
                ("Description", string)]
        return Plan("local", columns=cols, rows=rows, is_query=True)

    def _prepare(self, m: re.Match[str], text: str, session: ClientSession,
                 principal: Principal) -> Plan:
        body = m["body"].strip()
        try:
            sqlglot.parse_one(body, read="trino")
        except ParseError as exc:
            raise _syntax_error(body, exc) from None
        return self._local("PREPARE", SessionChanges(added_prepare={m["name"]: body}))

    def _prepared(self, name: str, session: ClientSession) -> str:
        if name not in session.prepared:
            raise QueryError(E.NOT_FOUND, f"Prepared statement not found: {name}")
        return session.prepared[name]

    def _execute(self, m: re.Match[str], text: str, session: ClientSession,
                 principal: Principal) -> Plan:
        body = self._prepared(m["name"], session)
        return self._with_params(body, m["params"], session, principal)

    def _execute_immediate(self, m: re.Match[str], text: str, session: ClientSession,
                           principal: Principal) -> Plan:
        return self._with_params(_unquote_string(m["body"]), m["params"], session, principal)

    def _with_params(self, body: str, params: str | None, session: ClientSession,
                     principal: Principal) -> Plan:
        values: list[exp.Expression] = []
        if params:
            try:
                values = list(sqlglot.parse_one(f"SELECT {params}", read="trino").expressions)
            except ParseError as exc:
                raise QueryError(E.SYNTAX_ERROR, f"bad USING parameter list: {exc}") from None
        for pattern, handler in self._handlers:
            if pattern.match(body) and handler not in (self._explain,):
                if values:
                    raise QueryError(E.INVALID_PARAMETER_USAGE,
                                     "this kind of statement takes no parameters")
                return handler(pattern.match(body), body, session, principal)
        return self._statement(body, session, principal, params=values)

    def _deallocate(self, m: re.Match[str], text: str, session: ClientSession,
                    principal: Principal) -> Plan:
        self._prepared(m["name"], session)
        return self._local("DEALLOCATE", SessionChanges(deallocated_prepare=[m["name"]]))

    def _describe_output(self, m: re.Match[str], text: str, session: ClientSession,
                         principal: Principal) -> Plan:
        body = self._prepared(m["name"], session)
        inner = self._statement(body, session, principal, params=None, null_params=True)
        if not inner.is_query:
            return Plan("local", is_query=True, columns=_DESCRIBE_OUTPUT_COLUMNS, rows=[])
        return Plan("describe_output", spark_sql=inner.spark_sql, is_query=True,
                    output=inner.output)

    def _describe_input(self, m: re.Match[str], text: str, session: ClientSession,
                        principal: Principal) -> Plan:
        body = self._prepared(m["name"], session)
        count = len(list(sqlglot.parse_one(body, read="trino").find_all(exp.Placeholder)))
        return Plan("local", is_query=True,
                    columns=[("Position", T.LongType()), ("Type", T.StringType())],
                    rows=[[i, "unknown"] for i in range(count)])

    def _start_transaction(self, m: re.Match[str], text: str, session: ClientSession,
                           principal: Principal) -> Plan:
        return self._local("START TRANSACTION",
                           SessionChanges(started_transaction=str(uuid.uuid4())))

    def _end_transaction(self, m: re.Match[str], text: str, session: ClientSession,
                         principal: Principal) -> Plan:
        kind = text.split()[0].upper()
        return self._local(kind, SessionChanges(clear_transaction=True))

    def _explain(self, m: re.Match[str], text: str, session: ClientSession,
                 principal: Principal) -> Plan:
        inner = self._statement(m["body"], session, principal)
        if inner.kind != "spark":
            raise QueryError(E.NOT_SUPPORTED, "EXPLAIN works for queries only")
        return Plan("spark", spark_sql=f"EXPLAIN {inner.spark_sql}", is_query=True,
                    rename={"plan": "Query Plan"})

    # -- metadata statements ----------------------------------------------------------------

    def _meta_query(self, sql: str) -> Plan:
        return Plan("spark", spark_sql=sql, is_query=True)

    def _like(self, m: re.Match[str], column: str) -> str:
        return f" AND {column} LIKE {_lit(_unquote_string(m['like']))}" if m["like"] else ""

    def _view(self, kind: str, principal: Principal) -> str:
        """The role's metadata view ``kind`` (it lists only what the role may read)."""
        return self.catalog.metadata_view(kind, principal.role)

    def _show_catalogs(self, m: re.Match[str], text: str, session: ClientSession,
                       principal: Principal) -> Plan:
        view = self._view("catalogs", principal)
        return self._meta_query(f"SELECT catalog_name AS `Catalog` FROM `{view}` WHERE true"
                                f"{self._like(m, 'catalog_name')} ORDER BY 1")

    def _show_schemas(self, m: re.Match[str], text: str, session: ClientSession,
                      principal: Principal) -> Plan:
        catalog = self._catalog_of(_unquote_ident(m["name"]) if m["name"] else None, session)
        view = self._view("schemata", principal)
        return self._meta_query(
            f"SELECT schema_name AS `Schema` FROM `{view}` WHERE catalog_name = {_lit(catalog)}"
            f"{self._like(m, 'schema_name')} ORDER BY 1")

    def _show_tables(self, m: re.Match[str], text: str, session: ClientSession,
                     principal: Principal) -> Plan:
        parts = _split_qname(m["name"]) if m["name"] else []
        catalog, schema = self._schema_of(parts, session, principal)
        view = self._view("tables", principal)
        return self._meta_query(
            f"SELECT table_name AS `Table` FROM `{view}` WHERE table_catalog = {_lit(catalog)} "
            f"AND table_schema = {_lit(schema)}{self._like(m, 'table_name')} ORDER BY 1")

    def _show_columns(self, m: re.Match[str], text: str, session: ClientSession,
                      principal: Principal) -> Plan:
        parts = _split_qname(m["name"])
        if len(parts) > 3:
            raise QueryError(E.SYNTAX_ERROR, f"'{m['name']}' is not a table name")
        table = parts[-1]
        catalog, schema = self._schema_of(parts[:-1], session, principal)
        if catalog == CATALOG and self.catalog.table(schema, table, principal.role) is None:
            raise QueryError(E.TABLE_NOT_FOUND,
                             f"Table '{catalog}.{schema}.{table}' does not exist")
        view = self._view("columns", principal)
        like = self._like(m, "column_name") if "like" in m.groupdict() else ""
        return self._meta_query(
            f"SELECT column_name AS `Column`, data_type AS `Type`, '' AS `Extra`, "
            f"coalesce(comment, '') AS `Comment` FROM `{view}` "
            f"WHERE table_catalog = {_lit(catalog)} AND table_schema = {_lit(schema)} "
            f"AND table_name = {_lit(table)}{like} ORDER BY ordinal_position")

    # -- general statements -----------------------------------------------------------------

    def _statement(self, text: str, session: ClientSession, principal: Principal, *,
                   params: list[exp.Expression] | None = None,
                   null_params: bool = False) -> Plan:
        try:
            trees = [t for t in sqlglot.parse(text, read="trino") if t is not None]
        except ParseError as exc:
            raise _syntax_error(text, exc) from None
        if len(trees) != 1:
            raise QueryError(E.SYNTAX_ERROR, "send exactly one statement per request")
        tree = trees[0]
        admin = principal.role is Role.ADMIN
        if isinstance(tree, exp.Describe) and isinstance(tree.this, exp.Table):
            name = ".".join(p.name for p in tree.this.parts)
            match = re.match(r"(?P<name>.+)", name)
            assert match is not None
            return self._show_columns(match, text, session, principal)
        is_read = isinstance(tree, READ_STATEMENTS)
        if isinstance(tree, exp.Command) or (not is_read and not admin):
            # A Spark-specific command (admins), or a statement a non-admin's session will
            # refuse on Spark's own parse of it: passed on as written, nothing resolved.
            kind = str(tree.this) if isinstance(tree, exp.Command) else tree.key
            return Plan("spark", spark_sql=text, is_query=False, update_type=kind.upper(),
                        changes_catalog=True)
        plan = Plan("spark", is_query=is_read, output=output_items(tree) if is_read else None)
        if is_read:
            name_inner_columns(tree)
        _timestamps_without_zone(tree)
        self._bind(tree, text, params or [], null_params)
        self._resolve_tables(tree, text, session, principal, plan)
        for node in list(tree.find_all(exp.CurrentVersion)):
            node.replace(exp.Literal.string(self.server_version))
        self._answer_user(tree, principal)
        try:
            plan.spark_sql = tree.sql(dialect="spark", identify=True,
                                      unsupported_level=ErrorLevel.RAISE)
        except SqlglotError as exc:
            raise QueryError(E.NOT_SUPPORTED,
                             f"this statement cannot be translated to Spark SQL: {exc}"
                             ) from None
        if not is_read:
            plan.update_type = tree.key.upper()
            plan.changes_catalog = True
        return plan

    def _bind(self, tree: exp.Expr, text: str, params: list[exp.Expression],
              null_params: bool) -> None:
        slots = list(tree.find_all(exp.Placeholder, bfs=False))
        if null_params:
            for slot in slots:
                slot.replace(exp.Null())
            return
        if len(slots) != len(params):
            raise QueryError(E.INVALID_PARAMETER_USAGE,
                             f"Incorrect number of parameters: expected {len(slots)} but found "
                             f"{len(params)}")
        for slot, value in zip(slots, params, strict=True):
            slot.replace(value.copy())

    @staticmethod
    def _answer_user(tree: exp.Expr, principal: Principal) -> None:
        """``current_user``, ``session_user()``, ``user()`` answer the SQL user."""
        user = exp.Literal.string(principal.name)
        for node in list(tree.find_all(exp.CurrentUser, exp.SessionUser)):
            node.replace(user.copy())
        for node in list(tree.find_all(exp.Anonymous)):
            if node.name.lower() in SERVER_ANSWERED and not node.expressions:
                node.replace(user.copy())
        for column in list(tree.find_all(exp.Column)):
            ident = column.this
            if (isinstance(ident, exp.Identifier) and not ident.quoted and not column.table
                    and ident.name.lower() in ("current_user", "session_user")):
                column.replace(user.copy())

    def _resolve_tables(self, tree: exp.Expr, text: str, session: ClientSession,
                        principal: Principal, plan: Plan) -> None:
        ctes = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
        for table in list(tree.find_all(exp.Table)):
            if isinstance(table.this, exp.Func):
                self._table_function(table)
                continue
            name = table.name.lower() if not table.this.args.get("quoted") else table.name
            if not table.args.get("db") and name in ctes:
                continue
            line, col = _first_position(text, table.parts)
            try:
                catalog = self._catalog_of(table.catalog or None, session)
            except QueryError as exc:
                raise exc.at(*_position(text, table.args.get("catalog"))) from None
            schema = table.db.lower() if table.db else session.schema
            if not schema:
                raise QueryError(E.MISSING_SCHEMA_NAME,
                                 "Schema must be specified when session schema is not set"
                                 ).at(line, col)
            replacement = self._resolve_one(catalog, schema, name, principal, plan)
            if replacement is None:
                raise QueryError(E.TABLE_NOT_FOUND,
                                 f"Table '{catalog}.{schema}.{name}' does not exist"
                                 + _hint(schema, principal)).at(line, col)
            alias = table.args.get("alias")
            if alias is None and not (isinstance(replacement, exp.Table)
                                      and replacement.name == name):
                alias = exp.TableAlias(this=exp.to_identifier(name))  # keep `t.col` working
            replacement.set("alias", alias)
            for key in ("joins", "laterals", "pivots", "hints", "sample", "version", "when"):
                if table.args.get(key):
                    replacement.set(key, table.args[key])
            table.replace(replacement)
        for column in tree.find_all(exp.Column):
            column.set("catalog", None)
            column.set("db", None)

    def _resolve_one(self, catalog: str, schema: str, name: str, principal: Principal,
                     plan: Plan) -> exp.Expression | None:
        role = principal.role
        if schema == INFORMATION_SCHEMA:
            if name not in INFORMATION_SCHEMA_TABLES:
                return None
            key = "catalog_name" if name == "schemata" else "table_catalog"
            return self._metadata_subquery(name, role, exp.column(key).eq(
                exp.Literal.string(catalog)))
        if catalog == SYSTEM_CATALOG:
            kind = SYSTEM_TABLES.get((schema, name))
            return self._metadata_subquery(kind, role, None) if kind else None
        info = self.catalog.table(schema, name, role)
        if info is None:
            # Admins may reach what Spark's catalog holds beyond the snapshot (and name new
            # tables in DDL); a query's name it does not hold is answered here, never left
            # to Spark (which reads ``dicom.x`` as a query of data source ``dicom``).
            if role is Role.ADMIN and (not plan.is_query
                                       or self.catalog.spark_has_table(schema, name)):
                return exp.Table(this=exp.to_identifier(name), db=exp.to_identifier(schema))
            return None
        if (schema, name) == ("system", "audit_log"):
            plan.reads_audit_log = True
        *db, table = self.catalog.relation(schema, name, role)
        return exp.Table(this=exp.to_identifier(table),
                         db=exp.to_identifier(db[0]) if db else None)

    def _metadata_subquery(self, kind: str, role: Role,
                           condition: exp.Expression | None) -> exp.Expression:
        view = self.catalog.metadata_view(kind, role)
        select = exp.select(*view_columns(kind)).from_(exp.to_identifier(view))
        if condition is not None:
            select = select.where(condition)
        return exp.Subquery(this=select)

    @staticmethod
    def _table_function(table: exp.Table) -> None:
        func = table.this
        if isinstance(func, exp.Anonymous) and func.name.lower() == "table" and func.expressions:
            func.replace(func.expressions[0])  # Trino's TABLE(f(...)) is Spark's f(...)

    def timeout_for(self, session: ClientSession, principal: Principal) -> float:
        """The time limit for a query of this session (a session may only lower it)."""
        value = session.properties.get("query_max_run_time")
        if not value:
            return self.max_timeout_seconds
        seconds = parse_duration(value)
        if principal.role is Role.ADMIN:
            return seconds
        return min(seconds, self.max_timeout_seconds)


_DESCRIBE_OUTPUT_COLUMNS: list[tuple[str, T.DataType]] = [
    ("Column Name", T.StringType()), ("Catalog", T.StringType()), ("Schema", T.StringType()),
    ("Table", T.StringType()), ("Type", T.StringType()), ("Type Size", T.LongType()),
    ("Aliased", T.BooleanType())]
