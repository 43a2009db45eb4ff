"""Metadata filters for ``image_knn(filter => "modality = 'CT' AND rows >= 512")``.

The filter is evaluated inside the Python worker running the search, over columns of
``dicom.instances``, so the search can skip rows that fail it and keep scanning until ``k``
rows pass (a ``WHERE`` after the join would return fewer than ``k``). sqlglot parses the
Spark SQL predicate; a small translator turns it into a pyarrow compute expression. Only
comparisons, IN, BETWEEN, LIKE, IS [NOT] NULL, AND/OR/NOT over plain columns are accepted;
anything else is refused with the construct named.
"""

from __future__ import annotations

from typing import Any

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


def _translate(node: Any, columns: set[str]) -> Any:
    import pyarrow.compute as pc
    from sqlglot import exp

    def col(n: Any) -> Any:
        name = n.name.lower()
        if name not in columns:
            raise KnnError(f"image_knn filter: unknown column {n.name!r}; columns of "
                           f"dicom.instances are: {', '.join(sorted(columns))}")
        return pc.field(name)

    def side(n: Any) -> Any:
        return col(n) if isinstance(n, exp.Column) else pc.scalar(_literal(n))

    if isinstance(node, exp.Paren):
        return _translate(node.this, columns)
    if isinstance(node, exp.And):
        return _translate(node.left, columns) & _translate(node.right, columns)
    if isinstance(node, exp.Or):
        return _translate(node.left, columns) | _translate(node.right, columns)
    if isinstance(node, exp.Not):
        return ~_translate(node.this, columns)
    ops = {exp.EQ: "equal", exp.NEQ: "not_equal", exp.GT: "greater", exp.GTE: "greater_equal",
           exp.LT: "less", exp.LTE: "less_equal"}
    for kind, fn in ops.items():
        if isinstance(node, kind):
            return getattr(pc, fn)(side(node.left), side(node.right))
    if isinstance(node, exp.In):
        values = [_literal(v) for v in node.expressions]
        return pc.is_in(col(node.this), value_set=_array(values))
    if isinstance(node, exp.Between):
        c = col(node.this)
        return (c >= pc.scalar(_literal(node.args["low"]))) & (
            c <= pc.scalar(_literal(node.args["high"])))
    if isinstance(node, exp.Like):
        pattern = str(_literal(node.expression))
        return pc.match_like(col(node.this), pattern)
    if isinstance(node, exp.Is):
        return col(node.this).is_null()
    raise KnnError(f"image_knn filter: {node.sql()!r} is not supported; use comparisons, IN, "
                   "BETWEEN, LIKE, IS [NOT] NULL, AND, OR, NOT over dicom.instances columns")


def _array(values: list[Any]) -> Any:
    import pyarrow as pa

    return pa.array(values)


def parse_filter(text: str, columns: set[str]) -> tuple[Any, set[str]]:
    """(pyarrow expression, referenced columns) for a Spark SQL predicate."""
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import ParseError

    try:
        tree = sqlglot.parse_one(text, read="spark")
    except ParseError as exc:
        raise KnnError(f"image_knn filter {text!r} is not a valid SQL predicate: {exc}"
                       ) from exc
    used = {c.name.lower() for c in tree.find_all(exp.Column)}
    return _translate(tree, columns), used
