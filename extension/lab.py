"""``dicomlake lab``: the SQL service and JupyterLab with the extension, on one lake.

What a new user needs after ``make demo`` is JupyterLab with the sidebar working, so this
prepares the missing pieces and then runs both servers until Ctrl-C:

1. a SQL user for JupyterLab (``jupyter``, role clinician, random password) mapped to every
   Jupyter user in the server-side identities file, unless a ``"*"`` mapping exists already;
2. ``dicomlake serve`` on loopback, unless the endpoint already answers;
3. ``jupyter lab`` with ``DICOMLAKE_HOME`` set and a starter notebook in ``<home>/notebooks``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import click

from dicomlake.extension.identities import ANY_USER, Identity, IdentityMap, write_identity
from dicomlake.processes import stop_processes

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from dicomlake.config import Settings

LAB_SQL_USER = "jupyter"
"""The SQL user ``dicomlake lab`` creates for JupyterLab when nobody mapped one."""

STARTER_NOTEBOOK = {
    "cells": [
        {"cell_type": "markdown", "metadata": {}, "source": [
            "# dicomlake\n",
            "The **dicomlake SQL** sidebar (left) runs SQL against the lake; the dataset "
            "browser (dicomlake menu, or the cell below) shows studies, series and images "
            "and finds similar images. Every action shows its SQL."]},
        {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
         "source": ["import dicomlake\n", "dicomlake.browse(modality=\"CT\")"]},
    ],
    "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                "name": "python3"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def endpoint_alive(endpoint: str) -> bool:
    """True if a Trino-protocol endpoint answers ``/v1/info``."""
    try:
        with urllib.request.urlopen(f"{endpoint}/v1/info", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def ensure_identity(settings: Settings, endpoint: str) -> Identity:
    """The ``"*"`` mapping, creating the ``jupyter`` SQL user for it when missing."""
    from dicomlake.sql.users import Role, UserStore

    identities = IdentityMap()
    try:
        return identities.connection_for(ANY_USER).identity
    except Exception:
        pass
    store = UserStore(settings.home)
    password = secrets.token_urlsafe(24)
    if any(u.name == LAB_SQL_USER for u in store.list()):
        store.set_password(LAB_SQL_USER, password)
    else:
        store.add(LAB_SQL_USER, password, Role.CLINICIAN)
    identity = Identity(LAB_SQL_USER, password, upload=True)
    write_identity(identities.path, ANY_USER, identity, endpoint=endpoint)
    click.echo(f"created SQL user '{LAB_SQL_USER}' (clinician) for JupyterLab; mapping in "
               f"{identities.path}")
    return identity


def embed_new_images(spark: SparkSession, settings: Settings) -> None:
    """Embed images not embedded yet, so "find similar" works (skipped without the extra)."""
    try:
        from dicomlake.udfs.pipeline import embed
        from dicomlake.udfs.settings import load_similarity
    except ImportError as exc:
        click.echo(f"similarity search unavailable ({exc}); 'find similar' will fail",
                   err=True)
        return
    click.echo("embedding new images for 'find similar' ...", err=True)
    result = embed(spark, settings, load_similarity(settings))
    click.echo(f"embedded {result.instances} new images ({result.codes_written} PQ codes)",
               err=True)


def _wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float) -> str | None:
    """The first output line containing ``needle`` (None if the process ended or timed out)."""
    found: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            if needle in line and not found:
                found.append(line.strip())
                done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    done.wait(timeout)
    return found[0] if found else None


def run_lab(settings: Settings, *, sql_port: int = 8080, lab_port: int = 8888,
            open_browser: bool = True) -> int:
    """Start (or reuse) ``dicomlake serve`` and run ``jupyter lab`` until interrupted."""
    env = {**os.environ, "DICOMLAKE_HOME": str(settings.home)}
    identities = IdentityMap()
    endpoint = identities.endpoint if identities.path.exists() else \
        f"http://127.0.0.1:{sql_port}"
    identity = ensure_identity(settings, endpoint)
    endpoint = IdentityMap().endpoint
    children: list[subprocess.Popen[str]] = []
    exe = Path(sys.executable).parent
    try:
        if endpoint_alive(endpoint):
            click.echo(f"using the running SQL service at {endpoint}")
        else:
            port = endpoint.rsplit(":", 1)[-1].split("/", 1)[0]
            click.echo(f"starting dicomlake serve on {endpoint} ...")
            serve = subprocess.Popen([str(exe / "dicomlake"), "serve", "--port", port], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
            children.append(serve)
            if _wait_for_line(serve, "listening on", 300) is None:
                raise click.ClickException("dicomlake serve did not start; see its output "
                                           "above")
        notebooks = settings.home / "notebooks"
        notebooks.mkdir(parents=True, exist_ok=True)
        starter = notebooks / "dicomlake.ipynb"
        if not starter.exists():
            starter.write_text(json.dumps(STARTER_NOTEBOOK, indent=1))
        click.echo(f"starting JupyterLab on port {lab_port}; SQL user {identity.sql_user}; "
                   "Ctrl-C stops both")
        lab = subprocess.Popen(
            [str(exe / "jupyter"), "lab", f"--ServerApp.root_dir={notebooks}",
             f"--ServerApp.port={lab_port}", "--ServerApp.ip=127.0.0.1",
             *([] if open_browser else ["--no-browser"]),
             # Jupyter refuses root unless told; containers often run the demo as root
             *(["--allow-root"] if os.geteuid() == 0 else []), "dicomlake.ipynb"],
            env=env, text=True, cwd=notebooks)
        children.append(lab)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            ended = [child for child in children if child.poll() is not None]
            if ended:
                name = "jupyter lab" if ended[0] is lab else "dicomlake serve"
                click.echo(f"{name} exited with code {ended[0].returncode}; stopping", err=True)
                return ended[0].returncode or 1
        return 0
    finally:
        stop_processes(children, timeout=30)
