"""Product quantization: faiss trains the codebooks, Delta keeps every version.

A codebook splits a ``dim``-vector into ``m`` sub-vectors and learns ``ksub`` (256, or fewer
when there are fewer training vectors) centroids per sub-space with faiss's k-means; a code is
one byte per sub-space. An optional coarse quantizer (IVF, ``nlist`` centroids, also faiss
k-means) assigns each vector a list so a search can probe only the nearest lists. Codes are
of the raw vector, not of the residual to its list centroid: one lookup table per query then
serves every probed list (the residual variant is a little more accurate but needs a table
per list; see the issue note).

Codebooks live in ``dicom.codebooks`` (one row per version, centroids as ``.npy`` bytes); the
newest version is the current one and every code carries the version it was made with.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicomlake.udfs.errors import CodebookError

CODEBOOKS = "codebooks"
"""Table name in the ``dicom`` schema."""


def _npy(arr: np.ndarray | None) -> bytes | None:
    if arr is None:
        return None
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _from_npy(data: bytes | None) -> np.ndarray | None:
    return None if data is None else np.load(io.BytesIO(data), allow_pickle=False)


def check_finite(vectors: np.ndarray, what: str) -> None:
    """Refuse NaN/inf rows, naming the first bad row (a NaN would poison every distance)."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise CodebookError(f"{what}: {int(bad.sum())} vector(s) contain NaN or inf "
                            f"(first at row {first}); they cannot be quantized or searched")


