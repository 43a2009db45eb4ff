"""The feature pipeline inside Spark tasks: ``mapInArrow`` wrappers of :mod:`.features`.

Spark's ``mapInArrow`` runs a function over a task's Arrow batches; these wrappers feed those
batches to the Spark-free pipeline and hand its rows back with a routing column, so one job
writes ``dicom.embeddings`` and ``dicom.pixel_errors`` together. Nothing here decides how an
image is embedded or encoded: the stream and the SQL functions call the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache
from typing import TYPE_CHECKING

from dicomlake.catalog import tables
from dicomlake.catalog.columns import TABLE_COLUMN

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql.types import StructType

    from dicomlake.udfs.pq import Codebook


@cache
def _embed_output() -> pa.Schema:
    """Embedding rows, plus the pixel error columns, plus the routing column."""
    import pyarrow as pa

    embeddings = tables.EMBEDDINGS.schema
    extra = [f for f in tables.PIXEL_ERRORS.schema if f.name not in embeddings.names]
    return pa.schema([*embeddings, *extra, (TABLE_COLUMN, pa.string())])


def embed_output_schema() -> StructType:
    """What :func:`embed_batches` yields, as Spark declares it."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(_embed_output())


@cache
def _encode_output() -> pa.Schema:
    import pyarrow as pa

    return tables.CODES.schema.append(pa.field("thumbnail", pa.binary()))


def codes_schema() -> StructType:
    """What :func:`encode_batches` yields: ``dicom.codes`` rows plus the thumbnail, which
    only code stores that keep images (HBase's ``MD`` family) write."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(_encode_output())


def embed_batches(batch_size: int = 32, backend: str = "onnx", device: str = "cpu"
                  ) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """A ``mapInArrow`` function: (sop_instance_uid, path) rows -> embedding/error rows.

    ``backend`` and ``device`` are :class:`~dicomlake.udfs.settings.ModelBackend` and
    ``Device`` values (``auto`` is resolved in each worker, on its own hardware); plain
    strings keep the pickled closure free of project classes.
    """

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa

        from dicomlake.udfs.features import FeatureModel, ImageInput, featurize

        model = FeatureModel(backend, device=device)
        schema = _embed_output()

        def inputs() -> Iterator[ImageInput]:
            for batch in batches:
                for uid, path in zip(batch.column("sop_instance_uid").to_pylist(),
                                     batch.column("path").to_pylist(), strict=True):
                    yield ImageInput(uid, path)

        for out in featurize(inputs(), model, batch_size=batch_size):
            for table, rows in ((tables.EMBEDDINGS.name, out.embeddings),
                                (tables.PIXEL_ERRORS.name, out.pixel_errors)):
                if rows.num_rows == 0:
                    continue
                rows = rows.append_column(TABLE_COLUMN,
                                          pa.array([table] * rows.num_rows, pa.string()))
                missing = [f for f in schema if f.name not in rows.column_names]
                for f in missing:
                    rows = rows.append_column(f, pa.nulls(rows.num_rows, f.type))
                yield from rows.select(schema.names).cast(schema).to_batches()

    return run


class EmbedRows:
    """One Spark task's rows for :func:`dicomlake.catalog.delta.write_tasks`: its payload is
    a slice of the instances to embed (``sop_instance_uid``, ``path``; :meth:`payload`), embedded by
    :func:`embed_batches` in that task and written there, so the vectors never travel to the
    JVM and back and the driver's slices (contiguous in path order: members of one archive
    together) decide what each task reads."""

    def __init__(self, batch_size: int, backend: str, device: str) -> None:
        self.run = embed_batches(batch_size, backend, device)

    @staticmethod
    def payload(todo: pa.Table) -> bytes:
        """A slice of the list as Arrow IPC bytes: only the slice's rows (a pickled slice
        would carry the whole list's buffers, once per task)."""
        import pyarrow as pa

        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, todo.schema) as writer:
            writer.write_table(todo)
        return bytes(sink.getvalue().to_pybytes())

    def __call__(self, payload: bytes) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa

        return self.run(iter(pa.ipc.open_stream(payload).read_all().to_batches()))


def encode_batches(book: Codebook
                   ) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """A ``mapInArrow`` function: embedding rows -> ``dicom.codes`` rows of ``book``."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa

        from dicomlake.udfs.features import encode

        for batch in batches:
            if batch.num_rows:
                thumbs = (batch.column("thumbnail") if "thumbnail" in batch.schema.names
                          else pa.nulls(batch.num_rows, pa.binary()))
                codes = encode(batch, book).append_column("thumbnail", thumbs)
                yield from codes.cast(_encode_output()).to_batches()

    return run
