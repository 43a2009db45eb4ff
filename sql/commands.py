"""``dicomlake serve`` and ``dicomlake user add|list|remove|passwd``."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click

from dicomlake.config import Settings, load_settings


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs --tls-cert/--tls-key.")
@click.option("--port", default=8080, show_default=True, help="TCP port (0 picks a free one).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM certificate chain for HTTPS.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM private key for HTTPS.")
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
def serve(host: str, port: int, tls_cert: Path | None, tls_key: Path | None,
          max_concurrent: int, timeout_seconds: float, max_rows: int,
          max_concurrent_per_user: int | None, public_url: str | None,
          with_stream: bool) -> None:
    """Serve the lake over the Trino protocol (trino CLI, JDBC, Python, BI tools)."""
    from dicomlake.console import start_session
    from dicomlake.sql.errors import SqlServiceError
    from dicomlake.sql.query import Limits
    from dicomlake.sql.server import ServerConfig, SqlServer

    try:
        config = ServerConfig(host=host, port=port, tls_cert=tls_cert, tls_key=tls_key,
                              public_url=public_url,
                              limits=Limits(max_concurrent=max_concurrent,
                                            max_concurrent_per_user=max_concurrent_per_user,
                                            timeout_seconds=timeout_seconds,
                                            max_rows=max_rows))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    settings = load_settings()
    from dicomlake.sql.users import UserStore

    if not UserStore(settings.home).list():
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
    click.echo(f"dicomlake SQL listening on {server.url} (catalog dicomlake)", err=False)
    sys.stdout.flush()
    stop.wait()
    click.echo("shutting down: cancelling queries, flushing the audit log", err=True)
    server.shutdown(stop_spark=False)
    spark.stop()
    _stop_stream(settings, owns_stream)


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
