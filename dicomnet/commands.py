"""``dicomlake dimse``: the lake as a DICOM node (C-ECHO, C-STORE, C-FIND)."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from dicomlake.config import load_settings

_ROLES = ("analyst", "clinician", "admin")


def _trusted(values: tuple[str, ...]) -> dict[str, str]:
    """``NAME=role`` pairs as a dict; the error names the pair and the allowed roles."""
    trusted: dict[str, str] = {}
    for item in values:
        name, sep, role = item.partition("=")
        if not sep or not name.strip() or role.strip().lower() not in _ROLES:
            raise click.BadParameter(f"{item!r} is not NAME=ROLE with ROLE one of "
                                     f"{', '.join(_ROLES)}", param_hint="--trusted-ae")
        trusted[name.strip()] = role.strip().lower()
    return trusted


@click.command()
@click.option("--ae-title", default="DICOMLAKE", show_default=True, envvar="DICOMLAKE_DIMSE_AE",
              help="This node's AE title; peers must call it by this name "
                   "[env DICOMLAKE_DIMSE_AE].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (DIMSE has no passwords: bind another address only on a "
                   "network you trust).")
@click.option("--port", type=int, default=11112, show_default=True,
              envvar="DICOMLAKE_DIMSE_PORT",
              help="TCP port (0 picks a free one) [env DICOMLAKE_DIMSE_PORT].")
@click.option("--trusted-ae", "trusted_ae", multiple=True, metavar="NAME=ROLE",
              help="A calling AE title whose C-FINDs get ROLE (clinician or admin: "
                   "identifying values). Repeatable. Every other peer is answered as an "
                   "analyst (de-identified values, pseudonymous UIDs).")
@click.option("--max-associations", default=10, show_default=True,
              help="Associations served at once; more are rejected (and audited).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info",
              show_default=True,
              help="info: one line per association and per refused instance; debug: one "
                   "per stored instance.")
def dimse(ae_title: str, host: str, port: int, trusted_ae: tuple[str, ...],
          max_associations: int, log_level: str) -> None:
    """Serve the lake to PACS and modalities: C-ECHO, C-STORE and C-FIND.

    Stored instances enter the lake the way browser uploads do: through the upload stream
    when its job runs (Success once the broker confirmed them), else written to disk
    (Success once fsync'd) and ingested and embedded when the association ends.
    """
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_level != "debug":  # pynetdicom logs every PDU and DIMSE message at INFO
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    from dicomlake.dicomnet.dimse import DimseConfig, DimseServer
    from dicomlake.sql.users import Role

    try:
        config = DimseConfig(ae_title=ae_title, host=host, port=port,
                             trusted={k: Role(v) for k, v in _trusted(trusted_ae).items()},
                             max_associations=max_associations)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    settings = load_settings()
    server = DimseServer(settings, config)
    try:
        server.start()
    except OSError as exc:
        raise click.ClickException(str(exc)) from exc
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    bound_host, bound_port = server.address
    click.echo(f"dicomlake DIMSE {config.ae_title} listening on {bound_host}:{bound_port} "
               f"(C-ECHO, C-STORE, C-FIND; lake {settings.home})")
    click.echo(f"  echo:  echoscu -aec {config.ae_title} {bound_host} {bound_port}")
    click.echo(f"  push:  TCP_NODELAY=1 storescu -aec {config.ae_title} {bound_host} "
               f"{bound_port} file.dcm   (a folder: add +sd +r and name the folder)")
    click.echo(f"  find:  findscu -S -aec {config.ae_title} -k QueryRetrieveLevel=STUDY "
               f"-k PatientID=... -k StudyInstanceUID {bound_host} {bound_port}")
    trusted = ", ".join(f"{k}={v}" for k, v in sorted(config.trusted.items())) or "none"
    click.echo(f"  roles: trusted AE titles {trusted}; every other peer sees the "
               "de-identified (analyst) view")
    sys.stdout.flush()
    stop.wait()
    click.echo("shutting down: finishing associations, ingesting what was received, "
               "flushing the audit log", err=True)
    server.shutdown()


COMMANDS = [dimse]
