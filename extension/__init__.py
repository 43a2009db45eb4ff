"""JupyterLab extension: SQL sidebar and dataset browser over the dicomlake SQL endpoint.

Two halves ship in this package: Jupyter server handlers (:mod:`.handlers`), which talk to the
lake only through the Trino-protocol endpoint as the SQL user the Jupyter user is mapped to,
and the prebuilt JupyterLab front end (TypeScript in ``src/``, built into ``labextension/``
when the package is built). :func:`browse` shows the dataset browser inside a notebook.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicomlake.extension.browse import BrowserView, browse

__all__ = ["BrowserView", "browse"]

LABEXTENSION_NAME = "@dicomlake/jupyterlab"
"""The front end's npm name; also its folder under ``share/jupyter/labextensions``."""


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where a development install finds the built front end (``labextension/``)."""
    return [{"src": "labextension", "dest": LABEXTENSION_NAME}]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """Tell ``jupyter server`` which module holds ``_load_jupyter_server_extension``."""
    return [{"module": "dicomlake.extension"}]


def _load_jupyter_server_extension(server_app: Any) -> None:
    """Register the routes; the lake home comes from dicomlake's own settings."""
    from dicomlake.config import load_settings
    from dicomlake.extension.handlers import setup_handlers

    home = Path(load_settings().home)
    state = setup_handlers(server_app.web_app, home)
    server_app.log.info("dicomlake extension: routes under %sdicomlake/, identities in %s",
                        server_app.web_app.settings["base_url"], state.identities.path)
