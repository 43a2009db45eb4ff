"""image_knn's searcher under a stream of commits: tables are kept open, appends are read
incrementally, anything else reloads, and either way the searcher holds exactly what a fresh
one would. Tables only delta-rs can read right (column mapping, deletion vectors) are read
through it.

Real Delta tables (delta-rs) and a real faiss codebook; no Spark (the searcher is the part
of ``image_knn`` that runs in the Python worker).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from dicomlake.catalog.snapshots import FollowedTable, TableRows
from dicomlake.udfs import pq
from dicomlake.udfs.codestore import CODE_COLUMNS
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
    return Searcher(lake.warehouse, SimilaritySettings(m=M, nlist=0))


def test_appends_are_read_incrementally_and_match_a_fresh_searcher(lake: Lake) -> None:
    first = lake.append(20)
    s = _searcher(lake)
    s.refresh()
    assert s.index is not None and s.index.size == 20
    rows = TableRows(lake.path("codes"), CODE_COLUMNS)
    rows.refresh()
    for _ in range(3):  # three stream commits, each only adding files
        lake.append(5)
    assert rows.refresh() and rows.added is not None and rows.added.num_rows == 15
    newest = lake.append(1)
    assert s.search(newest[0], 1)[0][1] == newest[0]  # found at once, by its own vector
    assert s.search(first[0], 1)[0][1] == first[0]
    fresh = _searcher(lake)
    fresh.refresh()
    assert _state(s) == _state(fresh)
    assert s.store.generation() == str(DeltaTable(str(lake.path("codes"))).version())


def test_a_commit_that_removes_files_reloads_everything(lake: Lake) -> None:
    lake.append(12)
    s = _searcher(lake)
    s.refresh()
    rows = TableRows(lake.path("codes"), CODE_COLUMNS)
    rows.refresh()
    kept = lake.append(4)
    DeltaTable(str(lake.path("codes"))).delete("sop_instance_uid = '1.2.3.0'")
    assert rows.refresh() and rows.added is None  # read afresh
    assert rows.rows is not None and "1.2.3.0" not in rows.rows.column(0).to_pylist()
    s.refresh()
    assert s.index is not None
    assert "1.2.3.0" not in set(s.index.ids.tolist())
    assert set(kept) <= set(s.index.ids.tolist())
    fresh = _searcher(lake)
    fresh.refresh()
    assert _state(s) == _state(fresh)


def test_an_unchanged_table_is_not_read_again(lake: Lake) -> None:
    lake.append(3)
    rows = TableRows(lake.path("codes"), CODE_COLUMNS)
    assert rows.refresh()
    before = rows.rows
    assert not rows.refresh() and rows.rows is before


def test_a_new_column_reloads_with_it(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write_deltalake(str(path), pa.table({"a": [1, 2]}))
    rows = TableRows(path, ["a"])
    rows.refresh()
    write_deltalake(str(path), pa.table({"a": [3], "b": ["x"]}), mode="append",
                    schema_mode="merge")
    assert rows.refresh() and rows.added is None
    assert sorted(rows.rows.column("a").to_pylist()) == [1, 2, 3]


def test_column_mapping_is_read_through_delta_rs(tmp_path: Path) -> None:
    """Files of a column-mapped table name columns by id: a plain Parquet read gives NULLs."""
    path = tmp_path / "mapped"
    write_deltalake(str(path), pa.table({"a": [1, 2], "b": ["x", "y"]}),
                    configuration={"delta.columnMapping.mode": "name"})
    rows = TableRows(path, ["b", "a"])
    rows.refresh()
    write_deltalake(str(path), pa.table({"a": [3], "b": ["z"]}), mode="append")
    assert rows.refresh() and rows.added is None  # never by file for such a table
    assert sorted(rows.rows.to_pylist(), key=lambda r: r["a"]) == [
        {"b": "x", "a": 1}, {"b": "y", "a": 2}, {"b": "z", "a": 3}]


def test_a_deletion_vector_table_is_read_through_delta_rs(tmp_path: Path) -> None:
    path = tmp_path / "dv"
    write_deltalake(str(path), pa.table({"a": [1, 2, 3]}),
                    configuration={"delta.enableDeletionVectors": "true"})
    rows = TableRows(path, ["a"])
    rows.refresh()
    DeltaTable(str(path)).delete("a = 2")
    assert rows.refresh() and rows.added is None
    assert sorted(rows.rows.column("a").to_pylist()) == [1, 3]
    assert rows.rows.schema.field("a").type == pa.int64()  # the table's type, not a view


def test_a_table_that_appears_later(tmp_path: Path) -> None:
    path = tmp_path / "later"
    rows = TableRows(path, ["a"])
    assert rows.refresh() and rows.rows is None and rows.version == -1
    assert not rows.refresh()
    assert FollowedTable(path).version() == -1
    write_deltalake(str(path), pa.table({"a": [1]}))
    assert rows.refresh() and rows.rows is not None and rows.rows.num_rows == 1
