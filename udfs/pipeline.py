"""``dicomlake embed``: pixels -> embeddings -> PQ codebook -> codes, for new rows only.

Each step is one atomic commit: embeddings and pixel errors (one job, two Delta tables),
then a codebook version when none fits yet (or ``retrain``), then codes into the configured
store. Embedding runs in Spark tasks on the CPU (the default); with ``[similarity] device``
resolving to ``cuda`` it runs without Spark in this process (:func:`embed_instances_local`):
one process holds the GPU and its CUDA context, and a pool of decode processes on every core
feeds it. A retrain re-encodes every embedding, replacing all codes in one write. A step that
fails leaves the earlier steps committed, and the next run resumes where it stopped
(instances without embeddings, embeddings without codes of the current codebook).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dicomlake.catalog import tables
from dicomlake.catalog.delta import (
    TableTarget,
    WrittenFile,
    commit,
    read_columns,
    write_tasks,
)
from dicomlake.catalog.warehouse import Warehouse
from dicomlake.session import default_parallelism
from dicomlake.udfs import decode, features, pq
from dicomlake.udfs import model as model_mod
from dicomlake.udfs.codestore import CODES, open_store
from dicomlake.udfs.embeddings import EmbedRows, codes_schema, encode_batches
from dicomlake.udfs.errors import CodebookError
from dicomlake.udfs.settings import Device, SimilaritySettings

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as papq
    from pyspark.sql import DataFrame, SparkSession

    from dicomlake.config import Settings

SCHEMA = tables.SCHEMA
EMBEDDINGS, PIXEL_ERRORS = tables.EMBEDDINGS.name, tables.PIXEL_ERRORS.name
FILE_BYTES = 128 << 20
"""Arrow bytes per Parquet file the Spark-free path writes before it starts the next one: a
run over an archive keeps one row group in memory, and readers get files of the size a
Spark read partition takes (:class:`~dicomlake.catalog.delta.DeltaTableReader`)."""


@dataclass
class EmbedResult:
    """What one ``embed`` run did."""

    instances: int = 0
    embeddings: int = 0
    pixel_errors: int = 0
    codebook_version: int | None = None
    trained: bool = False
    codes_written: int = 0
    store: str = ""
    seconds: float = 0.0
    replaced_model: str = ""
    """``model_id version`` of the codebook's model when the configured model differs (a new
    backend, or a new build of the model shipped with dicomlake): every image is embedded
    again with the configured one."""


def _done_uids(warehouse: Warehouse, version: str) -> set[str]:
    done: set[str] = set()
    for table in (EMBEDDINGS, PIXEL_ERRORS):
        data = read_columns(warehouse.table_path(SCHEMA, table),
                            ["sop_instance_uid", "model_version"])
        for uid, ver in zip(data.column("sop_instance_uid").to_pylist(),
                            data.column("model_version").to_pylist(), strict=True):
            if ver == version:
                done.add(uid)
    return done


def embed_instances(spark: SparkSession, settings: Settings, similarity: SimilaritySettings,
                    *, progress: Callable[[int], None] | None = None,
                    on_plan: Callable[[int], None] | None = None) -> tuple[int, int, int]:
    """Embed every instance that has no embedding (or pixel error) for the current model.

    On the CPU in Spark tasks, one model per task; on CUDA in this process
    (:func:`embed_instances_local`), Spark only registering the tables it wrote.
    Returns (instances read, embedding rows, pixel error rows).
    """
    warehouse = Warehouse(settings.warehouse_path)
    model_mod.prepare(similarity.backend, similarity.device)  # once, on the driver
    if model_mod.resolve_device(similarity.device, similarity.backend) is Device.CUDA:
        model = features.FeatureModel(similarity.backend, device=Device.CUDA,
                                      precision=similarity.precision)
        done = embed_instances_local(settings, similarity, model, workers=decode.all_cores(),
                                     progress=progress, on_plan=on_plan)
        for key, table_rows in ((EMBEDDINGS, done[1]), (PIXEL_ERRORS, done[2])):
            if table_rows:
                warehouse.register(spark, only=(SCHEMA, key))
        return done
    listed = _todo_local(warehouse, model_mod.model_info(similarity.backend).version)
    count = 0 if listed is None else listed.num_rows
    if on_plan:
        on_plan(count)
    if listed is None or count == 0:
        return 0, 0, 0
    # The list goes to the tasks as their payloads, slices in path order: scanning
    # dicom.instances through its data source, counting the anti-join and shuffling the
    # rows cost Spark jobs (~4 s at the start of a run, more than embedding 100 images on
    # 2 cores), and each task then writes the rows it embedded (write_tasks).
    parallel = default_parallelism(spark)
    slices = max(parallel, min(count // 64, 4 * parallel))
    step = -(-count // slices)
    payloads = [EmbedRows.payload(listed.slice(start, step)) for start in range(0, count, step)]
    produce = EmbedRows(similarity.batch_size, similarity.backend.value,
                        similarity.device.value)
    targets = [TableTarget(t.name, str(t.path(warehouse.root)), t.columns)
               for t in (tables.EMBEDDINGS, tables.PIXEL_ERRORS)]
    reported = 0

    def report(rows_written: int) -> None:
        # rows are frames (a multi-frame image gives several): the bar counts images
        nonlocal reported
        step = min(rows_written, count - reported)
        if step > 0 and progress is not None:
            reported += step
            progress(step)

    written = write_tasks(spark, payloads, produce, targets,
                          {t.key: tables.spec(t.key).schema for t in targets}, progress=report)
    totals = {}
    for target in targets:
        adds = [f for f in written if f.table == target.key]
        commit(target.path, tables.spec(target.key).schema, adds, operation="EMBED")
        totals[target.key] = sum(f.rows for f in adds)
        if adds:
            warehouse.register(spark, only=(SCHEMA, target.key))
    return count, totals[EMBEDDINGS], totals[PIXEL_ERRORS]


def _todo_local(warehouse: Warehouse, version: str) -> pa.Table | None:
    """``sop_instance_uid, path`` of the instances without a row of model ``version``, read
    with delta-rs and sorted by path (members of one archive together); None without
    ``dicom.instances``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if (SCHEMA, "instances") not in warehouse.tables():
        return None
    rows = read_columns(warehouse.table_path(SCHEMA, "instances"),
                        ["sop_instance_uid", "path"]).select(["sop_instance_uid", "path"])
    keep = pc.is_valid(rows.column("sop_instance_uid"))
    done = _done_uids(warehouse, version)
    if done:
        known = pc.is_in(rows.column("sop_instance_uid"),
                         value_set=pa.array(sorted(done), pa.string()))
        keep = pc.and_(keep, pc.invert(known))
    return rows.filter(keep).sort_by([("path", "ascending"), ("sop_instance_uid", "ascending")])


