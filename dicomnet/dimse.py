"""The lake's DIMSE service (``dicomlake dimse``): C-ECHO, C-STORE and C-FIND with pynetdicom.

PACS and modalities do not speak HTTP: they push with C-STORE and ask with C-FIND. This
service lets them, with the rules every other way into and out of the lake keeps:

* C-STORE takes the instance in through :class:`~dicomlake.dicomnet.intake.DimseIntake`
  (the browser upload's way in: the stream when its job runs, batch ingest otherwise) and
  answers Success only once the instance cannot be lost; what the lake's pre-check refuses
  is answered with a DIMSE failure status and an Error Comment saying why, and the
  association goes on.
* C-FIND (Patient Root and Study Root; STUDY, SERIES and IMAGE levels) is answered by
  :mod:`dicomlake.dicomnet.index`, the one matching engine QIDO-RS uses too.
* DIMSE has no passwords, so the calling AE title decides the role: AE titles configured as
  trusted get their role (``clinician`` or ``admin``: identifying values), every other peer
  the analyst's (de-identified values, pseudonymous UIDs), as an analyst in SQL.
* Every association (accepted, rejected, released or aborted) and every operation is one
  row of the SQL service's audit table (``system.audit_log``, ``source`` ``dimse``), with
  the calling AE title as the user and the DIMSE status of failures as the error name.

Accepted sockets get ``TCP_NODELAY``: with Nagle's algorithm on, each small PDU of a
C-STORE exchange waits for the previous one's acknowledgement (measured: ``storescu`` at 21
files/s instead of 265).
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from dicomlake.config import load_section
from dicomlake.dicomnet.index import CatalogIndex, Level, catalog_index
from dicomlake.dicomnet.intake import DimseIntake, Intake, StoreError, check_instance
from dicomlake.sql.users import Role

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pynetdicom.events import Event

    from dicomlake.config import Settings
    from dicomlake.extension.upload import UploadJob
    from dicomlake.sql.audit import AuditLog

log = logging.getLogger(__name__)

DEFAULT_AE_TITLE = "DICOMLAKE"
DEFAULT_PORT = 11112
"""The port IANA registered for DICOM (``dicom`` 11112/tcp)."""

MAX_PDU_BYTES = 4 * 1024 * 1024
"""The largest PDU this node receives (announced at association). pynetdicom's default,
16 KiB, cuts a 512x512 CT into 32 PDUs, each a few turns of its polling loops (measured:
storescu at 21-31 files/s against a bare pynetdicom SCP); a 512x512 instance fits in one."""

_ERROR_COMMENT_MAX = 64
"""Error Comment (0000,0902) is LO: at most 64 characters."""


def check_ae_title(title: str, what: str = "AE title") -> str:
    """``title`` if it is a valid AE title (1-16 characters, printable ASCII, no backslash);
    the error names the rule."""
    stripped = title.strip()
    if not stripped or len(stripped) > 16 or "\\" in stripped or not stripped.isprintable() \
            or not stripped.isascii():
        raise ValueError(f"{what} {title!r} is not valid: 1 to 16 printable ASCII characters, "
                         "no backslash")
    return stripped


@dataclass(frozen=True)
class DimseConfig:
    """Where the service listens, what it is called, and which peers it trusts.

    ``trusted`` maps calling AE titles to the role their queries get; any other peer gets
    ``default_role`` (the analyst's de-identified view unless set otherwise).
    """

    ae_title: str = DEFAULT_AE_TITLE
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    trusted: Mapping[str, Role] = field(default_factory=dict)
    default_role: Role = Role.ANALYST
    max_associations: int = 10
    max_find_results: int = 10_000
    """C-FIND answers at most this many matches (then status B000... is not used: the
    peer gets the first ones and a warning in the log)."""

    def __post_init__(self) -> None:
        check_ae_title(self.ae_title)
        for title in self.trusted:
            check_ae_title(title, "trusted AE title")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"DIMSE port {self.port} is not a TCP port (0-65535; 0 picks a "
                             "free one)")
        if self.max_associations < 1:
            raise ValueError("DIMSE max_associations must be at least 1")

    def role_for(self, calling_ae: str) -> Role:
        """The role a peer calling as ``calling_ae`` gets."""
        return self.trusted.get(calling_ae.strip(), self.default_role)


@dataclass(frozen=True)
class DimseSettings:
    """``[dimse]`` in the config file: the node as a PACS administrator sets it up once
    (each ``dicomlake dimse`` flag overrides its key for one run).

    ``trusted`` maps calling AE titles to roles; the flags' ``--trusted-ae`` list replaces
    the file's (never adds to it: a run can only narrow whom the file trusts, by naming)::

        [dimse]
        ae_title = "LAKE"
        port = 11112
        [dimse.trusted]
        PACS = "clinician"
    """

    ae_title: str = DEFAULT_AE_TITLE
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    trusted: dict[str, str] = field(default_factory=dict)
    max_associations: int = 10

    def __post_init__(self) -> None:
        self.config()  # every rule of DimseConfig, so a bad file fails when it is read

    def config(self) -> DimseConfig:
        """These settings as the server's config (roles parsed, AE titles checked)."""
        trusted: dict[str, Role] = {}
        for title, role in self.trusted.items():
            try:
                trusted[title] = Role(role.strip().lower())
            except ValueError:
                allowed = ", ".join(r.value for r in Role)
                raise ValueError(f"trusted AE title {title!r} has role {role!r}; it must be "
                                 f"one of: {allowed}") from None
        return DimseConfig(ae_title=self.ae_title, host=self.host, port=self.port,
                           trusted=trusted, max_associations=self.max_associations)


_DIMSE_ENVIRONMENT = {"ae_title": "DICOMLAKE_DIMSE_AE", "port": "DICOMLAKE_DIMSE_PORT"}


def load_dimse(settings: Settings, *, ae_title: str | None = None, host: str | None = None,
               port: int | None = None, trusted: Mapping[str, str] | None = None,
               max_associations: int | None = None) -> DimseConfig:
    """The service's config: defaults, then ``[dimse]``, then ``DICOMLAKE_DIMSE_AE`` and
    ``DICOMLAKE_DIMSE_PORT``, then the arguments that are not None (the command's flags).

    Raises:
        ConfigError: the file's section (or a variable) breaks a rule; names file and key.
        ValueError: an argument breaks a rule.
    """
    section = load_section(settings, "dimse", DimseSettings, env=_DIMSE_ENVIRONMENT)
    flags: dict[str, Any] = {"ae_title": ae_title, "host": host, "port": port,
                             "max_associations": max_associations,
                             "trusted": dict(trusted) if trusted is not None else None}
    return replace(section, **{k: v for k, v in flags.items() if v is not None}).config()


class _NoDelayServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with Nagle's algorithm off on every accepted socket."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def shutdown(self) -> None:
        """Stop serving and close the socket (this server was made with ``make_server``,
        so the AE's list of servers it started never held it)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


@dataclass
class _Peer:
    """One association: who called, with which role, and what it did."""

    id: str
    calling_ae: str
    address: str
    role: Role
    started: float = field(default_factory=time.monotonic)
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    intake: Intake | None = None
    stored: int = 0
    refused: int = 0
    finds: int = 0
    echoes: int = 0


def _comment(text: str) -> str:
    """``text`` fitted into an Error Comment (LO: 64 characters, no backslash)."""
    text = " ".join(text.replace("\\", "/").split())
    return text if len(text) <= _ERROR_COMMENT_MAX else text[:_ERROR_COMMENT_MAX - 3] + "..."


class _FindError(Exception):
    """A C-FIND identifier that cannot be answered; ``status`` is the failure to send."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_FIND_LEVELS = {"STUDY": Level.STUDY, "SERIES": Level.SERIES, "IMAGE": Level.INSTANCE}
_NOT_KEYS = (0x00080005, 0x00080052)
"""Specific Character Set and Query/Retrieve Level: part of every identifier, never keys."""


@dataclass(frozen=True)
class _FindRequest:
    """A C-FIND identifier read once: its level, the keys to match and the keys to return."""

    level: Level
    query: dict[str, str]
    """Keyword (or tag) to DICOM matching string, for the keys that carry a value."""
    returned: tuple[str, ...]
    """Keys asked for without a value (universal matching: returned, not matched)."""
    identifier: Dataset

    @classmethod
    def parse(cls, identifier: Dataset) -> _FindRequest:
        from pydicom.multival import MultiValue

        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        if level not in _FIND_LEVELS:
            raise _FindError(0xA900, f"QueryRetrieveLevel {level or 'missing'}: this service "
                                     "answers STUDY, SERIES or IMAGE")
        query: dict[str, str] = {}
        returned: list[str] = []
        for elem in identifier:
            if elem.tag in _NOT_KEYS or elem.tag.group in (0x0000, 0x0002):
                continue
            name = elem.keyword or f"{int(elem.tag):08X}"
            value = elem.value
            if elem.VR == "SQ" or value is None or value == "" or (
                    isinstance(value, MultiValue) and not any(str(v) for v in value)):
                returned.append(name)
            elif isinstance(value, MultiValue | list):
                query[name] = "\\".join(str(v) for v in value)
            else:
                query[name] = str(value)
        return cls(_FIND_LEVELS[level], query, tuple(returned), identifier)

    def describe(self) -> str:
        """The request in one line for the log and the audit record."""
        keys = " ".join(f"{k}={v}" for k, v in self.query.items())
        level = "IMAGE" if self.level is Level.INSTANCE else self.level.value
        return f"{level} {keys} return {','.join(self.returned) or '-'}"[:2000]

    def run(self, index: CatalogIndex, limit: int) -> list[dict[str, Any]]:
        """The matches as DICOM JSON (at most ``limit``)."""
        if self.level is Level.STUDY:
            return index.studies(self.query, limit=limit, include=self.returned)
        if self.level is Level.SERIES:
            return index.series(self.query, limit=limit, include=self.returned)
        return index.instances(self.query, limit=limit, include=self.returned)

    def answer(self, found: Mapping[str, Any]) -> Dataset:
        """One pending response: every requested key (empty when the match has no value)
        and nothing else, in UTF-8."""
        from pydicom.dataset import Dataset

        answer = Dataset.from_json({tag: value for tag, value in found.items()
                                    if int(tag, 16) in self.identifier})
        for elem in self.identifier:
            if elem.tag not in answer and elem.tag.group not in (0x0000, 0x0002):
                answer.add_new(elem.tag, elem.VR, None)
        answer.QueryRetrieveLevel = "IMAGE" if self.level is Level.INSTANCE else \
            self.level.value
        answer.SpecificCharacterSet = "ISO_IR 192"
        return answer


class DimseServer:
    """C-ECHO, C-STORE and C-FIND SCP on the lake.

    Example:
        >>> server = DimseServer(load_settings(), DimseConfig(port=11112)).start()
        >>> # storescu -aec DICOMLAKE 127.0.0.1 11112 file.dcm
        >>> server.shutdown()
    """

    def __init__(self, settings: Settings, config: DimseConfig | None = None, *,
                 audit: AuditLog | None = None) -> None:
        self.settings = settings
        self.config = config or DimseConfig()
        self._audit = audit
        self._owns_audit = audit is None
        self.intake = DimseIntake(settings, on_upload_done=self._upload_done)
        self._peers: dict[int, _Peer] = {}
        self._lock = threading.Lock()
        self._server: _NoDelayServer | None = None
        self._thread: threading.Thread | None = None
        self._deid_lock = threading.Lock()
        self._deid_checked = -float("inf")

    deid_check_seconds = 5.0
    """How stale an analyst's C-FIND may be behind the raw tables: the twins are refreshed
    by an analyst's C-FIND at most this often (rows the stream job writes reach analysts
    this way; the job itself never refreshes the twins), and at once after each batch
    ingest of received instances."""

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)`` (the real port when 0 was asked for)."""
        if self._server is None:
            raise RuntimeError("the DIMSE server is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def audit(self) -> AuditLog:
        if self._audit is None:
            raise RuntimeError("the DIMSE server is not started")
        return self._audit

    def start(self) -> DimseServer:
        """Open the audit log, queue uploads a previous run left pending, and listen."""
        if self._audit is None:
            from dicomlake.catalog.warehouse import Warehouse
            from dicomlake.sql.audit import AUDIT_SCHEMA_NAME, AUDIT_TABLE_NAME, AuditLog

            path = Warehouse(self.settings.warehouse_path).table_path(AUDIT_SCHEMA_NAME,
                                                                      AUDIT_TABLE_NAME)
            self._audit = AuditLog(path).start()
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True  # a peer must call us by our name
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = MAX_PDU_BYTES
        self._add_contexts(ae)
        handlers = [
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_ended, ["RELEASED"]),
            (evt.EVT_ABORTED, self._on_ended, ["ABORTED"]),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
        ]
        self.intake.start()
        try:
            server = ae.make_server((self.config.host, self.config.port),
                                    evt_handlers=handlers,  # type: ignore[arg-type]
                                    server_class=_NoDelayServer)
        except OSError as exc:
            self.intake.stop(wait=False)
            raise OSError(f"DIMSE cannot listen on {self.config.host}:{self.config.port}: "
                          f"{exc.strerror or exc}") from exc
        assert isinstance(server, _NoDelayServer)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever,
                                        name="dimse-acceptor", daemon=True)
        self._thread.start()
        host, port = self.address
        log.info("DIMSE %s listening on %s:%d", self.config.ae_title, host, port)
        return self

    @staticmethod
    def _add_contexts(ae: AE) -> None:
        """Verification, every storage SOP class in any transfer syntax (the bytes are kept
        as received, so nothing needs decoding), and the two query models' FIND."""
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts

        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(PatientRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)

    def shutdown(self, *, grace_s: float = 10.0) -> None:
        """Stop listening, let running associations end (then abort them), ingest what was
        received, and flush the audit log."""
        if self._server is not None:
            server, self._server = self._server, None
            active = list(server.active_associations)
            server.shutdown()
            deadline = time.monotonic() + grace_s
            for assoc in active:
                assoc.join(max(0.0, deadline - time.monotonic()))
                if assoc.is_alive():
                    assoc.abort()
        self.intake.stop(wait=True)
        if self._audit is not None and self._owns_audit:
            self._audit.close()

    # -- auditing ----------------------------------------------------------------------------

    def _record(self, peer: _Peer | None, event: str, *, what: str, state: str, rows: int = 0,
                started_at: dt.datetime | None = None, status: int | None = None,
                error: str | None = None, calling_ae: str | None = None,
                address: str | None = None, role: Role | None = None) -> None:
        from dicomlake.sql.audit import AuditRecord

        now = dt.datetime.now(dt.UTC)
        began = started_at or now
        self.audit.append(AuditRecord(
            event=event, user=peer.calling_ae if peer else calling_ae,
            role=str(peer.role if peer else role) if (peer or role) else None,
            query_id=peer.id if peer else None, sql=what, state=state, rows=rows,
            started_at=began, finished_at=now,
            duration_ms=int((now - began).total_seconds() * 1000),
            error_name=f"DIMSE_STATUS_0x{status:04X}" if status else None,
            error_message=error, client_address=peer.address if peer else address,
            source=f"dimse {self.config.ae_title}"))

    def _peer(self, event: Event) -> _Peer:
        """The association's state (made on the fly if an event came before ESTABLISHED)."""
        with self._lock:
            peer = self._peers.get(id(event.assoc))
        return peer if peer is not None else self._on_established(event)

    # -- association events ------------------------------------------------------------------

    def _on_established(self, event: Event) -> _Peer:
        remote = event.assoc.remote
        calling = str(remote["ae_title"]).strip()
        peer = _Peer(id=f"dimse-{uuid.uuid4().hex[:12]}", calling_ae=calling,
                     address=f"{remote['address']}:{remote['port']}",
                     role=self.config.role_for(calling))
        with self._lock:
            self._peers[id(event.assoc)] = peer
        log.info("DIMSE association %s from %s at %s (role %s)", peer.id, calling,
                 peer.address, peer.role)
        return peer

    def _on_ended(self, event: Event, how: str) -> None:
        with self._lock:
            peer = self._peers.pop(id(event.assoc), None)
        if peer is None:
            return
        if peer.intake is not None:
            self.intake.close(peer.intake)
        summary = (f"association {how.lower()}: {peer.echoes} C-ECHO, {peer.stored} stored, "
                   f"{peer.refused} refused, {peer.finds} C-FIND")
        if peer.intake is not None and peer.intake.path == "batch" and peer.stored:
            summary += f"; batch upload {peer.intake.job_id} queued for ingest"
        (log.warning if how == "ABORTED" else log.info)(
            "DIMSE %s from %s %s", peer.id, peer.calling_ae, summary)
        self._record(peer, "dimse_association", what=summary,
                     state="FINISHED" if how == "RELEASED" else "ABORTED",
                     rows=peer.stored, started_at=peer.started_at,
                     error="the peer or the network aborted the association"
                     if how == "ABORTED" else None)

    def _on_rejected(self, event: Event) -> None:
        """An association refused (wrong called AE title, too many associations...)."""
        remote = event.assoc.remote
        calling = str(remote.get("ae_title") or "").strip()
        called = str(getattr(event.assoc.requestor.primitive, "called_ae_title", "")).strip()
        if called != self.config.ae_title:
            reason = (f"association rejected: called AE title {called!r}, this service is "
                      f"{self.config.ae_title!r}")
        else:
            reason = ("association rejected: more than "
                      f"{self.config.max_associations} associations at once")
        log.warning("DIMSE %s from %s at %s:%s", reason, calling, remote.get("address"),
                    remote.get("port"))
        self._record(None, "dimse_association", what=reason, state="REJECTED",
                     calling_ae=calling or None, role=self.config.role_for(calling),
                     address=f"{remote.get('address')}:{remote.get('port')}", error=reason)

    # -- services ----------------------------------------------------------------------------

    def _on_echo(self, event: Event) -> int:
        peer = self._peer(event)
        peer.echoes += 1
        self._record(peer, "dimse_echo", what="C-ECHO", state="FINISHED")
        return 0x0000

    def _on_store(self, event: Event) -> int | Dataset:
        """Check the instance, make it durable, then answer Success (or a failure status
        with an Error Comment; the association goes on either way)."""
        peer = self._peer(event)
        began = dt.datetime.now(dt.UTC)
        request = event.request
        sop_class = str(request.AffectedSOPClassUID)
        sop_instance = str(request.AffectedSOPInstanceUID)  # type: ignore[union-attr]
        what = f"C-STORE {sop_class} {sop_instance}"
        try:
            data = event.encoded_dataset(include_meta=True)
            check_instance(data, sop_class, sop_instance)
            if peer.intake is None:
                peer.intake = self.intake.open(peer.calling_ae)
                log.info("DIMSE %s: %s", peer.id, peer.intake.reason)
            name = self.intake.store(peer.intake, sop_instance, data)
        except StoreError as exc:
            peer.refused += 1
            log.warning("DIMSE %s from %s: C-STORE of %s refused (0x%04X): %s", peer.id,
                        peer.calling_ae, sop_instance, exc.status, exc)
            self._record(peer, "dimse_store", what=what, state="FAILED", started_at=began,
                         status=exc.status, error=str(exc))
            return self._failure(exc.status, str(exc))
        peer.stored += 1
        log.debug("DIMSE %s: stored %s as %s", peer.id, sop_instance, name)
        self._record(peer, "dimse_store", what=f"{what} -> {peer.intake.path} {name}",
                     state="FINISHED", rows=1, started_at=began)
        return 0x0000

    @staticmethod
    def _failure(status: int, message: str) -> Dataset:
        from pydicom.dataset import Dataset

        answer = Dataset()
        answer.Status = status
        answer.ErrorComment = _comment(message)
        return answer

    def _on_find(self, event: Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """Answer a C-FIND from the role's catalog index (the engine QIDO-RS uses).

        Keys with a value are matched (DICOM matching: wild cards, ranges, UID lists);
        empty keys are returned. Each match carries exactly the requested keys.
        """
        peer = self._peer(event)
        peer.finds += 1
        began = dt.datetime.now(dt.UTC)
        model = "Patient Root" if event.request.AffectedSOPClassUID == \
            PatientRootQueryRetrieveInformationModelFind else "Study Root"
        try:
            request = _FindRequest.parse(event.identifier)
        except _FindError as exc:
            what = f"C-FIND {model}: {exc}"
            log.warning("DIMSE %s from %s: %s", peer.id, peer.calling_ae, what)
            self._record(peer, "dimse_find", what=what, state="FAILED", started_at=began,
                         status=exc.status, error=str(exc))
            yield self._failure(exc.status, str(exc)), None
            return
        what = f"C-FIND {model} {request.describe()}"
        limit = self.config.max_find_results
        try:
            if peer.role is Role.ANALYST:
                self._refresh_deidentified()
            matches = request.run(self._catalog(peer.role), limit + 1)
        except Exception as exc:  # MatchError names the key; anything else is ours
            from dicomlake.dicomnet.matching import MatchError

            status = 0xA900 if isinstance(exc, MatchError) else 0xC001
            text = str(exc) if isinstance(exc, MatchError) else \
                f"the catalog cannot be searched ({type(exc).__name__}: {exc})"
            (log.warning if status == 0xA900 else log.exception)(
                "DIMSE %s from %s: %s: %s", peer.id, peer.calling_ae, what, text)
            self._record(peer, "dimse_find", what=what, state="FAILED", started_at=began,
                         status=status, error=text)
            yield self._failure(status, text), None
            return
        sent, state, note = 0, "FINISHED", None
        try:
            for found in matches[:limit]:
                if event.is_cancelled:
                    state, note = "CANCELLED", "the peer cancelled the C-FIND"
                    yield 0xFE00, None
                    return
                yield 0xFF00, request.answer(found)
                sent += 1
            if len(matches) > limit:
                state, note = "TRUNCATED", (f"more than {limit} matches; the first {limit} "
                                            "were sent (narrow the query)")
                log.warning("DIMSE %s from %s: %s: %s", peer.id, peer.calling_ae, what, note)
                yield self._failure(0xB001, note), None
        finally:
            self._record(peer, "dimse_find", what=what, state=state, rows=sent,
                         started_at=began, error=note)

    def _catalog(self, role: Role) -> CatalogIndex:
        return catalog_index(self.settings, role)

    def _refresh_deidentified(self, *, force: bool = False) -> None:
        """Bring the ``dicom_deid`` twins up to date (at most every
        :attr:`deid_check_seconds` unless ``force``): analysts are answered from them, and
        the batch ingest and the stream job write only the raw tables."""
        from dicomlake.catalog.deid import refresh

        with self._deid_lock:
            if not force and time.monotonic() - self._deid_checked < self.deid_check_seconds:
                return
            refresh(self.settings.warehouse_path, self.settings.home)
            self._deid_checked = time.monotonic()

    def _upload_done(self, job: UploadJob) -> None:
        """A batch upload of received instances finished: report and audit its outcome, and
        bring the de-identified twins up to date so analysts find the new instances."""
        failed = job.state != "FINISHED"
        if not failed:
            try:
                self._refresh_deidentified(force=True)
            except Exception:  # the next analyst C-FIND tries again
                log.exception("DIMSE: refreshing the de-identified tables failed")
        summary = job.summary or {}
        text = (f"ingest of DIMSE upload {job.id} ({len(job.files)} files, {job.path}): "
                f"{job.state.lower()}, {summary}")
        (log.error if failed else log.info)("DIMSE %s%s", text,
                                            "; " + " | ".join(job.output[-5:]) if failed else "")
        from dicomlake.sql.audit import AuditRecord

        now = dt.datetime.now(dt.UTC)
        elapsed = dt.timedelta(seconds=time.monotonic() - job.started)
        self.audit.append(AuditRecord(
            event="dimse_ingest", user=None, role=None, query_id=job.id, sql=text,
            state="FAILED" if failed else "FINISHED",
            rows=int(summary.get("rows_written", summary.get("sent", 0)) or 0),
            started_at=now - elapsed, finished_at=now,
            duration_ms=int(elapsed.total_seconds() * 1000),
            error_name="INGEST_FAILED" if failed else None,
            error_message=" | ".join(job.output[-5:])[-2000:] if failed else None,
            client_address=None, source=f"dimse {self.config.ae_title}"))
