"""Helpers shared by the SQL service test modules: a real `dicomlake serve` process and the
real trino client."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trino
from trino.auth import BasicAuthentication

from dicomlake.processes import stop_processes


@contextlib.contextmanager
def serve(home: Path, *args: str) -> Iterator[str]:
    """Run ``dicomlake serve --port 0 ARGS`` on ``home``; yields its base URL, then stops it
    with SIGTERM and checks it exited cleanly."""
    env = {**os.environ, "DICOMLAKE_HOME": str(home), "DICOMLAKE_SPARK_MASTER": "local[2]"}
    exe = Path(sys.executable).parent / "dicomlake"
    log_path = home / "serve.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([str(exe), "serve", *args], env=env, stdout=subprocess.PIPE,
                                stderr=log_file, text=True)
        url = None
        deadline = time.monotonic() + 240
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "listening on" in line:
                url = line.split("listening on", 1)[1].split()[0]
                break
        if url is None:
            proc.kill()
            lines = [x for x in log_path.read_text().splitlines() if " WARN " not in x]
            pytest.fail("dicomlake serve did not start:\n" + "\n".join(lines[-20:]))
        yield url
        stop_processes([proc], timeout=90)
    assert proc.returncode == 0


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def connect(url: str, user: str, password: str, **kwargs) -> trino.dbapi.Connection:
    """A trino DB-API connection with HTTP Basic auth over plain HTTP (loopback)."""
    kwargs.setdefault("catalog", "dicomlake")
    return trino.dbapi.connect(
        host="127.0.0.1", port=port_of(url), user=user, http_scheme="http",
        auth=BasicAuthentication(user, password), allow_insecure_auth=True, **kwargs)


PASSWORDS = {"root": "root password", "doc": "doc password", "ana": "ana password"}
"""Users of :func:`lake_with_users`: an admin, a clinician and an analyst."""


def lake_with_users(home: Path, spark, settings, sample_archives) -> Path:
    """``home`` with the sample archives ingested, de-identified tables refreshed and the
    three :data:`PASSWORDS` users (root admin, doc clinician, ana analyst)."""
    from dicomlake.catalog import deid
    from dicomlake.catalog.ingest import ingest
    from dicomlake.catalog.warehouse import Warehouse
    from dicomlake.sql.users import Role, UserStore

    result = ingest(spark, Warehouse(home / "warehouse"), [str(p) for p in sample_archives])
    assert result.rows_written > 0
    deid.refresh(home / "warehouse", home)
    # ingest bound the shared session's table names to this lake; give them back
    Warehouse(settings.warehouse_path).register(spark)
    store = UserStore(home)
    for user, role in (("root", Role.ADMIN), ("doc", Role.CLINICIAN), ("ana", Role.ANALYST)):
        store.add(user, PASSWORDS[user], role)
    return home
