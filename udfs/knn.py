"""``image_knn(query => ..., k => ...)``: a Spark SQL table-valued function (Python UDTF).

Usage::

    SELECT i.*, n.distance
    FROM image_knn(query => '1.2.826...', k => 10, filter => "modality = 'CT'") n
    JOIN dicom.instances i USING (sop_instance_uid)

    SELECT q.sop_instance_uid AS query, n.*
    FROM dicom.instances q, LATERAL image_knn(query => q.sop_instance_uid, k => 3) n

    SELECT * FROM image_knn(query_image => X'89504E470D0A1A0A...', k => 10)

    SELECT u.name, n.* FROM my_uploads u, LATERAL image_knn(query_image => u.bytes, k => 3) n

``query`` is a SOPInstanceUID (digits and dots), an embedding (``array<float>``) or, for
admins only, an image path (``<archive>!/<member>`` or a file). ``query_image`` (instead of
``query``, every role) is an image that need not be in the lake, as ``binary``: DICOM, PNG or
JPEG bytes, at most :data:`MAX_QUERY_IMAGE_BYTES`. They are decoded and embedded in the
worker's memory exactly as lake images are, and never written anywhere; messages about them
give their size and first bytes, nothing more. Output: ``rank,
sop_instance_uid, frame, distance`` (L2), nearest first. The search runs in the Python worker:
the codebook, codes (from the configured store), exact vectors for ``refine`` and filter
columns are loaded once per worker and re-loaded only when their table (or HBase generation)
changed.

Each role's session registers its own ``image_knn`` (:class:`~dicomlake.udfs.images.ImageScope`):
analysts' searches, ids and filters use the de-identified twins (``dicom_deid.codes``,
``embeddings``, ``instances``), so a filter can only ever compare against de-identified
values, and no role but admin may name a file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomlake.catalog import tables
from dicomlake.catalog.snapshots import FollowedTable, TableRows, read_table, schema_of
from dicomlake.udfs import pq
from dicomlake.udfs.codestore import CODES, CodeStore, DeltaCodeStore, check_versions, open_store
from dicomlake.udfs.errors import CodebookError, KnnError
from dicomlake.udfs.images import ADMIN_SCOPE, ImageScope
from dicomlake.udfs.search import CodeIndex
from dicomlake.udfs.search import refine as refine_rows
from dicomlake.udfs.settings import SimilaritySettings

KNN_DDL = "rank int, sop_instance_uid string, frame int, distance double"
MAX_QUERY_IMAGE_BYTES = 32 << 20
"""Largest ``query_image`` accepted (a 512x512 CT is about 0.5 MiB; a large colour
photograph a few MiB); larger values are refused before anything is decoded."""
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _vectors(table: Any) -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(table.num_rows, -1) if table.num_rows else np.zeros((0, 0), np.float32)


_EMB_COLUMNS = ["sop_instance_uid", "frame", "model_version", "embedding"]


@dataclass
class Searcher:
    """Everything one worker needs to answer queries, refreshed when tables change.

    The stream appends to ``dicom.codes`` and ``dicom.embeddings`` several times a second, and
    every query task checks for changes, so the tables are kept open and a check is an
    ``update_incremental`` per table (:mod:`~dicomlake.catalog.snapshots`); a change that only
    appended reads only the new files. Anything else (``embed --replace``, deletes, the HBase
    store) reloads that table.
    """

    warehouse: Path
    similarity: SimilaritySettings
    scope: ImageScope = ADMIN_SCOPE
    _stamps: dict[str, object] = field(default_factory=dict)
    book: pq.Codebook | None = None
    index: CodeIndex | None = None
    exact: np.ndarray | None = None
    exact_rows: np.ndarray | None = None
    emb_keys: dict[tuple[str, int], int] = field(default_factory=dict)
    _filters: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    store: CodeStore = field(init=False)
    _books: FollowedTable = field(init=False)
    _emb: TableRows = field(init=False)
    _instances: FollowedTable = field(init=False)

    def __post_init__(self) -> None:
        # the de-identified twin of the codes is always Delta
        self.store = (DeltaCodeStore(self._path(CODES)) if self.scope.deidentified
                      else open_store(self.warehouse, self.similarity))
        self._books = FollowedTable(self._book_path())
        self._emb = TableRows(self._path("embeddings"), _EMB_COLUMNS)
        self._instances = FollowedTable(self._path("instances"))

    def _path(self, table: str) -> Path:
        return self.warehouse / self.scope.schema / table

    def _book_path(self) -> Path:
        """Codebooks (centroids, no identifiers) live in ``dicom`` for every scope."""
        return tables.CODEBOOKS.path(self.warehouse)

    def refresh(self) -> None:
        """Reload the codebook, codes and exact vectors if any of them changed."""
        store = self.store
        stamps = {"book": self._books.version(),
                  "codes": (store.name, store.generation()),
                  "emb": self._emb.followed.version()}
        if stamps == self._stamps and self.index is not None:
            return
        if stamps["book"] != self._stamps.get("book") or self.book is None:
            self.book = pq.latest(self._book_path())
        if self.book is None:
            raise CodebookError(
                f"image_knn: no PQ codebook yet in {self._book_path()}; run "
                "`dicomlake embed` (it trains one once images are embedded)")
        codes = store.load()
        check_versions(codes, self.book.version, store.name)
        n = codes.num_rows
        raw = b"".join(codes.column("code").to_pylist()) if n else b""
        code_arr = np.frombuffer(raw, np.uint8).reshape(n, self.book.m)
        self.index = CodeIndex.build(
            self.book, np.array(codes.column("sop_instance_uid").to_pylist(), dtype=object),
            np.asarray(codes.column("frame").to_numpy(zero_copy_only=False), np.int32),
            code_arr, np.asarray(codes.column("list_id").to_numpy(zero_copy_only=False),
                                 np.int32))
        self._load_exact()
        self._filters.clear()
        self._stamps = stamps

    def _load_exact(self) -> None:
        import pyarrow.compute as pc

        assert self.index is not None and self.book is not None
        self._emb.refresh()
        emb = self._emb.rows
        if emb is None or not emb.num_rows:
            self.emb_keys, self.exact = {}, None
        else:
            emb = emb.filter(pc.equal(emb.column("model_version"), self.book.model_version))
            self.emb_keys = {(u, int(f)): i for i, (u, f) in enumerate(zip(
                emb.column("sop_instance_uid").to_pylist(), emb.column("frame").to_pylist(),
                strict=True))}
            self.exact = _vectors(emb) if emb.num_rows else None
        self.exact_rows = np.array(
            [self.emb_keys.get((u, int(f)), -1) for u, f in zip(
                self.index.ids.tolist(), self.index.frames.tolist(), strict=True)],
            dtype=np.int64)

    def allowed(self, text: str) -> np.ndarray:
        """Bool per index row: does the row's instance pass the metadata filter?"""
        import pyarrow as pa

        from dicomlake.udfs.filters import parse_filter

        instances = self._instances.table()
        key = (text, -1 if instances is None else instances.version())
        if key in self._filters:
            return self._filters[key]
        table = f"{self.scope.schema}.instances"
        columns = ({f.name: f.type for f in schema_of(instances)} if instances is not None
                   else {"sop_instance_uid": pa.string()})
        expr, used = parse_filter(text, columns, table)
        wanted = sorted(used | {"sop_instance_uid"})
        data = (read_table(instances, wanted) if instances is not None
                else pa.table({c: pa.array([], columns[c]) for c in wanted}))
        try:
            passing = set(data.filter(expr).column("sop_instance_uid").to_pylist()) \
                if data.num_rows else set()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise KnnError(f"image_knn filter {text!r} cannot be evaluated over {table}: "
                           f"{exc}") from exc
        assert self.index is not None
        mask = np.fromiter((u in passing for u in self.index.ids.tolist()), dtype=bool,
                           count=self.index.size)
        self._filters[key] = mask
        return mask

    def query_vector(self, query: Any, frame: int) -> np.ndarray:
        """The embedding a query stands for (see the module docstring)."""
        assert self.book is not None
        if isinstance(query, list | tuple | np.ndarray):
            if len(query) == 0:
                raise KnnError("image_knn: the query embedding is empty")
            vec = np.asarray([np.nan if v is None else v for v in query], dtype=np.float32)
            return self.book.check_vectors(vec, "image_knn query embedding")[0]
        if not isinstance(query, str) or not query.strip():
            raise KnnError(f"image_knn: query must be a SOPInstanceUID, an image path or an "
                           f"array<float> embedding, got {query!r}")
        text = query.strip()
        if _UID.match(text):
            row = self.emb_keys.get((text, frame))
            if row is None or self.exact is None:
                raise KnnError(
                    f"image_knn: no embedding for SOPInstanceUID {text!r} frame {frame}; "
                    f"check the id in {self.scope.schema}.instances, or run `dicomlake "
                    "embed` if it was ingested after the last embed")
            return self.exact[row]
        if not self.scope.paths:  # decided before any file is looked at
            raise KnnError(
                f"image_knn: query must be a sop_instance_uid of {self.scope.schema}.instances "
                "or an array<float> embedding; image files are only for admins")
        from dicomlake.udfs.errors import PixelError
        from dicomlake.udfs.pixels import model_inputs

        try:
            images = model_inputs(text)
        except PixelError as exc:
            raise KnnError(f"image_knn: query image cannot be used: {exc}") from exc
        return self._embed_frame(images, frame, f"query image {text}")

    def image_vector(self, data: bytes, frame: int) -> np.ndarray:
        """The embedding of an image given as bytes (``query_image``), made in memory."""
        from dicomlake.udfs.errors import PixelError
        from dicomlake.udfs.pixels import query_image_inputs

        if len(data) > MAX_QUERY_IMAGE_BYTES:
            raise KnnError(f"image_knn: query_image is {len(data)} bytes; at most "
                           f"{MAX_QUERY_IMAGE_BYTES} ({MAX_QUERY_IMAGE_BYTES >> 20} MiB) are "
                           "accepted")
        try:
            images = query_image_inputs(data, "query_image")
        except PixelError as exc:
            raise KnnError(f"image_knn: {exc} ({len(data)} bytes)") from exc
        return self._embed_frame(images, frame, f"query_image ({len(data)} bytes)")

    def _embed_frame(self, images: np.ndarray, frame: int, what: str) -> np.ndarray:
        """One frame of a decoded query image through the codebook's model."""
        from dicomlake.udfs.model import backend_of, embedder_for

        assert self.book is not None
        if not 0 <= frame < len(images):
            raise KnnError(f"image_knn: {what} has {len(images)} frame(s); frame {frame} "
                           "does not exist")
        # the codebook's model, not the configured backend: codes and query must match
        embedder = embedder_for(backend_of(self.book.model_id), device=self.similarity.device)
        vec = embedder.embed(images[frame:frame + 1])
        return self.book.check_vectors(vec, f"image_knn {what}")[0]

    def search(self, query: Any, k: int, *, nprobe: int | None = None,
               refine: int | None = None, filter_text: str | None = None, frame: int = 0,
               refresh: bool = True, image: bytes | None = None
               ) -> list[tuple[int, str, int, float]]:
        """Ranked (rank, sop_instance_uid, frame, distance) rows for ``query`` or, when it is
        None, the image bytes ``image`` (``refresh=False``: the caller refreshed already,
        e.g. once for a whole query task)."""
        if refresh or self.index is None:
            self.refresh()
        assert self.index is not None
        vec = self.image_vector(image, frame) if image is not None and query is None \
            else self.query_vector(query, frame)
        nprobe = self.similarity.nprobe if nprobe is None else nprobe
        refine = self.similarity.refine if refine is None else refine
        if nprobe <= 0 or refine < 0:
            raise KnnError(f"image_knn: nprobe must be > 0 and refine >= 0, got nprobe="
                           f"{nprobe}, refine={refine}")
        allowed = self.allowed(filter_text) if filter_text else None
        rows, dist = self.index.search(vec, max(k, refine), nprobe=nprobe, allowed=allowed)
        if refine:
            rows, dist = refine_rows(rows, dist, vec, self.exact, self.exact_rows)
        rows, dist = rows[:k], dist[:k]
        return [(i + 1, str(self.index.ids[r]), int(self.index.frames[r]),
                 float(np.sqrt(max(d, 0.0)))) for i, (r, d) in enumerate(zip(rows, dist,
                                                                              strict=True))]


