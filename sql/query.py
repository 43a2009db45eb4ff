"""Query lifecycle: id, slug, states, paging tokens, limits, cancellation.

A statement becomes a :class:`Query`. Session statements are answered at once; Spark
statements wait in the :class:`QueryManager`'s pool (``QUEUED`` while all slots are busy),
then a producer thread runs them and pushes JSON-encoded pages into a small bounded buffer.
The client pulls pages with ``GET nextUri``; when it stops pulling, the producer blocks, so
a result is never held whole in memory. Every page answers one token; the previous answer
is kept so a client retrying the same token gets the same page.

Limits: a per-query time limit and result-row cap, a cap on concurrently running queries
(and a lower one per user, so one user cannot hold every slot while others wait), and an
abandonment timer for clients that vanish. Time limit, cancel and abandonment end the Spark
job through its job group.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import orjson

from dicomlake.sql import errors as E
from dicomlake.sql.audit import AuditRecord, redact_binary_literals
from dicomlake.sql.engine import engine_error_or_cancel
from dicomlake.sql.errors import QueryError
from dicomlake.sql.protocol import results_json
from dicomlake.sql.session import SessionChanges
from dicomlake.sql.translate import Plan, client_error
from dicomlake.sql.types import column_converter, column_json

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import types as T

    from dicomlake.sql.audit import AuditLog
    from dicomlake.sql.engine import SparkEngine
    from dicomlake.sql.metadata import LakeCatalog
    from dicomlake.sql.session import ClientSession
    from dicomlake.sql.translate import Translator
    from dicomlake.sql.users import Principal

log = logging.getLogger(__name__)


class QueryState(StrEnum):
    """Trino's query states as clients see them (cancelled queries end ``FAILED``)."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class Limits:
    """Server-wide limits (``dicomlake serve`` options)."""

    max_concurrent: int = 4
    """Queries running on Spark at once; more wait as ``QUEUED``."""
    max_concurrent_per_user: int | None = None
    """Queries one user may run at once (default: half of ``max_concurrent``, at least 1);
    the user's further queries wait as ``QUEUED`` while other users' queries start."""
    timeout_seconds: float = 600.0
    """Default and (for non-admins) maximum time for a query, queue time included."""
    max_rows: int = 5_000_000
    """Largest result a query may return; beyond it the query fails (add a LIMIT)."""
    abandon_seconds: float = 300.0
    """A query whose client has not polled for this long is cancelled."""
    page_bytes: int = 4 << 20
    """Target size of one response's data."""
    buffered_pages: int = 8
    """Encoded pages a producer may run ahead of its client."""
    max_wait_seconds: float = 1.0
    """How long a request waits for new rows before answering with an empty page."""
    keep_finished_seconds: float = 900.0
    """How long finished queries stay visible at their ``infoUri``."""

    @property
    def per_user(self) -> int:
        if self.max_concurrent_per_user is not None:
            return max(1, min(self.max_concurrent_per_user, self.max_concurrent))
        return max(1, self.max_concurrent // 2)


_COUNTER = itertools.count()


def new_query_id() -> str:
    """A Trino-style id: ``YYYYMMDD_HHMMSS_<counter>_<random>``."""
    now = dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%d_%H%M%S}_{next(_COUNTER) % 100000:05d}_{secrets.token_hex(3)[:5]}"


