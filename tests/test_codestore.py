"""Both code stores through the one Arrow interface, without Spark: what ``embed``, the
stream and ``image_knn`` rely on (rows in and out, replace, app transactions with the write,
de-duplication of replayed codes, a generation that moves with every write, nothing visible
of a write that failed).

The Delta store runs always; the HBase store runs against Google's Bigtable emulator when its
binary is installed (a real wide-column server with the HBase data model).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from _bigtable import BigtableEmulator, emulator_binary
from deltalake import DeltaTable

from dicomlake.udfs.codestore import CODE_COLUMNS, CodeStore, DeltaCodeStore, codes_schema
from dicomlake.udfs.errors import CodeStoreError
from dicomlake.udfs.hbase import HBaseCodeStore
from dicomlake.udfs.settings import HBaseSettings

_tables = itertools.count()


def codes(uids: list[str], version: int = 1, *, thumbnails: bool = False) -> pa.Table:
    n = len(uids)
    data = {"sop_instance_uid": pa.array(uids, pa.string()),
            "frame": pa.array([0] * n, pa.int32()),
            "codebook_version": pa.array([version] * n, pa.int32()),
            "list_id": pa.array([i % 3 for i in range(n)], pa.int32()),
            "code": pa.array([u.encode().ljust(8, b".")[:8] for u in uids], pa.binary())}
    if thumbnails:
        data["thumbnail"] = pa.array([b"\x89PNG" + u.encode() for u in uids], pa.binary())
    return pa.table(data)


def stored(store: CodeStore) -> list[tuple[str, int, int, int, bytes]]:
    return sorted(tuple(r.values()) for r in store.load().to_pylist())


def expected(table: pa.Table) -> list[tuple[str, int, int, int, bytes]]:
    return sorted(tuple(r.values()) for r in table.select(list(CODE_COLUMNS)).to_pylist())


@pytest.fixture(scope="module")
def emulator() -> Iterator[BigtableEmulator]:
    if emulator_binary() is None:
        pytest.skip("Bigtable emulator (cbtemulator, Debian package "
                    "google-cloud-cli-bigtable-emulator) is not installed")
    with BigtableEmulator() as emu:
        yield emu


@pytest.fixture(params=["delta", "hbase"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CodeStore:
    if request.param == "delta":
        return DeltaCodeStore(tmp_path / "dicom" / "codes")
    emu = request.getfixturevalue("emulator")
    hbase = HBaseCodeStore(HBaseSettings(emulator=emu.address, table=f"t{next(_tables)}"))
    hbase.check()
    return hbase


class TestContract:
    """What every store must do, through Arrow only."""

    def test_write_then_load(self, store: CodeStore) -> None:
        assert store.load().num_rows == 0
        batch = codes([f"1.2.{i}" for i in range(25)], thumbnails=True)
        assert store.write(batch, replace=False) == 25
        loaded = store.load()
        assert loaded.schema == codes_schema()
        assert stored(store) == expected(batch)

    def test_a_record_batch_reader_streams_in(self, store: CodeStore) -> None:
        batch = codes([f"1.3.{i}" for i in range(30)])
        reader = pa.RecordBatchReader.from_batches(batch.schema, batch.to_batches(max_chunksize=7))
        assert store.write(reader, replace=False) == 30
        assert stored(store) == expected(batch)

    def test_replace_leaves_only_the_new_codes(self, store: CodeStore) -> None:
        store.write(codes(["1.1", "1.2", "1.3"], version=1), replace=False)
        new = codes(["1.2", "1.4"], version=2)
        assert store.write(new, replace=True) == 2
        assert stored(store) == expected(new)
        more = codes(["1.5"], version=2)
        store.write(more, replace=False)  # later writes are visible again
        assert stored(store) == expected(pa.concat_tables([new, more]))

    def test_generation_moves_with_every_write_and_only_then(self, store: CodeStore) -> None:
        before = store.generation()
        store.write(codes(["2.1"]), replace=False)
        first = store.generation()
        assert first != before and store.generation() == first
        assert store.write(codes([]), replace=False) == 0  # nothing to write: no new state
        assert store.generation() == first
        store.write(codes(["2.2"]), replace=False)
        assert store.generation() != first

    def test_app_transactions_come_with_the_write(self, store: CodeStore) -> None:
        app = "dicomlake-stream/e1/imageupload/3"
        assert store.transaction_versions([app]) == {}
        store.write(codes(["3.1", "3.2"]), replace=False, app_transactions={app: 17},
                    operation="STREAM")
        assert store.transaction_versions([app, "other"]) == {app: 17}
        # a batch whose codes were all stored already still records how far it got
        assert store.write(codes([]), replace=False, app_transactions={app: 20}) == 0
        assert store.transaction_versions([app]) == {app: 20}
        assert len(stored(store)) == 2

    def test_missing_drops_codes_already_stored(self, store: CodeStore) -> None:
        store.write(codes(["4.1", "4.2"], version=1), replace=False)
        replay = codes(["4.1", "4.2", "4.3"], version=1)
        assert store.missing(replay).column("sop_instance_uid").to_pylist() == ["4.3"]
        other_book = codes(["4.1"], version=2)  # same image, another codebook: not stored
        assert store.missing(other_book).num_rows == 1
        store.write(store.missing(replay), replace=False)
        assert store.missing(replay).num_rows == 0
        assert len(stored(store)) == 3

    def test_codes_without_their_columns_are_refused(self, store: CodeStore) -> None:
        with pytest.raises(ValueError, match=r"codes lack column\(s\) \['code'\]"):
            store.write(codes(["5.1"]).drop_columns(["code"]), replace=False)
        assert store.load().num_rows == 0


def failing_reader(good: pa.Table) -> pa.RecordBatchReader:
    """Yields ``good``, then fails the way a crashed producer would."""
    def batches() -> Iterator[pa.RecordBatch]:
        yield from good.to_batches()
        raise RuntimeError("encoder died")

    return pa.RecordBatchReader.from_batches(good.schema, batches())


def test_delta_a_failed_write_commits_nothing(tmp_path: Path) -> None:
    store = DeltaCodeStore(tmp_path / "codes")
    store.write(codes(["6.1"]), replace=False)
    generation = store.generation()
    with pytest.raises(Exception, match="encoder died"):
        store.write(failing_reader(codes(["6.2", "6.3"])), replace=True)
    assert store.generation() == generation
    assert stored(store) == expected(codes(["6.1"]))


def test_delta_one_commit_per_write_with_its_operation(tmp_path: Path) -> None:
    store = DeltaCodeStore(tmp_path / "codes")
    store.write(codes(["7.1"]), replace=False, operation="STREAM")
    store.write(codes(["7.2"]), replace=True)
    history = DeltaTable(store.uri).history()
    assert [h.get("dicomlake.operation") for h in history] == ["ENCODE", "STREAM"]
    assert DeltaTable(store.uri).version() == 1


def test_delta_readers_see_appends_incrementally(tmp_path: Path) -> None:
    writer = DeltaCodeStore(tmp_path / "codes")
    reader = DeltaCodeStore(tmp_path / "codes")
    writer.write(codes(["8.1"]), replace=False)
    assert reader.missing(codes(["8.1", "8.2"])).num_rows == 1
    writer.write(codes(["8.2"]), replace=False)  # another process's append
    assert reader.missing(codes(["8.1", "8.2"])).num_rows == 0
    writer.write(codes(["8.3"]), replace=True)
    assert reader.missing(codes(["8.1", "8.3"])).column(0).to_pylist() == ["8.1"]


def test_hbase_a_failed_write_is_invisible(emulator: BigtableEmulator) -> None:
    store = HBaseCodeStore(HBaseSettings(emulator=emulator.address, table=f"t{next(_tables)}"))
    store.write(codes(["9.1"]), replace=False)
    generation = store.generation()
    with pytest.raises(CodeStoreError, match="nothing of this write is visible"):
        store.write(failing_reader(codes(["9.2", "9.3"])), replace=True)
    assert store.generation() == generation
    assert stored(store) == expected(codes(["9.1"]))


def test_hbase_keeps_thumbnails(emulator: BigtableEmulator) -> None:
    store = HBaseCodeStore(HBaseSettings(emulator=emulator.address, table=f"t{next(_tables)}"))
    store.write(codes(["10.1"], thumbnails=True), replace=False)
    assert store.thumbnail("10.1") == b"\x89PNG10.1"
