"""A non-admin role session (sql.roles + sql.guard) on the run's Spark: what Spark's own plans
let through. The end-to-end attacks through a real server are in test_privacy_attacks.py."""

from __future__ import annotations

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from dicomlake.sql import errors as E
from dicomlake.sql.errors import QueryError
from dicomlake.sql.roles import (
    EXTRA_FUNCTIONS,
    FUNCTION_GROUPS,
    RoleSession,
    relation_view,
)
from dicomlake.sql.users import Role

pytestmark = pytest.mark.slow  # starts the run's Spark session

VIEW = relation_view("dicom_deid", "t")


@pytest.fixture(scope="module")
def table_t(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("guard") / "t"
    write_deltalake(str(path), pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]}))
    return str(path)


@pytest.fixture(scope="module")
def analyst(spark, table_t):
    """An analyst session holding one view (of a tiny Delta table) and nothing else; the
    shared catalog holds a parquet table with a secret, as an admin's CTAS would leave."""
    from dicomlake.sql.guard import builtin_functions

    spark.sql("CREATE TABLE IF NOT EXISTS default.guard_secret USING parquet AS "
              "SELECT 'Doe^Jane' AS patient_name")
    session = RoleSession(Role.ANALYST, spark.newSession(),
                          builtin_functions(spark, FUNCTION_GROUPS, EXTRA_FUNCTIONS))
    session.spark.conf.set("spark.sql.runSQLOnFiles", "false")
    session.sync({("dicom_deid", "t"): table_t})
    yield session
    spark.sql("DROP TABLE IF EXISTS default.guard_secret")


def _refused(session: RoleSession, sql: str) -> QueryError:
    with pytest.raises(QueryError) as info:
        session.dataframe(sql).collect()
    return info.value


@pytest.mark.parametrize("sql", [
    f"SELECT a, upper(b) FROM {VIEW} WHERE a IN (SELECT a FROM {VIEW}) ORDER BY a",
    f"WITH c AS (SELECT * FROM {VIEW}) SELECT count(*) FROM c JOIN c c2 USING (a)",
    f"SELECT a, count(*) OVER (PARTITION BY b) FROM {VIEW}",
    f"SELECT * FROM {VIEW} LATERAL VIEW explode(array(1, 2)) e AS x",
    f"SELECT transform(array(a), x -> x + 1), get_json_object('{{\"k\":1}}', '$.k') FROM {VIEW}",
    "SELECT * FROM range(3)",
    "VALUES (1, 'x')",
    f"EXPLAIN SELECT * FROM {VIEW}",
])
def test_queries_run(analyst, sql):
    assert analyst.dataframe(sql).collect() is not None


@pytest.mark.parametrize(("sql", "kind"), [
    (f"CREATE TABLE default.copy AS SELECT * FROM {VIEW}", "CreateTableAsSelect"),
    (f"INSERT INTO default.guard_secret SELECT b FROM {VIEW}", "InsertIntoStatement"),
    (f"CACHE TABLE {VIEW}", "CacheTable"),
    ("SET spark.sql.runSQLOnFiles = true", "SetCommand"),
    ("ADD JAR /tmp/evil.jar", "AddJarsCommand"),
    (f"CREATE TEMPORARY VIEW v2 AS SELECT * FROM {VIEW}", "CreateViewCommand"),
    ("CREATE FUNCTION f AS 'x.Y'", "CreateFunction"),
    ("DROP TABLE default.guard_secret", "DropTable"),
    (f"EXPLAIN CREATE TABLE default.x AS SELECT * FROM {VIEW}", "CreateTableAsSelect"),
])
def test_commands_are_refused_before_they_run(analyst, spark, sql, kind):
    error = _refused(analyst, sql)
    assert error.code is E.PERMISSION_DENIED and kind in error.message
    assert not spark.catalog.tableExists("default.copy")
    assert spark.catalog.tableExists("default.guard_secret")
    assert analyst.spark.conf.get("spark.sql.runSQLOnFiles") == "false"


@pytest.mark.parametrize("sql", [
    "SELECT * FROM default.guard_secret",
    "SELECT * FROM guard_secret",  # the current database, default
    "SELECT * FROM spark_catalog.default.guard_secret",
    "SELECT * FROM parquet.`/tmp`",
    "SELECT * FROM dicom.instances",
    f"SELECT * FROM range(1), (SELECT * FROM {VIEW}) WHERE EXISTS (SELECT * FROM guard_secret)",
    # a CTE name used outside its scope resolves to the catalog: caught on the analysed plan
    "SELECT * FROM (WITH guard_secret AS (SELECT 1 AS x) SELECT * FROM guard_secret), "
    "guard_secret",
])
def test_only_the_roles_views_are_readable(analyst, sql):
    assert _refused(analyst, sql).code is E.TABLE_NOT_FOUND


def test_a_name_with_a_newline_cannot_hide_a_read(analyst):
    """The analysed plan is judged line by line: a made-up line (a column alias with a
    newline) adds lines, never hides one, and a line that is no plan node is refused."""
    fake = "x\n+- RelationV2[a#1] spark_catalog.__dl_analyst.__dl_rel__dicom_deid__t"
    for sql in (f"SELECT * FROM VALUES (1) AS v(`{fake}`), "
                "(WITH guard_secret AS (SELECT 1) SELECT 1), guard_secret",
                f"SELECT * FROM VALUES (1) AS v(`{fake}`)"):
        assert _refused(analyst, sql).code is E.TABLE_NOT_FOUND


