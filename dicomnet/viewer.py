"""The OHIF viewer, served from the lake's own server at ``/viewer/`` (and through Jupyter).

The build comes unchanged from the ``@ohif/app`` npm package (``make install`` unpacks its
``dist/`` into ``dicomnet/viewer/``, the wheel carries it). That build expects to live at
``/``: its ``index.html`` names every file as ``/...`` and its bundles load their chunks
from ``__webpack_require__.p = "/"``. Rather than rebuilding OHIF, :class:`ViewerSite`
rewrites those two things as it serves them, for whatever path the viewer is mounted at
(``/viewer/`` on ``dicomlake serve``, ``<base_url>/dicomlake/viewer/`` in Jupyter), and it
writes ``app-config.js`` per request so the viewer talks to *this* server's DICOMweb root on
the same origin (no CORS, and the browser's credentials for that origin apply).

The files are public OHIF code and are served without a login; every DICOMweb request the
viewer then makes is authenticated as usual. Nothing here is ever compressed: pixel data
must not be gzipped, and the bundles are served as they lie on disk.
"""

from __future__ import annotations

import json
import mimetypes
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from dicomlake.errors import DicomlakeError

__all__ = ["OHIF_VERSION", "VIEWER_DIR", "ViewerMissingError", "ViewerResponse", "ViewerSite",
           "app_config"]

OHIF_VERSION = "3.13.2"
"""The ``@ohif/app`` release the Makefile unpacks (pinned: its config keys are what
:func:`app_config` writes)."""

VIEWER_DIR = Path(__file__).resolve().parent / "viewer"
"""Where ``make install`` puts OHIF's ``dist/`` (package data of ``dicomlake.dicomnet``)."""

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",  # browsers compile wasm while streaming only with this type
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".xml": "application/xml",
    ".txt": "text/plain; charset=utf-8",
}
_WEBPACK_ROOT = b'__webpack_require__.p = "/";'
_WEBPACK_MOUNTED = (b'__webpack_require__.p = (self.PUBLIC_URL || '
                    b'new URL(".", self.location.href).pathname);')
"""Chunks load from the page's ``PUBLIC_URL`` (set in ``index.html``) or, inside a web
worker, from the folder the worker's own script came from: the same byte rewrite serves
every mount point."""
_ROOT_REFERENCE = re.compile(rb'(\s(?:href|src)=")/(?!/)')
_PUBLIC_URL = b'window.PUBLIC_URL="/"'
_CSS_ROOT_URL = re.compile(rb"url\(/(?!/)")
"""Fonts named from the stylesheet's root; ``./`` is the same folder wherever it is mounted."""
_MOUNT = re.compile(r"^(?:/[A-Za-z0-9._~-]+)*/$")


class ViewerMissingError(DicomlakeError):
    """The OHIF build is not installed next to this module."""


@dataclass(frozen=True)
class ViewerResponse:
    """What to send back for one viewer request."""

    status: int
    body: bytes
    content_type: str
    headers: list[tuple[str, str]] = field(default_factory=list)


def app_config(mount: str, dicomweb_root: str) -> bytes:
    """OHIF's ``window.config`` for a viewer at ``mount`` reading from ``dicomweb_root``.

    What our DICOMweb service supports decides each switch: QIDO accepts ``includefield``
    (one comma-separated list too) and fuzzy name matching; frames come from WADO-RS
    (``wadors``) and thumbnails from the instance ``/thumbnail`` resource; there is no
    static-WADO layout. The investigational-use dialog and the onboarding tours (the
    ``ohif.tours`` customization, replaced by none at global scope) are off: each would cover
    the study list or the first image on every first visit of a lab panel, whose browser
    storage is often fresh.
    """
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomlake",
        "configuration": {
            "friendlyName": "dicomlake",
            "name": "dicomlake",
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "wadoUriRoot": dicomweb_root,
            "qidoSupportsIncludeField": True,
            "supportsFuzzyMatching": True,
            "supportsWildcard": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "thumbnail",
            "thumbnailRequestStrategy": "fetch",
            "enableStudyLazyLoad": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "name": "dicomlake",
        "routerBasename": mount.rstrip("/") or "/",
        "extensions": [],
        "modes": [],
        "customizationService": {"ohif.tours": {"$set": []}},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        "defaultDataSourceName": "dicomlake",
        "dataSources": [source],
    }
    text = json.dumps(config, indent=1).replace("</", "<\\/")
    return f"/* written by dicomlake for this server */\nwindow.config = {text};\n".encode()


