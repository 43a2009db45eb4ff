"""SQL service logic that needs no server: types, values, users, limits, audit, translation."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pyarrow as pa
import pytest
from click.testing import CliRunner
from pyspark.sql import types as T

from dicomlake.sql import errors as E
from dicomlake.sql.errors import AuthenticationError, QueryError, UserStoreError
from dicomlake.sql.query import Limits, encode_batch
from dicomlake.sql.server import ServerConfig
from dicomlake.sql.session import ClientSession, SessionChanges
from dicomlake.sql.translate import Translator
from dicomlake.sql.types import column_converter, trino_type
from dicomlake.sql.users import (
    Authenticator,
    LoginThrottle,
    Principal,
    Role,
    UserStore,
    parse_role,
)

# ---- type signatures ---------------------------------------------------------------------


@pytest.mark.parametrize(("spark_type", "name", "raw", "args"), [
    (T.StringType(), "varchar", "varchar", [{"kind": "LONG", "value": 2147483647}]),
    (T.VarcharType(10), "varchar(10)", "varchar", [{"kind": "LONG", "value": 10}]),
    (T.CharType(3), "char(3)", "char", [{"kind": "LONG", "value": 3}]),
    (T.DecimalType(12, 3), "decimal(12,3)", "decimal",
     [{"kind": "LONG", "value": 12}, {"kind": "LONG", "value": 3}]),
    (T.TimestampType(), "timestamp(6) with time zone", "timestamp with time zone",
     [{"kind": "LONG", "value": 6}]),
    (T.TimestampNTZType(), "timestamp(6)", "timestamp", [{"kind": "LONG", "value": 6}]),
    (T.LongType(), "bigint", "bigint", []),
    (T.IntegerType(), "integer", "integer", []),
    (T.ShortType(), "smallint", "smallint", []),
    (T.ByteType(), "tinyint", "tinyint", []),
    (T.FloatType(), "real", "real", []),
    (T.DoubleType(), "double", "double", []),
    (T.BooleanType(), "boolean", "boolean", []),
    (T.BinaryType(), "varbinary", "varbinary", []),
    (T.DateType(), "date", "date", []),
    (T.NullType(), "unknown", "unknown", []),
])
def test_scalar_type_signatures(spark_type, name, raw, args):
    assert trino_type(spark_type) == (name, {"rawType": raw, "arguments": args})


def test_nested_type_signatures_are_complete():
    struct = T.StructType([T.StructField("x", T.LongType()),
                           T.StructField("tags", T.ArrayType(T.StringType()))])
    name, sig = trino_type(T.MapType(T.StringType(), struct))
    assert name == "map(varchar, row(x bigint, tags array(varchar)))"
    key, value = sig["arguments"]
    assert key["value"]["arguments"][0]["value"] == 2147483647  # client indexes this
    row = value["value"]
    assert row["rawType"] == "row"
    assert row["arguments"][0] == {"kind": "NAMED_TYPE", "value": {
        "fieldName": {"name": "x"}, "typeSignature": {"rawType": "bigint", "arguments": []}}}
    tags = row["arguments"][1]["value"]["typeSignature"]
    assert tags["rawType"] == "array"
    assert tags["arguments"][0]["value"]["rawType"] == "varchar"


def test_trino_client_decodes_our_values():
    """What we encode, the real trino client's row mapper turns into the right Python values."""
    from trino.mapper import RowMapperFactory

    columns_spark = [
        ("d", T.DecimalType(10, 2)), ("day", T.DateType()), ("ts", T.TimestampType()),
        ("f", T.DoubleType()), ("b", T.BinaryType()),
        ("m", T.MapType(T.StringType(), T.LongType())),
        ("r", T.StructType([T.StructField("a", T.LongType()), T.StructField("s", T.StringType())])),
        ("xs", T.ArrayType(T.DoubleType())),
    ]
    batch = pa.RecordBatch.from_pydict({
        "d": pa.array([Decimal("1.50"), None], pa.decimal128(10, 2)),
        "day": pa.array([dt.date(2020, 1, 2), None]),
        "ts": pa.array([dt.datetime(2020, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC), None],
                       pa.timestamp("us", tz="UTC")),
        "f": pa.array([float("nan"), float("inf")]),
        "b": pa.array([b"\x00\xff", None]),
        "m": pa.array([[("k", 1)], None], pa.map_(pa.string(), pa.int64())),
        "r": pa.array([{"a": 1, "s": "x"}, None],
                      pa.struct([("a", pa.int64()), ("s", pa.string())])),
        "xs": pa.array([[0.5, None], []], pa.list_(pa.float64())),
    })
    converters = [column_converter(f.type) for f in batch.schema]
    rows = json.loads(b"[" + encode_batch(batch, converters) + b"]")
    columns = [{"name": n, "typeSignature": trino_type(t)[1]} for n, t in columns_spark]
    mapped = RowMapperFactory().create(columns, legacy_primitive_types=False).map(rows)
    first, second = mapped
    assert first[0] == Decimal("1.50")
    assert first[1] == dt.date(2020, 1, 2)
    assert first[2].replace(tzinfo=None) == dt.datetime(2020, 1, 2, 3, 4, 5, 123456)
    assert first[2].utcoffset() == dt.timedelta(0)
    assert first[3] != first[3] and second[3] == float("inf")
    assert first[4] == b"\x00\xff"
    assert first[5] == {"k": 1}
    assert tuple(first[6]) == (1, "x") and first[6].a == 1
    assert first[7] == [0.5, None] and second[7] == []
    assert second[:3] == [None, None, None] and second[4:7] == [None, None, None]