class Query:
    """One statement from submission to its last page."""

    def __init__(self, *, sql: str, principal: Principal, session: ClientSession,
                 client_address: str | None, limits: Limits) -> None:
        self.id = new_query_id()
        self.slug = secrets.token_urlsafe(12)
        self.sql = sql
        self.principal = principal
        self.session = session
        self.client_address = client_address
        self.limits = limits
        self.state = QueryState.QUEUED
        self.created = time.monotonic()
        self.created_at = dt.datetime.now(dt.UTC)
        self.started: float | None = None
        self.ended: float | None = None
        self.error: QueryError | None = None
        self.columns: list[dict[str, Any]] | None = None
        self.update_type: str | None = None
        self.update_count: int | None = None
        self.changes = SessionChanges()
        self.plan: Plan | None = None
        self.rows = 0
        self.bytes = 0
        self.deadline = self.created + limits.timeout_seconds
        self.last_seen = self.created
        self.cancel_reason: QueryError | None = None
        self._cond = threading.Condition()
        self._pages: deque[bytes] = deque()
        self._producer_done = False
        self._respond_lock = threading.Lock()
        self._token = 0
        self._last_body: bytes | None = None
        self._closed = False

    # -- timings ----------------------------------------------------------------------------

    def elapsed_seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.created

    def queued_seconds(self) -> float:
        return (self.started or self.ended or time.monotonic()) - self.created

    @property
    def job_group(self) -> str:
        return f"dicomlake-sql-{self.id}"

    @property
    def terminal(self) -> bool:
        return self.state in (QueryState.FINISHED, QueryState.FAILED)

    # -- producer side ----------------------------------------------------------------------

    def set_columns(self, columns: list[tuple[str, T.DataType]]) -> None:
        with self._cond:
            self.columns = [column_json(name, data_type) for name, data_type in columns]
            self._cond.notify_all()

    def put_page(self, fragment: bytes, rows: int, *, last: bool = False) -> None:
        """Queue encoded rows; blocks while the client is behind.

        ``last`` also ends the result in the same step, so a client woken by the final page
        sees the query finished and needs no further round trip.

        Raises:
            QueryError: the query was cancelled meanwhile.
        """
        with self._cond:
            while len(self._pages) >= self.limits.buffered_pages:
                if self.cancel_reason is not None:
                    raise self.cancel_reason
                self._cond.wait(0.25)
            if self.cancel_reason is not None:
                raise self.cancel_reason
            self._pages.append(fragment)
            self.rows += rows
            self.bytes += len(fragment)
            self._producer_done = self._producer_done or last
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self._producer_done = True
            self._cond.notify_all()

    def fail(self, error: QueryError) -> None:
        with self._cond:
            if self.terminal:
                return
            self.error = error
            self.state = QueryState.FAILED
            self.ended = time.monotonic()
            self._pages.clear()
            self._cond.notify_all()

    def request_cancel(self, reason: QueryError) -> bool:
        """Mark the query cancelled; False if it had already ended."""
        with self._cond:
            if self.terminal:
                return False
            self.cancel_reason = reason
            self._cond.notify_all()
        self.fail(reason)
        return True

    # -- client side ------------------------------------------------------------------------

    def _take(self, wait: float) -> list[bytes]:
        deadline = time.monotonic() + wait
        with self._cond:
            while not (self._pages or self._producer_done or self.terminal):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            taken: list[bytes] = []
            size = 0
            while self._pages and size < self.limits.page_bytes:
                page = self._pages.popleft()
                taken.append(page)
                size += len(page)
            if self._producer_done and not self._pages and self.state is QueryState.RUNNING:
                self.state = QueryState.FINISHED
                self.ended = time.monotonic()
            self._cond.notify_all()
            return taken

    def respond(self, token: int, *, base_url: str, wait: float) -> bytes | None:
        """The response for page ``token`` (None if the token is not the current or next).

        Token 0 is the answer to the POST; each answer names token+1 in its ``nextUri``.
        """
        with self._respond_lock:
            self.last_seen = time.monotonic()
            if token == self._token and self._last_body is not None:
                return self._last_body
            if token != self._token + 1 and not (token == 0 and self._last_body is None):
                return None
            fragments = self._take(wait)
            next_uri = None
            if not self.terminal:
                next_uri = (f"{base_url}/v1/statement/executing/{self.id}/{self.slug}/"
                            f"{token + 1}")
            body = results_json(self, base_url=base_url, fragments=fragments, next_uri=next_uri)
            self._token = token
            self._last_body = body
            return body


def _json_rows(columns: list[list[Any]]) -> bytes:
    """Rows (given as columns) as comma-separated JSON arrays, without the outer brackets.

    orjson: the encoder is on the path of every result row and is several times faster than
    the standard library's; converters have already turned values into JSON types.
    """
    return orjson.dumps(list(zip(*columns, strict=True)))[1:-1]


def encode_batch(batch: pa.RecordBatch,
                 converters: list[Callable[[Any], list[Any]]]) -> bytes:
    """Rows of an Arrow batch as comma-separated JSON arrays (no surrounding brackets)."""
    return _json_rows([convert(batch.column(i)) for i, convert in enumerate(converters)])


