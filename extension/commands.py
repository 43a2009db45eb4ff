"""``dicomlake lab`` and ``dicomlake jupyter map``: JupyterLab on the lake."""

from __future__ import annotations

import sys

import click

from dicomlake.config import load_settings


@click.command()
@click.option("--sql-port", default=8080, show_default=True,
              help="Port of the SQL service (started unless it already answers).")
@click.option("--port", "lab_port", default=8888, show_default=True, help="JupyterLab port.")
@click.option("--no-browser", is_flag=True, help="Do not open a web browser.")
def lab(sql_port: int, lab_port: int, no_browser: bool) -> None:
    """Start the SQL service and JupyterLab with the dicomlake sidebar and browser."""
    from dicomlake.extension.lab import run_lab

    sys.exit(run_lab(load_settings(), sql_port=sql_port, lab_port=lab_port,
                     open_browser=not no_browser))


@click.group()
def jupyter() -> None:
    """Map Jupyter users to dicomlake SQL users (credentials stay on the server)."""


@jupyter.command("map")
@click.argument("jupyter_user")
@click.option("--sql-user", required=True, help="The dicomlake SQL user to act as.")
@click.option("--password-stdin", is_flag=True, help="Read the SQL user's password from stdin.")
@click.option("--endpoint", default=None, help="SQL endpoint URL (e.g. http://127.0.0.1:8080).")
@click.option("--upload/--no-upload", default=False, show_default=True,
              help="May this user add files to the lake from the browser.")
def jupyter_map(jupyter_user: str, sql_user: str, password_stdin: bool, endpoint: str | None,
                upload: bool) -> None:
    """Let JUPYTER_USER ('*' for everyone) query the lake as SQL user --sql-user."""
    from dicomlake.extension.identities import Identity, identities_path, write_identity

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = str(click.prompt("Password of the SQL user", hide_input=True))
    path = identities_path()
    write_identity(path, jupyter_user, Identity(sql_user, password, upload), endpoint=endpoint)
    click.echo(f"Jupyter user {jupyter_user!r} -> SQL user {sql_user!r} "
               f"(upload {'allowed' if upload else 'not allowed'}); written to {path}")


COMMANDS = [lab, jupyter]
