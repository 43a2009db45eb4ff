"""The audit log: every statement, every refused request and every failed login, in the
Delta table ``system.audit_log`` (admins query it like any table).

A statement is stored whole (with the prepared statements its request carried), except the
bytes of long binary literals (``image_knn(query_image => X'...')``: a user's own image must
leave no trace beyond its size and hash, :func:`redact_binary_literals`); statements
longer than the server's ``max_statement_bytes`` (1 MiB by default) are refused before they
run, and the refusal is recorded with its size. Refused requests (HTTP 400, 401, 403, 404,
411, 413, 429, 431) are rows with ``event = 'request_refused'`` or ``'login_failed'``, the
user they claimed, the client address and the status.

Records are appended by a background thread in one Delta commit per flush (at most one a
second, or sooner when the buffer fills), so auditing adds no Delta commit to a query's
latency. ``flush()`` is called before an admin reads the log, so they always see their own
earlier statements, and at shutdown, so nothing acknowledged is lost on a clean stop.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

AUDIT_SCHEMA_NAME, AUDIT_TABLE_NAME = "system", "audit_log"

_BINARY_LITERAL = re.compile(r"[Xx]'((?:[0-9A-Fa-f]\s*){64,})'")
"""A binary literal of 32 bytes or more: an image or file a user queried with."""


def redact_binary_literals(text: str | None) -> str | None:
    """``text`` with each long ``X'...'`` literal cut to its first 8 bytes, its size and its
    SHA-256: enough to tell which image a statement used, not enough to rebuild it."""
    if text is None:
        return None

    def short(match: re.Match[str]) -> str:
        digits = "".join(match[1].split())
        raw = bytes.fromhex(digits[: len(digits) // 2 * 2])
        return (f"X'{digits[:16]}...' /* {len(raw)} bytes, sha256 "
                f"{hashlib.sha256(raw).hexdigest()} */")

    return _BINARY_LITERAL.sub(short, text)


@dataclass(frozen=True)
class AuditRecord:
    """One audited event: a statement (``event='query'``), a refused request
    (``'request_refused'``) or a failed login (``'login_failed'``)."""

    event: str
    user: str | None
    role: str | None
    query_id: str | None
    sql: str | None
    state: str
    rows: int
    started_at: dt.datetime
    finished_at: dt.datetime
    duration_ms: int
    error_name: str | None
    error_message: str | None
    client_address: str | None
    source: str | None
    http_status: int | None = None
    """The HTTP status the request was answered with (200 for statements)."""
    prepared: str | None = None
    """The prepared statements (name -> SQL, JSON) the request carried in its headers."""


def audit_schema() -> pa.Schema:
    """Arrow schema of ``system.audit_log``."""
    import pyarrow as pa

    ts = pa.timestamp("us", tz="UTC")
    return pa.schema([
        ("event", pa.string()), ("user", pa.string()), ("role", pa.string()),
        ("query_id", pa.string()), ("sql", pa.string()), ("state", pa.string()),
        ("rows", pa.int64()), ("started_at", ts), ("finished_at", ts),
        ("duration_ms", pa.int64()), ("error_name", pa.string()),
        ("error_message", pa.string()), ("client_address", pa.string()),
        ("source", pa.string()), ("http_status", pa.int32()), ("prepared", pa.string()),
    ])


class AuditLog:
    """Buffered appends to the audit Delta table."""

    def __init__(self, table_path: Path, *, flush_seconds: float = 1.0,
                 max_buffer: int = 500) -> None:
        self.table_path = Path(table_path)
        self.flush_seconds = flush_seconds
        self.max_buffer = max_buffer
        self._buffer: list[AuditRecord] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
        self.ensure_table()

    def ensure_table(self) -> None:
        """Create the empty table if it does not exist (so it is queryable at once)."""
        from deltalake import DeltaTable, Schema

        if not DeltaTable.is_deltatable(str(self.table_path)):
            self.table_path.mkdir(parents=True, exist_ok=True)
            DeltaTable.create(str(self.table_path), Schema.from_arrow(audit_schema()),
                              mode="ignore")

    def start(self) -> AuditLog:
        self._thread.start()
        return self

    def append(self, record: AuditRecord) -> None:
        """Queue a record (long binary literals redacted); it is committed within
        ``flush_seconds``."""
        record = replace(record, sql=redact_binary_literals(record.sql),
                         prepared=redact_binary_literals(record.prepared),
                         error_message=redact_binary_literals(record.error_message))
        with self._lock:
            self._buffer.append(record)
            if len(self._buffer) >= self.max_buffer:
                self._wake.set()

    def flush(self) -> int:
        """Commit what is buffered now; returns the number of records written."""
        with self._flush_lock:
            with self._lock:
                records, self._buffer = self._buffer, []
            if not records:
                return 0
            import pyarrow as pa
            from deltalake import write_deltalake

            columns = {name: [getattr(r, name) for r in records]
                       for name in audit_schema().names}
            table = pa.table(columns, schema=audit_schema())
            try:
                # merge: a log made before a column was added gains it
                write_deltalake(str(self.table_path), table, mode="append",
                                schema_mode="merge")
            except Exception:  # keep the records for the next try; never lose them silently
                log.exception("audit log append to %s failed; will retry", self.table_path)
                with self._lock:
                    self._buffer[:0] = records
                return 0
            return len(records)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        """Stop the flusher and write what is left."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.flush()
