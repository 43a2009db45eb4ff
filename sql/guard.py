"""What a non-admin statement may do, judged on Spark's own plans, never on SQL text.

The translator's SQL is parsed by the role session's own Spark parser (the text Spark runs is
the text judged) and the parsed plan is walked as Spark serialises it (``toJSON``), subquery
expressions, CTE definitions and table arguments included:

* Only queries: every plan node must be a query operator (:data:`QUERY_NODES`); commands
  (``CREATE``, ``INSERT``, ``CACHE``, ``SET``, ``ADD JAR``, ``SELECT ... INTO``, which arrives
  as a CTAS) are refused. ``EXPLAIN`` of an allowed query is allowed.
* Only the role's relations: a table name must be one of the role's temporary views (or a CTE
  of the statement); two-part names, ``format.`path``` and catalog tables never resolve.
* Only allow-listed functions (:class:`Allowance`): reflection, file and JVM functions do not
  exist for the role.

Then the analysed plan is checked too: every leaf must be a constant relation or a read of one
of the role's data sources, so a name that resolved somewhere unexpected (say, a catalog table
an admin made, read through an out-of-scope CTE name) is refused before any job runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dicomlake.sql import errors as E
from dicomlake.sql.errors import QueryError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

_LOGICAL = "org.apache.spark.sql.catalyst.plans.logical."
_ANALYSIS = "org.apache.spark.sql.catalyst.analysis."
_EXPRESSIONS = "org.apache.spark.sql.catalyst.expressions."

QUERY_NODES = frozenset({
    "Project", "Filter", "Aggregate", "Join", "Union", "Intersect", "Except", "Sort",
    "GlobalLimit", "LocalLimit", "Offset", "Tail", "Distinct", "Deduplicate", "SubqueryAlias",
    "OneRowRelation", "LocalRelation", "Window", "WithWindowDefinition", "Generate", "Sample",
    "Pivot", "Unpivot", "LateralJoin", "UnresolvedWith", "RepartitionByExpression",
    "Repartition", "UnresolvedHint", "Expand",
})
"""Logical operators a read-only statement is made of."""

ANALYSIS_NODES = frozenset({
    "UnresolvedRelation", "UnresolvedTableValuedFunction", "UnresolvedInlineTable",
    "UnresolvedSubqueryColumnAliases", "UnresolvedTVFAliases", "UnresolvedAttribute",
    "UnresolvedStar", "UnresolvedStarExceptOrReplace", "UnresolvedAlias", "UnresolvedFunction",
    "UnresolvedGenerator", "UnresolvedExtractValue", "UnresolvedOrdinal", "UnresolvedRegex",
    "UnresolvedNamedLambdaVariable", "UnresolvedHaving", "UnresolvedQualify",
})
"""Parser placeholders a query may contain (each name-bearing one is checked)."""

DENIED_EXPRESSIONS = frozenset({
    "CurrentUser", "InputFileName", "InputFileBlockStart", "InputFileBlockLength",
    "CallMethodViaReflection", "TryReflect",
})
"""Expressions that reach the JVM, the file system or the server's OS account."""

SERVER_ANSWERED = frozenset({"current_user", "user", "session_user"})
"""Names Spark would answer with the server's OS account (the translator answers them)."""

ANALYZED_NODES = frozenset({
    "Project", "Filter", "Aggregate", "Join", "Union", "Intersect", "Except", "Sort",
    "GlobalLimit", "LocalLimit", "Offset", "Tail", "Distinct", "Deduplicate", "SubqueryAlias",
    "View", "Window", "Generate", "Sample", "Expand", "LateralJoin", "WithCTE",
    "CTERelationDef", "CTERelationRef", "UnionLoop", "UnionLoopRef", "Repartition",
    "RepartitionByExpression", "ResolvedHint", "OneRowRelation", "LocalRelation", "Range",
})
"""Nodes of an analysed query other than reads (``RelationV2``, checked by source name):
operators and relations that hold no data of the lake (a CTE reference's definition is its
own line)."""
_TREE_PREFIX = re.compile(r"^[\s:|+\-]*")
_NODE_NAME = re.compile(r"'?(\w+)")