@dataclass(frozen=True)
class Codebook:
    """One trained codebook version.

    ``centroids`` is (m, ksub, dsub); ``coarse`` is (nlist, dim) or None without IVF.
    """

    version: int
    model_id: str
    model_version: str
    centroids: np.ndarray
    coarse: np.ndarray | None = None
    trained_on: int = 0

    @property
    def m(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def ksub(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[0] * self.centroids.shape[2])

    @property
    def nlist(self) -> int:
        return 0 if self.coarse is None else int(self.coarse.shape[0])

    def check_vectors(self, vectors: np.ndarray, what: str) -> np.ndarray:
        """Vectors as float32 (n, dim), or a CodebookError naming the mismatch."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[np.newaxis]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            got = vectors.shape[-1] if vectors.ndim else 0
            raise CodebookError(
                f"{what}: vectors have {got} dimensions but codebook v{self.version} was "
                f"trained on {self.dim}-d vectors of model {self.model_id} "
                f"({self.model_version}); retrain with `dicomlake embed --retrain`")
        check_finite(vectors, what)
        return vectors

    def encode(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes (n, m) uint8, list ids (n,) int32; all 0 without IVF).

        Each row's code depends on that row alone: distances are summed per row as squared
        differences (not as ``||c||^2 - 2 x.c`` through BLAS, whose rounding depends on how
        many rows share the call), and exact ties go to the lowest centroid. So a vector gets
        the same bytes whether batch ``embed``, the stream or ``pq_encode`` in SQL encodes it,
        alone or with thousands of others.
        """
        x = self.check_vectors(vectors, f"encode with codebook v{self.version}")
        n, dsub = x.shape[0], self.centroids.shape[2]
        codes = np.empty((n, self.m), dtype=np.uint8)
        sub = x.reshape(n, self.m, dsub)
        step = max(1, (1 << 22) // max(1, self.ksub * dsub))  # rows per chunk (~16 MB)
        for start in range(0, n, step):
            chunk = sub[start:start + step]
            for j in range(self.m):
                diff = chunk[:, j, np.newaxis, :] - self.centroids[j][np.newaxis]
                codes[start:start + step, j] = np.argmin((diff * diff).sum(axis=2), axis=1)
        if self.coarse is None:
            return codes, np.zeros(n, dtype=np.int32)
        lists = np.empty(n, dtype=np.int32)
        step = max(1, (1 << 22) // max(1, self.coarse.size))
        for start in range(0, n, step):
            diff = x[start:start + step, np.newaxis, :] - self.coarse[np.newaxis]
            lists[start:start + step] = np.argmin((diff * diff).sum(axis=2), axis=1)
        return codes, lists

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Reconstructed vectors (n, dim) from codes (n, m)."""
        parts = [self.centroids[j][codes[:, j]] for j in range(self.m)]
        return np.concatenate(parts, axis=1)

    def lookup_table(self, query: np.ndarray) -> np.ndarray:
        """(m, ksub) squared distances from the query's sub-vectors to every centroid."""
        q = query.reshape(self.m, 1, -1)
        return ((self.centroids - q) ** 2).sum(axis=2, dtype=np.float32)


def train(vectors: np.ndarray, *, m: int, nlist: int = 0, version: int = 1,
          model_id: str = "", model_version: str = "", seed: int = 1234) -> Codebook:
    """Train a codebook with faiss (k-means per sub-space, optional coarse k-means)."""
    import faiss

    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] == 0:
        raise CodebookError(f"PQ training needs a non-empty (n, dim) matrix, got {x.shape}")
    n, dim = x.shape
    check_finite(x, "PQ training")
    if m <= 0 or dim % m:
        raise CodebookError(f"PQ: m={m} sub-spaces must divide the {dim} dimensions")
    if n < 2:
        raise CodebookError(f"PQ training needs at least 2 vectors, got {n}; embed more images")
    nbits = min(8, int(np.floor(np.log2(n))))
    pq = faiss.ProductQuantizer(dim, m, nbits)
    pq.cp.seed = seed
    pq.cp.min_points_per_centroid = 1  # small lakes: train anyway, faiss only warns
    pq.verbose = False
    pq.train(x)
    centroids = faiss.vector_to_array(pq.centroids).reshape(m, 1 << nbits, dim // m)
    coarse = None
    if nlist:
        if nlist > n:
            raise CodebookError(f"PQ: nlist={nlist} coarse lists need at least that many "
                                f"training vectors, got {n}")
        km = faiss.Kmeans(dim, nlist, niter=20, seed=seed, verbose=False,
                          min_points_per_centroid=1)
        km.train(x)
        assert km.centroids is not None  # train() sets them
        coarse = km.centroids.copy()
    return Codebook(version, model_id, model_version, centroids.astype(np.float32), coarse,
                    trained_on=n)


def save(table_path: str | Path, book: Codebook) -> None:
    """Append a codebook version to ``dicom.codebooks`` (one small delta-rs commit)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    row = pa.table({
        "version": pa.array([book.version], pa.int32()),
        "model_id": [book.model_id],
        "model_version": [book.model_version],
        "dim": pa.array([book.dim], pa.int32()),
        "m": pa.array([book.m], pa.int32()),
        "ksub": pa.array([book.ksub], pa.int32()),
        "nlist": pa.array([book.nlist], pa.int32()),
        "trained_on": pa.array([book.trained_on], pa.int64()),
        "created_at": pa.array([dt.datetime.now(dt.UTC)], pa.timestamp("us", tz="UTC")),
        "centroids": pa.array([_npy(book.centroids)], pa.binary()),
        "coarse": pa.array([_npy(book.coarse)], pa.binary()),
    })
    Path(table_path).mkdir(parents=True, exist_ok=True)
    write_deltalake(str(table_path), row, mode="append")


def latest(table_path: str | Path) -> Codebook | None:
    """The current (highest) codebook version, or None when none was trained yet."""
    from deltalake import DeltaTable

    from dicomlake.catalog.snapshots import read_table, schema_of

    if not DeltaTable.is_deltatable(str(table_path)):
        return None
    table = DeltaTable(str(table_path))
    data = read_table(table, schema_of(table).names)
    if data.num_rows == 0:
        return None
    versions = data.column("version").to_pylist()
    row = data.slice(versions.index(max(versions)), 1).to_pylist()[0]
    return Codebook(row["version"], row["model_id"], row["model_version"],
                    _from_npy(row["centroids"]), _from_npy(row["coarse"]),  # type: ignore[arg-type]
                    trained_on=row["trained_on"])
