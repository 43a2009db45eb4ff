"""image_knn's searcher under a stream of commits: appends are read incrementally, anything
else reloads, and either way the searcher holds exactly what a fresh one would.

Real Delta tables (delta-rs) and a real faiss codebook; no Spark (the searcher is the part
of ``image_knn`` that runs in the Python worker).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from dicomlake.udfs import pq
from dicomlake.udfs.deltalog import appended_files, latest_version
from dicomlake.udfs.knn import Searcher
from dicomlake.udfs.settings import SimilaritySettings

DIM, M = 16, 4
MODEL = "test-model-v1"


def _rows(uids: list[str], vectors: np.ndarray, book: pq.Codebook,
          ) -> tuple[pa.Table, pa.Table]:
    codes, lists = book.encode(vectors)
    n = len(uids)
    code_t = pa.table({
        "sop_instance_uid": pa.array(uids, pa.string()),
        "frame": pa.array([0] * n, pa.int32()),
        "codebook_version": pa.array([book.version] * n, pa.int32()),
        "list_id": pa.array([int(x) for x in lists], pa.int32()),
        "code": pa.array([c.tobytes() for c in codes], pa.binary())})
    emb_t = pa.table({
        "sop_instance_uid": pa.array(uids, pa.string()),
        "frame": pa.array([0] * n, pa.int32()),
        "model_version": pa.array([MODEL] * n, pa.string()),
        "embedding": pa.array([v.tolist() for v in vectors], pa.list_(pa.float32()))})
    return code_t, emb_t


class Lake:
    """A warehouse with codebooks, codes and embeddings tables, appended like the stream."""

    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        self.warehouse = root / "warehouse"
        self.rng = np.random.default_rng(7)
        self.book = pq.train(self.rng.normal(size=(300, DIM)).astype(np.float32), m=M,
                             version=1, model_id="test", model_version=MODEL)
        pq.save(self.path(pq.CODEBOOKS), self.book)
        self.count = 0

    def path(self, table: str) -> Path:
        return self.warehouse / "dicom" / table

    def append(self, n: int) -> list[str]:
        uids = [f"1.2.3.{self.count + i}" for i in range(n)]
        self.count += n
        codes, emb = _rows(uids, self.rng.normal(size=(n, DIM)).astype(np.float32), self.book)
        write_deltalake(str(self.path("codes")), codes, mode="append")
        write_deltalake(str(self.path("embeddings")), emb, mode="append")
        return uids


def _state(s: Searcher) -> tuple[list[tuple[str, int]], list[list[float]]]:
    """What the searcher answers from: index rows and their exact vectors, order-free."""
    assert s.index is not None and s.exact is not None and s.exact_rows is not None
    rows = sorted(zip(s.index.ids.tolist(), s.index.frames.tolist(),
                      s.exact[s.exact_rows].tolist(), strict=True))
    return [(u, f) for u, f, _ in rows], [v for _, _, v in rows]


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(tmp_path)


def _searcher(lake: Lake) -> Searcher:
    return Searcher(lake.home, lake.warehouse, SimilaritySettings(m=M, nlist=0))


def test_appends_are_read_incrementally_and_match_a_fresh_searcher(lake: Lake) -> None:
    first = lake.append(20)
    s = _searcher(lake)
    s.refresh()
    assert s.index is not None and s.index.size == 20
    for _ in range(3):  # three stream commits, each only adding files
        lake.append(5)
    codes = lake.path("codes")
    assert appended_files(codes, s._codes.version, latest_version(codes)) is not None
    newest = lake.append(1)
    assert s.search(newest[0], 1)[0][1] == newest[0]  # found at once, by its own vector
    assert s.search(first[0], 1)[0][1] == first[0]
    fresh = _searcher(lake)
    fresh.refresh()
    assert _state(s) == _state(fresh)
    assert s._codes.version == latest_version(codes) == DeltaTable(str(codes)).version()


def test_a_commit_that_removes_files_reloads_everything(lake: Lake) -> None:
    lake.append(12)
    s = _searcher(lake)
    s.refresh()
    kept = lake.append(4)
    dt_codes = DeltaTable(str(lake.path("codes")))
    dt_codes.delete("sop_instance_uid = '1.2.3.0'")
    codes = lake.path("codes")
    assert appended_files(codes, s._codes.version, latest_version(codes)) is None
    s.refresh()
    assert s.index is not None
    assert "1.2.3.0" not in set(s.index.ids.tolist())
    assert set(kept) <= set(s.index.ids.tolist())
    fresh = _searcher(lake)
    fresh.refresh()
    assert _state(s) == _state(fresh)


def test_latest_version_without_a_table(tmp_path: Path) -> None:
    assert latest_version(tmp_path / "missing") == -1