# ---- users -------------------------------------------------------------------------------


def test_user_store_round_trip_and_errors(tmp_path):
    store = UserStore(tmp_path)
    store.add("alice", "correct horse", Role.ANALYST)
    assert [(u.name, u.role) for u in store.list()] == [("alice", Role.ANALYST)]
    raw = store.path.read_text()
    assert "correct horse" not in raw and "$argon2id$" in raw
    assert (store.path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(UserStoreError, match="already exists"):
        store.add("alice", "another pass", Role.ADMIN)
    with pytest.raises(UserStoreError, match="too short"):
        store.add("bob", "short", Role.ADMIN)
    with pytest.raises(UserStoreError, match="not allowed"):
        store.add("bad name!", "long enough", Role.ADMIN)
    with pytest.raises(UserStoreError, match="one of: admin, clinician, analyst"):
        parse_role("superuser")
    with pytest.raises(UserStoreError, match="does not exist"):
        store.remove("nobody")


def test_authenticator_checks_hashes_and_sees_password_changes(tmp_path):
    store = UserStore(tmp_path)
    store.add("alice", "first password", Role.CLINICIAN)
    auth = Authenticator(store)
    assert auth.authenticate("alice", "first password") == Principal("alice", Role.CLINICIAN)
    with pytest.raises(AuthenticationError):
        auth.authenticate("alice", "wrong password")
    with pytest.raises(AuthenticationError):
        auth.authenticate("mallory", "first password")
    store.set_password("alice", "second password")
    with pytest.raises(AuthenticationError):
        auth.authenticate("alice", "first password")  # the cache must not outlive the change
    assert auth.authenticate("alice", "second password").role is Role.CLINICIAN
    store.remove("alice")
    with pytest.raises(AuthenticationError):
        auth.authenticate("alice", "second password")


def test_user_cli(tmp_path, monkeypatch):
    from dicomlake.cli import main

    monkeypatch.setenv("DICOMLAKE_HOME", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(main, ["user", "add", "carol", "--role", "clinician",
                                  "--password-stdin"], input="a fine password\n")
    assert result.exit_code == 0, result.output
    listed = runner.invoke(main, ["user", "list"])
    assert "carol" in listed.output and "clinician" in listed.output
    again = runner.invoke(main, ["user", "add", "carol", "--password-stdin"],
                          input="a fine password\n")
    assert again.exit_code != 0 and "already exists" in again.output
    changed = runner.invoke(main, ["user", "passwd", "carol", "--password-stdin"],
                            input="another password\n")
    assert changed.exit_code == 0
    assert Authenticator(UserStore(tmp_path)).authenticate("carol", "another password")
    assert runner.invoke(main, ["user", "remove", "carol"]).exit_code == 0
    assert "no users" in runner.invoke(main, ["user", "list"]).output


# ---- server config, session headers ------------------------------------------------------


def test_plain_http_only_on_loopback(tmp_path):
    assert ServerConfig(host="127.0.0.1").scheme == "http"
    with pytest.raises(ValueError, match="refuses plain HTTP"):
        ServerConfig(host="0.0.0.0")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    assert ServerConfig(host="0.0.0.0", tls_cert=cert, tls_key=key).scheme == "https"
    with pytest.raises(ValueError, match="both"):
        ServerConfig(tls_cert=cert)


def test_session_headers_parse_and_reply():
    session = ClientSession.from_headers({
        "X-Trino-User": "u", "X-Trino-Catalog": "dicomlake", "X-Trino-Schema": "dicom",
        "X-Trino-Session": "query_max_run_time=10s",
        "X-Trino-Prepared-Statement": "st1=SELECT+%3F%2C+1"})
    assert session.schema == "dicom" and session.properties == {"query_max_run_time": "10s"}
    assert session.prepared == {"st1": "SELECT ?, 1"}
    with pytest.raises(QueryError):
        ClientSession.from_headers({"X-Trino-Session": "no-equals-sign"})
    headers = dict(SessionChanges(set_schema="dicom",
                                  added_prepare={"st2": "SELECT 1, 2"}).headers())
    assert headers == {"X-Trino-Set-Schema": "dicom", "X-Trino-Added-Prepare": "st2=SELECT+1%2C+2"}


# ---- translation (statements that need no catalog) ---------------------------------------

ADMIN, ANALYST = Principal("root", Role.ADMIN), Principal("ana", Role.ANALYST)


@pytest.fixture
def translator():
    return Translator(None, server_version="476-test", max_timeout_seconds=60)  # type: ignore[arg-type]


def test_trino_functions_become_spark_functions(translator):
    plan = translator.plan("SELECT approx_distinct(x), cardinality(ARRAY[x]), "
                           "regexp_like('ab', 'a'), json_extract_scalar('{\"a\":1}', '$.a') "
                           "FROM (VALUES (1)) AS t(x)", ClientSession(), ANALYST)
    sql = plan.spark_sql.upper()
    assert "APPROX_COUNT_DISTINCT" in sql and "SIZE(" in sql and "GET_JSON_OBJECT" in sql
    assert plan.is_query


def test_version_and_current_user_are_answered_by_the_service(translator):
    plan = translator.plan("SELECT version(), current_user", ClientSession(), ANALYST)
    assert "'476-test'" in plan.spark_sql and "'ana'" in plan.spark_sql


def test_syntax_error_points_at_the_client_text(translator):
    with pytest.raises(QueryError) as info:
        translator.plan("SELECT 1\nFROM", ClientSession(), ADMIN)
    assert info.value.code is E.SYNTAX_ERROR
    assert info.value.line == 2 and info.value.message.startswith("line 2:")


def test_non_queries_of_non_admins_go_to_spark_as_written(translator):
    """What a statement may do is judged on Spark's parse (sql.guard), not on sqlglot's: the
    translator passes a non-admin's writes on untouched, resolving nothing."""
    for statement in ("CREATE TABLE t (a int)", "DROP TABLE dicom.instances",
                      "INSERT INTO t VALUES (1)", "DELETE FROM t", "SET spark.x = 1"):
        plan = translator.plan(statement, ClientSession(schema="dicom"), ANALYST)
        assert plan.spark_sql == statement and not plan.is_query, statement


def test_every_spelling_of_the_user_is_the_sql_user(translator):
    plan = translator.plan("SELECT current_user, current_user(), session_user(), user(), "
                           "session_user", ClientSession(), ANALYST)
    assert plan.spark_sql == "SELECT 'ana', 'ana', 'ana', 'ana', 'ana'"


def test_session_statements(translator):
    session = ClientSession(prepared={"st": "SELECT ? + 1"})
    plan = translator.plan("SET SESSION query_max_run_time = '5s'", session, ANALYST)
    assert plan.changes.set_session == {"query_max_run_time": "5s"}
    with pytest.raises(QueryError) as info:
        translator.plan("SET SESSION nope = 1", session, ANALYST)
    assert info.value.code is E.INVALID_SESSION_PROPERTY
    assert translator.plan("PREPARE q1 FROM SELECT 1", session, ANALYST).changes.added_prepare \
        == {"q1": "SELECT 1"}
    executed = translator.plan("EXECUTE st USING 41", session, ANALYST)
    assert executed.spark_sql == "SELECT 41 + 1"
    immediate = translator.plan("EXECUTE IMMEDIATE 'SELECT ?, ?' USING 'it''s', DATE '2020-01-02'",
                                session, ANALYST)
    assert immediate.spark_sql == "SELECT 'it\\'s', CAST('2020-01-02' AS DATE)"
    with pytest.raises(QueryError) as info:
        translator.plan("EXECUTE st USING 1, 2", session, ANALYST)
    assert info.value.code is E.INVALID_PARAMETER_USAGE
    with pytest.raises(QueryError) as info:
        translator.plan("EXECUTE missing", session, ANALYST)
    assert info.value.code is E.NOT_FOUND
    assert translator.plan("DEALLOCATE PREPARE st", session, ANALYST).changes \
        .deallocated_prepare == ["st"]
    limited = ClientSession(properties={"query_max_run_time": "10m"})
    assert translator.timeout_for(limited, ANALYST) == 60  # never above the server limit
    assert translator.timeout_for(limited, ADMIN) == 600


def test_python_worker_failures_report_the_raised_reason():
    """image_knn failing inside Spark: the client sees image_knn's own message, as a user
    error, not Spark's "An exception was thrown from the Python worker"."""
    from dicomlake.sql import errors as E
    from dicomlake.sql.engine import query_error

    text = ("[PYTHON_EXCEPTION] An exception was thrown from the Python worker. Please see "
            "the stack trace below.\nTraceback (most recent call last):\n  File \"knn.py\", "
            "line 9, in eval\ndicomlake.udfs.errors.KnnError: image_knn: no image with "
            "SOPInstanceUID '1.2.3'\n")
    error = query_error(RuntimeError(text))
    assert error.code == E.GENERIC_USER_ERROR
    assert error.message == "image_knn: no image with SOPInstanceUID '1.2.3'"


# ---- limits, back-off and audit ------------------------------------------------------------


def test_per_user_concurrency_defaults_to_half_the_slots():
    assert Limits(max_concurrent=4).per_user == 2
    assert Limits(max_concurrent=1).per_user == 1
    assert Limits(max_concurrent=4, max_concurrent_per_user=9).per_user == 4


def test_login_back_off_per_user_and_per_address(monkeypatch):
    import dicomlake.sql.users as users

    now = [1000.0]
    monkeypatch.setattr(users.time, "monotonic", lambda: now[0])
    throttle = LoginThrottle(free_per_user=3, free_per_address=5, max_wait=8)
    for _ in range(3):
        assert throttle.wait_seconds("ana", "10.0.0.1") == 0
        throttle.failed("ana", "10.0.0.1")
    assert throttle.wait_seconds("ana", "10.0.0.9") == 0  # 3 free failures
    throttle.failed("ana", "10.0.0.1")
    assert throttle.wait_seconds("ana", "10.0.0.9") == 1  # then 1, 2, 4, ... seconds
    throttle.failed("ana", "10.0.0.1")
    assert throttle.wait_seconds("ana", "10.0.0.9") == 2
    for _ in range(5):
        throttle.failed("ana", "10.0.0.1")
    assert throttle.wait_seconds("ana", None) == 8  # capped
    assert throttle.wait_seconds("bob", "10.0.0.1") == 8  # the address sprays too
    assert throttle.wait_seconds("bob", "10.0.0.2") == 0
    now[0] += 8
    assert throttle.wait_seconds("ana", None) == 0
    throttle.succeeded("ana", "10.0.0.1")
    throttle.failed("ana", "10.0.0.1")
    assert throttle.wait_seconds("ana", "10.0.0.1") == 0


def test_audit_keeps_whole_statements_and_http_status(tmp_path):
    import datetime as dt

    from deltalake import DeltaTable

    from dicomlake.sql.audit import AuditLog, AuditRecord

    log = AuditLog(tmp_path / "audit")
    now = dt.datetime.now(dt.UTC)
    probe = "SELECT 1 /*" + "x" * 200_000 + "*/ , 'probe after a long comment'"
    log.append(AuditRecord(event="query", user="ana", role="analyst", query_id="q", sql=probe,
                           state="FINISHED", rows=1, started_at=now, finished_at=now,
                           duration_ms=1, error_name=None, error_message=None,
                           client_address="127.0.0.1", source=None, http_status=200))
    assert log.flush() == 1
    rows = DeltaTable(str(tmp_path / "audit")).to_pyarrow_dataset().to_table().to_pylist()
    assert rows[0]["sql"] == probe and rows[0]["http_status"] == 200

