"""`dicomlake serve` answers like Trino: result column names, result types, error names,
messages and locations, and one log line per failed statement.

A real server process on a small lake, reached through the real Python trino client. Users:
``root`` (admin), ``doc`` (clinician), ``ana`` (analyst).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from _sql_helpers import PASSWORDS, lake_with_users, serve
from _sql_helpers import connect as connect_as
from trino.exceptions import TrinoUserError

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def sql_home(tmp_path_factory, spark, settings, sample_archives) -> Path:
    home = tmp_path_factory.mktemp("trino-compat-home")
    return lake_with_users(home, spark, settings, sample_archives)


@pytest.fixture(scope="module")
def server(sql_home) -> str:
    with serve(sql_home, "--port", "0", "--timeout", "120") as url:
        yield url


def cursor_of(server: str, user: str):
    schema = "dicom_deid" if user == "ana" else "dicom"
    return connect_as(server, user, PASSWORDS[user], schema=schema).cursor()


def run(server: str, user: str, sql: str, params=None):
    cursor = cursor_of(server, user)
    cursor.execute(sql, params)
    rows = cursor.fetchall()
    return rows, cursor


def failure(server: str, user: str, sql: str) -> TrinoUserError:
    cursor = cursor_of(server, user)
    with pytest.raises(TrinoUserError) as info:
        cursor.execute(sql)
        cursor.fetchall()
    return info.value


# ---- names --------------------------------------------------------------------------------


@pytest.mark.parametrize(("sql", "names"), [
    ("SELECT 1, modality, count(*) FROM instances GROUP BY modality",
     ["_col0", "modality", "_col2"]),
    ("SELECT current_timestamp", ["_col0"]),
    ("SELECT i.modality, i.rows AS r, upper(i.modality), CAST(i.rows AS bigint), i.rows + 1 "
     "FROM instances i LIMIT 1", ["modality", "r", "_col2", "_col3", "_col4"]),
    ("SELECT version(), current_user, 'x', NULL", ["_col0", "_col1", "_col2", "_col3"]),
    ("SELECT 1 UNION ALL SELECT 2", ["_col0"]),
    ("SELECT modality, 1 FROM series UNION SELECT 'x', 2", ["modality", "_col1"]),
    ("WITH x AS (SELECT count(*) AS n, max(rows) FROM instances) SELECT n, n + 1 FROM x",
     ["n", "_col1"]),
    ("(SELECT count(*) FROM series)", ["_col0"]),
    ("SELECT * FROM (SELECT modality, count(*) FROM series GROUP BY 1) ORDER BY 1",
     ["modality", "_col1"]),
    ("VALUES (1, 'a'), (2, 'b')", ["_col0", "_col1"]),
    ("SELECT count(*) FROM series ORDER BY count(*) LIMIT 1", ["_col0"]),
])
@pytest.mark.parametrize("user", ["root", "doc"])
def test_unnamed_columns_are_named_like_trino(server, user, sql, names):
    _, cursor = run(server, user, sql)
    assert [d[0] for d in cursor.description] == names


def test_star_keeps_the_tables_names(server):
    described = [r[0] for r in run(server, "doc", "DESCRIBE series")[0]]
    _, cursor = run(server, "doc", "SELECT * FROM series LIMIT 1")
    assert [d[0] for d in cursor.description] == described
    _, cursor = run(server, "doc", "SELECT s.*, 1 FROM series s LIMIT 1")
    assert [d[0] for d in cursor.description] == [*described, f"_col{len(described)}"]


def test_parameters_and_describe_output_use_trino_names(server):
    _, cursor = run(server, "doc", "SELECT ? + 1, modality FROM series LIMIT 1", [41])
    assert [d[0] for d in cursor.description] == ["_col0", "modality"]


def test_result_types_are_trinos(server):
    rows, cursor = run(server, "doc",
                       "SELECT count(*), avg(rows), sum(rows), 1, 1.5, 1e0, DATE '2020-01-02', "
                       "TIMESTAMP '2020-01-02 03:04:05', CAST(1 AS DECIMAL(20,2)), "
                       "min(ingested_at), max(modality), 'abc' FROM instances")
    types = [d[1] for d in cursor.description]
    assert types == ["bigint", "double", "bigint", "integer", "decimal(2,1)", "double", "date",
                     "timestamp(6)", "decimal(20,2)", "timestamp(6) with time zone", "varchar",
                     "varchar"]
    stamp = rows[0][7]
    assert stamp.tzinfo is None and (stamp.hour, stamp.minute, stamp.second) == (3, 4, 5)


# ---- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(("user", "sql", "name", "message", "location"), [
    ("doc", "SELECT modalty FROM instances", "COLUMN_NOT_FOUND",
     "line 1:8: Column 'modalty' cannot be resolved", (1, 8)),
    ("root", "SELECT modalty FROM instances", "COLUMN_NOT_FOUND",
     "line 1:8: Column 'modalty' cannot be resolved", (1, 8)),
    ("ana", "SELECT approx_distinct(modality),\n  i.modalty FROM instances i", "COLUMN_NOT_FOUND",
     "line 2:3: Column 'i.modalty' cannot be resolved", (2, 3)),
    ("doc", "SELECT *\nFROM nope", "TABLE_NOT_FOUND",
     "line 2:6: Table 'dicomlake.dicom.nope' does not exist", (2, 6)),
    ("root", "SELECT *\nFROM nope", "TABLE_NOT_FOUND",
     "line 2:6: Table 'dicomlake.dicom.nope' does not exist", (2, 6)),
    ("root", 'SELECT * FROM dicom."instances$partitions"', "TABLE_NOT_FOUND",
     "line 1:15: Table 'dicomlake.dicom.instances$partitions' does not exist", (1, 15)),
    ("doc", 'SELECT * FROM dicom."instances$partitions"', "TABLE_NOT_FOUND",
     "line 1:15: Table 'dicomlake.dicom.instances$partitions' does not exist", (1, 15)),
    ("ana", 'SELECT * FROM dicom_deid."series$partitions"', "TABLE_NOT_FOUND",
     "line 1:15: Table 'dicomlake.dicom_deid.series$partitions' does not exist", (1, 15)),
    ("root", 'SELECT * FROM parquet."a b"', "TABLE_NOT_FOUND",
     "line 1:15: Table 'dicomlake.parquet.a b' does not exist", (1, 15)),
    ("root", "SELECT * FROM dicomlake.json.x", "TABLE_NOT_FOUND",
     "line 1:15: Table 'dicomlake.json.x' does not exist", (1, 15)),
    ("doc", "SELECT foo(1)", "FUNCTION_NOT_FOUND",
     "line 1:8: Function 'foo' not registered", (1, 8)),
    ("root", "SELECT 1,  Foo(1)", "FUNCTION_NOT_FOUND",
     "line 1:12: Function 'foo' not registered", (1, 12)),
    ("doc", "SELECT 1 / 0", "DIVISION_BY_ZERO", "Division by zero", None),
    ("doc", "SELECT 1 / (rows - rows) FROM instances", "DIVISION_BY_ZERO", "Division by zero",
     None),
    ("doc", "SELECT CAST('x' AS INTEGER)", "INVALID_CAST_ARGUMENT",
     "Cannot cast 'x' to INTEGER", None),
])
def test_errors_carry_trinos_name_message_and_location(server, user, sql, name, message,
                                                        location):
    error = failure(server, user, sql)
    assert (error.error_name, error.message) == (name, message)
    assert error.error_type == "USER_ERROR"
    if location is None:
        assert error.error_location is None or error.error_location == (-1, -1)
    else:
        assert error.error_location == location


@pytest.mark.parametrize("user", ["root", "doc"])
def test_type_mismatch_is_located_and_free_of_spark_internals(server, user):
    error = failure(server, user, "SELECT modality,\n       abs(ARRAY[rows]) FROM instances")
    assert error.error_name == "TYPE_MISMATCH"
    assert error.error_location == (2, 8)
    assert error.message.startswith("line 2:8: ")
    for leak in ("[DATATYPE_MISMATCH", "SQLSTATE", "`", "__dl_", "Did you mean"):
        assert leak not in error.message


def test_syntax_errors_keep_their_positions(server):
    error = failure(server, "doc", "SELECT 1\nFROM")
    assert error.error_name == "SYNTAX_ERROR"
    assert error.message.startswith("line 2:") and error.error_location[0] == 2


def test_a_role_learns_nothing_about_tables_it_cannot_read(server):
    """An analyst asking for a raw table, an existing and a missing one alike, is told the
    same thing: it does not exist (plus where analysts read)."""
    real = failure(server, "ana", "SELECT * FROM dicom.instances")
    missing = failure(server, "ana", "SELECT * FROM dicom.nope")
    assert real.error_name == missing.error_name == "TABLE_NOT_FOUND"
    assert real.message.replace("instances", "X") == missing.message.replace("nope", "X")
    audit = failure(server, "doc", "SELECT * FROM system.audit_log")
    assert audit.error_name == "TABLE_NOT_FOUND"
    assert audit.message == "line 1:15: Table 'dicomlake.system.audit_log' does not exist"


# ---- the log ------------------------------------------------------------------------------


def test_each_failed_statement_logs_one_line(server, sql_home):
    log_path = sql_home / "serve.log"
    before = log_path.stat().st_size
    ids = []
    for sql in ("SELECT modalty FROM instances", "SELECT * FROM nope",
                "SELECT 1 / (rows - rows) FROM instances", "SELECT foo(1)"):
        for user in ("root", "doc"):
            ids.append((failure(server, user, sql).query_id, user))
    deadline = time.monotonic() + 10
    while True:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            handle.seek(before)
            text = handle.read()
        if all(query_id in text for query_id, _ in ids) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for query_id, user in ids:
        lines = [line for line in text.splitlines() if query_id in line]
        assert len(lines) == 1, lines
        assert f" by {user} " in lines[0]
        assert "_NOT_FOUND" in lines[0] or "DIVISION_BY_ZERO" in lines[0]
    assert "\tat org.apache" not in text, text[:3000]
    assert "SQLQueryContextLogger" not in text
    assert len(text) < 400 * len(ids), text[:3000]
