"""image_knn end to end through Spark SQL with the Delta code store: embed, query by id, path
and embedding, LATERAL, filters, refine, retrain, and the errors users hit."""

from __future__ import annotations

import pytest
from _knn_helpers import a_ct, augment, is_source

from dicomlake.catalog.ingest import ingest
from dicomlake.catalog.warehouse import Warehouse
from dicomlake.config import Settings
from dicomlake.udfs import register_functions
from dicomlake.udfs.pipeline import embed
from dicomlake.udfs.settings import SimilaritySettings

SIM = SimilaritySettings(m=32)


@pytest.fixture(scope="module")
def lake(spark, settings, sample_archives, tmp_path_factory):
    """Sample archives (+ one multi-frame file) ingested and embedded once (delta store)."""
    import shutil

    from dicomlake.catalog.sample import find_template

    extra = tmp_path_factory.mktemp("multiframe") / "emri_small.dcm"
    shutil.copy(find_template("emri_small.dcm"), extra)
    ingest(spark, Warehouse(settings.warehouse_path),
           [str(p) for p in sample_archives] + [str(extra)])
    register_functions(spark, settings, SIM)
    result = embed(spark, settings, SIM)
    return result


def _rows(spark, sql):
    return [r.asDict() for r in spark.sql(sql).collect()]


def test_embed_records_model_and_every_frame(spark, lake):
    assert lake.embeddings >= lake.instances > 0
    assert lake.codes_written == lake.embeddings
    row = spark.sql("SELECT model_id, model_version, size(embedding) AS d, thumbnail "
                    "FROM dicom.embeddings LIMIT 1").first()
    assert row.model_id == "efficientnet-lite0-imagenet" and "onnx" in row.model_version
    assert row.d == 1280 and bytes(row.thumbnail).startswith(b"\x89PNG")
    multi = _rows(spark, "SELECT i.number_of_frames AS n, count(e.frame) AS frames "
                         "FROM dicom.instances i JOIN dicom.embeddings e USING "
                         "(sop_instance_uid) WHERE i.number_of_frames > 1 "
                         "GROUP BY i.sop_instance_uid, i.number_of_frames")
    assert multi and all(r["n"] == r["frames"] for r in multi)


def test_embed_again_does_nothing_new(spark, settings, lake):
    again = embed(spark, settings, SIM)
    assert (again.instances, again.codes_written, again.trained) == (0, 0, False)


def test_query_by_uid_finds_itself_first_sorted(spark, lake):
    ct = a_ct(spark)
    rows = _rows(spark, f"SELECT * FROM image_knn(query => '{ct.sop_instance_uid}', k => 5)")
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["distance"] == pytest.approx(0.0, abs=1e-3)
    dists = [r["distance"] for r in rows]
    assert dists == sorted(dists)


def test_join_with_instances_and_positional_args(spark, lake):
    ct = a_ct(spark)
    rows = _rows(spark, f"""
        SELECT i.modality, n.distance FROM image_knn('{ct.sop_instance_uid}', 3) n
        JOIN dicom.instances i USING (sop_instance_uid) ORDER BY n.rank""")
    assert len(rows) == 3 and rows[0]["modality"] == "CT"


def test_lateral_one_search_per_row(spark, lake):
    rows = _rows(spark, """
        SELECT q.sop_instance_uid AS q, n.rank, n.sop_instance_uid AS hit
        FROM (SELECT DISTINCT sop_instance_uid FROM dicom.embeddings
              ORDER BY sop_instance_uid LIMIT 3) q,
        LATERAL image_knn(query => q.sop_instance_uid, k => 2) n""")
    assert len(rows) == 6
    assert {r["q"] for r in rows if r["rank"] == 1} == {r["q"] for r in rows}


def test_filter_keeps_scanning_until_k_rows_pass(spark, lake):
    ct = a_ct(spark)
    n_mr = spark.sql("SELECT count(*) FROM dicom.instances i JOIN dicom.embeddings "
                     "USING (sop_instance_uid) WHERE modality = 'MR'").first()[0]
    k = min(5, n_mr)
    assert k > 0
    rows = _rows(spark, f"""
        SELECT i.modality FROM image_knn(query => '{ct.sop_instance_uid}', k => {k},
                                          filter => "modality = 'MR'") n
        JOIN dicom.instances i USING (sop_instance_uid)""")
    assert len(rows) == k and {r["modality"] for r in rows} == {"MR"}


def test_query_by_embedding_and_refine_off(spark, lake):
    ct = a_ct(spark)
    rows = _rows(spark, f"""
        SELECT n.* FROM (SELECT embedding FROM dicom.embeddings
                         WHERE sop_instance_uid = '{ct.sop_instance_uid}') e,
        LATERAL image_knn(query => e.embedding, k => 3, refine => 0) n""")
    assert len(rows) == 3
    assert rows[0]["distance"] < 1.0  # ADC distance of a vector to its own code is small


