"""The HTTP resource: Trino's REST endpoints, authentication, TLS, and the server wiring.

The request handler only authenticates, parses the request into a :class:`ClientSession`,
asks the :class:`QueryManager` for a query or a page, and writes the response; it never
calls Spark (Kyuubi's ``StatementResource`` habit). Endpoints:

* ``POST /v1/statement`` - SQL as the body; answers with the first page (waiting up to a
  second, so small queries finish in one round trip) and a ``nextUri`` while more follows.
* ``GET /v1/statement/executing/{id}/{slug}/{token}`` - the next page.
* ``DELETE`` on the same URI (or ``/v1/query/{id}``) - cancel; answers 204.
* ``GET /v1/query/{id}`` - query info; ``GET /v1/info`` and ``/v1/info/state`` - liveness.
* ``/dicomweb/...`` - DICOMweb (QIDO-RS, WADO-RS, STOW-RS) for viewers and PACS, answered by
  :class:`dicomlake.dicomnet.web.DicomWeb` after the same authentication; every request is
  audited (``event = 'dicomweb'``), refusals as ``request_refused``.
* ``GET /viewer/...`` - the bundled OHIF viewer (:mod:`dicomlake.dicomnet.viewer`), public
  files without a login; its ``app-config.js`` points at ``<public URL>/dicomweb``, where
  the browser's first request gets 401 with ``WWW-Authenticate: Basic`` and so the browser's
  own login prompt (or the credentials a client was given).

Plain HTTP is accepted only on a loopback address; any other bind address needs TLS.
Every refused request is audited (user claimed, client address, status); failed logins back
off per user and per address (:class:`~dicomlake.sql.users.LoginThrottle`); ``nextUri`` and
``infoUri`` are built from the configured public URL, never from the request's ``Host``.
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
from dicomlake.sql.users import Authenticator, LoginThrottle, Principal, Role, UserStore

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from dicomlake.config import Settings

log = logging.getLogger(__name__)

SERVER_VERSION = f"476-dicomlake-{__version__}"
"""Reported by ``/v1/info`` and ``version()``: Trino 476 protocol, dicomlake behind it."""

_EXECUTING = re.compile(r"^/v1/statement/(?:executing|queued)/([\w-]+)/([\w-]+)/(\d+)$")
_QUERY = re.compile(r"^/v1/query/([\w-]+)$")
VIEWER_MOUNT = "/viewer/"
"""Where ``dicomlake serve`` serves the OHIF viewer."""


@dataclass(frozen=True)
class ServerConfig:
    """Where and how ``dicomlake serve`` listens."""

    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: Limits = field(default_factory=Limits)
    max_statement_bytes: int = 1 << 20
    """Longest statement accepted (and audited whole); longer ones are refused with 413."""
    max_store_bytes: int = 512 << 20
    """Largest STOW-RS request body (the browser upload's limit, too)."""
    public_url: str | None = None
    """The URL clients reach the server by (behind a proxy, say); default: the bound
    address. ``nextUri`` and ``infoUri`` start with it."""

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("dicomlake serve needs both --tls-cert and --tls-key (or neither)")
        if self.tls_cert is None and not is_loopback(self.host):
            raise ValueError(
                f"dicomlake serve refuses plain HTTP on {self.host!r}: passwords would cross "
                "the network in clear. Bind 127.0.0.1, or serve over TLS: --tls auto, or "
                "--tls-cert and --tls-key.")

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
    server: _HttpServer
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

    def _error(self, status: int, message: str, *, user: str | None = None,
               event: str = "request_refused", headers: list[tuple[str, str]] | None = None,
               audit_reason: str | None = None, **extra: Any) -> None:
        """Answer with an HTTP error and audit the refusal (with ``audit_reason`` where the
        log may say more than the client is told)."""
        self.server.app.audit_refusal(status, audit_reason or message, user=user, event=event,
                                      address=self.client_address[0], path=self._path())
        headers = list(headers or [])
        if status == 401:
            headers.append(("WWW-Authenticate", 'Basic realm="dicomlake"'))
        self._send(status, message_json(message, **extra), headers=headers)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, 414, 431 header too large) are
        audited like ours."""
        self.server.app.audit_refusal(int(code), message or explain or "bad request",
                                      user=None, event="request_refused",
                                      address=self.client_address[0], path=self._path())
        super().send_error(code, message, explain)

    def _path(self) -> str | None:
        path = getattr(self, "path", None)
        return path.split("?", 1)[0][:200] if isinstance(path, str) else None

    def _claimed_user(self) -> str | None:
        headers = getattr(self, "headers", None)
        if headers is None:
            return None
        return headers.get("X-Trino-User") or headers.get("X-Presto-User")

    def _base_url(self) -> str:
        return self.server.app.public_url

    # -- authentication ---------------------------------------------------------------------

    def _principal(self) -> Principal | None:
        """The authenticated user, or None after answering 401/403."""
        app = self.server.app
        address = self.client_address[0]
        header = self.headers.get("Authorization", "")
        claimed = self._claimed_user()
        if not header.lower().startswith("basic "):
            self._error(401, "Authentication required: send HTTP Basic credentials "
                             "(user and password made with `dicomlake user add`)",
                        user=claimed, event="login_failed")
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
            name, sep, password = decoded.partition(":")
            if not sep:
                raise ValueError("no ':' in credentials")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            self._error(401, "Malformed HTTP Basic credentials", user=claimed,
                        event="login_failed")
            return None
        wait = app.throttle.wait_seconds(name, address)
        if wait > 0:  # refused before the password is looked at
            retry = max(1, round(wait))
            self._error(429, f"Too many failed logins for this user or address; retry in "
                             f"{retry} s", user=name, event="login_failed",
                        headers=[("Retry-After", str(retry))])
            return None
        try:
            principal = app.authenticator.authenticate(name, password)
        except AuthenticationError as exc:
            app.throttle.failed(name, address)
            # the client is not told which part was wrong; the audit log is
            self._error(401, "Invalid credentials: user name or password is wrong",
                        user=name, event="login_failed", audit_reason=str(exc))
            return None
        app.throttle.succeeded(name, address)
        if claimed and claimed != principal.name:
            self._error(403, f"Access Denied: user '{principal.name}' cannot impersonate "
                             f"user '{claimed}'", user=principal.name)
            return None
        return principal

    # -- routes -----------------------------------------------------------------------------

    def do_OPTIONS(self) -> None:
        """CORS preflight for DICOMweb (browsers send it without credentials)."""
        from dicomlake.dicomnet.web import CORS_HEADERS, PREFIX

        path = self.path.split("?", 1)[0]
        if path == PREFIX or path.startswith(PREFIX + "/"):
            self._send(204, headers=CORS_HEADERS)
            return
        self._error(404, f"No such endpoint: OPTIONS {path}", user=self._claimed_user())

    def _dicomweb(self) -> bool:
        """Serve a DICOMweb request (True), or leave the request to the SQL routes (False)."""
        from dicomlake.dicomnet.web import CORS_HEADERS, PREFIX, Request, parse_query

        path, _, query = self.path.partition("?")
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            return False
        principal = self._principal()
        if principal is None:
            if self.command == "POST":
                self._discard_body()
            return True
        app = self.server.app
        body = b""
        if self.command == "POST":
            try:
                length = int(self.headers.get("Content-Length") or "")
            except ValueError:
                self._error(411, "Content-Length (a byte count) is required to store "
                                 "instances", user=principal.name)
                self.close_connection = True
                return True
            if length > app.config.max_store_bytes:
                self._error(413, f"Store request is {length} bytes; the limit is "
                                 f"{app.config.max_store_bytes}", user=principal.name)
                self.close_connection = True
                return True
            body = self.rfile.read(length)
        started = dt.datetime.now(dt.UTC)
        response = app.dicomweb.handle(Request(
            self.command, path[len(PREFIX):], parse_query(query), self.headers,  # type: ignore[arg-type]
            body, principal, f"{self._base_url()}{PREFIX}"))
        headers = [*CORS_HEADERS, *response.headers]
        if response.status >= 400:
            app.audit_refusal(response.status, json.loads(response.body)["message"],
                              user=principal.name, event="request_refused",
                              address=self.client_address[0], path=self._path())
        else:
            app.audit_dicomweb(principal, self.command, self.path, response.status,
                               response.items, started, self.client_address[0])
        self._send(response.status, response.body, headers=headers,
                   content_type=response.content_type)
        return True

    def _viewer(self) -> bool:
        """Serve the OHIF viewer's files (True), or leave the request to the others."""
        from dicomlake.dicomnet.viewer import ViewerMissingError

        path = self.path.split("?", 1)[0]
        if path == VIEWER_MOUNT.rstrip("/"):
            self._send(301, b"", headers=[("Location", VIEWER_MOUNT)],
                       content_type="text/plain")
            return True
        if not path.startswith(VIEWER_MOUNT):
            return False
        try:
            response = self.server.app.viewer.respond(path[len(VIEWER_MOUNT):])
        except ViewerMissingError as exc:
            self._error(404, str(exc), user=self._claimed_user())
            return True
        self._send(response.status, response.body, headers=response.headers,
                   content_type=response.content_type)
        return True

    def do_GET(self) -> None:
        if self._dicomweb() or self._viewer():
            return
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
        self._error(404, f"No such endpoint: GET {path}", user=self._claimed_user())

    def do_POST(self) -> None:
        if self._dicomweb():
            return
        path = self.path.split("?", 1)[0]
        if path != "/v1/statement":
            self._error(404, f"No such endpoint: POST {path}", user=self._claimed_user())
            return
        principal = self._principal()
        if principal is None:
            self._discard_body()
            return
        app = self.server.app
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self._error(411, "Content-Length is required; send the SQL text as the body",
                        user=principal.name)
            self.close_connection = True
            return
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError(length_text)
        except ValueError:
            self._error(400, f"Content-Length {length_text!r} is not a byte count",
                        user=principal.name)
            self.close_connection = True
            return
        if length > app.config.max_statement_bytes:
            self._error(413, f"Statement is {length} bytes; the limit is "
                             f"{app.config.max_statement_bytes}", user=principal.name)
            self.close_connection = True
            return
        raw = self.rfile.read(length)
        try:
            sql = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._error(400, f"The statement is not valid UTF-8 ({exc}); send SQL text",
                        user=principal.name)
            return
        try:
            # the headers' case-insensitive get() is all from_headers uses; a Message is no
            # Mapping, and a dict of it would make the lookup case-sensitive
            session = ClientSession.from_headers(self.headers)  # type: ignore[arg-type]
        except QueryError as exc:
            self._error(400, exc.message, user=principal.name, error=exc.to_json())
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
            self._error(404, f"No such endpoint: DELETE {path}", user=self._claimed_user())
            return
        principal = self._principal()
        if principal is None:
            return
        query = self._owned_query(principal, m.group(1))
        if query is None:
            return
        if m.re is _EXECUTING and m.group(2) != query.slug:
            self._error(404, f"Query {query.id} has no URI with that slug",
                        user=principal.name)
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
            self._error(404, f"Query {query_id} does not exist (or has expired)",
                        user=principal.name)
            return None
        return query

    def _page(self, principal: Principal, query_id: str, slug: str, token: int) -> None:
        query = self._owned_query(principal, query_id)
        if query is None:
            return
        if slug != query.slug:
            self._error(404, f"Query {query_id} has no URI with that slug",
                        user=principal.name)
            return
        body = query.respond(token, base_url=self._base_url(),
                             wait=self.server.app.config.limits.max_wait_seconds)
        if body is None:
            self._error(404, f"Token {token} of query {query_id} is not the current or next "
                             "page; follow nextUri in order", user=principal.name)
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
        from dicomlake.sql.metadata import LakeCatalog
        from dicomlake.sql.roles import RoleSessions
        from dicomlake.sql.translate import Translator

        store = UserStore(self.settings.home)
        if not store.list():
            raise SqlServiceError(
                f"no SQL users in {store.path}; create one first, e.g. "
                "`dicomlake user add admin --role admin`")
        self.authenticator = Authenticator(store)
        self.throttle = LoginThrottle()
        self.refresh_deidentified()  # a writer that stopped before refreshing is caught up
        spark = self._spark or build_session(self.settings, app_name="dicomlake-sql")
        self.spark = spark
        warehouse = Warehouse(self.settings.warehouse_path)
        self.audit = AuditLog(warehouse.table_path(AUDIT_SCHEMA_NAME, AUDIT_TABLE_NAME)).start()
        sessions = RoleSessions(spark, self.settings)
        self.catalog = LakeCatalog(sessions, self.settings.warehouse_path,
                                   maintain=self.refresh_deidentified)
        self.catalog.refresh(force=True)
        self.catalog.start_background_refresh()
        translator = Translator(self.catalog, server_version=SERVER_VERSION,
                                max_timeout_seconds=self.config.limits.timeout_seconds)
        self.manager = QueryManager(engine=SparkEngine(sessions), translator=translator,
                                    catalog=self.catalog, audit=self.audit,
                                    limits=self.config.limits)
        http = _HttpServer((self.config.host, self.config.port), TrinoRequestHandler)
        if self.config.tls_cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(str(self.config.tls_cert), str(self.config.tls_key))
            http.socket = context.wrap_socket(http.socket, server_side=True,
                                              do_handshake_on_connect=False)
        from dicomlake.dicomnet.viewer import ViewerSite
        from dicomlake.dicomnet.web import DicomWeb

        self.dicomweb = DicomWeb(self.settings)
        http.app = self
        self._http = http
        self.viewer = ViewerSite(VIEWER_MOUNT, f"{self.public_url}/dicomweb")
        self.started = time.monotonic()
        return self

    @property
    def url(self) -> str:
        """The bound address."""
        assert self._http is not None
        host, port = self._http.server_address[:2]
        assert isinstance(host, str)  # an IP address; bytes are only for AF_UNIX paths
        return f"{self.config.scheme}://{host}:{port}"

    @property
    def public_url(self) -> str:
        """What ``nextUri``/``infoUri`` start with: the configured public URL, else
        :attr:`url` (never the client's ``Host`` header)."""
        return (self.config.public_url or self.url).rstrip("/")

    def refresh_deidentified(self) -> None:
        """Bring the ``dicom_deid`` twins up to date (cheap when nothing changed)."""
        from dicomlake.catalog.deid import refresh

        refresh(self.settings.warehouse_path, self.settings.home)

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

    def audit_refusal(self, status: int, reason: str, *, user: str | None, event: str,
                      address: str | None, path: str | None) -> None:
        """Record a refused request (``event``: ``request_refused`` or ``login_failed``)."""
        if not hasattr(self, "audit"):
            return
        now = dt.datetime.now(dt.UTC)
        name = "AUTHENTICATION_FAILED" if event == "login_failed" else f"HTTP_{status}"
        self.audit.append(AuditRecord(
            event=event, user=user, role=None, query_id=None, sql=None,
            state="LOGIN_FAILED" if event == "login_failed" else "REFUSED", rows=0,
            started_at=now, finished_at=now, duration_ms=0, error_name=name,
            error_message=f"{reason} ({path})" if path else reason, client_address=address,
            source=None, http_status=status))

    def audit_dicomweb(self, principal: Principal, method: str, target: str, status: int,
                       items: int, started: dt.datetime, address: str | None) -> None:
        """Record an answered DICOMweb request (``rows``: datasets, instances or frames)."""
        if not hasattr(self, "audit"):
            return
        now = dt.datetime.now(dt.UTC)
        self.audit.append(AuditRecord(
            event="dicomweb", user=principal.name, role=principal.role.value, query_id=None,
            sql=f"{method} {target[:2000]}", state="FINISHED", rows=items, started_at=started,
            finished_at=now, duration_ms=int((now - started).total_seconds() * 1000),
            error_name=None, error_message=None, client_address=address, source="dicomweb",
            http_status=status))

    def shutdown(self, *, stop_spark: bool = True) -> None:
        """Stop listening, cancel running queries, flush the audit log, stop Spark."""
        if self._http is not None:
            if self._serving:  # shutdown() waits for serve_forever, which may never have run
                self._http.shutdown()
            self._http.server_close()
        if hasattr(self, "dicomweb"):
            self.dicomweb.close()
        if hasattr(self, "manager"):
            self.manager.shutdown()
        if hasattr(self, "catalog"):
            self.catalog.stop()
        if hasattr(self, "audit"):
            self.audit.close()
        if stop_spark and self._spark is None and hasattr(self, "spark"):
            self.spark.stop()
