"""The HTTP resource: Trino's REST endpoints, authentication, TLS, and the server wiring.

The request handler only authenticates, parses the request into a :class:`ClientSession`,
asks the :class:`QueryManager` for a query or a page, and writes the response; it never
calls Spark (Kyuubi's ``StatementResource`` habit). Endpoints:

* ``POST /v1/statement`` - SQL as the body; answers with the first page (waiting up to a
  second, so small queries finish in one round trip) and a ``nextUri`` while more follows.
* ``GET /v1/statement/executing/{id}/{slug}/{token}`` - the next page.
* ``DELETE`` on the same URI (or ``/v1/query/{id}``) - cancel; answers 204.
* ``GET /v1/query/{id}`` - query info; ``GET /v1/info`` and ``/v1/info/state`` - liveness.

Plain HTTP is accepted only on a loopback address; any other bind address needs TLS.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import json
import logging
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomlake import __version__
from dicomlake.sql.audit import AUDIT_SCHEMA_NAME, AUDIT_TABLE_NAME, AuditLog, AuditRecord
from dicomlake.sql.errors import AuthenticationError, QueryError, SqlServiceError
from dicomlake.sql.protocol import info_json, message_json
from dicomlake.sql.query import Limits, Query, QueryManager
from dicomlake.sql.session import ClientSession
from dicomlake.sql.users import Authenticator, Principal, Role, UserStore

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from dicomlake.config import Settings

log = logging.getLogger(__name__)

SERVER_VERSION = f"476-dicomlake-{__version__}"
"""Reported by ``/v1/info`` and ``version()``: Trino 476 protocol, dicomlake behind it."""

_EXECUTING = re.compile(r"^/v1/statement/(?:executing|queued)/([\w-]+)/([\w-]+)/(\d+)$")
_QUERY = re.compile(r"^/v1/query/([\w-]+)$")
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(?::\d+)?$|^\[[0-9a-fA-F:.]+\](?::\d+)?$")


@dataclass(frozen=True)
class ServerConfig:
    """Where and how ``dicomlake serve`` listens."""

    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: Limits = field(default_factory=Limits)
    max_statement_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("dicomlake serve needs both --tls-cert and --tls-key (or neither)")
        if self.tls_cert is None and not is_loopback(self.host):
            raise ValueError(
                f"dicomlake serve refuses plain HTTP on {self.host!r}: passwords would cross "
                "the network in clear. Bind 127.0.0.1, or give --tls-cert and --tls-key.")

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    app: SqlServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Dropped connections and failed TLS handshakes are the client's business."""
        import sys

        if isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError, TimeoutError)):
            log.debug("connection from %s ended: %s", client_address, sys.exc_info()[1])
            return
        log.exception("request from %s failed", client_address)


