"""``dicomlake serve`` and ``dicomlake user add|list|remove|passwd``."""

from __future__ import annotations

import json
import logging
import shlex
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import click

from dicomlake.config import Settings, load_settings

if TYPE_CHECKING:
    from dicomlake.sql.certificates import ServerCertificate


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs TLS (--tls auto, or "
                   "--tls-cert/--tls-key).")
@click.option("--port", type=int, default=None,
              help="TCP port (0 picks a free one) [default: 8080; 8443 with TLS, as Trino].")
@click.option("--tls", type=click.Choice(["auto"]), default=None,
              help="auto: serve HTTPS with a self-signed certificate made on the first start "
                   "under <home>/tls/ and reused (renewed when it expires or does not name "
                   "--host); start-up prints its fingerprint and how each client connects. "
                   "The Java trino CLI and JDBC (DBeaver, Tableau) need TLS for passwords.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM certificate chain for HTTPS (your own; not with --tls auto).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM private key for HTTPS (with --tls-cert).")
@click.option("--max-concurrent", default=4, show_default=True,
              help="Queries running at once; more wait as QUEUED.")
@click.option("--timeout", "timeout_seconds", default=600.0, show_default=True,
              help="Per-query time limit in seconds (queue time included).")
@click.option("--max-rows", default=5_000_000, show_default=True,
              help="Largest result a query may return.")
@click.option("--max-concurrent-per-user", type=int, default=None,
              help="Queries one user may run at once [default: half of --max-concurrent].")
@click.option("--public-url", default=None,
              help="URL clients reach this server by (e.g. behind a proxy); nextUri starts "
                   "with it [default: the bound address].")
@click.option("--with-stream", is_flag=True,
              help="Also run the upload stream (broker + Flink job) while serving; it is "
                   "stopped with the server unless it was already running.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info",
              show_default=True,
              help="info: one line per failed statement; debug adds their full stacks.")
