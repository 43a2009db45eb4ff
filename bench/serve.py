"""SQL endpoint benchmark: what the Trino protocol layer costs over Spark itself.

One process builds a small lake, starts the SQL service on loopback over its Spark session,
and measures the same small metadata query (``SHOW TABLES FROM dicom``) two ways: through the
endpoint with the real ``trino`` Python client (in a separate process, so client and server
do not share a GIL), and directly on the same Spark session with the Spark SQL the
translator produced. The two alternate query by query: the JVM keeps getting faster for
minutes after start, and measuring one side first would hand the other the warmer JVM.
``overhead_ms`` is the p50 difference. ``rows_per_second`` streams a
1M-row result through the Python client.

The same query is also sent by an analyst (whose statements run in the analyst's own Spark
session, parsed and checked on Spark's plans first, over the de-identified tables) alternately
with the admin: ``analyst_overhead_ms`` is analyst p50 minus admin p50 through the endpoint,
and ``analyst_rows_per_second`` the analyst's streaming rate.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METADATA_QUERY = "SHOW TABLES FROM dicom"
ROLE_QUERY = "SHOW TABLES"
"""Admin and analyst send the same text; each lists its own session schema (``dicom`` and
``dicom_deid``, the same table names)."""
STREAM_QUERY = "SELECT id, id * 2 AS twice, CAST(id AS VARCHAR) AS s FROM range({rows})"
_PASSWORD = "bench password"

_CLIENT = r"""
import json, sys, time, trino
from trino.auth import BasicAuthentication
port, password, user, schema = sys.argv[1:5]
conn = trino.dbapi.connect(host="127.0.0.1", port=int(port), user=user, http_scheme="http",
                           auth=BasicAuthentication(user, password), allow_insecure_auth=True,
                           catalog="dicomlake", schema=schema)
cur = conn.cursor()
for line in sys.stdin:
    command, count, sql = line.rstrip("\n").split(" ", 2)
    if command == "time":
        times = []
        for _ in range(int(count)):
            t = time.perf_counter(); cur.execute(sql); cur.fetchall()
            times.append((time.perf_counter() - t) * 1000)
        print(json.dumps({"times": times}), flush=True)
    else:
        t = time.perf_counter(); cur.execute(sql); n = 0
        while True:
            rows = cur.fetchmany(int(count))
            if not rows:
                break
            n += len(rows)
        print(json.dumps({"rows": n, "seconds": time.perf_counter() - t}), flush=True)
"""
"""The client process: reads ``time N SQL`` / ``stream BATCH SQL`` lines, answers JSON lines."""

WARMUP = 20
"""Untimed queries on each side first: the JVM keeps compiling for a while after start."""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(*, queries: int = 200, rows: int = 1_000_000) -> dict[str, object]:
    """Run the benchmark and return its result object."""
    from dicomlake.catalog import deid
    from dicomlake.catalog.ingest import ingest
    from dicomlake.catalog.sample import Profile, make_sample
    from dicomlake.catalog.warehouse import Warehouse
    from dicomlake.config import Settings, SparkSettings, load_settings
    from dicomlake.session import build_session
    from dicomlake.sql.query import Limits
    from dicomlake.sql.server import ServerConfig, SqlServer
    from dicomlake.sql.session import ClientSession
    from dicomlake.sql.users import Principal, Role, UserStore

    base = load_settings()
    with tempfile.TemporaryDirectory(prefix="dicomlake-bench-serve-") as tmp:
        home = Path(tmp)
        settings = Settings(home=home, spark=SparkSettings(
            master=base.spark.master, driver_memory=base.spark.driver_memory,
            conf=base.spark.conf))
        spark = build_session(settings, app_name="dicomlake-bench-serve")
        try:
            archives = make_sample(home / "samples", archives=2, files=10, seed=1,
                                   profile=Profile.CTMR, workers=1)
            ingest(spark, Warehouse(settings.warehouse_path), [str(p) for p in archives])
            deid.refresh(settings.warehouse_path, home)
            UserStore(home).add("bench", _PASSWORD, Role.ADMIN)
            UserStore(home).add("analyst", _PASSWORD, Role.ANALYST)
            server = SqlServer(settings, ServerConfig(port=0, limits=Limits(
                max_rows=rows + 1, max_concurrent=2)), spark).start().serve_in_thread()
            try:
                port = server.url.rsplit(":", 1)[1]
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
                plan = server.manager.translator.plan(
                    METADATA_QUERY, ClientSession(catalog="dicomlake", schema="dicom"),
                    Principal("bench", Role.ADMIN))
                direct_sql = plan.spark_sql
                assert direct_sql is not None
                clients = {user: subprocess.Popen(
                    [sys.executable, "-c", _CLIENT, port, _PASSWORD, user, schema], env=env,
                    text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                    for user, schema in (("bench", "dicom"), ("analyst", "dicom_deid"))}
                try:
                    def ask(user: str, line: str) -> dict[str, Any]:
                        proc = clients[user]
                        assert proc.stdin is not None and proc.stdout is not None
                        proc.stdin.write(line + "\n")
                        proc.stdin.flush()
                        answer = proc.stdout.readline()
                        if not answer:
                            raise RuntimeError("the benchmark's trino client process died")
                        return json.loads(answer)

                    ask("bench", f"time {WARMUP} {METADATA_QUERY}")
                    for user in clients:
                        ask(user, f"time {WARMUP} {ROLE_QUERY}")
                    for _ in range(WARMUP):
                        spark.sql(direct_sql).collect()
                    # One query each way, alternately: a single query of this size varies
                    # 100-250 ms on a small machine, and pairing them keeps drift and noise
                    # out of the difference.
                    times, direct, admin, analyst = [], [], [], []
                    for _ in range(queries):
                        times += ask("bench", f"time 1 {METADATA_QUERY}")["times"]
                        started = time.perf_counter()
                        spark.sql(direct_sql).collect()
                        direct.append((time.perf_counter() - started) * 1000)
                        admin += ask("bench", f"time 1 {ROLE_QUERY}")["times"]
                        analyst += ask("analyst", f"time 1 {ROLE_QUERY}")["times"]
                    client = ask("bench", f"stream 10000 {STREAM_QUERY.format(rows=rows)}")
                    analyst_client = ask("analyst",
                                         f"stream 10000 {STREAM_QUERY.format(rows=rows)}")
                finally:
                    for proc in clients.values():
                        assert proc.stdin is not None
                        proc.stdin.close()
                        proc.wait(60)
            finally:
                server.shutdown(stop_spark=False)
        finally:
            spark.stop()
    p50, direct_p50 = statistics.median(times), statistics.median(direct)
    admin_p50, analyst_p50 = statistics.median(admin), statistics.median(analyst)
    return {
        "queries": len(times),
        "query": METADATA_QUERY,
        "p50_ms": round(p50, 2),
        "p95_ms": round(_percentile(times, 0.95), 2),
        "direct_p50_ms": round(direct_p50, 2),
        "overhead_ms": round(p50 - direct_p50, 2),
        "stream_rows": client["rows"],
        "stream_seconds": round(client["seconds"], 3),
        "rows_per_second": round(client["rows"] / client["seconds"]),
        "role_query": ROLE_QUERY,
        "admin_p50_ms": round(admin_p50, 2),
        "analyst_p50_ms": round(analyst_p50, 2),
        "analyst_overhead_ms": round(analyst_p50 - admin_p50, 2),
        "analyst_rows_per_second": round(analyst_client["rows"] / analyst_client["seconds"]),
    }