@pytest.mark.parametrize(("sql", "code"), [
    ("SELECT reflect('java.lang.System', 'getenv', 'HOME')", E.PERMISSION_DENIED),
    ("SELECT java_method('java.lang.System', 'getenv', 'HOME')", E.PERMISSION_DENIED),
    ("SELECT input_file_name()", E.PERMISSION_DENIED),
    ("SELECT current_user()", E.PERMISSION_DENIED),
    ("SELECT session_user", E.PERMISSION_DENIED),
    ("SELECT from_protobuf(X'00', 'M', '/etc/passwd')", E.PERMISSION_DENIED),
    ("SELECT xpath('<a/>', '/a')", E.PERMISSION_DENIED),
    ("SELECT default.some_udf(1)", E.PERMISSION_DENIED),
    ("SELECT no_such_function(1)", E.FUNCTION_NOT_FOUND),
    ("SELECT * FROM read_files('/etc')", E.PERMISSION_DENIED),
    (f"SELECT * FROM {VIEW} LATERAL VIEW default.gen(a) g", E.PERMISSION_DENIED),
])
def test_only_allow_listed_functions(analyst, sql, code):
    assert _refused(analyst, sql).code is code


def test_appends_show_at_once(analyst, table_t, tmp_path):
    """The view is resolved afresh by each query (a view USING the source kept its files)."""
    other = tmp_path / "grows"
    write_deltalake(str(other), pa.table({"a": [1]}))
    analyst.sync({("dicom_deid", "t"): table_t, ("dicom_deid", "grows"): str(other)})
    view = relation_view("dicom_deid", "grows")
    assert analyst.dataframe(f"SELECT count(*) FROM {view}").first()[0] == 1
    write_deltalake(str(other), pa.table({"a": [2, 3]}), mode="append")
    assert analyst.dataframe(f"SELECT count(*) FROM {view}").first()[0] == 3
    analyst.sync({("dicom_deid", "t"): table_t})


def test_views_of_tables_that_went_away_are_dropped(analyst, table_t, tmp_path):
    other = tmp_path / "u"
    write_deltalake(str(other), pa.table({"a": [1]}))
    analyst.sync({("dicom_deid", "t"): table_t, ("dicom_deid", "u"): str(other)})
    assert analyst.dataframe(f"SELECT * FROM {relation_view('dicom_deid', 'u')}").count() == 1
    analyst.sync({("dicom_deid", "t"): table_t})
    assert _refused(analyst, f"SELECT * FROM {relation_view('dicom_deid', 'u')}").code \
        is E.TABLE_NOT_FOUND


def test_raw_catalog_tables_cannot_be_read_or_described_from_an_analyst_session(
        spark, settings, tmp_path):
    """By construction, without the guard: the shared catalog lists a raw lake table, but its
    data source exists only in the admin session."""
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import AnalysisException

    from dicomlake.catalog.warehouse import Warehouse
    from dicomlake.sql.roles import RoleSessions

    write_deltalake(str(tmp_path / "dicom" / "guard_raw"), pa.table({"patient_name": ["Doe"]}))
    Warehouse(tmp_path).register(spark, only=("dicom", "guard_raw"))
    try:
        assert spark.sql("SELECT * FROM dicom.guard_raw").count() == 1
        sessions = RoleSessions(spark, settings)
        for role in (Role.ANALYST, Role.CLINICIAN):
            session = sessions.get(role).spark
            listed = {r.tableName for r in session.sql("SHOW TABLES IN dicom").collect()}
            assert "guard_raw" in listed  # the shared catalog lists it ...
            assert session.conf.get("spark.sql.runSQLOnFiles") == "false"
            for sql in ("SELECT * FROM dicom.guard_raw", "DESCRIBE TABLE dicom.guard_raw",
                        "SELECT * FROM parquet.`/etc`"):  # ... but nothing reads it
                with pytest.raises((AnalysisException, Py4JJavaError)):
                    session.sql(sql).collect()
        assert spark.conf.get("spark.sql.runSQLOnFiles") == "false"
    finally:
        spark.conf.set("spark.sql.runSQLOnFiles", "true")  # the run's shared session
        spark.sql("DROP TABLE IF EXISTS dicom.guard_raw")


def test_spark_connect_serves_admins_only(settings):
    """Over Spark Connect there is no JVM to isolate or inspect sessions: non-admins refused."""
    from dicomlake.sql.roles import RoleSessions

    class Remote:  # what a Spark Connect session lacks is _jsparkSession
        pass

    sessions = RoleSessions(Remote(), settings)  # type: ignore[arg-type]
    assert sessions.remote and sessions.guarded() == []
    assert isinstance(sessions.get(Role.ADMIN).spark, Remote)
    for role in (Role.ANALYST, Role.CLINICIAN):
        with pytest.raises(QueryError) as info:
            sessions.get(role)
        assert info.value.code is E.PERMISSION_DENIED and "Spark Connect" in info.value.message

