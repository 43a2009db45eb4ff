"""The client session: what a Trino client sends in headers and what we ask it to change.

The Trino protocol keeps no server-side session: every request carries the user, catalog,
schema, session properties and prepared statements in ``X-Trino-*`` headers, and a statement
that changes them (``USE``, ``SET SESSION``, ``PREPARE``) answers with ``X-Trino-Set-*`` /
``X-Trino-Added-Prepare`` headers the client applies to its next requests.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from dicomlake.sql import errors as E
from dicomlake.sql.errors import QueryError

SESSION_PROPERTIES: dict[str, str] = {
    "query_max_run_time": "Per-query time limit such as '30s' or '5m' (lowered, never raised "
                          "above the server's limit for non-admins).",
}
"""Session properties the service understands (others are refused, as Trino does)."""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in a Trino duration ('30s', '5m', '1.5h')."""
    match = _DURATION.match(text)
    if not match:
        raise QueryError(E.INVALID_SESSION_PROPERTY,
                         f"'{text}' is not a duration; use a number with ms, s, m, h or d")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class ClientSession:
    """Session state as sent by the client on one request."""

    user: str | None = None
    catalog: str | None = None
    schema: str | None = None
    source: str | None = None
    time_zone: str | None = None
    properties: dict[str, str] = field(default_factory=dict)
    prepared: dict[str, str] = field(default_factory=dict)
    transaction_id: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> ClientSession:
        """Parse ``X-Trino-*`` (and legacy ``X-Presto-*``) headers.

        Raises:
            QueryError: a session or prepared-statement header is malformed.
        """
        def get(name: str) -> str | None:
            value = headers.get(f"X-Trino-{name}") or headers.get(f"X-Presto-{name}")
            return value.strip() if value else None

        return cls(
            user=get("User"),
            catalog=(get("Catalog") or None),
            schema=(get("Schema") or None),
            source=get("Source"),
            time_zone=get("Time-Zone"),
            properties=_pairs(get("Session"), "X-Trino-Session", urllib.parse.unquote),
            prepared=_pairs(get("Prepared-Statement"), "X-Trino-Prepared-Statement",
                            urllib.parse.unquote_plus),
            transaction_id=None if get("Transaction-Id") in (None, "NONE")
            else get("Transaction-Id"),
        )


def _pairs(value: str | None, header: str,
           unquote: object) -> dict[str, str]:
    if not value:
        return {}
    out: dict[str, str] = {}
    for item in value.split(","):
        if not item.strip():
            continue
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise QueryError(E.GENERIC_USER_ERROR,
                             f"Invalid {header} header item {item.strip()!r}; expected "
                             "name=value")
        out[name.strip()] = unquote(raw.strip())  # type: ignore[operator]
    return out


@dataclass
class SessionChanges:
    """Headers a statement's responses carry so the client updates its session."""

    set_catalog: str | None = None
    set_schema: str | None = None
    set_session: dict[str, str] = field(default_factory=dict)
    clear_session: list[str] = field(default_factory=list)
    added_prepare: dict[str, str] = field(default_factory=dict)
    deallocated_prepare: list[str] = field(default_factory=list)
    started_transaction: str | None = None
    clear_transaction: bool = False

    def headers(self) -> list[tuple[str, str]]:
        """The ``X-Trino-*`` response headers."""
        out: list[tuple[str, str]] = []
        if self.set_catalog is not None:
            out.append(("X-Trino-Set-Catalog", self.set_catalog))
        if self.set_schema is not None:
            out.append(("X-Trino-Set-Schema", self.set_schema))
        for name, value in self.set_session.items():
            out.append(("X-Trino-Set-Session", f"{name}={urllib.parse.quote(value)}"))
        for name in self.clear_session:
            out.append(("X-Trino-Clear-Session", name))
        for name, sql in self.added_prepare.items():
            out.append(("X-Trino-Added-Prepare", f"{name}={urllib.parse.quote_plus(sql)}"))
        for name in self.deallocated_prepare:
            out.append(("X-Trino-Deallocated-Prepare", name))
        if self.started_transaction is not None:
            out.append(("X-Trino-Started-Transaction-Id", self.started_transaction))
        if self.clear_transaction:
            out.append(("X-Trino-Clear-Transaction-Id", "true"))
        return out
