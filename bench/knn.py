"""kNN benchmark: our ADC scan vs faiss IndexPQ on the same codes, recall, and SQL latency.

Synthetic clustered vectors (seeded) stand in for embeddings: speed depends on the number of
codes and ``m``, not on where the vectors came from. Both searches run single-threaded, one
query at a time, over the same codebook (faiss gets our centroids, so the codes are equal).
Our timing includes what ``image_knn`` really does by default: the lookup table, the scan and
selecting ``refine`` candidates (faiss selects only 10). ``recall_at_10`` compares our
default search (ADC + exact re-rank of ``refine`` candidates) with exact brute force.
``sql_p50_ms`` runs ``image_knn`` through Spark SQL over the same codes stored as Delta
tables in a temporary lake (warm: after three queries).
"""

from __future__ import annotations

import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dicomlake.catalog import tables


def clustered(n: int, dim: int, *, seed: int = 0, clusters: int = 2000) -> np.ndarray:
    """Vectors around ``clusters`` centres (a fair stand-in for CNN features)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 50_000):
        stop = min(n, start + 50_000)
        out[start:stop] = centres[rng.integers(0, clusters, stop - start)] + 0.35 * rng.normal(
            size=(stop - start, dim)).astype(np.float32)
    return out


def _write_lake(root: Path, book: Any, x: np.ndarray, codes: np.ndarray) -> list[str]:
    import pyarrow as pa
    from deltalake import write_deltalake

    from dicomlake.udfs import pq

    n, dim = x.shape
    ids = [f"1.2.826.0.1.{i}" for i in range(n)]
    frames = pa.array(np.zeros(n, np.int32))
    emb = pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)),
                                   pa.array(x.ravel()))
    write_deltalake(str(tables.EMBEDDINGS.path(root)), pa.table({
        "sop_instance_uid": ids, "frame": frames, "embedding": emb,
        "model_id": ["synthetic"] * n, "model_version": ["synthetic"] * n,
        "embedded_at": pa.array([dt.datetime.now(dt.UTC)] * n, pa.timestamp("us", tz="UTC")),
    }))
    write_deltalake(str(tables.CODES.path(root)), pa.table({
        "sop_instance_uid": ids, "frame": frames,
        "codebook_version": pa.array(np.full(n, book.version, np.int32)),
        "list_id": pa.array(np.zeros(n, np.int32)),
        "code": pa.array([c.tobytes() for c in codes], pa.binary()),
    }))
    pq.save(tables.CODEBOOKS.path(root), book)
    return ids


def _sql_p50(home: Path, m: int, ids: list[str], queries: int) -> float:
    from dicomlake.config import Settings, SparkSettings
    from dicomlake.session import build_session
    from dicomlake.udfs import register_functions
    from dicomlake.udfs.settings import SimilaritySettings

    settings = Settings(home=home, spark=SparkSettings(master="local[2]", driver_memory="2g"))
    spark = build_session(settings)
    register_functions(spark, settings, SimilaritySettings(m=m))
    rng = np.random.default_rng(5)
    times = []
    for i in range(queries + 3):
        uid = ids[int(rng.integers(0, len(ids)))]
        started = time.perf_counter()
        rows = spark.sql(f"SELECT * FROM image_knn(query => '{uid}', k => 10)").collect()
        if i >= 3:
            times.append((time.perf_counter() - started) * 1000)
        assert len(rows) == 10
    return statistics.median(times)


def run(*, codes: int = 200_000, dim: int = 128, m: int = 16, queries: int = 100,
        refine: int = 100, sql_queries: int = 20, sql: bool = True) -> dict[str, Any]:
    """Run the benchmark and return its keys (see the module docstring)."""
    import faiss

    from dicomlake.udfs import pq
    from dicomlake.udfs.search import CodeIndex
    from dicomlake.udfs.search import refine as refine_rows

    faiss.omp_set_num_threads(1)
    x = clustered(codes, dim)
    rng = np.random.default_rng(1)
    q = x[rng.integers(0, codes, queries)] + 0.2 * rng.normal(size=(queries, dim)).astype(
        np.float32)
    book = pq.train(x[rng.permutation(codes)[:50_000]], m=m, model_id="synthetic",
                    model_version="synthetic")
    code_arr, lists = book.encode(x)
    ids = np.array([str(i) for i in range(codes)], dtype=object)
    index = CodeIndex.build(book, ids, np.zeros(codes, np.int32), code_arr, lists)

    baseline = faiss.IndexPQ(dim, m, 8)
    faiss.copy_array_to_vector(book.centroids.ravel(), baseline.pq.centroids)
    baseline.is_trained = True
    baseline.add(x)

    started = time.perf_counter()
    for i in range(queries):
        baseline.search(q[i:i + 1], 10)
    faiss_s = (time.perf_counter() - started) / queries

    started = time.perf_counter()
    results = [index.search(q[i], max(10, refine)) for i in range(queries)]
    adc_s = (time.perf_counter() - started) / queries

    exact_rows = np.arange(codes, dtype=np.int64)
    hits = 0
    for i, (rows, dist) in enumerate(results):
        rows, _ = refine_rows(rows, dist, q[i], x, exact_rows)
        truth = np.argpartition(((x - q[i]) ** 2).sum(axis=1), 10)[:10]
        hits += len(set(rows[:10].tolist()) & set(truth.tolist()))
    result: dict[str, Any] = {
        "codes": codes, "dim": dim, "m": m, "queries": queries, "refine": refine,
        "adc_codes_per_second": codes / adc_s,
        "faiss_codes_per_second": codes / faiss_s,
        "adc_vs_faiss": faiss_s / adc_s,
        "recall_at_10": hits / (10 * queries),
        "threads": 1,
    }
    if sql:
        with tempfile.TemporaryDirectory(prefix="dicomlake-bench-knn-") as tmp:
            home = Path(tmp)
            stored = _write_lake(home / "warehouse", book, x, code_arr)
            result["sql_p50_ms"] = _sql_p50(home, m, stored, sql_queries)
    return result
