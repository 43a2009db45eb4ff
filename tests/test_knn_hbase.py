"""The HBase code store against a real wide-column server (Google's Bigtable emulator through
google-cloud-happybase): salted row keys in 9 regions, parallel scans, image_knn through it,
and a store that is down."""

from __future__ import annotations

import pytest
from _bigtable import BigtableEmulator, emulator_binary
from _knn_helpers import a_ct, augment, is_source

from dicomlake.catalog.ingest import ingest
from dicomlake.catalog.warehouse import Warehouse
from dicomlake.udfs import register_functions
from dicomlake.udfs.errors import CodeStoreError
from dicomlake.udfs.hbase import REGIONS, HBaseCodeStore, image_id, row_key
from dicomlake.udfs.pipeline import embed
from dicomlake.udfs.settings import SimilaritySettings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(emulator_binary() is None, reason="Bigtable emulator not installed"),
]


def test_row_key_is_salt_prefix_plus_last_8_md5_hex():
    import hashlib

    uid = "1.2.826.0.1.3680043.8.498.1"
    digest = hashlib.md5(uid.encode()).hexdigest()
    assert row_key(uid) == f"000{int(digest, 16) % 9}|{digest[-8:]}".encode()
    assert image_id(uid, 0) == uid and image_id(uid, 3) == f"{uid}#3"


@pytest.fixture(scope="module")
def emulator():
    with BigtableEmulator() as emu:
        yield emu


@pytest.fixture(scope="module")
def hbase_lake(spark, settings, sample_archives, emulator):
    ingest(spark, Warehouse(settings.warehouse_path), [str(p) for p in sample_archives])
    sim = SimilaritySettings(m=32).with_store("hbase", emulator=emulator.address)
    result = embed(spark, settings, sim)
    register_functions(spark, settings, sim)
    yield sim, result
    register_functions(spark, settings, SimilaritySettings(m=32))


def test_codes_spread_over_nine_salted_regions(spark, settings, hbase_lake):
    sim, result = hbase_lake
    store = HBaseCodeStore(sim.hbase)
    codes = store.load()
    embedded = spark.sql("SELECT count(*) FROM dicom.embeddings").first()[0]
    assert codes.num_rows == embedded
    assert result.codes_written == embedded or result.codes_written == 0
    table = store.connect().table("image_info")
    prefixes = {key[:5] for key, _ in table.scan(columns=[b"MI:uid"])
                if not key.endswith(b"~meta")}
    assert prefixes <= {f"{i:04d}|".encode() for i in range(REGIONS)}
    assert len(prefixes) >= 5  # ~70 keys over 9 salts
    uid = codes.column("sop_instance_uid")[0].as_py()
    assert store.thumbnail(uid, codes.column("frame")[0].as_py()).startswith(b"\x89PNG")


def test_image_knn_reads_the_hbase_store(spark, hbase_lake):
    uid = spark.sql("SELECT sop_instance_uid FROM dicom.embeddings WHERE frame = 0 "
                    "ORDER BY sop_instance_uid LIMIT 1").first()[0]
    rows = spark.sql(f"SELECT n.*, i.modality FROM image_knn(query => '{uid}', k => 4) n "
                     "JOIN dicom.instances i USING (sop_instance_uid) ORDER BY rank").collect()
    assert len(rows) == 4 and rows[0].distance == pytest.approx(0.0, abs=1e-3)


def test_augmented_image_finds_its_source_through_hbase(spark, hbase_lake, tmp_path):
    ct = a_ct(spark)
    augment(ct.path, tmp_path / "aug.dcm")
    top = spark.sql(f"SELECT i.path FROM image_knn(query => '{tmp_path / 'aug.dcm'}', k => 1)"
                    " n JOIN dicom.instances i USING (sop_instance_uid)").first()
    assert is_source(ct.path, top.path)


def test_store_down_is_a_clear_error_and_nothing_is_written(spark, settings, hbase_lake):
    from _bigtable import free_port as _free_port

    down = SimilaritySettings(m=32).with_store("hbase", emulator=f"127.0.0.1:{_free_port()}")
    before = sorted(Warehouse(settings.warehouse_path).tables())
    with pytest.raises(CodeStoreError, match=r"unreachable.*Nothing was written"):
        embed(spark, settings, down, retrain=True)
    assert sorted(Warehouse(settings.warehouse_path).tables()) == before
    from dicomlake.udfs import pq

    books = Warehouse(settings.warehouse_path).table_path("dicom", pq.CODEBOOKS)
    assert pq.latest(books).version == hbase_lake[1].codebook_version  # no retrain happened


def test_image_knn_with_store_down(spark, settings, hbase_lake):
    from _bigtable import free_port as _free_port

    down = SimilaritySettings(m=32).with_store("hbase", emulator=f"127.0.0.1:{_free_port()}")
    register_functions(spark, settings, down)
    try:
        with pytest.raises(Exception, match=r"HBase code store at 127\.0\.0\.1:\d+ is unreachable"):
            spark.sql("SELECT * FROM image_knn(query => '1.2.3', k => 3)").collect()
    finally:
        register_functions(spark, settings, hbase_lake[0])


def test_half_written_generation_is_invisible(hbase_lake):
    sim, _ = hbase_lake
    store = HBaseCodeStore(sim.hbase)
    before = store.load().num_rows
    table = store.connect().table("image_info")
    # what a write that died after its first put leaves behind: a row of an unpublished gen
    gen = table.counter_inc(b"0000|~meta", b"MI:next_gen")
    table.put(row_key("9.9.9"), {b"MI:uid": b"9.9.9", b"MI:frame": b"0", b"MI:code": b"x" * 32,
                                 b"MI:cbv": b"1", b"MI:list": b"0", b"MI:gen": str(gen).encode()})
    assert store.load().num_rows == before