class ViewerSite:
    """The viewer's files as seen at one mount point, reading from ``root``."""

    def __init__(self, mount: str, dicomweb_root: str, root: Path = VIEWER_DIR) -> None:
        if not _MOUNT.match(mount):
            raise ValueError(f"viewer mount {mount!r} must be a path that starts and ends "
                             "with '/'")
        self.mount = mount
        self.dicomweb_root = dicomweb_root
        self.root = root.resolve()

    def _file(self, relative: str) -> Path | None:
        """The file ``relative`` names inside :attr:`root`, or None (also for anything that
        would leave it: ``..``, absolute names, links pointing out)."""
        if "\x00" in relative:
            return None
        candidate = (self.root / relative.lstrip("/")).resolve()
        if not candidate.is_relative_to(self.root) or not candidate.is_file():
            return None
        return candidate

    def _index(self) -> bytes:
        index = self.root / "index.html"
        if not index.is_file():
            raise ViewerMissingError(
                f"The OHIF viewer is not installed ({index} is missing): run `make install`, "
                f"which unpacks @ohif/app@{OHIF_VERSION} there")
        mount = self.mount.encode()
        html = _ROOT_REFERENCE.sub(rb"\1" + mount, index.read_bytes())
        return html.replace(_PUBLIC_URL, b"window.PUBLIC_URL=" + json.dumps(self.mount).encode())

    def respond(self, path: str) -> ViewerResponse:
        """The answer for ``path`` (the URL path after the mount, still percent-encoded).

        Known files are sent with their type; ``app-config.js`` is written for this mount;
        any other name without an extension is one of OHIF's routes and gets
        ``index.html``; a missing file with an extension is a 404.
        """
        relative = unquote(path.split("?", 1)[0]).lstrip("/")
        fresh = [("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff")]
        if relative == "app-config.js":
            return ViewerResponse(200, app_config(self.mount, self.dicomweb_root),
                                  _CONTENT_TYPES[".js"], fresh)
        found = None if relative in ("", "index.html") else self._file(relative)
        if found is None:
            if relative != "index.html" and "." in relative.rsplit("/", 1)[-1]:
                return ViewerResponse(404, f"No such viewer file: {relative}".encode(),
                                      _CONTENT_TYPES[".txt"], fresh)
            return ViewerResponse(200, self._index(), _CONTENT_TYPES[".html"], fresh)
        body = found.read_bytes()
        if found.suffix == ".js" and _WEBPACK_ROOT in body:
            body = body.replace(_WEBPACK_ROOT, _WEBPACK_MOUNTED)
        elif found.suffix == ".css":
            body = _CSS_ROOT_URL.sub(b"url(./", body)
        content_type = (_CONTENT_TYPES.get(found.suffix.lower())
                        or mimetypes.guess_type(found.name)[0] or "application/octet-stream")
        # bundle names carry a content hash; the rest may change with an upgrade
        hashed = re.search(r"(?:^|\.)[0-9a-f]{16}\.(?:js|wasm)$", found.name) is not None
        cache = "public, max-age=31536000, immutable" if hashed else "no-cache"
        return ViewerResponse(200, body, content_type,
                              [("Cache-Control", cache), ("X-Content-Type-Options", "nosniff")])
