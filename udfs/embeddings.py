"""Embeddings and codes as vectorized (Arrow batch) functions run by Spark tasks.

``embed_batches`` is used with ``mapInArrow``: every Python worker loads the backend's model
once (:func:`dicomlake.udfs.model.embedder_for`: ONNX Runtime, or TensorFlow for VGG-16),
decodes the images of a batch, and runs the model on ``batch_size`` frames at a time. A
multi-frame instance yields one row per frame (``frame`` column). Images that cannot be
decoded become rows for ``dicom.pixel_errors`` instead of failing the job.
``encode_batches`` turns embeddings into PQ codes the same way.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from dicomlake.catalog.columns import TABLE_COLUMN

if TYPE_CHECKING:
    import pyarrow as pa

    from dicomlake.udfs.pq import Codebook

EMBEDDINGS, PIXEL_ERRORS = "embeddings", "pixel_errors"
EMBEDDING_COLUMNS = ("sop_instance_uid", "frame", "embedding", "model_id", "model_version",
                     "thumbnail", "embedded_at")
PIXEL_ERROR_COLUMNS = ("sop_instance_uid", "path", "error_kind", "error", "model_id",
                       "model_version", "embedded_at")
EMBED_DDL = ("sop_instance_uid string, frame int, embedding array<float>, model_id string, "
             "model_version string, thumbnail binary, embedded_at timestamp, path string, "
             f"error_kind string, error string, {TABLE_COLUMN} string")

ONNX_THREADS_ENV = "DICOMLAKE_ONNX_THREADS"
"""Threads per model in a Spark task (default 1: one task per core). The name predates the
TensorFlow backend, which reads it too (as its intra-op thread count)."""


def _thumbnail(image: np.ndarray, size: int = 128) -> bytes:
    import io

    from PIL import Image

    img = Image.fromarray(image)
    img.thumbnail((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def frame_inputs(data: bytes, path: str) -> list[tuple[np.ndarray, bytes]]:
    """(model input, PNG thumbnail) per frame of one instance; raises :class:`PixelError`.

    The batch UDF and the streaming job both call this, so an uploaded image is embedded
    exactly like an ingested one.
    """
    from dicomlake.udfs.pixels import load_frames, resize, to_uint8

    frames = load_frames(data, path)
    out = []
    for raw in frames.data:
        img = to_uint8(raw, frames)
        out.append((resize(img), _thumbnail(img)))
    return out


def embed_batches(home: str, batch_size: int = 32, backend: str = "onnx"
                  ) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """A ``mapInArrow`` function: (sop_instance_uid, path) rows -> embedding/error rows.

    ``backend`` is a :class:`~dicomlake.udfs.settings.ModelBackend` value; a plain string
    keeps the pickled closure free of project classes.
    """

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa

        from dicomlake.udfs import model as model_mod
        from dicomlake.udfs.errors import PixelError
        from dicomlake.udfs.pixels import read_bytes

        threads = int(os.environ.get(ONNX_THREADS_ENV, "1"))
        info = model_mod.model_info(backend)
        embedder = model_mod.embedder_for(home, backend, threads)
        schema = pa.schema([
            ("sop_instance_uid", pa.string()), ("frame", pa.int32()),
            ("embedding", pa.list_(pa.float32())), ("model_id", pa.string()),
            ("model_version", pa.string()), ("thumbnail", pa.binary()),
            ("embedded_at", pa.timestamp("us", tz="UTC")), ("path", pa.string()),
            ("error_kind", pa.string()), ("error", pa.string()), (TABLE_COLUMN, pa.string()),
        ])
        pending: list[tuple[str, int, str, np.ndarray, bytes]] = []
        errors: list[tuple[str, str, str, str]] = []

        def flush() -> pa.RecordBatch:
            now = dt.datetime.now(dt.UTC)
            n_ok, n_err = len(pending), len(errors)
            vectors = (embedder.embed(np.stack([p[3] for p in pending])) if pending
                       else np.zeros((0, info.dim), np.float32))
            cols: dict[str, list[object]] = {
                "sop_instance_uid": [p[0] for p in pending] + [e[0] for e in errors],
                "frame": [p[1] for p in pending] + [None] * n_err,
                "embedding": [v for v in vectors] + [None] * n_err,
                "model_id": [info.model_id] * (n_ok + n_err),
                "model_version": [info.version] * (n_ok + n_err),
                "thumbnail": [p[4] for p in pending] + [None] * n_err,
                "embedded_at": [now] * (n_ok + n_err),
                "path": [p[2] for p in pending] + [e[1] for e in errors],
                "error_kind": [None] * n_ok + [e[2] for e in errors],
                "error": [None] * n_ok + [e[3] for e in errors],
                TABLE_COLUMN: [EMBEDDINGS] * n_ok + [PIXEL_ERRORS] * n_err,
            }
            pending.clear()
            errors.clear()
            return pa.RecordBatch.from_pydict(cols, schema=schema)

        for batch in batches:
            uids = batch.column("sop_instance_uid").to_pylist()
            paths = batch.column("path").to_pylist()
            for uid, path in zip(uids, paths, strict=True):
                try:
                    for i, (image, thumb) in enumerate(frame_inputs(read_bytes(path), path)):
                        pending.append((uid, i, path, image, thumb))
                except PixelError as exc:
                    errors.append((uid, path, exc.kind.value, str(exc)))
                if len(pending) >= batch_size:
                    yield flush()
        if pending or errors:
            yield flush()

    return run


def encode_batches(book: Codebook
                   ) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """A ``mapInArrow`` function: embedding rows -> PQ code rows of codebook ``book``."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa

        for batch in batches:
            if batch.num_rows == 0:
                continue
            emb = batch.column("embedding")
            flat = emb.flatten().to_numpy(zero_copy_only=False)
            vectors = flat.reshape(batch.num_rows, -1) if len(flat) else np.zeros(
                (batch.num_rows, 0), np.float32)
            codes, lists = book.encode(vectors)
            yield pa.RecordBatch.from_pydict({
                "sop_instance_uid": batch.column("sop_instance_uid"),
                "frame": batch.column("frame"),
                "codebook_version": pa.array([book.version] * batch.num_rows, pa.int32()),
                "list_id": pa.array(lists, pa.int32()),
                "code": pa.array([c.tobytes() for c in codes], pa.binary()),
                "thumbnail": (batch.column("thumbnail") if "thumbnail" in batch.schema.names
                              else pa.nulls(batch.num_rows, pa.binary())),
            })

    return run
