"""``dicomlake.extension.browse(...)``: the dataset browser in a notebook output.

The kernel never talks to the lake for this: the call returns a small document (the initial
filters) under the MIME type ``application/vnd.dicomlake.browser+json``, and the front end's
renderer draws the browser widget, which queries through the Jupyter server's handlers as the
logged-in user, like the main-area browser does.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

MIME_TYPE = "application/vnd.dicomlake.browser+json"


@dataclass(frozen=True)
class BrowserView:
    """A dataset browser to display; its filters are where the browser starts."""

    modality: str | None = None
    body_part: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    text: str | None = None

    def filters(self) -> dict[str, str]:
        names = {"modality": "modality", "body_part": "bodyPart", "date_from": "dateFrom",
                 "date_to": "dateTo", "text": "text"}
        return {names[k]: v for k, v in asdict(self).items() if v}

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.filters().items()) or "no filters"
        return {MIME_TYPE: {"filters": self.filters()},
                "text/plain": f"dicomlake dataset browser ({shown}); needs JupyterLab with "
                              "the dicomlake extension"}


def _iso(value: str | dt.date | None, name: str) -> str | None:
    if value is None or (isinstance(value, str) and not value):
        return None
    if isinstance(value, dt.date):
        return value.isoformat()
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise ValueError(f"browse: {name} must be a date or 'YYYY-MM-DD', got {value!r}"
                         ) from None


def browse(*, modality: str | None = None, body_part: str | None = None,
           date_from: str | dt.date | None = None, date_to: str | dt.date | None = None,
           text: str | None = None) -> BrowserView:
    """Show the dataset browser in the notebook, starting with these filters.

    ``dicomlake.browse(modality="CT", date_from="2020-01-01")`` as the last expression of a
    cell displays studies > series > instances with thumbnails, a detail view and "find
    similar"; every action shows the SQL it ran.
    """
    return BrowserView(modality=modality or None, body_part=body_part or None,
                       date_from=_iso(date_from, "date_from"), date_to=_iso(date_to, "date_to"),
                       text=text or None)
