"""The OHIF viewer inside JupyterLab: its files and a DICOMweb proxy on the Jupyter server.

Routes (after ``<base_url>/dicomlake/``):

* ``GET viewer/...`` - the bundled OHIF build (:class:`~dicomlake.dicomnet.viewer.ViewerSite`
  mounted here), with an ``app-config.js`` whose DICOMweb root is the route below;
* ``GET dicomweb/...`` - QIDO-RS and WADO-RS forwarded to ``dicomlake serve`` as the SQL user
  the Jupyter user is mapped to.

Why a proxy rather than the browser talking to ``dicomlake serve`` itself: the lab user
would then need the SQL password in the browser (an HTTP Basic prompt inside the panel),
and the viewer would be another origin (CORS, and credentials per origin). Here the browser
only ever holds its Jupyter login; the mapped password stays on the Jupyter server (as for
every other route of this extension), every request is authenticated by Jupyter first and
then by ``dicomlake serve`` (roles, de-identification, the burned-in pixel rule and audit
all apply unchanged, under the mapped user's name). Only ``GET`` is forwarded: the viewer
reads; storing goes through the upload route. Only paths that name a DICOMweb resource
(:func:`~dicomlake.dicomnet.web.route_of`: no ``..``, no other endpoint of the server) are
forwarded; anything else is refused here with 404. Bodies are passed through as received, never
compressed (gzip cost viewers 8x their frame rate).
"""

from __future__ import annotations

import base64

import tornado.web
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from dicomlake.dicomnet.viewer import ViewerMissingError, ViewerSite
from dicomlake.dicomnet.web import route_of
from dicomlake.extension.identities import IdentityError, IdentityMap

__all__ = ["DicomwebProxyHandler", "ViewerFilesHandler", "viewer_routes"]

_FORWARDED_REQUEST_HEADERS = ("Accept",)
_FORWARDED_RESPONSE_HEADERS = ("Content-Type", "Warning", "Cache-Control")
MAX_RESPONSE_BYTES = 1 << 30
"""Largest DICOMweb answer passed through (a whole study retrieved as one multipart)."""


def _jupyter_user(handler: JupyterHandler) -> str:
    user = handler.current_user
    return str(getattr(user, "username", None) or getattr(user, "name", None) or user)


class ViewerFilesHandler(JupyterHandler):
    """OHIF's files for a logged-in Jupyter user, mounted under this extension's prefix."""

    def initialize(self, mount: str, dicomweb_path: str) -> None:
        self.mount = mount
        self.dicomweb_path = dicomweb_path

    @tornado.web.authenticated
    def get(self, path: str) -> None:
        # the root is absolute on this origin (OHIF builds further URLs from it)
        root = f"{self.request.protocol}://{self.request.host}{self.dicomweb_path}"
        try:
            response = ViewerSite(self.mount, root).respond(path)
        except ViewerMissingError as exc:
            raise tornado.web.HTTPError(404, str(exc)) from exc
        self.set_status(response.status)
        self.set_header("Content-Type", response.content_type)
        for name, value in response.headers:
            self.set_header(name, value)
        self.finish(response.body)


class DicomwebProxyHandler(JupyterHandler):
    """DICOMweb reads forwarded to the SQL endpoint as the Jupyter user's mapped SQL user."""

    def initialize(self, identities: IdentityMap) -> None:
        self.identities = identities

    @tornado.web.authenticated
    async def get(self, path: str) -> None:
        if route_of(f"/{path}") is None:
            raise tornado.web.HTTPError(404, f"not a DICOMweb resource: /{path}",
                                        reason="not a DICOMweb resource")
        try:
            connection = self.identities.connection_for(_jupyter_user(self))
        except IdentityError as exc:
            raise tornado.web.HTTPError(403, str(exc)) from exc
        identity = connection.identity
        token = base64.b64encode(f"{identity.sql_user}:{identity.password}".encode()).decode()
        headers = {"Authorization": f"Basic {token}", "Accept-Encoding": "identity"}
        for name in _FORWARDED_REQUEST_HEADERS:
            if name in self.request.headers:
                headers[name] = self.request.headers[name]
        query = f"?{self.request.query}" if self.request.query else ""
        url = f"{connection.endpoint.rstrip('/')}/dicomweb/{path}{query}"
        request = HTTPRequest(url, method="GET", headers=headers, connect_timeout=5.0,
                              request_timeout=600.0, decompress_response=False)
        try:
            answer = await AsyncHTTPClient(max_body_size=MAX_RESPONSE_BYTES).fetch(
                request, raise_error=False)
        except (OSError, HTTPClientError) as exc:
            raise tornado.web.HTTPError(502, f"dicomlake endpoint {connection.endpoint} "
                                             f"cannot be reached: {exc}") from exc
        if answer.code == 599:
            raise tornado.web.HTTPError(502, f"dicomlake endpoint {connection.endpoint} "
                                             f"cannot be reached: {answer.error}")
        self.set_status(answer.code)
        for name in _FORWARDED_RESPONSE_HEADERS:
            if name in answer.headers:
                self.set_header(name, answer.headers[name])
        self.finish(answer.body or b"")


def viewer_routes(base_url: str, namespace: str,
                  identities: IdentityMap) -> list[tuple[str, type, dict[str, object]]]:
    """The two routes, for ``web_app.add_handlers``."""
    mount = url_path_join(base_url, namespace, "viewer") + "/"
    dicomweb = url_path_join(base_url, namespace, "dicomweb")
    return [
        (mount + "(.*)", ViewerFilesHandler, {"mount": mount, "dicomweb_path": dicomweb}),
        (dicomweb + "/(.*)", DicomwebProxyHandler, {"identities": identities}),
    ]
