"""`dicomlake serve` end to end: a real server process on loopback, real Trino clients.

One server per test module, on a small lake made with the sample + ingest API. Users:
``root`` (admin), ``doc`` (clinician), ``ana`` (analyst).
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
import trino
from _sql_helpers import PASSWORDS, lake_with_users, port_of, serve
from _sql_helpers import connect as connect_as
from trino.auth import BasicAuthentication
from trino.exceptions import HttpError, TrinoQueryError, TrinoUserError

pytestmark = pytest.mark.slow

MAX_ROWS = 150_000


@pytest.fixture(scope="module")
def sql_home(tmp_path_factory, spark, settings, sample_archives) -> Path:
    return lake_with_users(tmp_path_factory.mktemp("sql-home"), spark, settings, sample_archives)


@pytest.fixture(scope="module")
def server(sql_home) -> str:
    """The base URL of a running ``dicomlake serve`` (stopped with SIGTERM afterwards)."""
    with serve(sql_home, "--port", "0", "--max-rows", str(MAX_ROWS), "--timeout", "120",
               "--max-concurrent", "4") as url:
        yield url


_port = port_of


def connect(server: str, user: str, password: str | None = None, **kwargs):
    kwargs.setdefault("schema", "dicom_deid" if user == "ana" else "dicom")
    return connect_as(server, user, password or PASSWORDS[user], **kwargs)


def run(server: str, user: str, sql: str, params=None, **kwargs):
    cursor = connect(server, user, **kwargs).cursor()
    cursor.execute(sql, params)
    rows = cursor.fetchall()
    return rows, cursor


def auth_header(user: str, password: str | None = None) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password or PASSWORDS[user]}".encode()).decode()
    return {"Authorization": f"Basic {token}", "X-Trino-User": user}


# ---- protocol and clients -----------------------------------------------------------------


def test_info_endpoint(server):
    info = requests.get(f"{server}/v1/info", timeout=10).json()
    assert info["coordinator"] is True and "dicomlake" in info["nodeVersion"]["version"]


def test_query_returns_typed_values(server):
    rows, cursor = run(server, "root",
                       "SELECT CAST(1.5 AS DECIMAL(10,2)) d, DATE '2020-01-02' day, "
                       "ARRAY[1.5, 2.5] xs, MAP(ARRAY['a'], ARRAY[1]) m, ROW(1, 'x') r, "
                       "X'00ff' b, 'text' s, true t")
    from datetime import date
    from decimal import Decimal

    assert rows[0][:3] == [Decimal("1.50"), date(2020, 1, 2), [1.5, 2.5]]
    assert rows[0][3] == {"a": 1} and tuple(rows[0][4]) == (1, "x")
    assert rows[0][5:] == [b"\x00\xff", "text", True]
    types = [d[1] for d in cursor.description]
    assert types == ["decimal(10,2)", "date", "array(decimal(2,1))", "map(varchar, integer)",
                     "row(col1 integer, col2 varchar)", "varbinary", "varchar", "boolean"]


def test_lake_tables_and_timestamps(server):
    rows, cursor = run(server, "doc", "SELECT count(*), min(ingested_at), "
                                      "count(DISTINCT modality) FROM instances")
    count, first, modalities = rows[0]
    assert count > 0 and modalities >= 1
    assert first.tzinfo is not None  # Spark TIMESTAMP is an instant: timestamp with time zone
    assert cursor.description[1][1] == "timestamp(6) with time zone"


def test_metadata_statements(server):
    assert run(server, "root", "SHOW CATALOGS")[0] == [["dicomlake"], ["system"]]
    schemas = [r[0] for r in run(server, "root", "SHOW SCHEMAS")[0]]
    assert {"dicom", "information_schema", "system"} <= set(schemas)
    tables = [r[0] for r in run(server, "root", "SHOW TABLES FROM dicom")[0]]
    assert {"instances", "series", "studies", "errors"} <= set(tables)
    assert run(server, "root", "SHOW TABLES LIKE 'ser%'")[0] == [["series"]]
    columns = {r[0]: r[1] for r in run(server, "root", "DESCRIBE instances")[0]}
    assert columns["patient_name"] == "varchar" and columns["study_date"] == "date"
    assert columns["pixel_spacing"] == "array(double)"
    shown = run(server, "root", "SHOW COLUMNS FROM dicomlake.dicom.series")[0]
    assert ["modality", "varchar", "", ""] in shown
    info = run(server, "root", "SELECT data_type FROM information_schema.columns WHERE "
                               "table_schema = 'dicom' AND table_name = 'instances' AND "
                               "column_name = 'rows'")[0]
    assert info == [["integer"]]
    jdbc = run(server, "root", "SELECT table_cat, table_schem, table_name FROM "
                               "system.jdbc.tables WHERE table_name = 'studies' "
                               "ORDER BY table_schem")[0]
    assert jdbc == [["dicomlake", "dicom", "studies"], ["dicomlake", "dicom_deid", "studies"]]
    version = run(server, "root", "SELECT version()")[0][0][0]
    assert version.startswith("476-dicomlake")


def test_sqlalchemy_inspector(server):
    import sqlalchemy as sa

    engine = sa.create_engine(
        f"trino://root:{PASSWORDS['root'].replace(' ', '%20')}@127.0.0.1:{_port(server)}"
        "/dicomlake/dicom",
        connect_args={"http_scheme": "http", "allow_insecure_auth": True})
    inspector = sa.inspect(engine)
    assert "dicom" in inspector.get_schema_names()
    assert {"instances", "series", "studies"} <= set(inspector.get_table_names("dicom"))
    columns = {c["name"]: c for c in inspector.get_columns("instances", "dicom")}
    assert isinstance(columns["patient_name"]["type"], sa.String)
    assert isinstance(columns["rows"]["type"], sa.Integer)
    with engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM studies")).scalar()
        assert n and n > 0
    engine.dispose()


def test_use_changes_the_client_session(server):
    conn = connect(server, "doc", schema=None)
    cursor = conn.cursor()
    with pytest.raises(TrinoUserError) as info:
        cursor.execute("SELECT count(*) FROM series")
        cursor.fetchall()
    assert info.value.error_name == "MISSING_SCHEMA_NAME"
    cursor.execute("USE dicom")
    cursor.fetchall()
    cursor.execute("SELECT count(*) FROM series")
    assert cursor.fetchall()[0][0] > 0
    with pytest.raises(TrinoUserError) as info:
        cursor.execute("USE nosuchschema")
        cursor.fetchall()
    assert info.value.error_name == "SCHEMA_NOT_FOUND"


def test_parameters_both_ways_the_client_sends_them(server):
    rows, _ = run(server, "ana", "SELECT ? + 1, ?, ?", [41, "it's", None])
    assert rows == [[42, "it's", None]]
    legacy = connect(server, "ana", legacy_prepared_statements=True).cursor()
    legacy.execute("SELECT count(*) FROM instances WHERE modality = ?", ["CT"])
    assert legacy.fetchall()[0][0] >= 0
    described = connect(server, "ana").cursor().describe("SELECT modality, rows FROM instances")
    assert [(d.name, d.type) for d in described] == [("modality", "varchar"), ("rows", "integer")]


def test_paging_100k_rows_in_order(server):
    cursor = connect(server, "ana").cursor()
    cursor.execute("SELECT id, id * 2 AS twice, CAST(id AS VARCHAR) AS s FROM range(100000)")
    seen = 0
    while True:
        batch = cursor.fetchmany(7000)
        if not batch:
            break
        for row in batch:
            assert row == [seen, seen * 2, str(seen)]
            seen += 1
    assert seen == 100_000


def test_paging_uses_next_uri_and_rejects_unknown_tokens(server):
    headers = {**auth_header("ana"), "X-Trino-Catalog": "dicomlake", "X-Trino-Schema": "dicom"}
    first = requests.post(f"{server}/v1/statement", data="SELECT id FROM range(100000)",
                          headers=headers, timeout=30).json()
    rows, pages, doc = len(first.get("data", [])), 1, first
    while "nextUri" in doc:
        uri = doc["nextUri"]
        doc = requests.get(uri, headers=headers, timeout=30).json()
        rows += len(doc.get("data", []))
        pages += 1
        if pages == 2:
            again = requests.get(uri, headers=headers, timeout=30).json()  # a retry
            assert again == doc
            base, token = uri.rsplit("/", 1)
            stale = requests.get(f"{base}/{int(token) + 5}", headers=headers, timeout=30)
            assert stale.status_code == 404 and "follow nextUri" in stale.json()["message"]
    assert rows == 100_000 and pages > 2 and doc["stats"]["state"] == "FINISHED"
    unknown = requests.get(f"{server}/v1/statement/executing/20200101_000000_00000_xxxxx/"
                           "slug/1", headers=headers, timeout=30)
    assert unknown.status_code == 404


def test_row_cap_fails_the_query(server):
    cursor = connect(server, "ana").cursor()
    with pytest.raises(TrinoQueryError) as info:
        cursor.execute(f"SELECT id FROM range({MAX_ROWS + 1000})")
        cursor.fetchall()
    assert info.value.error_type == "INSUFFICIENT_RESOURCES"
    assert f"limit of {MAX_ROWS} rows" in info.value.message


SLOW_SQL = "SELECT count(*) FROM range(0, 200000000000, 1, 2) WHERE id % 7 = 3"


def _start(server, sql=SLOW_SQL, user="root"):
    headers = auth_header(user)
    return requests.post(f"{server}/v1/statement", data=sql, headers=headers,
                         timeout=30).json(), headers


def _query_info(server, query_id, headers):
    return requests.get(f"{server}/v1/query/{query_id}", headers=headers, timeout=30).json()


def test_cancel_really_stops_the_spark_job(server):
    doc, headers = _start(server)
    deadline = time.monotonic() + 60
    while "RUNNING" not in _query_info(server, doc["id"], headers)["sparkJobs"]:
        assert time.monotonic() < deadline, "the Spark job never started"
        time.sleep(0.2)
    response = requests.delete(doc["nextUri"], headers=headers, timeout=30)
    assert response.status_code == 204
    deadline = time.monotonic() + 30
    while True:
        info = _query_info(server, doc["id"], headers)
        if "RUNNING" not in info["sparkJobs"]:
            break
        assert time.monotonic() < deadline, f"Spark job still running: {info}"
        time.sleep(0.2)
    assert info["state"] == "FAILED" and info["failureInfo"]["errorName"] == "USER_CANCELED"
    assert info["sparkJobs"] and set(info["sparkJobs"]) <= {"FAILED"}


def test_dbapi_cancel(server):
    cursor = connect(server, "root").cursor()
    done = threading.Event()
    errors: list[Exception] = []

    def work():
        try:
            cursor.execute(SLOW_SQL)
            cursor.fetchall()
        except Exception as exc:
            errors.append(exc)
        done.set()

    threading.Thread(target=work, daemon=True).start()
    time.sleep(2)
    cursor.cancel()
    assert done.wait(30)
    assert errors  # the fetch ends with the cancellation instead of a result


def test_timeout_from_session_property(server):
    conn = connect(server, "ana", session_properties={"query_max_run_time": "2s"})
    cursor = conn.cursor()
    started = time.monotonic()
    with pytest.raises(TrinoQueryError) as info:
        cursor.execute(SLOW_SQL)
        cursor.fetchall()
    assert info.value.error_name == "EXCEEDED_TIME_LIMIT", info.value.message
    assert time.monotonic() - started < 30


def test_queued_state_when_all_slots_are_busy(server):
    started = [_start(server) for _ in range(5)]  # 4 slots
    try:
        states = {doc["stats"]["state"] for doc, _ in started}
        assert "QUEUED" in states
    finally:
        for doc, headers in started:
            requests.delete(doc["nextUri"], headers=headers, timeout=30)


# ---- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(("sql", "name", "line", "column"), [
    ("SELECT 1 FROM", "SYNTAX_ERROR", 1, None),
    ("SELECT *\nFROM nope", "TABLE_NOT_FOUND", 2, 6),
    ("SELECT * FROM other.dicom.instances", "CATALOG_NOT_FOUND", 1, 15),
    ("SELECT no_such_column FROM series", "COLUMN_NOT_FOUND", 1, 8),
    ("SELECT no_such_function(1)", "FUNCTION_NOT_FOUND", None, None),
    ("SELECT 1 / 0", "DIVISION_BY_ZERO", None, None),
    ("SELECT CAST('x' AS INTEGER)", "INVALID_CAST_ARGUMENT", None, None),
    ("SELECT 9223372036854775807 + 1", "NUMERIC_VALUE_OUT_OF_RANGE", None, None),
])
def test_error_paths(server, sql, name, line, column):
    cursor = connect(server, "doc").cursor()
    with pytest.raises(TrinoUserError) as info:
        cursor.execute(sql)
        cursor.fetchall()
    assert info.value.error_name == name, info.value.message
    assert info.value.error_type == "USER_ERROR"
    if line is not None:
        assert info.value.error_location[0] == line
    if column is not None:
        assert info.value.error_location[1] == column
    assert "__dl_" not in info.value.message


# ---- users and roles ----------------------------------------------------------------------


def test_wrong_password_and_missing_user_are_refused(server):
    with pytest.raises(HttpError, match="401"):
        run(server, "ana", "SELECT 1", password="not the password")
    with pytest.raises(HttpError, match="401"):
        cursor = trino.dbapi.connect(host="127.0.0.1", port=_port(server), user="ghost",
                                     auth=BasicAuthentication("ghost", "whatever pw"),
                                     http_scheme="http", allow_insecure_auth=True).cursor()
        cursor.execute("SELECT 1")
    anonymous = requests.post(f"{server}/v1/statement", data="SELECT 1",
                              headers={"X-Trino-User": "root"}, timeout=10)
    assert anonymous.status_code == 401 and "Basic" in anonymous.headers["WWW-Authenticate"]
    spoof = requests.post(f"{server}/v1/statement", data="SELECT 1",
                          headers={**auth_header("ana"), "X-Trino-User": "root"}, timeout=10)
    assert spoof.status_code == 403


def _all_text(rows) -> str:
    return json.dumps(rows, default=str)


def test_analyst_never_sees_patient_names_or_ids(server):
    real, _ = run(server, "doc", "SELECT patient_name, patient_id FROM instances")
    names = {r[0] for r in real if r[0]} | {r[1] for r in real if r[1]}
    assert names, "the sample must have identifying values to hide"
    name_parts = {part for n in names for part in n.replace("^", " ").split() if len(part) > 3}
    queries = [
        "SELECT * FROM instances",
        "SELECT * FROM studies",
        "SELECT * FROM series",
        "SELECT * FROM errors",
        "SELECT upper(patient_name), lower(patient_id), concat(patient_name, '|') FROM instances",
        "SELECT json_extract_scalar(meta, '$[\"00100010\"].Value[0].Alphabetic'), meta "
        "FROM dicomlake.dicom_deid.instances",
        "SELECT i.patient_name FROM instances i JOIN studies s "
        "ON i.study_instance_uid = s.study_instance_uid",
        "WITH x AS (SELECT patient_id FROM instances) SELECT * FROM x",
    ]
    for sql in queries:
        rows, _ = run(server, "ana", sql)
        assert rows, sql
        text = _all_text(rows)
        for value in names | name_parts:
            assert value not in text, f"{value!r} leaked through {sql!r}"
    masked, _ = run(server, "ana", "SELECT DISTINCT patient_name FROM instances")
    assert all(r[0].startswith("anon-") for r in masked if r[0])
    # pseudonyms are consistent, so analysts still count and join patients and studies
    for sql in ("SELECT count(*), count(DISTINCT patient_id), count(DISTINCT study_instance_uid) "
                "FROM instances",
                "SELECT count(*) FROM instances i JOIN studies s USING (study_instance_uid) "
                "JOIN series r USING (series_instance_uid)"):
        assert run(server, "doc", sql)[0] == run(server, "ana", sql)[0], sql
    with pytest.raises(TrinoUserError, match="analysts read the de-identified tables"):
        run(server, "ana", "SELECT * FROM dicom.instances")


def test_clinician_sees_identifiers_and_admin_sees_the_same(server):
    doc, _ = run(server, "doc", "SELECT patient_name FROM instances ORDER BY path")
    root, _ = run(server, "root", "SELECT patient_name FROM instances ORDER BY path")
    assert doc == root and not any(str(r[0]).startswith("anon-") for r in doc if r[0])


@pytest.mark.parametrize("user", ["ana", "doc"])
def test_non_admins_are_read_only(server, user):
    for sql in ("CREATE TABLE dicom.t (a INTEGER)", "DROP TABLE dicom.instances",
                "INSERT INTO dicom.series SELECT * FROM dicom.series",
                "SET spark.sql.shuffle.partitions = 1",
                "SELECT reflect('java.lang.System', 'getenv', 'HOME')",
                "SELECT * FROM read_files('/etc')"):
        with pytest.raises(TrinoUserError) as info:
            run(server, user, sql)
        assert info.value.error_name == "PERMISSION_DENIED", sql
    with pytest.raises(TrinoUserError) as info:
        run(server, user, "SELECT * FROM system.audit_log")
    assert info.value.error_name == "TABLE_NOT_FOUND"
    schemas = [r[0] for r in run(server, user, "SHOW SCHEMAS")[0]]
    assert "system" not in schemas


def test_admin_ddl(server):
    run(server, "root", "CREATE TABLE IF NOT EXISTS default.scratch (a INT) USING parquet")
    tables = [r[0] for r in run(server, "root", "SHOW TABLES FROM default")[0]]
    assert "scratch" in tables
    run(server, "root", "DROP TABLE default.scratch")


# ---- malformed requests -------------------------------------------------------------------


def test_malformed_requests_get_clear_http_errors(server):
    headers = auth_header("ana")
    bad_utf8 = requests.post(f"{server}/v1/statement", data=b"SELECT '\xff\xfe'",
                             headers=headers, timeout=10)
    assert bad_utf8.status_code == 400 and "UTF-8" in bad_utf8.json()["message"]
    json_body = requests.post(f"{server}/v1/statement", data='{"query": "SELECT 1"',
                              headers={**headers, "Content-Type": "application/json"},
                              timeout=10).json()
    assert json_body["error"]["errorName"] == "SYNTAX_ERROR"
    bad_session = requests.post(f"{server}/v1/statement", data="SELECT 1",
                                headers={**headers, "X-Trino-Session": "novalue"}, timeout=10)
    assert bad_session.status_code == 400 and "name=value" in bad_session.json()["message"]
    huge = requests.post(f"{server}/v1/statement", data="SELECT 1",
                         headers={**headers, "X-Trino-Client-Info": "x" * 70000}, timeout=10)
    assert huge.status_code == 431
    missing = requests.get(f"{server}/v1/nothing", headers=headers, timeout=10)
    assert missing.status_code == 404
    empty = requests.post(f"{server}/v1/statement", data="", headers=headers, timeout=10).json()
    assert empty["error"]["errorName"] == "SYNTAX_ERROR"
    # the server is still healthy afterwards
    assert run(server, "ana", "SELECT 1")[0] == [[1]]


# ---- concurrency and audit ----------------------------------------------------------------


def test_twenty_concurrent_clients(server):
    results: dict[int, object] = {}

    def client(i: int) -> None:
        user = ("root", "doc", "ana")[i % 3]
        try:
            rows, _ = run(server, user, f"SELECT {i} AS n, count(*) FROM range({1000 + i})")
            results[i] = rows
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == list(range(20))
    for i, rows in results.items():
        assert rows == [[i, 1000 + i]], rows


def test_audit_log_records_statements_and_failed_logins(server):
    marker = f"audit-marker-{time.time_ns()}"
    run(server, "ana", f"SELECT '{marker}'")
    with pytest.raises(TrinoUserError):
        run(server, "ana", f"SELECT '{marker}' FROM nope")
    with pytest.raises(HttpError):
        run(server, "doc", "SELECT 1", password="bad password")
    rows, _ = run(server, "root", "SELECT user, role, state, rows, error_name, event "
                                  f"FROM system.audit_log WHERE sql LIKE '%{marker}%' "
                                  "AND sql NOT LIKE '%audit_log%' ORDER BY started_at")
    assert rows == [["ana", "analyst", "FINISHED", 1, None, "query"],
                    ["ana", "analyst", "FAILED", 0, "TABLE_NOT_FOUND", "query"]]
    failed, _ = run(server, "root", "SELECT count(*) FROM system.audit_log "
                                    "WHERE event = 'login_failed' AND user = 'doc'")
    assert failed[0][0] >= 1


def test_audit_log_keeps_the_hash_of_a_queried_image_not_its_bytes(server):
    """A user's own image given as a binary literal (image_knn(query_image => X'...')) leaves
    its size and hash in the audit log, never bytes enough to rebuild it."""
    image = hashlib.sha256(str(time.time_ns()).encode()).digest() * 8  # 256 bytes
    run(server, "ana", f"SELECT length(X'{image.hex()}')")
    rows, _ = run(server, "root", "SELECT sql FROM system.audit_log "
                                  f"WHERE sql LIKE '%{hashlib.sha256(image).hexdigest()}%'")
    assert len(rows) == 1
    assert "256 bytes" in rows[0][0] and image.hex()[16:48] not in rows[0][0]


def test_redaction_leaves_short_literals_and_other_text_alone():
    from dicomlake.sql.audit import redact_binary_literals

    short = "SELECT X'00ff', 'a' || x'41'"
    assert redact_binary_literals(short) == short
    long = "ab" * 40
    out = redact_binary_literals(f"EXECUTE s USING x'{long}', 7")
    assert out is not None and long not in out and out.startswith("EXECUTE s USING X'abababab")
    assert out.endswith(", 7") and "40 bytes" in out


def test_started_server_that_never_served_shuts_down(sql_home, spark, settings):
    """Embedding code (benchmarks, notebooks) may start() a server and stop it without ever
    serving; shutdown must not wait for a serve loop that never ran (it used to hang)."""
    from dicomlake.catalog.warehouse import Warehouse
    from dicomlake.config import Settings
    from dicomlake.sql.server import ServerConfig, SqlServer

    server = SqlServer(Settings(home=sql_home, spark=settings.spark), ServerConfig(port=0),
                       spark).start()
    done = threading.Event()
    stopper = threading.Thread(
        target=lambda: (server.shutdown(stop_spark=False), done.set()), daemon=True)
    stopper.start()
    stopper.join(60)
    Warehouse(settings.warehouse_path).register(spark)
    assert done.is_set(), "SqlServer.shutdown() hung waiting for serve_forever"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_end_to_end(sql_home, spark, settings, tmp_path, monkeypatch):
    """With a certificate the endpoint speaks HTTPS: the trino client verifies it and logs
    in; a plain-HTTP request to the TLS port gets no answer."""
    # requests lets these variables override a session's own CA file (psf/requests#3829)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    from dicomlake.catalog.warehouse import Warehouse
    from dicomlake.config import Settings
    from dicomlake.sql.server import ServerConfig, SqlServer

    cert, key = _self_signed(tmp_path)
    server = SqlServer(Settings(home=sql_home, spark=settings.spark),
                       ServerConfig(port=0, tls_cert=cert, tls_key=key), spark)
    server.start().serve_in_thread()
    silent = None
    try:
        assert server.url.startswith("https://127.0.0.1:")
        # a client that connects and never handshakes must not hold up the others
        silent = socket.create_connection(("127.0.0.1", _port(server.url)))
        conn = trino.dbapi.connect(
            host="127.0.0.1", port=_port(server.url), user="doc", http_scheme="https",
            auth=BasicAuthentication("doc", PASSWORDS["doc"]), verify=str(cert),
            catalog="dicomlake", schema="dicom")
        cursor = conn.cursor()
        cursor.execute("SELECT count(*) FROM instances WHERE modality = 'CT'")
        assert cursor.fetchall()[0][0] > 0
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{_port(server.url)}/v1/info", timeout=10)
        with pytest.raises(requests.exceptions.SSLError):  # an unknown certificate is refused
            requests.get(f"{server.url}/v1/info", timeout=10)
    finally:
        if silent is not None:
            silent.close()
        server.shutdown(stop_spark=False)
        Warehouse(settings.warehouse_path).register(spark)
