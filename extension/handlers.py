"""HTTP routes of the Jupyter server extension, all under ``<base_url>/dicomlake/``.

Every route needs an authenticated Jupyter user (``@tornado.web.authenticated``; API calls
without a login get 403) and reaches the lake only through the SQL endpoint, as the SQL user
that Jupyter user is mapped to (:mod:`~dicomlake.extension.identities`). Responses are JSON;
a failed statement is a normal answer carrying ``error`` (with its line and column) and the
SQL that failed, so the UI can show both. HTTP errors are for requests that cannot be served:
400 bad input, 403 no mapping, 404 unknown query, 502 endpoint unreachable.

Routes:

* ``GET status`` - endpoint, SQL user, reachable or not
* ``GET catalog?catalog=&schema=&table=`` - one level of the schema tree
* ``GET completions`` - tables and columns for the editor's completion
* ``POST queries`` / ``GET queries/{id}?offset=&limit=&wait=`` / ``DELETE queries/{id}``
* ``POST browse/{action}`` - the dataset browser's statements
* ``POST image-search`` (multipart ``image``, field ``k``) - neighbours of an image that is
  not in the lake, by ``image_knn(query_image => X'...')``; the image is held in memory for
  the one statement and never saved (uploading it is the separate ``uploads`` route)
* ``POST uploads`` (multipart ``files``) / ``GET uploads/{id}``: the upload stream when its
  job runs, else batch ingest + embed (``path`` in the reply)
* ``GET viewer/...`` and ``GET dicomweb/...``: the OHIF viewer and the DICOMweb reads it
  makes, as the mapped SQL user (:mod:`~dicomlake.extension.viewer_proxy`)
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from dicomlake.extension import browse_sql
from dicomlake.extension.browse_sql import BrowseInputError, Filters
from dicomlake.extension.identities import IdentityError, IdentityMap
from dicomlake.extension.queries import QueryRegistry
from dicomlake.extension.sqlclient import Result, SqlClient, SqlClientError
from dicomlake.extension.upload import UploadError, UploadManager
from dicomlake.extension.viewer_proxy import viewer_routes

NAMESPACE = "dicomlake"
"""URL prefix of every route (after the server's base URL)."""
MAX_STATEMENT_CHARS = 1 << 20
ENDPOINT_STATEMENT_BYTES = 1 << 20
"""Longest statement ``dicomlake serve`` accepts by default (its ``max_statement_bytes``):
an image searched for travels inside one, as hex (two characters a byte)."""


@dataclass
class ExtensionState:
    """What the handlers share for the life of the Jupyter server."""

    identities: IdentityMap
    queries: QueryRegistry
    uploads: UploadManager


def quote_ident(name: str) -> str:
    """A Trino quoted identifier."""
    return '"' + name.replace('"', '""') + '"'


class BaseHandler(APIHandler):
    """Shared plumbing: the mapped SQL client, JSON in and out, error mapping."""

    @property
    def state(self) -> ExtensionState:
        return self.settings[NAMESPACE]

    @property
    def jupyter_user(self) -> str:
        user = self.current_user
        return str(getattr(user, "username", None) or getattr(user, "name", None) or user)

    def sql_client(self) -> SqlClient:
        """The client for this request's user (403 if the user is not mapped)."""
        try:
            return SqlClient(self.state.identities.connection_for(self.jupyter_user))
        except IdentityError as exc:
            raise tornado.web.HTTPError(403, str(exc)) from exc

    def body_json(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.request.body or b"{}")
        except ValueError as exc:
            raise tornado.web.HTTPError(400, f"request body is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise tornado.web.HTTPError(400, "request body must be a JSON object")
        return doc

    def reply(self, doc: object, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(doc, default=str))

    async def guarded(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work``, turning known failures into JSON errors with the right status."""
        try:
            await work()
        except BrowseInputError as exc:
            raise tornado.web.HTTPError(400, str(exc)) from exc
        except UploadError as exc:
            raise tornado.web.HTTPError(400, str(exc)) from exc
        except SqlClientError as exc:
            raise tornado.web.HTTPError(exc.status, str(exc)) from exc


class StatusHandler(BaseHandler):
    """Connection status shown at the top of the sidebar."""

    @tornado.web.authenticated
    async def get(self) -> None:
        doc: dict[str, Any] = {"jupyterUser": self.jupyter_user, "connected": False}
        try:
            connection = self.state.identities.connection_for(self.jupyter_user)
        except IdentityError as exc:
            doc["error"] = str(exc)
            self.reply(doc)
            return
        client = SqlClient(connection, request_timeout=30.0)
        doc.update(endpoint=connection.endpoint, sqlUser=connection.identity.sql_user,
                   canUpload=connection.identity.upload)
        try:
            info = await client.info()
            doc["serverVersion"] = (info.get("nodeVersion") or {}).get("version")
            result = await client.execute("SELECT current_user AS sql_user")
        except SqlClientError as exc:
            doc["error"] = str(exc)
            self.reply(doc)
            return
        if result.error is not None:
            doc["error"] = result.error.message
        else:
            doc["connected"] = True
        self.reply(doc)


class CatalogHandler(BaseHandler):
    """One level of the schema tree, loaded when the user expands a node."""

    @tornado.web.authenticated
    async def get(self) -> None:
        catalog = self.get_query_argument("catalog", None)
        schema = self.get_query_argument("schema", None)
        table = self.get_query_argument("table", None)

        async def work() -> None:
            if catalog is None:
                sql, kind = "SHOW CATALOGS", "catalog"
            elif schema is None:
                sql, kind = f"SHOW SCHEMAS FROM {quote_ident(catalog)}", "schema"
            elif table is None:
                sql = f"SHOW TABLES FROM {quote_ident(catalog)}.{quote_ident(schema)}"
                kind = "table"
            else:
                sql = (f"SHOW COLUMNS FROM {quote_ident(catalog)}.{quote_ident(schema)}."
                       f"{quote_ident(table)}")
                kind = "column"
            result = await self.sql_client().execute(sql)
            items = [{"name": row[0], "type": row[1] if kind == "column" else None}
                     for row in result.rows]
            self.reply({"sql": sql, "kind": kind, "items": items,
                        "error": result.error.to_json() if result.error else None})

        await self.guarded(work)


class CompletionsHandler(BaseHandler):
    """Every table and its columns, for the SQL editor's completion."""

    SQL = ("SELECT table_schema, table_name, column_name\n"
           "FROM dicomlake.information_schema.columns\n"
           "ORDER BY table_schema, table_name, ordinal_position")

    @tornado.web.authenticated
    async def get(self) -> None:
        async def work() -> None:
            result = await self.sql_client().execute(self.SQL, max_rows=50_000)
            tables: dict[str, list[str]] = {}
            for schema, table, column in result.rows:
                tables.setdefault(f"{schema}.{table}", []).append(column)
            self.reply({"sql": self.SQL, "tables": tables,
                        "error": result.error.to_json() if result.error else None})

        await self.guarded(work)


class QueriesHandler(BaseHandler):
    """Start a sidebar query."""

    @tornado.web.authenticated
    async def post(self) -> None:
        doc = self.body_json()
        sql = str(doc.get("sql") or "").strip()
        if not sql:
            raise tornado.web.HTTPError(400, "no SQL to run; send {\"sql\": \"SELECT ...\"}")
        if len(sql) > MAX_STATEMENT_CHARS:
            raise tornado.web.HTTPError(400, f"statement is {len(sql)} characters; at most "
                                             f"{MAX_STATEMENT_CHARS}")
        sql = sql.rstrip(";").rstrip()
        query = self.state.queries.start(self.jupyter_user, self.sql_client(), sql)
        await self.state.queries.wait(query, rows_wanted=1, timeout=0.5)
        self.reply(query.page(0, 0), status=201)


class QueryHandler(BaseHandler):
    """Read one page of a sidebar query, or cancel it."""

    def _query(self, query_id: str) -> Any:
        query = self.state.queries.get(self.jupyter_user, query_id)
        if query is None:
            raise tornado.web.HTTPError(404, f"query {query_id} does not exist (or expired)")
        return query

    @tornado.web.authenticated
    async def get(self, query_id: str) -> None:
        query = self._query(query_id)
        try:
            offset = max(0, int(self.get_query_argument("offset", "0")))
            limit = min(1000, max(0, int(self.get_query_argument("limit", "100"))))
            wait = min(30.0, max(0.0, float(self.get_query_argument("wait", "0"))))
        except ValueError as exc:
            raise tornado.web.HTTPError(400, f"offset, limit and wait must be numbers: {exc}"
                                        ) from exc
        await self.state.queries.wait(query, rows_wanted=offset + limit, timeout=wait)
        self.reply(query.page(offset, limit))

    @tornado.web.authenticated
    async def delete(self, query_id: str) -> None:
        query = self._query(query_id)
        await self.state.queries.cancel(query, self.sql_client())
        self.reply(query.page(0, 0))


class BrowseHandler(BaseHandler):
    """The dataset browser's actions; each answers with its SQL and its rows."""

    @tornado.web.authenticated
    async def post(self, action: str) -> None:
        doc = self.body_json()

        async def work() -> None:
            builder = _BROWSE_ACTIONS.get(action)
            if builder is None:
                raise tornado.web.HTTPError(
                    404, f"unknown browse action {action!r}; one of: "
                         f"{', '.join(sorted(_BROWSE_ACTIONS))}")
            sql = builder(doc)
            result = await self.sql_client().execute(sql, max_rows=browse_sql.MAX_PAGE + 1)
            self.reply(_result_doc(result))

        await self.guarded(work)


def _result_doc(result: Result) -> dict[str, Any]:
    doc = result.to_json()
    doc["records"] = result.records()
    del doc["rows"]
    return doc


def _studies(doc: dict[str, Any]) -> str:
    offset, limit = browse_sql.page_args(doc)
    return browse_sql.studies_sql(Filters.from_json(doc.get("filters") or {}), offset, limit)


def _series(doc: dict[str, Any]) -> str:
    return browse_sql.series_sql(browse_sql.check_uid(doc.get("study"), "study"),
                                 Filters.from_json(doc.get("filters") or {}))


def _instances(doc: dict[str, Any]) -> str:
    offset, limit = browse_sql.page_args(doc, default=48)
    return browse_sql.instances_sql(browse_sql.check_uid(doc.get("series"), "series"),
                                    offset, limit)


def _instance(doc: dict[str, Any]) -> str:
    return browse_sql.instance_sql(browse_sql.check_uid(doc.get("sop"), "sop"))


def _similar(doc: dict[str, Any]) -> str:
    return browse_sql.similar_sql(browse_sql.check_uid(doc.get("sop"), "sop"),
                                  browse_sql.neighbours_arg(doc))


_BROWSE_ACTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "modalities": lambda doc: browse_sql.facets_sql("modality"),
    "body-parts": lambda doc: browse_sql.facets_sql("body_part_examined"),
    "studies": _studies,
    "series": _series,
    "instances": _instances,
    "instance": _instance,
    "similar": _similar,
}


class ImageSearchHandler(BaseHandler):
    """Neighbours of an image the user picked (DICOM, PNG or JPEG), which is not in the lake.

    The image reaches the endpoint inline in one statement, run as the user's SQL user like
    every browser action; it is kept in this request's memory only. The reply is the browse
    reply (records with thumbnails) with the statement as the browser shows it (the image
    literal shortened to its first bytes, with size and SHA-256) and ``queryImage``: what
    was sent.
    """

    @tornado.web.authenticated
    async def post(self) -> None:
        files = self.request.files.get("image", [])
        if len(files) != 1:
            raise tornado.web.HTTPError(400, "send exactly one image (DICOM, PNG or JPEG) as "
                                             "the multipart field 'image'")
        name, data = files[0]["filename"], bytes(files[0]["body"])
        k_text = self.get_body_argument("k", None)

        async def work() -> None:
            k = browse_sql.neighbours_arg({"k": k_text})
            client = self.sql_client()
            search, sent = await asyncio.to_thread(_image_search, data, name, k)
            result = await client.execute(search.sql, max_rows=browse_sql.MAX_PAGE + 1)
            result.sql = search.shown
            doc = _result_doc(result)
            doc["queryImage"] = {"name": _label(name), "bytes": len(data),
                                 "sha256": search.sha256, "sent": sent}
            self.reply(doc)

        await self.guarded(work)


def _label(name: str) -> str:
    """A file name fit to show in a SQL comment (one line, no control characters)."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", name).strip()[:80] or "image"


def _image_search(data: bytes, name: str, k: int) -> tuple[browse_sql.ImageSearch, str]:
    """The statement for a search by ``data``, and what it sends (``as uploaded``, or, for a
    DICOM file whose statement would be longer than the endpoint takes, ``frame 0 as PNG``:
    the 8-bit frame the model's input is made from, which the search reads back to exactly
    the same model input)."""
    from dicomlake.udfs.errors import PixelError
    from dicomlake.udfs.knn import MAX_QUERY_IMAGE_BYTES
    from dicomlake.udfs.pixels import image_kind, windowed_png

    label = _label(name)
    if len(data) > MAX_QUERY_IMAGE_BYTES:
        raise BrowseInputError(f"{label} is {len(data)} bytes; a query image may have at "
                               f"most {MAX_QUERY_IMAGE_BYTES}")
    search = browse_sql.image_search_sql(data, k, label)
    if len(search.sql) <= ENDPOINT_STATEMENT_BYTES:
        return search, "as uploaded"
    if image_kind(data) == "dicom":
        try:
            png = windowed_png(data, label)
        except PixelError as exc:
            raise BrowseInputError(str(exc)) from exc
        search = browse_sql.image_search_sql(png, k, f"{label}, frame 0 as PNG")
        if len(search.sql) <= ENDPOINT_STATEMENT_BYTES:
            return search, "frame 0 as PNG"
    raise BrowseInputError(
        f"{label} is {len(data)} bytes; sent inline it makes a statement longer than the "
        f"{ENDPOINT_STATEMENT_BYTES} bytes the SQL endpoint accepts (PNG and JPEG images up "
        "to about 500 KiB fit; larger DICOM files are sent as their first frame)")


class UploadsHandler(BaseHandler):
    """Accept DICOM files or archives and send them into the lake: through the upload
    stream when its job runs, else the batch fallback; the reply's ``path`` says which."""

    @tornado.web.authenticated
    async def post(self) -> None:
        client = self.sql_client()
        if not client.connection.identity.upload:
            raise tornado.web.HTTPError(
                403, f"Jupyter user {self.jupyter_user!r} may not upload; an administrator "
                     "allows it with `dicomlake jupyter map ... --upload`")
        files = [(f["filename"], f["body"]) for f in self.request.files.get("files", [])]

        async def work() -> None:
            job = self.state.uploads.save(self.jupyter_user, files)
            await self.state.uploads.start(job)
            self.reply(job.to_json(), status=202)

        await self.guarded(work)


def _stream_check_sql(sha256s: list[str]) -> str:
    """How many instances the stream has written so far from these images (its rows carry
    the image's SHA-256 as ``source_fingerprint``)."""
    values = ", ".join(browse_sql.literal(s) for s in sha256s) or "NULL"
    return ("SELECT count(*) AS instances, count(DISTINCT series_instance_uid) AS series\n"
            "FROM dicom.instances\n"
            f"WHERE source_fingerprint IN ({values})")


class UploadHandler(BaseHandler):
    """Progress of one upload; once done, the SQL that counts what it added (for the stream
    path: what the job has written so far, as it writes after the broker confirmed)."""

    @tornado.web.authenticated
    async def get(self, job_id: str) -> None:
        job = self.state.uploads.get(self.jupyter_user, job_id)
        if job is None:
            raise tornado.web.HTTPError(404, f"upload {job_id} does not exist")
        doc = job.to_json()

        async def work() -> None:
            if job.state == "FINISHED":
                sql = (_stream_check_sql(job.sent_sha256) if job.path == "stream"
                       else browse_sql.count_source_sql(str(job.folder)))
                doc["check"] = _result_doc(await self.sql_client().execute(sql))
            self.reply(doc)

        await self.guarded(work)


def setup_handlers(web_app: tornado.web.Application, home: Path) -> ExtensionState:
    """Register the routes and the shared state on the Jupyter server's web app."""
    state = ExtensionState(identities=IdentityMap(), queries=QueryRegistry(),
                           uploads=UploadManager(home))
    web_app.settings[NAMESPACE] = state
    base = url_path_join(web_app.settings["base_url"], NAMESPACE)
    uid = r"([0-9a-f]{32})"
    web_app.add_handlers(".*$", [
        (url_path_join(base, "status"), StatusHandler),
        (url_path_join(base, "catalog"), CatalogHandler),
        (url_path_join(base, "completions"), CompletionsHandler),
        (url_path_join(base, "queries"), QueriesHandler),
        (url_path_join(base, "queries", uid), QueryHandler),
        (url_path_join(base, "browse", r"([a-z-]+)"), BrowseHandler),
        (url_path_join(base, "image-search"), ImageSearchHandler),
        (url_path_join(base, "uploads"), UploadsHandler),
        (url_path_join(base, "uploads", r"([0-9T]+-[0-9a-f]{8})"), UploadHandler),
        *viewer_routes(web_app.settings["base_url"], NAMESPACE, state.identities),
    ])
    return state
