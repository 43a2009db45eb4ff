"""The feature pipeline after the header, free of Spark and Flink: frames -> vectors -> codes.

Batch tasks (:mod:`dicomlake.udfs.embeddings` wraps these for ``mapInArrow``), the stream's
writer, the SQL functions and ``image_knn`` queries all call this module, so each rule lives
here once:

* which model embeds: the configured backend, device and precision (:class:`FeatureModel`),
  whose id and version go with every vector and every pixel error;
* how frames reach the model: decoded in this process (inside a Spark task, where Spark
  already runs one task per core) or by a pool of decode processes
  (:mod:`dicomlake.udfs.decode`; the GPU path, where one process runs the model);
* what an image that cannot be decoded becomes: a ``dicom.pixel_errors`` row, never a failure;
* how PQ trains: on the ``train_sample`` embeddings of the current model with the smallest
  hash of (uid, frame), a sample that does not depend on arrival order or on which path
  (batch or stream) trains;
* when a codebook fits the configured model (:func:`require_fitting`): vectors of another
  model are never encoded with it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dicomlake.catalog import tables
from dicomlake.udfs import model as model_mod
from dicomlake.udfs.decode import DecodePool, StageTimes, decode_stream, model_batches
from dicomlake.udfs.errors import CodebookError, PixelError
from dicomlake.udfs.settings import Device, ModelBackend, Precision

if TYPE_CHECKING:
    import pyarrow as pa

    from dicomlake.udfs.pq import Codebook
    from dicomlake.udfs.settings import SimilaritySettings

THREADS_ENV = "DICOMLAKE_ONNX_THREADS"
"""Threads per model in one process (default 1: one Spark task per core). The name predates
the TensorFlow backend, which reads it too (as its intra-op thread count)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class FeatureModel:
    """The configured backend's model on its device; its weights load on the first ``embed``
    (once per process), so building one to read ``info`` costs nothing (``device = "auto"``
    is resolved then too: it imports torch)."""

    def __init__(self, backend: ModelBackend | str, threads: int | None = None, *,
                 device: Device | str = Device.CPU,
                 precision: Precision | str = Precision.FP32) -> None:
        self.backend = ModelBackend(backend)
        self.device = Device(device)
        self.precision = Precision(precision)
        self.info = model_mod.model_info(self.backend, self.precision)
        self.threads = threads or int(os.environ.get(THREADS_ENV, "1"))
        self._embedder: model_mod.ImageEmbedder | None = None

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(n, 224, 224, 3) uint8 -> (n, dim) float32."""
        if len(images) == 0:
            return np.zeros((0, self.info.dim), np.float32)
        if self._embedder is None:
            self._embedder = model_mod.embedder_for(self.backend, self.threads,
                                                    device=self.device,
                                                    precision=self.precision)
        return self._embedder.embed(images)


@dataclass(frozen=True)
class ImageInput:
    """One instance to embed; ``data`` None means: read it by ``path``."""

    uid: str
    path: str
    data: bytes | None = None


@dataclass
class Features:
    """Rows for ``dicom.embeddings`` and ``dicom.pixel_errors`` (registry schemas), and for
    each row the index of the :class:`ImageInput` it came from (callers that must tag rows
    with their origin, such as the stream with its Kafka offsets, use it)."""

    embeddings: pa.Table
    pixel_errors: pa.Table
    embedding_inputs: list[int] = field(default_factory=list)
    error_inputs: list[int] = field(default_factory=list)


def _rows(model: FeatureModel, images: np.ndarray,
          frames: list[tuple[int, ImageInput, int, bytes]],
          errors: list[tuple[int, ImageInput, PixelError]], stats: StageTimes | None,
          ) -> Features:
    import pyarrow as pa

    now, info = _now(), model.info
    started = time.perf_counter()
    vectors = model.embed(images)
    if stats is not None:
        stats.model_seconds += time.perf_counter() - started
    n = len(frames)
    embeddings = pa.Table.from_pydict({
        "sop_instance_uid": [f[1].uid for f in frames],
        "frame": pa.array([f[2] for f in frames], pa.int32()),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.reshape(-1), pa.float32()), info.dim).cast(
                pa.list_(pa.float32())) if n else pa.array([], pa.list_(pa.float32())),
        "model_id": [info.model_id] * n, "model_version": [info.version] * n,
        "thumbnail": pa.array([f[3] for f in frames], pa.binary()),
        "embedded_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
    }, schema=tables.EMBEDDINGS.schema)
    m = len(errors)
    pixel_errors = pa.Table.from_pydict({
        "sop_instance_uid": [e[1].uid for e in errors], "path": [e[1].path for e in errors],
        "error_kind": [e[2].kind.value for e in errors], "error": [str(e[2]) for e in errors],
        "model_id": [info.model_id] * m, "model_version": [info.version] * m,
        "embedded_at": pa.array([now] * m, pa.timestamp("us", tz="UTC")),
    }, schema=tables.PIXEL_ERRORS.schema)
    return Features(embeddings, pixel_errors, [f[0] for f in frames], [e[0] for e in errors])


def featurize(inputs: Iterable[ImageInput], model: FeatureModel, *, batch_size: int = 32,
              workers: int | DecodePool = 0, stats: StageTimes | None = None,
              ) -> Generator[Features, None, None]:
    """Embed every frame of every input, about ``batch_size`` frames per model call.

    A multi-frame instance gives one embedding row per frame; an instance whose pixels cannot
    be read or decoded gives one pixel error row. Yields whenever a batch is full, and once
    at the end when anything is left; a caller that stops early closes it, which stops a
    pool it started. ``workers`` > 0 (or a started pool) decodes in other
    processes while this one runs the model (:func:`dicomlake.udfs.decode.decode_stream`:
    same inputs, same order); ``stats`` receives the time of each stage.
    """
    held: dict[int, ImageInput] = {}

    def sources() -> Iterator[tuple[str, bytes | None]]:
        for index, item in enumerate(inputs):
            held[index] = item
            yield item.path, item.data

    decoded = decode_stream(sources(), workers=workers, thumbnails=True, stats=stats)
    for images, batch in model_batches(decoded, batch_size):
        frames: list[tuple[int, ImageInput, int, bytes]] = []
        errors: list[tuple[int, ImageInput, PixelError]] = []
        for entry in batch:
            item = held.pop(entry.index)
            if entry.error is not None:
                errors.append((entry.index, item, entry.error))
            else:
                frames += [(entry.index, item, i, thumb)
                           for i, thumb in enumerate(entry.thumbnails)]
        yield _rows(model, images, frames, errors, stats)


def vectors_of(embeddings: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The ``embedding`` column as an (n, dim) float32 matrix (the one conversion)."""
    column = embeddings.column("embedding")
    if hasattr(column, "combine_chunks"):
        column = column.combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    n = embeddings.num_rows
    return (np.asarray(flat, np.float32).reshape(n, -1) if len(flat)
            else np.zeros((n, 0), np.float32))