def test_augmented_image_finds_its_source(spark, lake, tmp_path):
    ct = a_ct(spark)
    query = tmp_path / "augmented.dcm"
    augment(ct.path, query)
    top = spark.sql(f"SELECT i.path FROM image_knn(query => '{query}', k => 1) n "
                    "JOIN dicom.instances i USING (sop_instance_uid)").first()
    assert is_source(ct.path, top.path)


@pytest.mark.parametrize("sql, message", [
    ("image_knn(query => '9.9.9.9', k => 3)", "no embedding for SOPInstanceUID '9.9.9.9'"),
    ("image_knn(query => '{uid}', k => 0)", "k must be a positive integer, got 0"),
    ("image_knn(query => '{uid}', k => -2)", "k must be a positive integer"),
    ("image_knn(query => array(1.0F, 2.0F), k => 3)", "2 dimensions but codebook"),
    ("image_knn(query => array_repeat(CAST('NaN' AS FLOAT), 1280), k => 3)", "NaN or inf"),
    ("image_knn(query => '/no/such.dcm', k => 3)", "cannot read"),
    ("image_knn(query => '{uid}', k => 3, filter => 'colour = 1')", "unknown column 'colour'"),
])
def test_bad_calls_say_what_is_wrong(spark, lake, sql, message):
    uid = a_ct(spark).sop_instance_uid
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        spark.sql(f"SELECT * FROM {sql.format(uid=uid)}").collect()


def test_no_codebook_yet(spark, settings, lake, tmp_path):
    empty = Settings(home=tmp_path / "empty-lake")
    register_functions(spark, empty, SIM)
    try:
        with pytest.raises(Exception, match=r"no PQ codebook yet.*dicomlake embed"):
            spark.sql("SELECT * FROM image_knn(query => '1.2.3', k => 3)").collect()
    finally:
        register_functions(spark, settings, SIM)


def test_retrain_new_codebook_refuses_old_codes_then_reencodes(spark, settings, lake):
    from dicomlake.udfs import pq
    from dicomlake.udfs.pipeline import train_codebook

    books = Warehouse(settings.warehouse_path).table_path("dicom", pq.CODEBOOKS)
    before = pq.latest(books).version
    new = train_codebook(spark, settings, SIM)  # a new version, codes not re-encoded yet
    assert new.version == before + 1
    uid = a_ct(spark).sop_instance_uid
    with pytest.raises(Exception, match=f"codebook version.*current codebook is v{new.version}"):
        spark.sql(f"SELECT * FROM image_knn(query => '{uid}', k => 3)").collect()
    result = embed(spark, settings, SIM)  # resumes: re-encodes everything with the new one
    assert result.codebook_version == new.version
    assert result.codes_written == lake.embeddings
    versions = spark.sql("SELECT DISTINCT codebook_version FROM dicom.codes").collect()
    assert [r[0] for r in versions] == [new.version]
    assert spark.sql(f"SELECT * FROM image_knn(query => '{uid}', k => 3)").count() == 3


def test_a_lake_embedded_by_an_earlier_model_build_is_embedded_again_and_told(spark, settings,
                                                                           lake):
    """The shipped ONNX file's hash is the model version: a lake embedded by an earlier build
    (here: the torch-exported one, ``<pth hash>-onnx1``) is re-embedded, and the user told."""
    import dataclasses

    from deltalake import DeltaTable

    from dicomlake.udfs import pq
    from dicomlake.udfs.model import model_version

    old = "579344248a93-onnx1"
    warehouse = Warehouse(settings.warehouse_path)
    books = warehouse.table_path("dicom", pq.CODEBOOKS)
    book = pq.latest(books)
    pq.save(books, dataclasses.replace(book, version=book.version + 1, model_version=old))
    DeltaTable(str(warehouse.table_path("dicom", "embeddings"))).update(
        {"model_version": f"'{old}'"})
    told: list[tuple[str, str]] = []
    result = embed(spark, settings, SIM, on_model_change=lambda a, b: told.append((a, b)))
    assert told == [(f"efficientnet-lite0-imagenet {old}",
                     f"efficientnet-lite0-imagenet {model_version()}")]
    assert result.trained and result.embeddings == lake.embeddings
    fresh = spark.sql(f"SELECT count(*) FROM dicom.embeddings "
                      f"WHERE model_version = '{model_version()}'").first()[0]
    assert fresh == lake.embeddings
    uid = a_ct(spark).sop_instance_uid
    assert spark.sql(f"SELECT * FROM image_knn(query => '{uid}', k => 3)").count() == 3
    # the session's lake is shared with later modules: leave one model's embeddings behind
    DeltaTable(str(warehouse.table_path("dicom", "embeddings"))).delete(
        f"model_version = '{old}'")


def test_thumbnail_sql_function(spark, lake):
    # CTs that have pixels (header-only objects are instances too); undecodable ones are NULL
    rows = spark.sql("SELECT dicom_thumbnail(path) AS png FROM dicom.instances "
                     "WHERE modality = 'CT' AND pixel_data_offset IS NOT NULL").collect()
    pngs = [bytes(r.png) for r in rows if r.png is not None]
    assert pngs and all(png.startswith(b"\x89PNG") for png in pngs)
    assert len(rows) - len(pngs) <= lake.pixel_errors