def serve(host: str, port: int | None, tls: str | None, tls_cert: Path | None,
          tls_key: Path | None, max_concurrent: int, timeout_seconds: float, max_rows: int,
          max_concurrent_per_user: int | None, public_url: str | None,
          with_stream: bool, log_level: str) -> None:
    """Serve the lake over the Trino protocol (trino CLI, JDBC, Python, BI tools)."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_level != "debug":  # py4j logs every gateway call at INFO/DEBUG
        logging.getLogger("py4j").setLevel(logging.WARNING)
    from dicomlake.console import start_session
    from dicomlake.sql.errors import SqlServiceError
    from dicomlake.sql.query import Limits
    from dicomlake.sql.server import ServerConfig, SqlServer

    if tls == "auto" and (tls_cert is not None or tls_key is not None):
        raise click.UsageError(
            "--tls auto makes and uses its own certificate; give either --tls auto or "
            "--tls-cert with --tls-key, not both")
    settings = load_settings()
    certificate: ServerCertificate | None = None
    if tls == "auto":
        from dicomlake.sql.certificates import ensure_certificate

        public_host = urlsplit(public_url).hostname if public_url else None
        try:
            certificate = ensure_certificate(settings.home, host,
                                             also=[public_host] if public_host else [])
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"--tls auto: cannot make or read the certificate "
                                       f"under {settings.home / 'tls'}: {exc}") from exc
        tls_cert, tls_key = certificate.cert_path, certificate.key_path
    if port is None:
        port = 8443 if tls_cert is not None else 8080
    try:
        config = ServerConfig(host=host, port=port, tls_cert=tls_cert, tls_key=tls_key,
                              public_url=public_url,
                              limits=Limits(max_concurrent=max_concurrent,
                                            max_concurrent_per_user=max_concurrent_per_user,
                                            timeout_seconds=timeout_seconds,
                                            max_rows=max_rows))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    from dicomlake.sql.users import UserStore

    users = UserStore(settings.home).list()
    if not users:
        raise click.ClickException(
            f"no SQL users in {UserStore(settings.home).path}; create one first: "
            "`dicomlake user add admin --role admin`")
    owns_stream = _start_stream(settings) if with_stream else False
    settings, spark = start_session(settings)
    server = SqlServer(settings, config, spark)
    from dicomlake.catalog.errors import DicomlakeError

    try:
        server.start()
    except (SqlServiceError, DicomlakeError, OSError) as exc:  # e.g. an unusable deid key
        spark.stop()
        _stop_stream(settings, owns_stream)
        raise click.ClickException(str(exc)) from exc
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.serve_in_thread()
    if config.tls_cert is not None:
        _echo_certificate(certificate, config.tls_cert)
    click.echo(f"dicomlake SQL listening on {server.url} (catalog dicomlake)", err=False)
    _echo_connection_strings(server.public_url, users[0].name, config.tls_cert)
    click.echo(f"DICOMweb (QIDO-RS, WADO-RS, STOW-RS) at {server.public_url}/dicomweb "
               "(same users; HTTP Basic)")
    click.echo(f"OHIF viewer at {server.public_url}/viewer/ (the browser asks for a dicomlake "
               "user's name and password)")
    sys.stdout.flush()
    stop.wait()
    click.echo("shutting down: cancelling queries, flushing the audit log", err=True)
    server.shutdown(stop_spark=False)
    spark.stop()
    _stop_stream(settings, owns_stream)


def _echo_certificate(made: ServerCertificate | None, cert_path: Path) -> None:
    """Where the certificate is and its fingerprint, so a user can check what a client
    shows before trusting it."""
    from dicomlake.sql.certificates import read_fingerprint

    if made is not None:
        click.echo(f"TLS certificate: {made.reason}; names {', '.join(made.names)}; "
                   f"valid until {made.not_after:%Y-%m-%d}")
        click.echo(f"TLS certificate file (trust it in clients): {made.cert_path}")
        fingerprint = made.fingerprint
    else:
        click.echo(f"TLS certificate file: {cert_path}")
        fingerprint = read_fingerprint(cert_path)
    click.echo(f"SHA-256 fingerprint: {fingerprint}")


def _echo_connection_strings(public_url: str, user: str, cert_path: Path | None) -> None:
    """The exact command or URL for each kind of client, built from the address clients
    use (``--public-url``, else the bound one) and the certificate they should trust.

    Over plain HTTP the Java clients cannot log in at all, so only that is said.
    """
    parts = urlsplit(public_url)
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::"):  # a wildcard bind: remote clients use the machine's name
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    server = f"{parts.scheme}://{host}:{port}"
    if cert_path is None:
        click.echo("plain HTTP: the Java trino CLI and JDBC (DBeaver, Tableau) refuse "
                   "passwords without TLS; start with --tls auto for them. Python: "
                   f"trino.dbapi.connect(host={server!r}, user={user!r}, "
                   "auth=BasicAuthentication(...), allow_insecure_auth=True)")
        return
    cli = f"--user {user} --password --catalog dicomlake --schema dicom_deid"
    jdbc = f"jdbc:trino://{host}:{port}/dicomlake/dicom_deid?SSL=true"
    connect_args = json.dumps({"http_scheme": "https", "verify": str(cert_path)})
    lines = [
        "Connect (password asked for, or from $TRINO_PASSWORD for the CLI):",
        f"  trino CLI   trino-cli --server {server} --truststore-path "
        f"{shlex.quote(str(cert_path))} {cli}",
        f"              trino-cli --server {server} --insecure {cli}",
        f"  JDBC        {jdbc}&SSLTrustStorePath={cert_path}",
        f"              {jdbc}&SSLVerification=NONE",
        f"  SQLAlchemy  trino://{user}:<password>@{host}:{port}/dicomlake/dicom_deid  "
        f"connect_args={connect_args}",
        f"  Python      trino.dbapi.connect(host={host!r}, port={port}, user={user!r}, "
        f"http_scheme='https', verify={str(cert_path)!r}, auth=BasicAuthentication(...))",
    ]
    for line in lines:
        click.echo(line)


def _start_stream(settings: Settings) -> bool:
    """Start the upload stream; True if this call started it (so serve stops it too)."""
    from dicomlake.streaming.runner import StreamError, start

    click.echo("starting the upload stream (broker + Flink job)...", err=True)
    try:
        info = start(settings)
    except (StreamError, RuntimeError) as exc:
        raise click.ClickException(f"--with-stream: {exc}") from exc
    click.echo(f"upload stream {'already running' if info['already_running'] else 'started'}:"
               f" Kafka at {info['bootstrap']}, job pid {info['job_pid']}", err=True)
    return not info["already_running"]


def _stop_stream(settings: Settings, owned: bool) -> None:
    if owned:
        from dicomlake.streaming.runner import stop

        click.echo("stopping the upload stream", err=True)
        stop(settings)


@click.group()
def user() -> None:
    """Manage SQL users (passwords are stored as argon2id hashes in the lake home)."""


def _store() -> object:
    from dicomlake.sql.users import UserStore

    return UserStore(load_settings().home)


@user.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["admin", "clinician", "analyst"]),
              default="analyst", show_default=True,
              help="admin: everything; clinician: queries, sees identifiers; analyst: "
                   "queries on the de-identified dicom_deid tables only.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
def user_add(name: str, role: str, password_stdin: bool) -> None:
    """Create a user."""
    from dicomlake.sql.errors import UserStoreError
    from dicomlake.sql.users import UserStore, parse_role

    store = _store()
    assert isinstance(store, UserStore)
    try:
        store.add(name, _read_password(password_stdin), parse_role(role))
    except UserStoreError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"added user {name} ({role})")


@user.command("list")
def user_list() -> None:
    """List users and their roles."""
    from dicomlake.sql.errors import UserStoreError
    from dicomlake.sql.users import UserStore

    store = _store()
    assert isinstance(store, UserStore)
    try:
        users = store.list()
    except UserStoreError as exc:
        raise click.ClickException(str(exc)) from exc
    if not users:
        click.echo("no users; add one with `dicomlake user add NAME --role admin`")
    for info in users:
        click.echo(f"{info.name:<24} {info.role.value:<10} updated {info.updated}")


@user.command("remove")
@click.argument("name")
def user_remove(name: str) -> None:
    """Delete a user (a running server notices within a request)."""
    from dicomlake.sql.errors import UserStoreError
    from dicomlake.sql.users import UserStore

    store = _store()
    assert isinstance(store, UserStore)
    try:
        store.remove(name)
    except UserStoreError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"removed user {name}")


@user.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the new password from stdin.")
def user_passwd(name: str, password_stdin: bool) -> None:
    """Change a user's password."""
    from dicomlake.sql.errors import UserStoreError
    from dicomlake.sql.users import UserStore

    store = _store()
    assert isinstance(store, UserStore)
    try:
        store.set_password(name, _read_password(password_stdin))
    except UserStoreError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"changed the password of {name}")


COMMANDS = [serve, user]
