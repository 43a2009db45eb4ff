"""A small non-blocking client of the Trino protocol, for the Jupyter server's event loop.

The handlers must not block Tornado's loop while Spark works, and a cancel must reach the
endpoint while a page is awaited, so this speaks the protocol directly with Tornado's
``AsyncHTTPClient`` (POST ``/v1/statement``, GET ``nextUri`` until absent, DELETE to cancel)
rather than running the blocking ``trino`` DB-API client in threads. Values arrive exactly as
the protocol sends them (dates and timestamps as text, ``varbinary`` as base64), which is what
a browser wants anyway.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from dicomlake.catalog import tables
from dicomlake.errors import DicomlakeError
from dicomlake.extension.identities import Connection

CATALOG = "dicomlake"
"""The lake's catalog name at the endpoint."""
DEFAULT_SCHEMA = tables.SCHEMA
SOURCE = "dicomlake-jupyterlab"
"""``X-Trino-Source``: lets the audit log tell sidebar queries from other clients."""


class SqlClientError(DicomlakeError):
    """The endpoint could not be reached or answered outside the protocol."""

    def __init__(self, message: str, *, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class StatementError:
    """A Trino ``QueryError``: what failed and, when known, where in the SQL."""

    message: str
    name: str
    type: str
    line: int | None = None
    column: int | None = None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> StatementError:
        location = doc.get("errorLocation") or {}
        return cls(message=str(doc.get("message", "query failed")),
                   name=str(doc.get("errorName", "GENERIC_INTERNAL_ERROR")),
                   type=str(doc.get("errorType", "INTERNAL_ERROR")),
                   line=location.get("lineNumber"), column=location.get("columnNumber"))

    def to_json(self) -> dict[str, Any]:
        return {"message": self.message, "name": self.name, "type": self.type,
                "line": self.line, "column": self.column}


@dataclass
class Page:
    """One ``QueryResults`` document."""

    query_id: str | None
    state: str
    next_uri: str | None
    columns: list[dict[str, str]] | None
    rows: list[list[Any]] = field(default_factory=list)
    error: StatementError | None = None


def _page(doc: dict[str, Any]) -> Page:
    columns = doc.get("columns")
    return Page(
        query_id=doc.get("id"),
        state=str((doc.get("stats") or {}).get("state", "UNKNOWN")),
        next_uri=doc.get("nextUri"),
        columns=[{"name": c["name"], "type": c["type"]} for c in columns] if columns else None,
        rows=list(doc.get("data") or []),
        error=StatementError.from_json(doc["error"]) if doc.get("error") else None,
    )


class SqlClient:
    """Statements over the Trino protocol as one mapped SQL user."""

    def __init__(self, connection: Connection, *, request_timeout: float = 660.0) -> None:
        self.connection = connection
        self.request_timeout = request_timeout
        identity = connection.identity
        token = base64.b64encode(f"{identity.sql_user}:{identity.password}".encode()).decode()
        self._headers = {
            "Authorization": f"Basic {token}",
            "X-Trino-User": identity.sql_user,
            "X-Trino-Catalog": CATALOG,
            "X-Trino-Schema": DEFAULT_SCHEMA,
            "X-Trino-Source": SOURCE,
        }

    async def _call(self, method: str, url: str, body: str | None = None) -> dict[str, Any]:
        request = HTTPRequest(url, method=method, headers=self._headers, body=body,
                              request_timeout=self.request_timeout, connect_timeout=5.0)
        try:
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except (OSError, HTTPClientError) as exc:
            raise SqlClientError(f"dicomlake SQL endpoint {self.connection.endpoint} cannot "
                                 f"be reached ({exc}); is `dicomlake serve` running?"
                                 ) from exc
        if response.code == 599:
            raise SqlClientError(f"dicomlake SQL endpoint {self.connection.endpoint} cannot "
                                 f"be reached ({response.error}); is `dicomlake serve` "
                                 "running?")
        if response.code == 204:
            return {}
        try:
            doc = json.loads(response.body or b"{}")
        except ValueError:
            doc = {"message": (response.body or b"").decode("utf-8", "replace")[:500]}
        if response.code == 401:
            raise SqlClientError(f"dicomlake SQL endpoint refused the credentials of SQL user "
                                 f"{self.connection.identity.sql_user!r}: {doc.get('message')}"
                                 " (fix the mapping with `dicomlake jupyter map`)", status=502)
        if response.code >= 400:
            raise SqlClientError(f"dicomlake SQL endpoint answered {response.code}: "
                                 f"{doc.get('message', '')}", status=502)
        return doc

    async def info(self) -> dict[str, Any]:
        """``GET /v1/info`` (no credentials needed): is the endpoint up, which version."""
        return await self._call("GET", f"{self.connection.endpoint}/v1/info")

    async def submit(self, sql: str) -> Page:
        """Start a statement; the first page (maybe already with rows)."""
        return _page(await self._call("POST", f"{self.connection.endpoint}/v1/statement",
                                      body=sql))

    async def advance(self, next_uri: str) -> Page:
        """The page at ``next_uri``."""
        return _page(await self._call("GET", next_uri))

    async def cancel(self, next_uri: str) -> None:
        """Cancel the statement whose next page is ``next_uri``."""
        await self._call("DELETE", next_uri)

    async def execute(self, sql: str, *, max_rows: int = 10_000) -> Result:
        """Run ``sql`` to the end (for small catalog and browser queries).

        More than ``max_rows`` rows cancels the statement and marks the result truncated.
        """
        page = await self.submit(sql)
        result = Result(sql=sql)
        while True:
            if page.columns is not None:
                result.columns = page.columns
            result.rows.extend(page.rows)
            if page.error is not None:
                result.error = page.error
                return result
            if page.next_uri is None:
                return result
            if len(result.rows) >= max_rows:
                del result.rows[max_rows:]
                result.truncated = True
                await self.cancel(page.next_uri)
                return result
            page = await self.advance(page.next_uri)


@dataclass
class Result:
    """A statement run to the end."""

    sql: str
    columns: list[dict[str, str]] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    error: StatementError | None = None
    truncated: bool = False

    def records(self) -> list[dict[str, Any]]:
        """Rows as ``{column: value}``."""
        names = [c["name"] for c in self.columns]
        return [dict(zip(names, row, strict=False)) for row in self.rows]

    def to_json(self) -> dict[str, Any]:
        return {"sql": self.sql, "columns": self.columns, "rows": self.rows,
                "error": self.error.to_json() if self.error else None,
                "truncated": self.truncated}