class _TableFiles:
    """Parquet files of one table written by this process, not yet committed.

    A new file starts every :data:`FILE_BYTES`, so memory holds one batch's rows however
    long the run. :meth:`files` are what :func:`~dicomlake.catalog.delta.commit` adds in
    one transaction; :meth:`discard` deletes them when the run fails before that (no log
    references them, and at archive scale they could be gigabytes).
    """

    def __init__(self, key: str, folder: Path, schema: pa.Schema, job: str) -> None:
        self.key = key
        self.folder = folder
        self.schema = schema
        self.job = job
        self._writer: papq.ParquetWriter | None = None
        self._name = ""
        self._rows = 0
        self._bytes = 0
        self._done: list[WrittenFile] = []

    def write(self, rows: pa.Table) -> None:
        import pyarrow.parquet as papq

        if rows.num_rows == 0:
            return
        if self._writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._name = f"part-{self.job}-{uuid.uuid4().hex}.parquet"
            self._writer = papq.ParquetWriter(str(self.folder / self._name), self.schema,
                                              compression="zstd")
        self._writer.write_table(rows)
        self._rows += rows.num_rows
        self._bytes += rows.nbytes
        if self._bytes >= FILE_BYTES:
            self._finish()

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        st = os.stat(self.folder / self._name)
        self._done.append(WrittenFile(self.key, self._name, st.st_size, self._rows,
                                      int(st.st_mtime * 1000)))
        self._rows = self._bytes = 0

    def files(self) -> list[WrittenFile]:
        """Close the open file; every file written, for the commit."""
        self._finish()
        return self._done

    def discard(self) -> None:
        """Delete every file written (the run failed: nothing is committed)."""
        names = [f.path for f in self._done]
        if self._writer is not None:
            with contextlib.suppress(Exception):  # the file is deleted next either way
                self._writer.close()
            names.append(self._name)
            self._writer = None
        for name in names:
            (self.folder / name).unlink(missing_ok=True)
        self._done = []


