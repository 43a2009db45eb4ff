"""SQL from a notebook kernel, as the SQL user JupyterLab's sidebar uses.

The sidebar's "Open in notebook" writes a cell calling :func:`query`: the cell must return the rows
the sidebar showed without asking for a password. A kernel runs in the Jupyter server's
account and environment, so it can read the same server-side identities file
(:mod:`dicomlake.extension.identities`) the server reads for the sidebar, and connect to the
endpoint named there with the ``trino`` DB-API client, as that SQL user. Nothing is written
into the notebook but the SQL.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from dicomlake.extension.identities import ANY_USER, Connection, IdentityMap
from dicomlake.extension.sqlclient import CATALOG, DEFAULT_SCHEMA

if TYPE_CHECKING:
    import pandas as pd
    import trino.dbapi

__all__ = ["connect", "query"]

SOURCE = "dicomlake-notebook"
"""``X-Trino-Source``: the audit log tells notebook queries from sidebar queries."""


def _jupyter_user(jupyter_user: str | None) -> str:
    """The Jupyter user whose mapping applies: given, else JupyterHub's (a hub starts each
    user's server, and so its kernels, with ``JUPYTERHUB_USER``), else the ``"*"`` entry a
    single-user JupyterLab maps everyone with."""
    return jupyter_user or os.environ.get("JUPYTERHUB_USER") or ANY_USER


def connect(*, jupyter_user: str | None = None) -> trino.dbapi.Connection:
    """A ``trino`` DB-API connection to the endpoint, as ``jupyter_user``'s mapped SQL user.

    Raises:
        IdentityError: the identities file has no entry for the user and no ``"*"`` entry.
        ImportError: the ``trino`` client is not installed in the kernel's environment.
    """
    try:
        import trino.dbapi
        from trino.auth import BasicAuthentication
    except ImportError as exc:
        raise ImportError("The trino client is required to query dicomlake from a notebook. "
                          "Install it with `pip install trino`.") from exc
    connection: Connection = IdentityMap().connection_for(_jupyter_user(jupyter_user))
    url = urlsplit(connection.endpoint)
    scheme = url.scheme or "http"
    identity = connection.identity
    return trino.dbapi.connect(
        host=url.hostname or "127.0.0.1", port=url.port or (443 if scheme == "https" else 80),
        http_scheme=scheme, user=identity.sql_user,
        auth=BasicAuthentication(identity.sql_user, identity.password),
        # the sidebar's own requests send the same password over the same URL; refusing it
        # here for plain HTTP (the client's default) would only break loopback set-ups
        allow_insecure_auth=scheme == "http", catalog=CATALOG,
        # unqualified table names resolve where they do in the sidebar
        schema=DEFAULT_SCHEMA, source=SOURCE)


def query(sql: str, *, jupyter_user: str | None = None) -> pd.DataFrame:
    """Run ``sql`` at the dicomlake SQL endpoint and return all its rows as a DataFrame.

    Columns are named as the statement names them; values are the ``trino`` client's Python
    types (``datetime.date``, ``Decimal``, ...). Unlike the sidebar, which buffers at most
    10,000 rows, every row is returned.
    """
    import pandas as pd

    with connect(jupyter_user=jupyter_user) as connection:
        cursor = connection.cursor()
        cursor.execute(sql)
        rows = cursor.fetchall()
        names = [column[0] for column in cursor.description or []]
    return pd.DataFrame.from_records(rows, columns=names)
