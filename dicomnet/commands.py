"""``dicomlake dimse``: the lake as a DICOM node (C-ECHO, C-STORE, C-FIND)."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from dicomlake.config import load_settings
from dicomlake.errors import ConfigError

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
@click.option("--ae-title", default=None,
              help="This node's AE title; peers must call it by this name [default: [dimse] "
                   "ae_title, env DICOMLAKE_DIMSE_AE, else DICOMLAKE].")
@click.option("--host", default=None,
              help="Address to bind (DIMSE has no passwords: bind another address only on a "
                   "network you trust) [default: [dimse] host, else 127.0.0.1].")
@click.option("--port", type=int, default=None,
              help="TCP port, 0 picks a free one [default: [dimse] port, env "
                   "DICOMLAKE_DIMSE_PORT, else 11112].")
@click.option("--trusted-ae", "trusted_ae", multiple=True, metavar="NAME=ROLE",
              help="A calling AE title whose C-FINDs get ROLE (clinician or admin: "
                   "identifying values). Repeatable; replaces the config file's "
                   "[dimse.trusted]. Every other peer is answered as an analyst "
                   "(de-identified values, pseudonymous UIDs).")
@click.option("--max-associations", type=int, default=None,
              help="Associations served at once; more are rejected (and audited) "
                   "[default: [dimse] max_associations, else 10].")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info",
              show_default=True,
              help="info: one line per association and per refused instance; debug: one "
                   "per stored instance.")
def dimse(ae_title: str | None, host: str | None, port: int | None,
          trusted_ae: tuple[str, ...], max_associations: int | None, log_level: str) -> None:
    """Serve the lake to PACS and modalities: C-ECHO, C-STORE and C-FIND.

    Stored instances enter the lake the way browser uploads do: through the upload stream
    when its job runs (Success once the broker confirmed them), else written to disk
    (Success once fsync'd) and ingested and embedded when the association ends. The
    config file's [dimse] section sets the node up; each flag overrides its key.
    """
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_level != "debug":  # pynetdicom logs every PDU and DIMSE message at INFO
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    from dicomlake.dicomnet.dimse import DimseServer, load_dimse

    try:
        settings = load_settings()
        config = load_dimse(settings, ae_title=ae_title, host=host, port=port,
                            trusted=_trusted(trusted_ae) if trusted_ae else None,
                            max_associations=max_associations)
    except ConfigError as exc:  # the file or a variable: not a flag the user just typed
        raise click.ClickException(str(exc)) from exc
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
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