def embed_instances_local(settings: Settings, similarity: SimilaritySettings,
                          model: features.FeatureModel, *, workers: int | decode.DecodePool,
                          progress: Callable[[int], None] | None = None,
                          on_plan: Callable[[int], None] | None = None,
                          ) -> tuple[int, int, int]:
    """Embed every instance without a row of ``model`` with no Spark: the GPU path.

    The instances to do are listed with delta-rs; :func:`features.featurize` decodes them in
    ``workers`` processes (a count, or a started pool) while this process runs ``model`` (on
    CUDA: batches of at least :data:`~dicomlake.udfs.torch_model.GPU_BATCH` frames); rows go
    to Parquet files as they come, and each table gets ONE commit at the end, as the Spark
    path's job does, so an interrupted run leaves the lake as it was and the next run does
    the same instances again. ``on_plan`` is told the number of instances to do,
    ``progress`` the instances done since its last call. Registers nothing (no Spark).
    Returns (instances read, embedding rows, pixel error rows).
    """
    from dicomlake.udfs.torch_model import GPU_BATCH

    warehouse = Warehouse(settings.warehouse_path)
    todo = _todo_local(warehouse, model.info.version)
    if todo is None:
        return 0, 0, 0
    count = todo.num_rows
    if on_plan:
        on_plan(count)
    if count == 0:
        return 0, 0, 0
    on_gpu = model_mod.resolve_device(model.device, model.backend) is Device.CUDA
    batch = max(similarity.batch_size, GPU_BATCH) if on_gpu else similarity.batch_size
    inputs = (features.ImageInput(uid, path) for uid, path in zip(
        todo.column("sop_instance_uid").to_pylist(), todo.column("path").to_pylist(),
        strict=True))
    job = f"{int(time.time())}-{uuid.uuid4().hex[:8]}"
    sinks = [_TableFiles(spec.name, spec.path(warehouse.root), spec.schema, job)
             for spec in (tables.EMBEDDINGS, tables.PIXEL_ERRORS)]
    stream = features.featurize(inputs, model, batch_size=batch, workers=workers)
    try:
        # closed here, not when collected: a pool it started stops before the files go
        with contextlib.closing(stream):
            for out in stream:
                sinks[0].write(out.embeddings)
                sinks[1].write(out.pixel_errors)
                # an input's frames never span two batches: each input is counted once
                done = len(set(out.embedding_inputs) | set(out.error_inputs))
                if progress is not None and done:
                    progress(done)
        written = [sink.files() for sink in sinks]
    except BaseException:
        for sink in sinks:
            sink.discard()
        raise
    totals = []
    for sink, adds in zip(sinks, written, strict=True):
        commit(sink.folder, sink.schema, adds, operation="EMBED")
        totals.append(sum(f.rows for f in adds))
    return count, totals[0], totals[1]


def _embeddings_frame(spark: SparkSession, warehouse: Warehouse, version: str) -> DataFrame:
    return spark.table(f"{SCHEMA}.{EMBEDDINGS}").where(
        f"model_version = '{version}'").select("sop_instance_uid", "frame", "embedding",
                                               "thumbnail")