_NAME = re.compile(r"^\[(\w+)\]$")


@dataclass(frozen=True)
class Allowance:
    """What one role's statements may name."""

    role: str
    views: frozenset[str]
    """Temporary views of the role's session (its relations and metadata views): the only
    names a statement may read."""
    sources: frozenset[str]
    """Catalog tables those views read (through data sources registered in this role's
    session only): the only reads of data an analysed plan may hold."""
    functions: frozenset[str]
    """Scalar, aggregate, window and generator functions."""
    table_functions: frozenset[str]
    """Functions allowed in ``FROM``."""


def builtin_functions(spark: SparkSession, groups: frozenset[str],
                      extra: frozenset[str]) -> frozenset[str]:
    """Built-in functions of Spark's registry in ``groups`` (ExpressionInfo groups), plus
    ``extra`` names from other groups."""
    registry = spark._jsparkSession.sessionState().functionRegistry()
    names = set(extra)
    iterator = registry.listFunction().iterator()
    while iterator.hasNext():
        ident = iterator.next()
        info = registry.lookupFunction(ident)
        if info.isDefined() and info.get().getGroup() in groups:
            names.add(str(info.get().getName()).lower())
    return frozenset(names)


def _denied(allowance: Allowance, what: str) -> QueryError:
    return QueryError(E.PERMISSION_DENIED,
                      f"Access Denied: {what} is not available to role '{allowance.role}'")


def _one_name(value: Any) -> str | None:
    """The single name of a Spark name list rendered as ``[name]`` (None for anything else:
    qualified names, quoted names with odd characters)."""
    match = _NAME.match(str(value)) if isinstance(value, str) else None
    return match.group(1).lower() if match else None