def encode(embeddings: pa.Table | pa.RecordBatch, book: Codebook) -> pa.Table:
    """``dicom.codes`` rows for embedding rows (``sop_instance_uid``, ``frame``,
    ``embedding``) under codebook ``book``."""
    import pyarrow as pa

    n = embeddings.num_rows
    if n == 0:
        return tables.CODES.schema.empty_table()
    codes, lists = book.encode(vectors_of(embeddings))
    return pa.Table.from_pydict({
        "sop_instance_uid": embeddings.column("sop_instance_uid"),
        "frame": embeddings.column("frame"),
        "codebook_version": pa.array([book.version] * n, pa.int32()),
        "list_id": pa.array(lists, pa.int32()),
        "code": pa.array([c.tobytes() for c in codes], pa.binary()),
    }, schema=tables.CODES.schema)


def fits(book: Codebook, info: model_mod.ModelInfo) -> bool:
    """Whether ``book`` was trained on vectors of the model ``info`` describes."""
    return book.model_id == info.model_id and book.model_version == info.version


def require_fitting(book: Codebook, info: model_mod.ModelInfo) -> None:
    """Refuse to encode vectors of one model with a codebook of another (their codes would
    be silently meaningless): both paths stop here and say what to run."""
    if not fits(book, info):
        raise CodebookError(
            f"the current PQ codebook (v{book.version}) was trained on {book.model_id} "
            f"{book.model_version}, but the configured backend {info.backend.value} makes "
            f"{info.model_id} {info.version}; run `dicomlake embed`, which re-embeds every "
            "image with the configured backend and trains a fitting codebook")