def train_codebook(spark: SparkSession, settings: Settings, similarity: SimilaritySettings,
                   ) -> pq.Codebook:
    """Train a new codebook version on the training sample (:func:`features.train`)."""
    warehouse = Warehouse(settings.warehouse_path)
    book = features.train(warehouse.root, similarity, model_mod.model_info(similarity.backend))
    if book is None:
        raise CodebookError("no embeddings to train a PQ codebook on; run `dicomlake embed` "
                            "after ingesting images")
    warehouse.register(spark, only=(SCHEMA, pq.CODEBOOKS))
    return book


def encode_codes(spark: SparkSession, settings: Settings, similarity: SimilaritySettings,
                 book: pq.Codebook, *, everything: bool) -> int:
    """Encode embeddings without a code of ``book`` (all of them when ``everything``)."""
    warehouse = Warehouse(settings.warehouse_path)
    store = open_store(settings.warehouse_path, similarity)
    store.check()
    emb = _embeddings_frame(spark, warehouse, book.model_version)
    if not everything:
        stored = store.load()
        import pyarrow.compute as pc

        current = stored.filter(pc.equal(stored.column("codebook_version"), book.version))
        if current.num_rows:
            have = spark.createDataFrame(
                list(zip(current.column("sop_instance_uid").to_pylist(),
                         current.column("frame").to_pylist(), strict=True)),
                "sop_instance_uid string, frame int")
            emb = emb.join(have, ["sop_instance_uid", "frame"], "left_anti")
        # codes of an older codebook left behind (an interrupted retrain) are replaced too
        everything = current.num_rows != stored.num_rows
        if everything:
            emb = _embeddings_frame(spark, warehouse, book.model_version)
    codes = emb.mapInArrow(encode_batches(book), codes_schema()).select(*store.columns)
    # The stores take Arrow (the stream writes through them too): the codes (and the
    # thumbnails, for a store that keeps them) come to the driver and go in one write.
    written = store.write(codes.toArrow(), replace=everything)
    if (SCHEMA, CODES) in warehouse.tables():
        warehouse.register(spark, only=(SCHEMA, CODES))
    return written


def embed(spark: SparkSession, settings: Settings, similarity: SimilaritySettings, *,
          retrain: bool = False, progress: Callable[[int], None] | None = None,
          on_plan: Callable[[int], None] | None = None,
          on_model_change: Callable[[str, str], None] | None = None) -> EmbedResult:
    """The whole pipeline for new rows (see the module docstring).

    ``on_model_change(old, new)`` is told before any work when the lake's codebook belongs to
    another model than the configured one, so a user knows why every image is embedded again.
    """
    started = time.perf_counter()
    result = EmbedResult(store=similarity.code_store.value)
    open_store(settings.warehouse_path, similarity).check()  # fail before any work
    info = model_mod.model_info(similarity.backend)
    previous = features.current_codebook(settings.warehouse_path)
    if previous is not None and not features.fits(previous, info):
        result.replaced_model = f"{previous.model_id} {previous.model_version}"
        if on_model_change is not None:
            on_model_change(result.replaced_model, f"{info.model_id} {info.version}")
    result.instances, result.embeddings, result.pixel_errors = embed_instances(
        spark, settings, similarity, progress=progress, on_plan=on_plan)
    warehouse = Warehouse(settings.warehouse_path)
    if (SCHEMA, EMBEDDINGS) not in warehouse.tables():
        result.seconds = time.perf_counter() - started
        return result
    book = features.current_codebook(warehouse.root)
    stale = book is None or not features.fits(book, info)
    if retrain or stale:
        book = train_codebook(spark, settings, similarity)
        result.trained = True
    assert book is not None
    result.codebook_version = book.version
    result.codes_written = encode_codes(spark, settings, similarity, book,
                                        everything=result.trained)
    result.seconds = time.perf_counter() - started
    return result
