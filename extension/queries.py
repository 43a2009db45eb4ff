"""Sidebar queries: started once, fetched in the background, read page by page, cancellable.

The endpoint hands out rows only in order (``nextUri``), but a results grid wants page 7 and
then page 2, so each sidebar query is drained into a server-side buffer by a background task
and the browser reads slices of it. The buffer is capped (``max_rows``); past the cap the
statement is cancelled at the endpoint and the result says it was truncated. Queries belong to
the Jupyter user who started them; another user gets "not found", as at the endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from dicomlake.extension.sqlclient import Page, SqlClient, SqlClientError, StatementError

FINISHED_STATES = frozenset({"FINISHED", "FAILED", "CANCELED"})


@dataclass
class SidebarQuery:
    """One statement run from the sidebar and its buffered rows."""

    id: str
    owner: str
    sql: str
    max_rows: int
    state: str = "QUEUED"
    trino_id: str | None = None
    columns: list[dict[str, str]] | None = None
    rows: list[list[Any]] = field(default_factory=list)
    error: StatementError | None = None
    truncated: bool = False
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    next_uri: str | None = None
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.state in FINISHED_STATES

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def page(self, offset: int, limit: int) -> dict[str, Any]:
        """The document the browser gets: state, columns and one slice of the rows."""
        end = self.finished if self.finished is not None else time.monotonic()
        return {
            "id": self.id, "sql": self.sql, "state": self.state, "done": self.done,
            "trinoId": self.trino_id, "columns": self.columns or [],
            "offset": offset, "rows": self.rows[offset:offset + limit],
            "totalRows": len(self.rows), "truncated": self.truncated,
            "error": self.error.to_json() if self.error else None,
            "elapsedSeconds": round(end - self.started, 3),
        }


class QueryRegistry:
    """The running and recent sidebar queries of this Jupyter server."""

    def __init__(self, *, max_rows: int = 10_000, keep_per_user: int = 20) -> None:
        self.max_rows = max_rows
        self.keep_per_user = keep_per_user
        self._queries: dict[str, SidebarQuery] = {}

    def get(self, owner: str, query_id: str) -> SidebarQuery | None:
        """The query if ``owner`` started it."""
        query = self._queries.get(query_id)
        return query if query is not None and query.owner == owner else None

    def start(self, owner: str, client: SqlClient, sql: str) -> SidebarQuery:
        """Start draining ``sql`` into a new buffered query."""
        query = SidebarQuery(id=uuid.uuid4().hex, owner=owner, sql=sql, max_rows=self.max_rows)
        self._queries[query.id] = query
        query.task = asyncio.ensure_future(self._drain(query, client))
        self._forget_old(owner)
        return query

    async def wait(self, query: SidebarQuery, *, rows_wanted: int, timeout: float) -> None:
        """Return when the query is done, holds ``rows_wanted`` rows, or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while not query.done and len(query.rows) < rows_wanted:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(query.changed.wait(), remaining)

    async def cancel(self, query: SidebarQuery, client: SqlClient) -> None:
        """Cancel at the endpoint (if still running) and stop draining."""
        if query.done:
            return
        next_uri = query.next_uri
        if query.task is not None:
            query.task.cancel()
        query.state = "CANCELED"
        query.error = StatementError("Query was canceled by the user", "USER_CANCELED",
                                     "USER_ERROR")
        query.finished = time.monotonic()
        query._notify()
        if next_uri is not None:
            with contextlib.suppress(SqlClientError):
                await client.cancel(next_uri)

    async def _drain(self, query: SidebarQuery, client: SqlClient) -> None:
        try:
            page: Page = await client.submit(query.sql)
            while True:
                self._apply(query, page)
                if page.error is not None or page.next_uri is None:
                    query.state = "FAILED" if page.error is not None else "FINISHED"
                    break
                if len(query.rows) >= query.max_rows:
                    del query.rows[query.max_rows:]
                    query.truncated = True
                    with contextlib.suppress(SqlClientError):
                        await client.cancel(page.next_uri)
                    query.state = "FINISHED"
                    break
                page = await client.advance(page.next_uri)
        except asyncio.CancelledError:
            return
        except SqlClientError as exc:
            query.error = StatementError(str(exc), "ENDPOINT_UNAVAILABLE", "EXTERNAL")
            query.state = "FAILED"
        query.next_uri = None
        query.finished = time.monotonic()
        query._notify()

    @staticmethod
    def _apply(query: SidebarQuery, page: Page) -> None:
        query.trino_id = page.query_id or query.trino_id
        if page.columns is not None:
            query.columns = page.columns
        query.rows.extend(page.rows)
        query.error = page.error
        query.next_uri = page.next_uri
        if page.state not in FINISHED_STATES:
            query.state = page.state
        query._notify()

    def _forget_old(self, owner: str) -> None:
        mine = sorted((q for q in self._queries.values() if q.owner == owner and q.done),
                      key=lambda q: q.started)
        for old in mine[:max(0, len(mine) - self.keep_per_user)]:
            self._queries.pop(old.id, None)

    def shutdown(self) -> None:
        """Stop draining (the endpoint abandons statements nobody reads)."""
        for query in self._queries.values():
            if query.task is not None and not query.task.done():
                query.task.cancel()
