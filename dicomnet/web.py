"""DICOMweb routes under ``/dicomweb``: QIDO-RS, WADO-RS and STOW-RS for ``dicomlake serve``.

The SQL server's request handler authenticates (the same users, throttle and TLS), then hands
the request here as plain values and writes the :class:`Response` back, auditing it; nothing
here touches sockets. Each role is answered from its own :class:`CatalogIndex` (analysts:
``dicom_deid``), pixels go through :func:`~dicomlake.udfs.images.pixels_allowed`, and
pixel responses are never compressed (gzip cost viewers 8x their frame rate).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from dicomlake.dicomnet.index import InstanceRef, catalog_index
from dicomlake.dicomnet.matching import MatchError
from dicomlake.dicomnet.wado import (
    EXPLICIT_LE,
    MemberCache,
    NotAcceptable,
    choose_frame_syntax,
    deidentified_file,
    frame_bytes,
    metadata,
    multipart,
    rendered,
)
from dicomlake.errors import DicomlakeError
from dicomlake.udfs.images import pixels_allowed, withheld_reason

if TYPE_CHECKING:
    from dicomlake.config import Settings
    from dicomlake.dicomnet.index import CatalogIndex
    from dicomlake.dicomnet.stow import Stower
    from dicomlake.sql.users import Principal

__all__ = ["CORS_HEADERS", "PREFIX", "DicomWeb", "Response", "route_of"]

PREFIX = "/dicomweb"
"""Where the DICOMweb root is on the server (QIDO, WADO and STOW share it)."""

CORS_HEADERS: list[tuple[str, str]] = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
    ("Access-Control-Allow-Headers", "Authorization, Accept, Content-Type"),
    ("Access-Control-Expose-Headers", "Content-Type, Content-Length, Warning"),
    ("Access-Control-Max-Age", "600"),
]
"""Viewers served from another origin may call us (credentials travel as an explicit
Authorization header, never as cookies, so ``*`` is safe)."""

_UID = r"((?=[0-9.]{1,64}(?:/|$))\.*[0-9][0-9.]*)"
"""A UID path segment: digits and dots, at most 64 characters (PS3.5 9.1), with at least one
digit, so ``.`` and ``..`` are never UIDs and no route can name a parent path (a real file's
malformed UID, such as one with a trailing dot, stays reachable). Written so that a path
matches one way only: an ambiguous form (``[0-9.]*[0-9][0-9.]*``) backtracks, and cost
240 ms a frame request."""
_ROUTES: list[tuple[str, re.Pattern[str]]] = [(name, re.compile(f"^{pattern}$")) for
                                              name, pattern in (
    ("qido_studies", "/studies"),
    ("qido_series", "/series"),
    ("qido_series", f"/studies/{_UID}/series"),
    ("qido_instances", "/instances"),
    ("qido_instances", f"/studies/{_UID}/instances"),
    ("qido_instances", f"/studies/{_UID}/series/{_UID}/instances"),
    ("metadata", f"/studies/{_UID}/metadata"),
    ("metadata", f"/studies/{_UID}/series/{_UID}/metadata"),
    ("metadata", f"/studies/{_UID}/series/{_UID}/instances/{_UID}/metadata"),
    ("retrieve", f"/studies/{_UID}"),
    ("retrieve", f"/studies/{_UID}/series/{_UID}"),
    ("retrieve", f"/studies/{_UID}/series/{_UID}/instances/{_UID}"),
    ("frames", f"/studies/{_UID}/series/{_UID}/instances/{_UID}/frames/([0-9,]+)"),
    ("rendered", f"/studies/{_UID}/series/{_UID}/instances/{_UID}/(rendered|thumbnail)"),
    ("rendered", f"/studies/{_UID}/series/{_UID}/instances/{_UID}/frames/([0-9]+)/"
                 "(rendered|thumbnail)"),
    ("rendered", f"/studies/{_UID}/series/{_UID}/(thumbnail)"),
    ("rendered", f"/studies/{_UID}/(thumbnail)"),
)]


def route_of(path: str) -> tuple[str, tuple[str, ...]] | None:
    """The DICOMweb resource a path below :data:`PREFIX` names (route name, its UIDs and
    frame numbers), or None: the one grammar of our DICOMweb paths, which the Jupyter proxy
    also checks before it forwards anything."""
    for name, pattern in _ROUTES:
        if m := pattern.match(path or "/"):
            return name, m.groups()
    return None


_QIDO_CONTROLS = frozenset({"limit", "offset", "fuzzymatching", "includefield"})
MAX_LIMIT = 10_000


class DicomWebError(DicomlakeError):
    """A request answered with a 4xx status and a message naming what was wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Response:
    """What the HTTP handler sends back."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    items: int = 0
    """Datasets, instances or frames sent (audited as rows)."""


@dataclass(frozen=True)
class Request:
    """One DICOMweb request, already authenticated."""

    method: str
    path: str
    """Below :data:`PREFIX`."""
    query: list[tuple[str, str]]
    headers: Mapping[str, str]
    body: bytes
    principal: Principal
    root: str
    """The public URL of the DICOMweb root (for RetrieveURL and BulkDataURI)."""


class DicomWeb:
    """The DICOMweb service of one lake."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.members = MemberCache()
        self._stower: Stower | None = None
        self._lock = threading.Lock()

    def index(self, principal: Principal) -> CatalogIndex:
        return catalog_index(self.settings, principal.role)

    def handle(self, request: Request) -> Response:
        """Answer one request (4xx errors as JSON ``{"message": ...}``)."""
        try:
            if route := route_of(request.path):
                name, groups = route
                if name == "qido_studies" and request.method == "POST":
                    return self._store(request, None)
                if name == "retrieve" and request.method == "POST" and len(groups) == 1:
                    return self._store(request, groups[0])
                if request.method != "GET":
                    raise DicomWebError(405, f"{request.method} {PREFIX}{request.path} is "
                                             "not supported (GET; POST to /studies)")
                handler: Callable[[Request, tuple[str, ...]], Response] = \
                    getattr(self, f"_{name}")
                return handler(request, groups)
            raise DicomWebError(404, f"No DICOMweb resource {PREFIX}{request.path}; see PS3.18 "
                                     "(/studies, /series, /instances, .../metadata, "
                                     ".../frames/N, .../rendered)")
        except DicomWebError as exc:
            return Response(exc.status, json.dumps({"message": exc.message}).encode())
        except MatchError as exc:
            return Response(400, json.dumps({"message": f"bad query parameter {exc}"}).encode())

    # -- QIDO-RS ---------------------------------------------------------------------------

    def _qido(self, request: Request) -> dict[str, Any]:
        """The search keyword arguments from the query string."""
        query: dict[str, str] = {}
        include: list[str] = []
        limit: int | None = None
        offset = 0
        fuzzy = False
        for key, value in request.query:
            if key == "includefield":
                include.extend(v.strip() for v in value.split(",") if v.strip())
            elif key in ("limit", "offset"):
                try:
                    number = int(value)
                    if number < 0:
                        raise ValueError(value)
                except ValueError:
                    raise DicomWebError(400, f"query parameter {key}={value!r} is not a "
                                             "non-negative integer") from None
                if key == "limit":
                    limit = min(number, MAX_LIMIT)
                else:
                    offset = number
            elif key == "fuzzymatching":
                if value.lower() not in ("true", "false"):
                    raise DicomWebError(400, f"query parameter fuzzymatching={value!r} must be "
                                             "true or false")
                fuzzy = value.lower() == "true"
            elif key in query:
                raise DicomWebError(400, f"query parameter {key} is given twice; give one "
                                         "matching value (a UID list is u1\\u2)")
            else:
                query[key] = value
        return {"query": query, "include": include, "fuzzy": fuzzy, "offset": offset,
                "limit": MAX_LIMIT if limit is None else limit}

    def _json(self, datasets: list[dict[str, Any]]) -> Response:
        return Response(200, json.dumps(datasets, separators=(",", ":")).encode(),
                        "application/dicom+json", items=len(datasets))

    def _qido_studies(self, request: Request, groups: tuple[str, ...]) -> Response:
        return self._json(self.index(request.principal).studies(**self._qido(request)))

    def _qido_series(self, request: Request, groups: tuple[str, ...]) -> Response:
        study = groups[0] if groups else None
        return self._json(self.index(request.principal).series(study=study,
                                                               **self._qido(request)))

    def _qido_instances(self, request: Request, groups: tuple[str, ...]) -> Response:
        study, series = ([*list(groups), None, None])[:2]
        return self._json(self.index(request.principal).instances(
            study=study, series=series, **self._qido(request)))

    # -- WADO-RS ---------------------------------------------------------------------------

    def _refs(self, request: Request, groups: tuple[str, ...]) -> list[InstanceRef]:
        """The instances a retrieve URL names (404 when none)."""
        index = self.index(request.principal)
        if len(groups) >= 3:
            ref = index.instance(groups[2])
            refs = [ref] if ref is not None and ref.study_instance_uid == groups[0] \
                and ref.series_instance_uid == groups[1] else []
        else:
            refs = index.instance_refs(groups[0], groups[1] if len(groups) > 1 else None)
        if not refs:
            raise DicomWebError(404, f"no {('study', 'series', 'instance')[len(groups) - 1]} "
                                     f"{groups[-1]} in this lake (for this user)")
        return refs

    def _url(self, request: Request, ref: InstanceRef) -> str:
        return (f"{request.root}/studies/{ref.study_instance_uid}/series/"
                f"{ref.series_instance_uid}/instances/{ref.sop_instance_uid}")

    def _metadata(self, request: Request, groups: tuple[str, ...]) -> Response:
        refs = self._refs(request, groups)
        return self._json([metadata(ref, self._url(request, ref)) for ref in refs])

    def _bytes(self, request: Request, ref: InstanceRef) -> bytes:
        """The instance's stored bytes (analysts: looked up by pseudonym, inside the server)."""
        path = ref.path
        if self.index(request.principal).deidentified:
            from dicomlake.udfs.images import ANALYST_SCOPE, image_index

            with self._lock:
                path = image_index(str(self.settings.home), str(self.settings.warehouse_path),
                                   ANALYST_SCOPE).path_of(ref.sop_instance_uid)
        try:
            return self.members.read(path)
        except Exception as exc:  # archive gone or changed since ingest
            raise DicomWebError(404, f"instance {ref.sop_instance_uid} cannot be read from "
                                     f"the lake's files ({type(exc).__name__})") from exc

    def _allowed(self, request: Request, refs: list[InstanceRef]) -> list[InstanceRef]:
        """The instances whose pixels the role may get (403 when none)."""
        deid = self.index(request.principal).deidentified
        allowed = [r for r in refs if pixels_allowed(r.burned_in_annotation, deidentified=deid)]
        if not allowed:
            raise DicomWebError(403, withheld_reason(refs[0].sop_instance_uid))
        return allowed

    def _retrieve(self, request: Request, groups: tuple[str, ...]) -> Response:
        entries = [e.strip().lower() for e in (request.headers.get("Accept") or "*/*")
                   .split(",")]
        if not any(e.startswith(("multipart/related", "*/*", "multipart/*"))
                   and ("application/dicom" in e or "type=" not in e) for e in entries):
            raise DicomWebError(406, f"Accept {request.headers.get('Accept')!r}: instances are "
                                     "offered as multipart/related; type=\"application/dicom\"")
        refs = self._refs(request, groups)
        allowed = self._allowed(request, refs)
        deid = self.index(request.principal).deidentified
        parts = []
        for ref in allowed:
            data = self._bytes(request, ref)
            parts.append((deidentified_file(data, ref) if deid else data, "application/dicom"))
        body, content_type = multipart(parts, "application/dicom")
        headers = []
        if len(allowed) < len(refs):
            headers.append(("Warning", f'299 dicomlake "{len(refs) - len(allowed)} instance(s) '
                                       'withheld: BurnedInAnnotation YES"'))
        return Response(200, body, content_type, headers, items=len(parts))

    def _frames(self, request: Request, groups: tuple[str, ...]) -> Response:
        try:
            numbers = [int(n) for n in groups[3].split(",") if n]
        except ValueError:
            numbers = []
        if not numbers:
            raise DicomWebError(400, f"frame list {groups[3]!r} names no frame; use e.g. "
                                     "frames/1 or frames/1,2,3")
        ref = self._allowed(request, self._refs(request, groups[:3]))[0]
        if ref.pixel_data_offset is None:
            raise DicomWebError(404, f"instance {ref.sop_instance_uid} has no pixel data")
        stored = ref.transfer_syntax_uid or EXPLICIT_LE
        try:
            syntax, part_type = choose_frame_syntax(request.headers.get("Accept"), stored)
        except NotAcceptable as exc:
            raise DicomWebError(406, str(exc)) from None
        try:
            frames = frame_bytes(self._bytes(request, ref), ref, numbers, syntax)
        except IndexError as exc:
            raise DicomWebError(404, str(exc)) from None
        except ValueError as exc:
            raise DicomWebError(404, str(exc)) from None
        kind = part_type if part_type != "application/octet-stream" else \
            "application/octet-stream"
        part_type_header = f"{part_type}; transfer-syntax={syntax}"
        body, content_type = multipart([(f, part_type_header) for f in frames], kind,
                                       f"; transfer-syntax={syntax}")
        return Response(200, body, content_type, items=len(frames))

    def _rendered(self, request: Request, groups: tuple[str, ...]) -> Response:
        what = groups[-1]
        uids = groups[:-1]
        frame = 1
        if len(uids) == 4:
            frame, uids = int(uids[3]), uids[:3]
        refs = self._refs(request, uids)
        ref = self._allowed(request, refs)[0] if len(uids) == 3 else \
            self._allowed(request, refs)[len(self._allowed(request, refs)) // 2]
        params = dict(request.query)
        accept = (request.headers.get("Accept") or "image/jpeg").lower()
        media_type = "image/png" if "image/png" in accept and "image/jpeg" not in accept \
            else "image/jpeg"
        if not any(t in accept for t in ("image/jpeg", "image/png", "image/*", "*/*")):
            raise DicomWebError(406, f"Accept {accept!r}: rendered images are offered as "
                                     "image/jpeg or image/png")
        window = None
        if "window" in params:
            try:
                center, width = (float(v) for v in params["window"].split(",")[:2])
                window = (center, width)
            except ValueError:
                raise DicomWebError(400, f"query parameter window={params['window']!r} must "
                                         "be center,width[,function]") from None
        size = 128 if what == "thumbnail" else None
        if "viewport" in params:
            try:
                size = max(int(v) for v in params["viewport"].split(",")[:2])
            except ValueError:
                raise DicomWebError(400, f"query parameter viewport={params['viewport']!r} "
                                         "must be width,height") from None
        quality = 90
        if "quality" in params:
            try:
                quality = min(100, max(1, int(params["quality"])))
            except ValueError:
                raise DicomWebError(400, f"query parameter quality={params['quality']!r} "
                                         "must be 1-100") from None
        from dicomlake.udfs.errors import PixelError

        try:
            image = rendered(self._bytes(request, ref), ref, frame=frame,
                             media_type=media_type, window=window, size=size, quality=quality)
        except IndexError as exc:
            raise DicomWebError(404, str(exc)) from None
        except PixelError as exc:
            raise DicomWebError(404, f"instance {ref.sop_instance_uid} cannot be rendered: "
                                     f"{exc.kind}") from None
        return Response(200, image, media_type, items=1)

    # -- STOW-RS ---------------------------------------------------------------------------

    def _store(self, request: Request, study: str | None) -> Response:
        from dicomlake.dicomnet.stow import parse_multipart
        from dicomlake.sql.users import Role

        if request.principal.role not in (Role.ADMIN, Role.CLINICIAN):
            raise DicomWebError(403, f"user '{request.principal.name}' "
                                     f"({request.principal.role.value}) may not store "
                                     "instances; admins and clinicians may")
        try:
            parts = parse_multipart(request.body, request.headers.get("Content-Type") or "")
        except ValueError as exc:
            raise DicomWebError(415 if "Content-Type" in str(exc) else 400, str(exc)) from None
        stower = self._stow()
        results, job = stower.store(request.principal.name, parts, study)
        referenced, failed = [], []
        for r in results:
            item: dict[str, Any] = {}
            if r.sop_class_uid:
                item["00081150"] = {"vr": "UI", "Value": [r.sop_class_uid]}
            if r.sop_instance_uid:
                item["00081155"] = {"vr": "UI", "Value": [r.sop_instance_uid]}
            if r.failure is None:
                item["00081190"] = {"vr": "UR", "Value": [
                    f"{request.root}/studies/{r.study_instance_uid}/series/"
                    f"{r.series_instance_uid}/instances/{r.sop_instance_uid}"]}
                referenced.append(item)
            else:
                item["00081197"] = {"vr": "US", "Value": [r.failure]}
                failed.append(item)
        dataset: dict[str, Any] = {}
        if referenced:
            dataset["00081199"] = {"vr": "SQ", "Value": referenced}
        if failed:
            dataset["00081198"] = {"vr": "SQ", "Value": failed}
        status = 200 if not failed else 202 if referenced else 409
        headers = [("Warning", f'299 dicomlake "{r.reason[:300]}"') for r in results
                   if r.failure is not None][:5]
        if job is not None:
            headers.append(("X-Dicomlake-Upload", f"{job['id']} {job['path']}"))
        return Response(status, json.dumps(dataset).encode(), "application/dicom+json",
                        headers, items=len(referenced))

    def _stow(self) -> Stower:
        with self._lock:
            if self._stower is None:
                from dicomlake.dicomnet.stow import Stower

                self._stower = Stower(self.settings)
            return self._stower

    def close(self) -> None:
        if self._stower is not None:
            self._stower.close()


def parse_query(text: str) -> list[tuple[str, str]]:
    """The query string as (name, value) pairs in order, repeats kept."""
    return parse_qsl(text, keep_blank_values=True)
