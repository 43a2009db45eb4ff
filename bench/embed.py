"""Embedding benchmark: the Spark vectorized UDF vs the bare model on the same images.

Both paths do the same work per image (read the member from its ZIP, decode, window,
resize, the backend's model: EfficientNet-Lite0 in ONNX Runtime or VGG-16 in TensorFlow,
batches of 32); the ratio shows what Spark adds (task scheduling, Arrow transfer, Parquet
write of the results). Spark runs ``local[N]`` with one model thread per task; the bare model
gets N threads in one process: the same cores. Model export and Spark start-up are excluded
from both; the UDF time does include each worker loading the model (for TensorFlow, its
import: seconds), as a real ``dicomlake embed`` run pays it.

The SQL function ``image_embedding`` is timed on the same images in the same session, in a
``SELECT`` whose ``count``/``sum`` force every value, one task per core
(``sql_udf_images_per_second``; ``sql_udf_efficiency`` is its ratio to the pipeline's
``images_per_second``). It embeds the first frame only and writes nothing, and it runs after
the pipeline in the Python workers the pipeline left, whose model is already loaded.

Then the Spark-free path, stage by stage, on the resolved ``device`` (``auto``: CUDA where
torch sees a GPU, else ONNX Runtime on the CPU; the Spark UDF above always runs the CPU
model, the baseline): ``decode_images_per_second`` is the decode stage alone as the pipeline
runs it (read, decode, window, resize, thumbnail) in ``decode_workers`` processes, all cores;
``model_images_per_second`` the network alone on already decoded images (``cores`` threads on
the CPU; batches of 512 on CUDA); ``pipeline_images_per_second`` both together
(:func:`dicomlake.udfs.features.featurize` with decode workers, as the GPU path runs, rows
built but not written), with the share of its wall time spent waiting for decoded frames
(``pipeline_decode_wait_share``) and in the model (``pipeline_model_share``): the stage near 1
is the one that bounds it. These three count frames (one per file here).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def run(*, files: int = 400, files_per_archive: int = 50, cores: int = 2,
        batch_size: int = 32, backend: str = "onnx", device: str = "auto") -> dict[str, Any]:
    """Run the benchmark and return its keys (see the module docstring)."""
    from dicomlake.catalog.delta import read_columns
    from dicomlake.catalog.ingest import ingest
    from dicomlake.catalog.sample import Profile, make_sample
    from dicomlake.catalog.warehouse import Warehouse
    from dicomlake.config import Settings, SparkSettings
    from dicomlake.session import build_session
    from dicomlake.udfs import model as model_mod
    from dicomlake.udfs.features import THREADS_ENV
    from dicomlake.udfs.pipeline import embed_instances
    from dicomlake.udfs.pixels import model_inputs
    from dicomlake.udfs.settings import Device, ModelBackend, SimilaritySettings

    with tempfile.TemporaryDirectory(prefix="dicomlake-bench-embed-") as tmp:
        home = Path(tmp)
        per_archive = min(files, files_per_archive)
        archives = make_sample(home / "samples", archives=max(1, files // per_archive),
                               files=per_archive, seed=11, profile=Profile.CTMR)
        settings = Settings(home=home, spark=SparkSettings(master=f"local[{cores}]",
                                                          driver_memory="2g"))
        os.environ[THREADS_ENV] = "1"
        spark = build_session(settings)
        ingest(spark, Warehouse(settings.warehouse_path), [str(a) for a in archives])
        kind = ModelBackend(backend)
        on = model_mod.resolve_device(device, kind)
        model_mod.prepare(kind)  # the Spark UDF's CPU model
        if on is Device.CUDA:
            model_mod.prepare(kind, on)
        similarity = SimilaritySettings(batch_size=batch_size, backend=kind)

        started = time.perf_counter()
        images, rows, _ = embed_instances(spark, settings, similarity)
        udf_s = time.perf_counter() - started
        sql_s = _time_sql_udf(spark, settings, similarity, cores)

        paths = read_columns(settings.warehouse_path / "dicom" / "instances",
                             ["path"]).column("path").to_pylist()
        embedder = model_mod.embedder_for(kind, threads=cores)
        embedder.embed(np.zeros((1, 224, 224, 3), np.uint8))  # warm, as the workers are
        started = time.perf_counter()
        pending: list[np.ndarray] = []
        for path in paths:
            pending.extend(model_inputs(path))
            if len(pending) >= batch_size:
                embedder.embed(np.stack(pending))
                pending = []
        if pending:
            embedder.embed(np.stack(pending))
        raw_s = time.perf_counter() - started
        stages = _spark_free(paths, kind, on, cores, batch_size)
    return {
        "backend": kind.value,
        "device": on.value,
        "model_id": model_mod.model_info(kind).model_id,
        "images": images,
        "embeddings": rows,
        "cores": cores,
        "images_per_second": images / udf_s,
        "raw_images_per_second": len(paths) / raw_s,
        "udf_efficiency": (images / udf_s) / (len(paths) / raw_s),
        "sql_udf_images_per_second": images / sql_s,
        "sql_udf_efficiency": (images / sql_s) / (images / udf_s),
        **stages,
    }


def _spark_free(paths: list[str], backend: Any, device: Any, cores: int, batch_size: int,
                ) -> dict[str, Any]:
    """The decode stage, the model and the two together without Spark (module docstring)."""
    from dicomlake.udfs.decode import DecodePool, StageTimes, decode_stream
    from dicomlake.udfs.features import FeatureModel, ImageInput, featurize
    from dicomlake.udfs.settings import Device
    from dicomlake.udfs.torch_model import GPU_BATCH

    batch = GPU_BATCH if device is Device.CUDA else batch_size
    with DecodePool() as pool:  # all cores; started (about a second) before any timing
        started = time.perf_counter()
        decoded = [d.images for d in decode_stream(((p, None) for p in paths), workers=pool,
                                                   thumbnails=True) if d.error is None]
        decode_s = time.perf_counter() - started
        frames = np.concatenate(decoded)

        model = FeatureModel(backend, threads=cores, device=device)
        model.embed(frames[:1])  # load (and on CUDA, initialise) before timing
        started = time.perf_counter()
        for i in range(0, len(frames), batch):
            model.embed(frames[i:i + batch])
        model_s = time.perf_counter() - started

        stats = StageTimes()
        started = time.perf_counter()
        inputs = (ImageInput(str(i), p) for i, p in enumerate(paths))
        for _ in featurize(inputs, model, batch_size=batch, workers=pool, stats=stats):
            pass
        pipeline_s = time.perf_counter() - started
    return {
        "decode_workers": pool.workers,
        "decode_images_per_second": len(frames) / decode_s,
        "model_images_per_second": len(frames) / model_s,
        "pipeline_images_per_second": stats.frames / pipeline_s,
        "pipeline_decode_wait_share": stats.wait_seconds / pipeline_s,
        "pipeline_model_share": stats.model_seconds / pipeline_s,
    }


def _time_sql_udf(spark: Any, settings: Any, similarity: Any, cores: int) -> float:
    """Seconds for ``image_embedding`` over every instance of the lake, checked to have
    embedded every image the pipeline embedded (a NULL-returning function would look fast)."""
    from dicomlake.catalog.delta import read_columns
    from dicomlake.udfs import register_functions

    register_functions(spark, settings, similarity)
    started = time.perf_counter()
    row = spark.sql(
        "SELECT count(e) AS embedded, sum(size(e)) AS total FROM (SELECT image_embedding(path) "
        f"AS e FROM (SELECT /*+ REPARTITION({cores}) */ path FROM dicom.instances))").first()
    seconds = time.perf_counter() - started
    frames = read_columns(settings.warehouse_path / "dicom" / "embeddings",
                          ["frame"]).column("frame").to_pylist()
    expected = frames.count(0)
    if row.embedded != expected or not row.total:
        raise RuntimeError(f"image_embedding gave {row.embedded} embeddings, the pipeline "
                           f"{expected} first frames: the SQL rate would not be comparable")
    return seconds