class TrinoRequestHandler(BaseHTTPRequestHandler):
    """One HTTP request of the Trino client protocol."""

    protocol_version = "HTTP/1.1"
    timeout = 120
    """Seconds a connection may sit idle (keep-alive, or a stalled TLS handshake) before its
    thread gives up on it."""
    disable_nagle_algorithm = True
    """Headers and body go out in separate writes; with Nagle on, the body waits for the
    client's delayed ACK of the headers (40 ms on Linux), which dominated small queries."""
    server: _HttpServer  # type: ignore[assignment]
    server_version = "dicomlake-sql"

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            # The listener does not handshake on accept (a silent client would stall every
            # other one there); each connection handshakes here, in its own thread.
            self.connection.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # -- responses --------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", *,
              headers: list[tuple[str, str]] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        if body or status != 204:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        for name, value in headers or []:
            self.send_header(name, value)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, **extra: Any) -> None:
        headers = [("WWW-Authenticate", 'Basic realm="dicomlake"')] if status == 401 else []
        self._send(status, message_json(message, **extra), headers=headers)

    def _base_url(self) -> str:
        host = self.headers.get("Host", "")
        if not _HOST.match(host):
            addr, port = self.server.server_address[:2]
            host = f"{addr}:{port}"
        return f"{self.server.app.config.scheme}://{host}"

    # -- authentication ---------------------------------------------------------------------

    def _principal(self) -> Principal | None:
        """The authenticated user, or None after answering 401/403."""
        app = self.server.app
        header = self.headers.get("Authorization", "")
        claimed = self.headers.get("X-Trino-User") or self.headers.get("X-Presto-User")
        if not header.lower().startswith("basic "):
            app.audit_login_failure(claimed, "no credentials (HTTP Basic required)",
                                    self.client_address[0])
            self._error(401, "Authentication required: send HTTP Basic credentials "
                             "(user and password made with `dicomlake user add`)")
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
            name, sep, password = decoded.partition(":")
            if not sep:
                raise ValueError("no ':' in credentials")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            app.audit_login_failure(claimed, "malformed Basic credentials",
                                    self.client_address[0])
            self._error(401, "Malformed HTTP Basic credentials")
            return None
        try:
            principal = app.authenticator.authenticate(name, password)
        except AuthenticationError as exc:
            app.audit_login_failure(name, str(exc), self.client_address[0])
            self._error(401, "Invalid credentials: user name or password is wrong")
            return None
        if claimed and claimed != principal.name:
            self._error(403, f"Access Denied: user '{principal.name}' cannot impersonate "
                             f"user '{claimed}'")
            return None
        return principal

    # -- routes -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        app = self.server.app
        if path == "/v1/info":
            self._send(200, info_json(SERVER_VERSION, time.monotonic() - app.started))
            return
        if path == "/v1/info/state":
            self._send(200, b'"ACTIVE"')
            return
        if _EXECUTING.match(path) or _QUERY.match(path):
            principal = self._principal()
            if principal is None:
                return
            if m := _EXECUTING.match(path):
                self._page(principal, m.group(1), m.group(2), int(m.group(3)))
            elif m := _QUERY.match(path):
                self._query_info(principal, m.group(1))
            return
        self._error(404, f"No such endpoint: GET {path}")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/v1/statement":
            self._error(404, f"No such endpoint: POST {path}")
            return
        principal = self._principal()
        if principal is None:
            self._discard_body()
            return
        app = self.server.app
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self._error(411, "Content-Length is required; send the SQL text as the body")
            self.close_connection = True
            return
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError(length_text)
        except ValueError:
            self._error(400, f"Content-Length {length_text!r} is not a byte count")
            self.close_connection = True
            return
        if length > app.config.max_statement_bytes:
            self._error(413, f"Statement is {length} bytes; the limit is "
                             f"{app.config.max_statement_bytes}")
            self.close_connection = True
            return
        raw = self.rfile.read(length)
        try:
            sql = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._error(400, f"The statement is not valid UTF-8 ({exc}); send SQL text")
            return
        try:
            session = ClientSession.from_headers(self.headers)
        except QueryError as exc:
            self._error(400, exc.message, error=exc.to_json())
            return
        query = app.manager.submit(sql, session, principal, self.client_address[0])
        body = query.respond(0, base_url=self._base_url(),
                             wait=app.config.limits.max_wait_seconds)
        assert body is not None
        self._send(200, body, headers=query.changes.headers())

    def do_DELETE(self) -> None:
        path = self.path.split("?", 1)[0]
        m = _EXECUTING.match(path) or _QUERY.match(path)
        if m is None:
            self._error(404, f"No such endpoint: DELETE {path}")
            return
        principal = self._principal()
        if principal is None:
            return
        query = self._owned_query(principal, m.group(1))
        if query is None:
            return
        if m.re is _EXECUTING and m.group(2) != query.slug:
            self._error(404, f"Query {query.id} has no URI with that slug")
            return
        self.server.app.manager.cancel(query)
        self._send(204)

    def _discard_body(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if 0 < length <= self.server.app.config.max_statement_bytes:
            self.rfile.read(length)
        else:
            self.close_connection = True

    def _owned_query(self, principal: Principal, query_id: str) -> Query | None:
        query = self.server.app.manager.get(query_id)
        if query is None or (query.principal.name != principal.name
                             and principal.role is not Role.ADMIN):
            self._error(404, f"Query {query_id} does not exist (or has expired)")
            return None
        return query

    def _page(self, principal: Principal, query_id: str, slug: str, token: int) -> None:
        query = self._owned_query(principal, query_id)
        if query is None:
            return
        if slug != query.slug:
            self._error(404, f"Query {query_id} has no URI with that slug")
            return
        body = query.respond(token, base_url=self._base_url(),
                             wait=self.server.app.config.limits.max_wait_seconds)
        if body is None:
            self._error(404, f"Token {token} of query {query_id} is not the current or next "
                             "page; follow nextUri in order")
            return
        self._send(200, body, headers=query.changes.headers())

    def _query_info(self, principal: Principal, query_id: str) -> None:
        query = self._owned_query(principal, query_id)
        if query is None:
            return
        doc = {"queryId": query.id, "state": query.state.value, "query": query.sql,
               "session": {"user": query.principal.name, "catalog": query.session.catalog,
                           "schema": query.session.schema},
               "self": f"{self._base_url()}/v1/query/{query.id}",
               "failureInfo": query.error.to_json() if query.error else None,
               "queryStats": {"elapsedTime": f"{query.elapsed_seconds():.3f}s",
                              "processedRows": query.rows},
               "sparkJobs": self.server.app.manager.engine.job_statuses(query.job_group)}
        self._send(200, json.dumps(doc).encode())


class SqlServer:
    """``dicomlake serve``: Spark session + catalog + users + audit behind one endpoint."""

    def __init__(self, settings: Settings, config: ServerConfig,
                 spark: SparkSession | None = None) -> None:
        self.settings = settings
        self.config = config
        self._spark = spark
        self.started = time.monotonic()
        self._http: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._serving = False

    def start(self) -> SqlServer:
        """Start Spark (unless given), the catalog, the audit log and the listener."""
        from dicomlake.catalog.warehouse import Warehouse
        from dicomlake.session import build_session
        from dicomlake.sql.engine import SparkEngine
        from dicomlake.sql.masking import load_salt
        from dicomlake.sql.metadata import LakeCatalog
        from dicomlake.sql.translate import Translator

        store = UserStore(self.settings.home)
        if not store.list():
            raise SqlServiceError(
                f"no SQL users in {store.path}; create one first, e.g. "
                "`dicomlake user add admin --role admin`")
        self.authenticator = Authenticator(store)
        spark = self._spark or build_session(self.settings, app_name="dicomlake-sql")
        self.spark = spark
        warehouse = Warehouse(self.settings.warehouse_path)
        self.audit = AuditLog(warehouse.table_path(AUDIT_SCHEMA_NAME, AUDIT_TABLE_NAME)).start()
        self.catalog = LakeCatalog(spark, self.settings.warehouse_path,
                                   load_salt(self.settings.home))
        self.catalog.refresh(force=True)
        self.catalog.start_background_refresh()
        translator = Translator(self.catalog, server_version=SERVER_VERSION,
                                max_timeout_seconds=self.config.limits.timeout_seconds)
        self.manager = QueryManager(engine=SparkEngine(spark), translator=translator,
                                    catalog=self.catalog, audit=self.audit,
                                    limits=self.config.limits)
        http = _HttpServer((self.config.host, self.config.port), TrinoRequestHandler)
        if self.config.tls_cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(str(self.config.tls_cert), str(self.config.tls_key))
            http.socket = context.wrap_socket(http.socket, server_side=True,
                                              do_handshake_on_connect=False)
        http.app = self
        self._http = http
        self.started = time.monotonic()
        return self

    @property
    def url(self) -> str:
        assert self._http is not None
        host, port = self._http.server_address[:2]
        return f"{self.config.scheme}://{host}:{port}"

    def serve_forever(self) -> None:
        assert self._http is not None
        self._serving = True
        self._http.serve_forever(poll_interval=0.2)

    def serve_in_thread(self) -> SqlServer:
        self._serving = True
        self._thread = threading.Thread(target=self.serve_forever, name="dicomlake-http",
                                        daemon=True)
        self._thread.start()
        return self

    def audit_login_failure(self, user: str | None, reason: str, address: str | None) -> None:
        now = dt.datetime.now(dt.UTC)
        self.audit.append(AuditRecord(
            event="login_failed", user=user, role=None, query_id=None, sql=None,
            state="LOGIN_FAILED", rows=0, started_at=now, finished_at=now, duration_ms=0,
            error_name="AUTHENTICATION_FAILED", error_message=reason, client_address=address,
            source=None))

    def shutdown(self, *, stop_spark: bool = True) -> None:
        """Stop listening, cancel running queries, flush the audit log, stop Spark."""
        if self._http is not None:
            if self._serving:  # shutdown() waits for serve_forever, which may never have run
                self._http.shutdown()
            self._http.server_close()
        if hasattr(self, "manager"):
            self.manager.shutdown()
        if hasattr(self, "catalog"):
            self.catalog.stop()
        if hasattr(self, "audit"):
            self.audit.close()
        if stop_spark and self._spark is None and hasattr(self, "spark"):
            self.spark.stop()