_SEARCHERS: dict[tuple[str, str, ImageScope], Searcher] = {}


def searcher(warehouse: str, similarity: SimilaritySettings,
             scope: ImageScope = ADMIN_SCOPE) -> Searcher:
    """The worker's searcher for this lake, store and scope (kept across queries)."""
    key = (warehouse, repr(similarity), scope)
    if key not in _SEARCHERS:
        _SEARCHERS[key] = Searcher(Path(warehouse), similarity, scope)
    return _SEARCHERS[key]


def make_udtf(warehouse: str, similarity: SimilaritySettings,
              scope: ImageScope = ADMIN_SCOPE) -> type:
    """The UDTF handler class bound to one lake and scope (pickled to the workers)."""

    class ImageKnn:
        """Python UDTF handler for ``image_knn``.

        Spark makes one handler per task: the tables are checked for changes on the task's
        first row only, so a task answers all its rows from one state of the lake, and a
        LATERAL query over many rows does not pay a check per row.
        """

        def __init__(self) -> None:
            self._searcher: Searcher | None = None

        def eval(self, query: Any = None, k: int = 10, nprobe: int | None = None,
                 refine: int | None = None, filter: str | None = None,
                 frame: int = 0, query_image: Any = None
                 ) -> Iterator[tuple[int, str, int, float]]:
            if k is None or int(k) <= 0:
                raise KnnError(f"image_knn: k must be a positive integer, got {k}")
            image = _image_bytes(query_image)
            if query is not None and image is not None:
                raise KnnError("image_knn: pass either query or query_image, not both")
            if query is None and image is None:
                raise KnnError("image_knn: query is NULL; pass a SOPInstanceUID, an image "
                               "path or an embedding as query, or image bytes as "
                               "query_image")
            if filter is not None and not isinstance(filter, str):  # e.g. TABLE(...) rows
                raise KnnError("image_knn: filter must be a SQL predicate string such as "
                               "\"modality = 'CT'\"")
            if self._searcher is None:
                found = searcher(warehouse, similarity, scope)
                found.refresh()
                self._searcher = found
            yield from self._searcher.search(
                query, int(k), nprobe=nprobe, refine=refine, filter_text=filter,
                frame=int(frame or 0), refresh=False, image=image)

    return ImageKnn


def _image_bytes(value: Any) -> bytes | None:
    """``query_image`` as bytes (Spark hands ``binary`` to Python as ``bytearray``)."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise KnnError(f"image_knn: query_image must be binary (DICOM, PNG or JPEG bytes: an "
                   f"X'...' literal or a binary column), got a {type(value).__name__}")
