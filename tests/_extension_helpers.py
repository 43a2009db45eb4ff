"""Real servers for the extension tests: a small embedded lake, ``dicomlake serve``, and
``jupyter lab`` with the dicomlake extension, started once per run and stopped at its end.

The handler tests (HTTP) and the browser tests (Chromium) share them: each costs a Spark or
Jupyter start, and the machine has two cores.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from dicomlake.processes import stop_processes

SQL_USER, SQL_PASSWORD = "lab", "lab password 1"
ADMIN_USER, ADMIN_PASSWORD = "root", "root password 1"
BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "extension"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


@contextmanager
def chromium_page(console_log: Path | None = None, **context_options: Any) -> Iterator[Any]:
    """A Playwright page in Debian's Chromium (the test tools' own browser downloads fail
    here), 1600x1000, 3-minute timeouts; the console goes to ``console_log`` at the end."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Debian's chromium is not installed at {CHROMIUM}; run `make debian-tools`")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        context = browser.new_context(viewport={"width": 1600, "height": 1000},
                                      **context_options)
        page = context.new_page()
        page.set_default_timeout(180_000)
        messages: list[str] = []
        page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
        try:
            yield page
        finally:
            if console_log is not None:
                console_log.parent.mkdir(parents=True, exist_ok=True)
                console_log.write_text("\n".join(messages))
            context.close()
            browser.close()


@contextmanager
def lab_page(servers: LabServers, console_log: Path | None = None) -> Iterator[Any]:
    """JupyterLab opened in Chromium on a reset workspace (the lab server outlives a test
    module; panels an earlier module left open must not be restored, hidden, behind this
    module's), its main dock panel shown."""
    with chromium_page(console_log) as page:
        page.goto(f"{servers.lab_url}/lab?reset&token={servers.token}")
        page.wait_for_selector("#jp-main-dock-panel")
        yield page


@dataclass
class LabServers:
    """Where the servers listen and the lake they share."""

    home: Path
    sql_url: str
    lab_url: str
    token: str
    identities: Path
    notebooks: Path | None = None

    def api(self, path: str) -> str:
        return f"{self.lab_url}/dicomlake/{path}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def map_identity(self, users: dict[str, dict[str, object]]) -> None:
        """Rewrite the identities file (the extension re-reads it on change)."""
        doc = {"endpoint": self.sql_url, "users": users}
        tmp = self.identities.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.identities)
        # mtime resolution: make sure the next change is seen as a change
        time.sleep(0.05)

    def default_identity(self) -> None:
        self.map_identity({"*": {"sql_user": SQL_USER, "password": SQL_PASSWORD,
                                 "upload": True}})


_SHARED: dict[str, LabServers] = {}
_PROCS: list[subprocess.Popen] = []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_all() -> None:
    stop_processes(_PROCS, timeout=60)
    _PROCS.clear()
    _SHARED.clear()


def _build_lake(spark, settings, sample_archives, home: Path) -> None:
    """Ingest the run's sample archives into ``home`` and embed them (shared session)."""
    from dicomlake.catalog.ingest import ingest
    from dicomlake.catalog.warehouse import Warehouse
    from dicomlake.config import Settings
    from dicomlake.sql.users import Role, UserStore
    from dicomlake.udfs import register_functions
    from dicomlake.udfs.pipeline import embed
    from dicomlake.udfs.settings import load_similarity

    lake = Settings(home=home)
    result = ingest(spark, Warehouse(lake.warehouse_path), [str(p) for p in sample_archives])
    assert result.rows_written > 0
    try:
        similarity = load_similarity(lake)
        register_functions(spark, lake, similarity)
        assert embed(spark, lake, similarity).embeddings > 0
    finally:
        # the shared session serves other modules: give it its own lake back
        Warehouse(settings.warehouse_path).register(spark)
        register_functions(spark, settings)
    store = UserStore(home)
    store.add(SQL_USER, SQL_PASSWORD, Role.CLINICIAN)
    store.add(ADMIN_USER, ADMIN_PASSWORD, Role.ADMIN)


def _start_serve(home: Path) -> str:
    env = {**os.environ, "DICOMLAKE_HOME": str(home), "DICOMLAKE_SPARK_MASTER": "local[2]"}
    proc = subprocess.Popen([str(BIN / "dicomlake"), "serve", "--port", "0", "--timeout", "300"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    _PROCS.append(proc)
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "listening on" in line:
            return line.split("listening on", 1)[1].split()[0]
    pytest.fail("dicomlake serve did not start")


def _start_lab(home: Path, tmp: Path) -> tuple[str, str]:
    token = secrets.token_hex(16)
    port = _free_port()
    for sub in ("notebooks", "config", "runtime", "workspaces"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    # no "get Jupyter news?" prompt over the screenshots (and no network call for it)
    news = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True, exist_ok=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env = {**os.environ, "DICOMLAKE_HOME": str(home),
           "JUPYTER_CONFIG_DIR": str(tmp / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp / "runtime")}
    log = open(tmp / "jupyter.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "jupyter"), "lab", "--no-browser", "--allow-root", f"--ServerApp.port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={tmp / 'notebooks'}",
         f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
         f"--LabApp.user_settings_dir={tmp / 'settings'}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class="
         "jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    _PROCS.append(proc)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jupyter lab exited: {(tmp / 'jupyter.log').read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/api/status", params={"token": token}, timeout=5).ok:
                return url, token
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    pytest.fail("jupyter lab did not start")


def lab_servers(request, spark, settings, sample_archives, tmp_path_factory) -> LabServers:
    """The run's lake and servers (made by the first module that asks)."""
    if "servers" in _SHARED:
        return _SHARED["servers"]
    home = tmp_path_factory.mktemp("lab-home")
    _build_lake(spark, settings, sample_archives, home)
    request.config.add_cleanup(_stop_all)
    sql_url = _start_serve(home)
    identities = home / "jupyter" / "identities.json"
    identities.parent.mkdir(parents=True, exist_ok=True)
    servers = LabServers(home=home, sql_url=sql_url, lab_url="", token="",
                         identities=identities)
    servers.default_identity()
    lab_dir = tmp_path_factory.mktemp("lab")
    servers.lab_url, servers.token = _start_lab(home, lab_dir)
    servers.notebooks = lab_dir / "notebooks"
    _SHARED["servers"] = servers
    return servers
