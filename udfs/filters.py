"""Metadata filters for ``image_knn(filter => "modality = 'CT' AND rows >= 512")``.

The filter is evaluated inside the Python worker running the search, over columns of the
caller's ``instances`` table (``dicom_deid.instances`` for analysts, so a filter can only
compare against de-identified values), so the search can skip rows that fail it and keep
scanning until ``k`` rows pass (a ``WHERE`` after the join would return fewer than ``k``).
sqlglot parses the Spark SQL predicate; a small translator turns it into a pyarrow compute
expression. Only
comparisons, IN, BETWEEN, LIKE, IS [NOT] NULL, AND/OR/NOT over plain columns are accepted;
anything else is refused with the construct named.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dicomlake.catalog import tables
from dicomlake.udfs.errors import KnnError


def _literal(node: Any) -> Any:
    from sqlglot import exp

    if isinstance(node, exp.Literal):
        return node.this if node.is_string else float(node.this) if "." in node.this or "e" in \
            node.this.lower() else int(node.this)
    if isinstance(node, exp.Boolean):
        return node.this
    if isinstance(node, exp.Neg):
        return -_literal(node.this)
    if isinstance(node, exp.Null):
        return None
    raise KnnError(f"image_knn filter: expected a literal value, got {node.sql()!r}")


def _typed(value: Any, column_type: Any) -> Any:
    """A literal as a scalar of its column's type (a date column compares with '2020-01-02')."""
    import pyarrow as pa

    scalar = pa.scalar(value)
    if column_type is None or value is None:
        return scalar
    try:
        return scalar.cast(column_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise KnnError(f"image_knn filter: {value!r} cannot be compared with a "
                       f"{column_type} column") from exc


def _translate(node: Any, columns: Mapping[str, Any], table: str) -> Any:
    import pyarrow.compute as pc
    from sqlglot import exp

    def col(n: Any) -> Any:
        name = n.name.lower()
        if name not in columns:
            raise KnnError(f"image_knn filter: unknown column {n.name!r}; columns of "
                           f"{table} are: {', '.join(sorted(columns))}")
        return pc.field(name)

    def type_of(n: Any) -> Any:
        return columns.get(n.name.lower()) if isinstance(n, exp.Column) else None

    def side(n: Any, other: Any = None) -> Any:
        if isinstance(n, exp.Column):
            return col(n)
        return pc.scalar(_typed(_literal(n), type_of(other)))

    if isinstance(node, exp.Paren):
        return _translate(node.this, columns, table)
    if isinstance(node, exp.And):
        return _translate(node.left, columns, table) & _translate(node.right, columns, table)
    if isinstance(node, exp.Or):
        return _translate(node.left, columns, table) | _translate(node.right, columns, table)
    if isinstance(node, exp.Not):
        return ~_translate(node.this, columns, table)
    ops = {exp.EQ: "equal", exp.NEQ: "not_equal", exp.GT: "greater", exp.GTE: "greater_equal",
           exp.LT: "less", exp.LTE: "less_equal"}
    for kind, fn in ops.items():
        if isinstance(node, kind):
            return getattr(pc, fn)(side(node.left, node.right), side(node.right, node.left))
    if isinstance(node, exp.In):
        kind = type_of(node.this)
        values = [_typed(_literal(v), kind) for v in node.expressions]
        return pc.is_in(col(node.this), value_set=_array(values))
    if isinstance(node, exp.Between):
        c, kind = col(node.this), type_of(node.this)
        return (c >= pc.scalar(_typed(_literal(node.args["low"]), kind))) & (
            c <= pc.scalar(_typed(_literal(node.args["high"]), kind)))
    if isinstance(node, exp.Like):
        pattern = str(_literal(node.expression))
        return pc.match_like(col(node.this), pattern)
    if isinstance(node, exp.Is):
        return col(node.this).is_null()
    raise KnnError(f"image_knn filter: {node.sql()!r} is not supported; use comparisons, IN, "
                   f"BETWEEN, LIKE, IS [NOT] NULL, AND, OR, NOT over {table} columns")


def _array(values: list[Any]) -> Any:
    import pyarrow as pa

    return pa.array(values)


def parse_filter(text: str, columns: Mapping[str, Any] | set[str],
                 table: str = tables.INSTANCES.qualified) -> tuple[Any, set[str]]:
    """(pyarrow expression, referenced columns) for a Spark SQL predicate over ``table``.

    ``columns`` maps the table's column names to their Arrow types (literals compared with a
    column are cast to its type); a plain set of names compares literals as they are.
    """
    if not isinstance(columns, Mapping):
        columns = dict.fromkeys(columns)
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import ParseError

    try:
        tree = sqlglot.parse_one(text, read="spark")
    except ParseError as exc:
        raise KnnError(f"image_knn filter {text!r} is not a valid SQL predicate: {exc}"
                       ) from exc
    used = {c.name.lower() for c in tree.find_all(exp.Column)}
    return _translate(tree, columns, table), used