class QueryManager:
    """Creates, runs, finds and cancels queries."""

    def __init__(self, *, engine: SparkEngine, translator: Translator, catalog: LakeCatalog,
                 audit: AuditLog, limits: Limits) -> None:
        self.engine = engine
        self.translator = translator
        self.catalog = catalog
        self.audit = audit
        self.limits = limits
        self._queries: dict[str, Query] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=limits.max_concurrent,
                                        thread_name_prefix="dicomlake-query")
        self._waiting: deque[Query] = deque()
        self._running_by_user: Counter[str] = Counter()
        self._running = 0
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="dicomlake-reaper",
                                        daemon=True)
        self._reaper.start()

    # -- submission -------------------------------------------------------------------------

    def submit(self, sql: str, session: ClientSession, principal: Principal,
               client_address: str | None) -> Query:
        """Plan a statement and start it (or answer it, for session statements)."""
        query = Query(sql=sql, principal=principal, session=session,
                      client_address=client_address, limits=self.limits)
        with self._lock:
            self._queries[query.id] = query
        try:
            plan = self.translator.plan(sql, session, principal)
            query.deadline = query.created + self.translator.timeout_for(session, principal)
        except QueryError as exc:
            self._end(query, exc)
            return query
        except Exception as exc:  # a translator bug must still answer the client
            log.debug("planning failed for %s", query.id, exc_info=True)
            self._end(query, QueryError(E.GENERIC_INTERNAL_ERROR, f"planning failed: {exc}"))
            return query
        query.plan = plan
        query.changes = plan.changes
        query.update_type = plan.update_type
        if plan.kind == "local":
            query.state = QueryState.RUNNING
            query.started = time.monotonic()
            if plan.columns:
                query.set_columns(plan.columns)
                converters = [column_converter_for(dt_) for _, dt_ in plan.columns]
                if plan.rows:
                    fragment = _encode_rows(plan.rows, converters)
                    query.put_page(fragment, len(plan.rows), last=True)
            query.finish()
            self._end(query, None)
            return query
        with self._lock:
            self._waiting.append(query)
        self._dispatch()
        return query

    def _dispatch(self) -> None:
        """Start waiting queries, oldest first, while slots are free and their user is under
        the per-user cap (a user at the cap does not block other users' queries). Queries
        cancelled while waiting leave the queue here, and are audited."""
        with self._lock:
            gone = [q for q in self._waiting if q.terminal]
            for query in gone:
                self._waiting.remove(query)
            while self._running < self.limits.max_concurrent and self._waiting:
                pick = next((q for q in self._waiting
                             if self._running_by_user[q.principal.name] < self.limits.per_user),
                            None)
                if pick is None:
                    break
                self._waiting.remove(pick)
                self._running += 1
                self._running_by_user[pick.principal.name] += 1
                self._pool.submit(self._run_in_slot, pick)
        for query in gone:
            self._end(query, None)

    def _run_in_slot(self, query: Query) -> None:
        try:
            self._run(query)
        finally:
            with self._lock:
                self._running -= 1
                self._running_by_user[query.principal.name] -= 1
            self._dispatch()

    def _run(self, query: Query) -> None:
        if query.terminal:  # cancelled between leaving the queue and starting
            self._end(query, None)
            return
        plan = query.plan
        assert plan is not None and plan.spark_sql is not None
        with query._cond:
            query.state = QueryState.RUNNING
            query.started = time.monotonic()
        error: QueryError | None = None
        try:
            if plan.reads_audit_log:
                self.audit.flush()
            if plan.kind == "describe_output":
                self._describe_output(query, plan)
            else:
                self._stream(query, plan)
        except BaseException as exc:
            log.debug("query %s failed", query.id, exc_info=True)
            error = engine_error_or_cancel(exc, query.cancel_reason)
            if error is not query.cancel_reason:
                error = client_error(error, query.sql, query.session)
        finally:
            self.engine.clear_group()
            if plan.changes_catalog:
                self.catalog.invalidate()
            self._end(query, error)

    def _stream(self, query: Query, plan: Plan) -> None:
        assert plan.spark_sql is not None
        limit = self.limits.max_rows
        result = self.engine.execute(plan.spark_sql, role=query.principal.role,
                                     group=query.job_group,
                                     description=query.sql, is_query=plan.is_query,
                                     row_limit=limit, rename=plan.rename,
                                     output=plan.output)
        if not result.columns:
            from pyspark.sql import types as T

            query.set_columns([("result", T.BooleanType())])
            query.put_page(b"[true]", 1, last=True)
            return
        query.set_columns(result.columns)
        if result.rows is not None:
            rows = result.rows[:limit]
            if rows:
                converters_ = [column_converter_for(t) for _, t in result.columns]
                query.put_page(_encode_rows([list(r) for r in rows], converters_), len(rows),
                               last=len(result.rows) <= limit)
            if len(result.rows) > limit:
                raise QueryError(E.GENERIC_INSUFFICIENT_RESOURCES,
                                 f"Query exceeded the result limit of {limit} rows")
            query.finish()
            return
        converters: list[Callable[[Any], list[Any]]] | None = None
        # One page is held back until the next arrives, so the final one goes out marked last.
        held: tuple[bytes, int] | None = None
        for batch in result.batches:
            if query.cancel_reason is not None:
                raise query.cancel_reason
            if batch.num_rows == 0:
                continue
            if converters is None:
                converters = [column_converter(f.type) for f in batch.schema]
            if held is not None:
                query.put_page(*held)
                held = None
            over = query.rows + batch.num_rows > limit
            if over:
                batch = batch.slice(0, limit - query.rows)
            if batch.num_rows:
                held = (encode_batch(batch, converters), batch.num_rows)
            if over:
                if held is not None:
                    query.put_page(*held)
                raise QueryError(E.GENERIC_INSUFFICIENT_RESOURCES,
                                 f"Query exceeded the result limit of {limit} rows; add a "
                                 "LIMIT or a narrower WHERE (the limit is the server's "
                                 "--max-rows setting)")
        if held is not None:
            query.put_page(*held, last=True)
        query.finish()

    def _describe_output(self, query: Query, plan: Plan) -> None:
        from dicomlake.sql.translate import _DESCRIBE_OUTPUT_COLUMNS
        from dicomlake.sql.types import trino_type

        assert plan.spark_sql is not None
        columns = self.engine.output_columns(plan.spark_sql, query.principal.role,
                                             plan.output)
        rows = [[name, "", "", "", trino_type(data_type)[0], 0, False]
                for name, data_type in columns]
        query.set_columns(_DESCRIBE_OUTPUT_COLUMNS)
        converters = [column_converter_for(t) for _, t in _DESCRIBE_OUTPUT_COLUMNS]
        if rows:
            query.put_page(_encode_rows(rows, converters), len(rows), last=True)
        query.finish()

    def _end(self, query: Query, error: QueryError | None) -> None:
        final = query.error or error
        if final is not None:
            # The one line a failed statement leaves in the server's log (its stack, if it
            # had one, is at DEBUG).
            log.warning("query %s by %s failed: %s: %s", query.id, query.principal.name,
                        final.code.name, redact_binary_literals(" ".join(final.message.split())))
        if error is not None:
            query.fail(error)
        now = dt.datetime.now(dt.UTC)
        state = "CANCELED" if (final is not None and final.code is E.USER_CANCELED) else (
            "FAILED" if final is not None else "FINISHED")
        self.audit.append(AuditRecord(
            event="query", user=query.principal.name, role=query.principal.role.value,
            query_id=query.id, sql=query.sql, state=state, rows=query.rows,
            started_at=query.created_at, finished_at=now,
            duration_ms=int((now - query.created_at).total_seconds() * 1000),
            error_name=final.code.name if final else None,
            error_message=final.message if final else None,
            client_address=query.client_address, source=query.session.source,
            http_status=200,
            prepared=json.dumps(query.session.prepared) if query.session.prepared else None))

    # -- lookup and cancel ------------------------------------------------------------------

    def get(self, query_id: str) -> Query | None:
        with self._lock:
            return self._queries.get(query_id)

    def running(self) -> list[Query]:
        with self._lock:
            return [q for q in self._queries.values() if not q.terminal]

    def cancel(self, query: Query, reason: QueryError | None = None) -> bool:
        """Cancel a query and its Spark jobs; False if it had already ended."""
        reason = reason or QueryError(E.USER_CANCELED, "Query was canceled")
        cancelled = query.request_cancel(reason)
        if cancelled:
            self.engine.cancel(query.job_group)
            self._dispatch()  # a query cancelled while waiting leaves the queue (audited)
        return cancelled

    def _reap(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            with self._lock:
                queries = list(self._queries.values())
            for query in queries:
                if query.terminal:
                    if now - (query.ended or now) > self.limits.keep_finished_seconds:
                        with self._lock:
                            self._queries.pop(query.id, None)
                    continue
                if now > query.deadline:
                    limit = query.deadline - query.created
                    self.cancel(query, QueryError(
                        E.EXCEEDED_TIME_LIMIT,
                        f"Query exceeded the maximum run time of {limit:g} s (set a lower "
                        "query_max_run_time or ask an admin to raise --timeout)"))
                elif now - query.last_seen > self.limits.abandon_seconds:
                    self.cancel(query, QueryError(
                        E.ABANDONED_QUERY,
                        f"Query was abandoned: no client request for "
                        f"{self.limits.abandon_seconds:g} s"))

    def shutdown(self) -> None:
        """Cancel what is running and stop the pool."""
        self._stop.set()
        for query in self.running():
            self.cancel(query, QueryError(E.SERVER_SHUTTING_DOWN, "the server is shutting down"))
        self._pool.shutdown(wait=True, cancel_futures=True)


def column_converter_for(data_type: T.DataType) -> Callable[[Any], list[Any]]:
    """Converter for a column of Python values (local plans, collected local results)."""
    from dicomlake.sql.types import spark_value_converter

    convert = spark_value_converter(data_type)
    return lambda values: [convert(v) for v in values]


def _encode_rows(rows: list[list[Any]], converters: list[Callable[[Any], list[Any]]]) -> bytes:
    return _json_rows([convert([r[i] for r in rows]) for i, convert in enumerate(converters)])
