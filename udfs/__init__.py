"""Image pixels, embeddings, PQ codes, code stores and ``image_knn`` (similarity in SQL).

Registered in every session by :func:`register_functions` (a ``SESSION_HOOKS`` entry):

* ``image_knn(query => ..., k => ..., nprobe => ..., refine => ..., filter => ..., frame => ...)``
  table-valued function (see :mod:`dicomlake.udfs.knn`);
* ``dicom_thumbnail(id)`` -> PNG bytes of the first frame of the image a ``sop_instance_uid``
  or ``path`` of ``instances`` names;
* ``image_embedding(id)``, ``pq_encode(embedding)`` and ``pq_distance(query_embedding, code)``:
  the configured backend's embedding of an image's first frame, its PQ code and the
  asymmetric distance of an embedding to a code (see :mod:`dicomlake.udfs.sqlfuncs`).

What those functions read depends on the session's :class:`ImageScope` (admin by default;
the SQL service registers the clinician and analyst scopes in their own sessions).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomlake.udfs.errors import (
    CodebookError,
    CodeStoreError,
    EmbeddingError,
    KnnError,
    PixelError,
    PixelErrorKind,
)
from dicomlake.udfs.images import ADMIN_SCOPE, ANALYST_SCOPE, CLINICIAN_SCOPE, ImageScope
from dicomlake.udfs.settings import (
    CodeStoreKind,
    ModelBackend,
    SimilaritySettings,
    load_similarity,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyspark.sql import SparkSession

    from dicomlake.config import Settings

__all__ = [
    "ADMIN_SCOPE",
    "ANALYST_SCOPE",
    "CLINICIAN_SCOPE",
    "CodeStoreError",
    "CodeStoreKind",
    "CodebookError",
    "EmbeddingError",
    "ImageScope",
    "KnnError",
    "ModelBackend",
    "PixelError",
    "PixelErrorKind",
    "SimilaritySettings",
    "load_similarity",
    "register_functions",
]


def _session_settings(spark: SparkSession) -> Settings:
    """The settings a session was built with: its home is the warehouse dir's parent.

    A Spark Connect server's warehouse dir is its own, not this lake's: there the settings
    come from the config file and environment, as :func:`dicomlake.config.load_settings` reads.
    """
    from dicomlake.config import Settings, load_settings
    from dicomlake.session import is_connect

    loaded = load_settings()
    if is_connect(spark):
        return loaded
    conf = spark.conf.get("spark.sql.warehouse.dir", None) or ""
    conf = conf.removeprefix("file:").removeprefix("//")
    if conf and Path(conf).name == "spark-warehouse" and Path(conf).parent != loaded.home:
        return Settings(home=Path(conf).parent)
    return loaded


def _vectorized(fn: Callable[..., Any], return_type: str) -> Any:
    """``pandas_udf(fn, return_type)``: pyspark's stubs type only the decorator forms, so
    the plain call (what the runtime documents too) needs this one narrow ignore."""
    from pyspark.sql.functions import pandas_udf

    return pandas_udf(fn, return_type)  # type: ignore[call-overload]


def register_functions(spark: SparkSession, settings: Settings | None = None,
                       similarity: SimilaritySettings | None = None,
                       scope: ImageScope = ADMIN_SCOPE) -> None:
    """Register ``image_knn`` and the scalar image functions for this lake in a session.

    Called by :func:`dicomlake.build_session`; call it again with other ``similarity``
    settings to point ``image_knn`` at another code store (or ``image_embedding`` at another
    backend).
    """
    from pyspark.sql.functions import udtf

    from dicomlake.udfs.knn import KNN_DDL, make_udtf
    from dicomlake.udfs.sqlfuncs import (
        make_embedding,
        make_pq_distance,
        make_pq_encode,
        make_thumbnail,
    )

    settings = settings or _session_settings(spark)
    similarity = similarity or load_similarity(settings)
    home, warehouse = str(settings.home), str(settings.warehouse_path)
    handler = make_udtf(warehouse, similarity, scope)
    # udtf(f, ...) returns the function itself (a classic or a Spark Connect class), never
    # the decorator the stub's union also allows
    spark.udtf.register("image_knn", udtf(handler, returnType=KNN_DDL))  # type: ignore[arg-type]
    spark.udf.register("dicom_thumbnail", _vectorized(make_thumbnail(home, warehouse, scope),
                                                      "binary"))
    backend = similarity.backend.value
    spark.udf.register("image_embedding", _vectorized(
        make_embedding(home, warehouse, scope, backend, similarity.batch_size,
                       similarity.device.value), "array<float>"))
    spark.udf.register("pq_encode", _vectorized(make_pq_encode(warehouse, backend), "binary"))
    spark.udf.register("pq_distance",
                       _vectorized(make_pq_distance(warehouse, backend), "double"))