def _cte_names(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        if node.get("class") == _LOGICAL + "UnresolvedWith":
            for relation in node.get("cteRelations") or []:
                name = relation.get("_1") if isinstance(relation, dict) else None
                if isinstance(name, str) and re.fullmatch(r"\w+", name):
                    out.add(name.lower())
        for value in node.values():
            _cte_names(value, out)
    elif isinstance(node, list):
        for value in node:
            _cte_names(value, out)


class _ParsedCheck:
    """One walk over a parsed plan's JSON."""

    def __init__(self, allowance: Allowance, ctes: set[str],
                 function_exists: Callable[[str], bool]) -> None:
        self.allowance = allowance
        self.ctes = ctes
        self.function_exists = function_exists

    def walk(self, node: Any) -> None:
        if isinstance(node, list):
            for value in node:
                self.walk(value)
            return
        if not isinstance(node, dict):
            return
        cls = node.get("class")
        if isinstance(cls, str):
            self.check(cls, node)
        for value in node.values():
            if isinstance(value, (dict, list)):
                self.walk(value)

    def check(self, cls: str, node: dict[str, Any]) -> None:
        a = self.allowance
        short = cls.rsplit(".", 1)[-1]
        if cls.startswith(_LOGICAL):
            if short not in QUERY_NODES:
                raise QueryError(
                    E.PERMISSION_DENIED,
                    f"Access Denied: role '{a.role}' is read-only; {short} statements need "
                    "the admin role")
            return
        if cls.startswith(_ANALYSIS):
            if short not in ANALYSIS_NODES:
                raise _denied(a, f"the construct {short}")
            self.check_name(short, node)
            return
        if cls.startswith(_EXPRESSIONS):
            if short in DENIED_EXPRESSIONS:
                raise _denied(a, f"the expression {short}")
            return
        # Commands (org.apache.spark.sql.execution.command.*) and anything unknown.
        raise QueryError(E.PERMISSION_DENIED,
                         f"Access Denied: role '{a.role}' is read-only; {short} statements "
                         "need the admin role")

    def check_name(self, short: str, node: dict[str, Any]) -> None:
        a = self.allowance
        if short == "UnresolvedRelation":
            name = _one_name(node.get("multipartIdentifier"))
            if name is None or (name not in a.views and name not in self.ctes):
                from dicomlake.sql.engine import public_message

                written = str(node.get("multipartIdentifier", "")).strip("[]")
                dotted = written.replace(", ", ".")
                raise QueryError(E.TABLE_NOT_FOUND, public_message(
                    f"Table '{dotted}' does not exist or is not readable by role '{a.role}'"),
                    params={"relationName": dotted})
        elif short == "UnresolvedTableValuedFunction":
            name = _one_name(node.get("name"))
            if name is None or name not in a.table_functions:
                raise _denied(a, f"the table function {node.get('name')}")
        elif short == "UnresolvedFunction":
            name = _one_name(node.get("nameParts"))
            if name is None or name not in a.functions:
                parts = str(node.get("nameParts", "")).strip("[]")
                if name is not None and not self.function_exists(name):
                    raise QueryError(E.FUNCTION_NOT_FOUND, f"Function '{name}' not registered",
                                     params={"routineName": name})
                raise _denied(a, f"the function '{parts}'")
        elif short == "UnresolvedGenerator":
            ident = node.get("name") or {}
            name = str(ident.get("funcName", "")).lower()
            if ident.get("database") or name not in a.functions:
                raise _denied(a, f"the generator {name!r}")
        elif short == "UnresolvedAttribute":
            if _one_name(node.get("nameParts")) in SERVER_ANSWERED:
                raise _denied(a, f"{node.get('nameParts')} (use current_user)")


class PlanGuard:
    """Parses, checks and analyses statements for one non-admin role session."""

    def __init__(self, spark: SparkSession, allowance: Allowance) -> None:
        self.spark = spark
        self.allowance = allowance

    def parse(self, sql: str) -> Any:
        """Spark's parsed plan of ``sql`` after the checks (a JVM ``LogicalPlan``).

        Raises:
            QueryError: the statement is not a query or names what the role may not use.
        """
        plan = self.spark._jsparkSession.sessionState().sqlParser().parsePlan(sql)
        tree = json.loads(plan.toJSON())
        ctes: set[str] = set()
        _cte_names(tree, ctes)
        check = _ParsedCheck(self.allowance, ctes, self.spark.catalog.functionExists)
        root = tree[0] if isinstance(tree, list) and tree else {}
        if root.get("class", "").endswith(".ExplainCommand") and len(tree) == 1:
            check.walk(root.get("logicalPlan"))
        else:
            check.walk(tree)
        return plan

    def check_analyzed(self, analyzed: Any) -> None:
        """Refuse an analysed plan that reads anything but the role's own data sources.

        Judged on ``treeString``, which lists every node (subqueries and CTE definitions
        included) one per line: each node must be a query operator or constant relation
        (:data:`ANALYZED_NODES`), and each ``RelationV2`` a read of one of the role's tables
        (the table's name ends its line). It costs well under a millisecond; serialising the
        analysed plan as JSON cost ~40 ms. A name a user chose (a column alias with a newline)
        can add lines, never hide one, and an odd line is refused.
        """
        for line in str(analyzed.treeString()).splitlines():
            text = _TREE_PREFIX.sub("", line)
            if not text:
                continue
            name = _NODE_NAME.match(text)
            node = name.group(1) if name else text[:40]
            if node == "RelationV2":
                if text.rsplit(" ", 1)[-1] not in self.allowance.sources:
                    raise QueryError(E.TABLE_NOT_FOUND, "Table does not exist or is not "
                                     f"readable by role '{self.allowance.role}'")
            elif node not in ANALYZED_NODES:
                raise QueryError(E.TABLE_NOT_FOUND, "Table does not exist or is not readable "
                                 f"by role '{self.allowance.role}' ({node})")