def sample_rank(uids: list[str], frames: list[int]) -> np.ndarray:
    """A per-row rank that depends only on (uid, frame): the training sample is the rows of
    lowest rank, whatever order they arrived in and whichever path trains."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{u}\x00{f}".encode(),
                                                    digest_size=8).digest(), "big")
                     for u, f in zip(uids, frames, strict=True)], np.uint64)


def training_vectors(warehouse: str | os.PathLike[str], info: model_mod.ModelInfo,
                     sample: int) -> np.ndarray:
    """The training sample of the current model's stored embeddings (see the module doc).

    Reads keys first and the vectors of the sampled rows only, so training on a large lake
    does not hold every embedding in memory.
    """
    import pyarrow as pa
    from deltalake import DeltaTable

    from dicomlake.catalog.snapshots import read_table, scan, schema_of, sql_string

    path = tables.EMBEDDINGS.path(warehouse)
    if not DeltaTable.is_deltatable(str(path)):
        return np.zeros((0, info.dim), np.float32)
    table = DeltaTable(str(path))
    mine = f"model_version = {sql_string(info.version)}"
    keys = read_table(table, ["sop_instance_uid", "frame"], mine)
    if keys.num_rows == 0:
        return np.zeros((0, info.dim), np.float32)
    uids, frames = (keys.column("sop_instance_uid").to_pylist(),
                    keys.column("frame").to_pylist())
    chosen = np.argsort(sample_rank(uids, frames), kind="stable")[:sample]
    order = {(uids[i], frames[i]): pos for pos, i in enumerate(chosen)}
    columns = ["sop_instance_uid", "frame", "embedding"]
    positions: list[int] = []
    parts = []
    for batch in scan(table, columns, mine):
        keep = [(order[k], i) for i, k in enumerate(zip(
            batch.column("sop_instance_uid").to_pylist(), batch.column("frame").to_pylist(),
            strict=True)) if k in order]
        if keep:
            positions += [pos for pos, _ in keep]
            parts.append(batch.take(pa.array([i for _, i in keep])))
    rows = pa.Table.from_batches(parts, schema=schema_of(table, columns))
    rows = rows.take(pa.array(np.argsort(positions, kind="stable")))  # rank order for k-means
    return vectors_of(rows)


def train(warehouse: str | os.PathLike[str], similarity: SimilaritySettings,
          info: model_mod.ModelInfo, *, min_rows: int = 1) -> Codebook | None:
    """Train and store the next codebook version on the training sample; None when fewer
    than ``min_rows`` embeddings of the current model exist."""
    from dicomlake.udfs import pq

    vectors = training_vectors(warehouse, info, similarity.train_sample)
    if len(vectors) < max(min_rows, 1):
        return None
    books = tables.CODEBOOKS.path(warehouse)
    previous = pq.latest(books)
    nlist = min(similarity.nlist, len(vectors)) if similarity.nlist else 0
    book = pq.train(vectors, m=similarity.m, nlist=nlist,
                    version=(previous.version + 1) if previous else 1,
                    model_id=info.model_id, model_version=info.version)
    pq.save(books, book)
    return book


def current_codebook(warehouse: str | os.PathLike[str]) -> Codebook | None:
    """The newest codebook version of the lake, or None."""
    from dicomlake.udfs import pq

    return pq.latest(Path(tables.CODEBOOKS.path(warehouse)))
