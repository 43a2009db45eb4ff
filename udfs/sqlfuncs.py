"""Scalar SQL functions over images, embeddings and PQ codes (vectorized pandas UDFs).

* ``dicom_thumbnail(id)`` -> PNG bytes of an image's first frame;
* ``image_embedding(id)`` -> ``array<float>``: the configured backend's embedding of an image's
  first frame (what ``dicomlake embed`` stores in ``dicom.embeddings`` as frame 0);
* ``pq_encode(embedding)`` -> ``binary``: its PQ code under the current codebook (what
  ``dicom.codes.code`` holds);
* ``pq_distance(query_embedding, code)`` -> ``double``: the asymmetric (ADC) L2 distance of an
  embedding to a code under the current codebook, the distance ``image_knn(..., refine => 0)``
  reports.

Spark hands each function a whole Arrow batch, so the model and the codebook are loaded once
per Python worker (and the codebook again only when ``dicom.codebooks`` gets a new version),
and the model runs on ``similarity.batch_size`` images at a time.

An image ``id`` is looked up in the caller's own ``instances`` table (see :mod:`.images`);
only admins may also name an image file. An id that names no image, and an image whose
pixels cannot be decoded, give NULL instead of failing the whole query (``dicom.pixel_errors``
says why a lake image has no pixels). A missing codebook, or one trained for another model
than the configured backend's, fails the query with the command that fixes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dicomlake.catalog.snapshots import FollowedTable
from dicomlake.udfs.images import ImageScope

if TYPE_CHECKING:
    from dicomlake.udfs.images import ImageIndex
    from dicomlake.udfs.pq import Codebook


def _thumbnail_or_none(path: str) -> bytes | None:
    from dicomlake.udfs.errors import PixelError
    from dicomlake.udfs.pixels import thumbnail_png

    try:
        return thumbnail_png(path)
    except PixelError:
        return None  # dicom.pixel_errors says why; a thumbnail column should not fail a query


def make_thumbnail(home: str, warehouse: str,
                   scope: ImageScope) -> Callable[[pd.Series], pd.Series]:
    """``dicom_thumbnail(id)``: PNG bytes (128 px) of the first frame, NULL if undecodable
    or if the scope may not see its pixels (:func:`~dicomlake.udfs.images.pixels_allowed`).

    ``id`` is a ``sop_instance_uid`` or ``path`` of the scope's ``instances`` table; anything
    else fails the query without the file system being asked (see :mod:`.images`).
    """

    def dicom_thumbnail(refs: pd.Series) -> pd.Series:
        from dicomlake.udfs.images import image_index

        index = image_index(home, warehouse, scope)

        def thumbnail(ref: object) -> bytes | None:
            if ref is None:
                return None
            path = index.path_of(str(ref))
            return _thumbnail_or_none(path) if index.pixels_allowed(path) else None

        return refs.map(thumbnail)

    return dicom_thumbnail


def _image_path(index: ImageIndex, ref: object, scope: ImageScope) -> str | None:
    """The raw path an ``image_embedding`` argument names, or None (-> NULL).

    Ids of the scope's ``instances`` table come first; anything else is a file only for
    admins (``scope.paths``), and for other roles nothing is looked at, so the answer (NULL)
    is the same whether or not such a file exists.
    """
    from dicomlake.udfs.errors import UnknownImageError

    if ref is None or not str(ref).strip():
        return None
    try:
        return index.path_of(str(ref))
    except UnknownImageError:
        return str(ref).strip() if scope.paths else None


def _first_frame_input(path: str) -> np.ndarray | None:
    """The model input of an image's first frame, exactly as ``dicomlake embed`` makes it;
    None when the image cannot be read or decoded."""
    from dicomlake.udfs.errors import PixelError
    from dicomlake.udfs.pixels import frame_inputs, read_bytes

    try:
        frames = frame_inputs(read_bytes(path), path)
    except PixelError:
        return None
    return frames[0][0] if frames else None


def make_embedding(home: str, warehouse: str, scope: ImageScope, backend: str,
                   batch_size: int, device: str = "cpu") -> Callable[[pd.Series], pd.Series]:
    """``image_embedding(id)``: the ``backend``'s embedding of the image's first frame.

    Multi-frame images give frame 0 only (``dicom.embeddings`` holds every frame). NULL for
    an unknown id, a file a non-admin names, or pixels that cannot be decoded. ``backend`` is
    a :class:`~dicomlake.udfs.settings.ModelBackend` value; a plain string keeps the pickled
    closure small.
    """

    def image_embedding(refs: pd.Series) -> pd.Series:
        from dicomlake.udfs.features import FeatureModel
        from dicomlake.udfs.images import image_index

        index = image_index(home, warehouse, scope)
        model = FeatureModel(backend, device=device)  # the process-wide model, loaded on first use
        out: list[np.ndarray | None] = [None] * len(refs)
        rows: list[int] = []
        images: list[np.ndarray] = []

        def flush() -> None:
            for row, vector in zip(rows, model.embed(np.stack(images)), strict=True):
                out[row] = vector
            rows.clear()
            images.clear()

        for row, ref in enumerate(refs.tolist()):
            path = _image_path(index, ref, scope)
            image = None if path is None else _first_frame_input(path)
            if image is not None:
                rows.append(row)
                images.append(image)
                if len(images) >= batch_size:
                    flush()
        if images:
            flush()
        return pd.Series(out, dtype=object)

    return image_embedding


@dataclass
class _FollowedBook:
    """The current codebook of one lake, re-read only when ``dicom.codebooks`` changed."""

    table: FollowedTable
    version: int = -2
    book: Codebook | None = None


_BOOKS: dict[str, _FollowedBook] = {}


def current_codebook(warehouse: str, backend: str, function: str) -> Codebook:
    """The lake's current codebook, kept per worker and re-read only after a new version.

    Raises:
        CodebookError: there is none yet, or it was trained for another model than the
            configured backend's (codes and distances would compare unlike vectors).
    """
    from dicomlake.catalog import tables
    from dicomlake.udfs import pq
    from dicomlake.udfs.errors import CodebookError
    from dicomlake.udfs.features import require_fitting
    from dicomlake.udfs.model import model_info

    path = tables.CODEBOOKS.path(warehouse)  # centroids only: one table, every role
    followed = _BOOKS.setdefault(str(path), _FollowedBook(FollowedTable(path)))
    version = followed.table.version()
    if version != followed.version:
        followed.version, followed.book = version, pq.latest(path)
    book = followed.book
    if book is None:
        raise CodebookError(f"{function}: no PQ codebook yet in {path}; run `dicomlake embed` "
                            "(it trains one once images are embedded)")
    try:
        require_fitting(book, model_info(backend))  # the pipeline's own rule and advice
    except CodebookError as exc:
        raise CodebookError(f"{function}: {exc}") from exc
    return book


def _matrix(values: pd.Series, book: Codebook, what: str) -> np.ndarray:
    """Non-null ``array<float>`` values as a float32 (n, dim) matrix (NULL elements become
    NaN, which the codebook refuses by name, as it does vectors of another size)."""
    vectors = []
    for value in values.tolist():
        if isinstance(value, np.ndarray) and value.dtype != object:
            vector = value.astype(np.float32, copy=False)
        else:
            vector = np.asarray([np.nan if x is None else x for x in value], dtype=np.float32)
        if vector.shape != (book.dim,):
            book.check_vectors(vector, what)  # raises, naming both sizes and the fix
        vectors.append(vector)
    if not vectors:
        return np.zeros((0, book.dim), np.float32)
    return book.check_vectors(np.stack(vectors), what)


def make_pq_encode(warehouse: str, backend: str) -> Callable[[pd.Series], pd.Series]:
    """``pq_encode(embedding)``: the embedding's code under the current codebook (NULL for a
    NULL embedding); byte for byte what ``dicomlake embed`` writes to ``dicom.codes.code``."""

    def pq_encode(embeddings: pd.Series) -> pd.Series:
        book = current_codebook(warehouse, backend, "pq_encode")
        present = embeddings.notna().to_numpy()
        codes, _ = book.encode(_matrix(embeddings[present], book, "pq_encode"))
        out: list[bytes | None] = [None] * len(embeddings)
        for row, code in zip(np.flatnonzero(present), codes, strict=True):
            out[row] = code.tobytes()
        return pd.Series(out, dtype=object)

    return pq_encode


def _codes(values: pd.Series, book: Codebook) -> np.ndarray:
    """Non-null ``binary`` codes as a uint8 (n, m) matrix."""
    from dicomlake.udfs.errors import CodebookError

    raw = [bytes(v) for v in values.tolist()]
    wrong = next((len(c) for c in raw if len(c) != book.m), None)
    if wrong is not None:
        raise CodebookError(
            f"pq_distance: a code has {wrong} bytes but codebook v{book.version} makes "
            f"{book.m}-byte codes; codes of another codebook cannot be compared, re-encode "
            "them with pq_encode or run `dicomlake embed`")
    return np.frombuffer(b"".join(raw), np.uint8).reshape(len(raw), book.m)


def adc_distances(book: Codebook, queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Squared asymmetric distances ``||query_i - decode(code_i)||^2`` of row pairs.

    The usual case is one query against many codes: one lookup table per distinct query
    (``m x ksub``) and a gather per code. When nearly every row has its own query (say, each
    embedding against its own code), building tables would cost more than the vectors
    themselves, so the codes are decoded and the distances taken directly: the same sum.
    """
    if not len(queries):
        return np.zeros(0, np.float32)
    first: dict[bytes, int] = {}
    which = np.fromiter((first.setdefault(q.tobytes(), i) for i, q in enumerate(queries)),
                        dtype=np.int64, count=len(queries))
    distinct, which = np.unique(which, return_inverse=True)
    if len(distinct) * book.ksub > len(queries):
        diff = queries - book.decode(codes)
        return (diff * diff).sum(axis=1, dtype=np.float32)
    tables = np.stack([book.lookup_table(queries[i]) for i in distinct])  # (distinct, m, ksub)
    return tables[which[:, None], np.arange(book.m)[None, :], codes].sum(axis=1)


def make_pq_distance(warehouse: str, backend: str
                     ) -> Callable[[pd.Series, pd.Series], pd.Series]:
    """``pq_distance(query_embedding, code)``: the L2 distance of an embedding to a code's
    reconstruction under the current codebook (NULL if either is NULL)."""

    def pq_distance(queries: pd.Series, codes: pd.Series) -> pd.Series:
        book = current_codebook(warehouse, backend, "pq_distance")
        present = (queries.notna() & codes.notna()).to_numpy()
        dist = adc_distances(book, _matrix(queries[present], book, "pq_distance query"),
                             _codes(codes[present], book))
        out: list[float | None] = [None] * len(queries)
        for row, value in zip(np.flatnonzero(present), np.sqrt(np.maximum(dist, 0.0)),
                              strict=True):
            out[row] = float(value)
        return pd.Series(out, dtype=object)

    return pq_distance
