"""image_embedding, pq_encode and pq_distance as SQL functions, through real Spark sessions
over a small lake embedded by ``dicomlake embed``: they reproduce what the pipeline stored,
rank like image_knn, resolve ids per role (analysts: pseudonyms; paths for admins only), give
NULL for unknown ids and undecodable pixels, and answer through the Trino-protocol server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from _knn_helpers import a_ct
from _sql_helpers import connect, serve

from dicomlake.catalog import deid
from dicomlake.catalog.ingest import ingest
from dicomlake.catalog.sample import find_template
from dicomlake.catalog.warehouse import Warehouse
from dicomlake.config import Settings
from dicomlake.udfs import ANALYST_SCOPE, CLINICIAN_SCOPE, register_functions
from dicomlake.udfs.pipeline import embed
from dicomlake.udfs.settings import ModelBackend, SimilaritySettings

SIM = SimilaritySettings(m=32)
PASSWORDS = {"root": "root password", "ana": "ana password"}

pytestmark = pytest.mark.slow  # the lake is ingested and embedded, and a server started


def _broken_ct(out: Path) -> Path:
    """A CT whose Pixel Data is far shorter than Rows x Columns: a header-only-readable
    instance whose pixels cannot be decoded (a ``dicom.pixel_errors`` row)."""
    from pydicom import dcmread

    ds = dcmread(find_template("CT_small.dcm"))
    ds.PixelData = b"\x00" * 64
    path = out / "broken_ct.dcm"
    ds.save_as(path)
    return path


BURNED_IN_SOP = "1.2.826.0.1.3680043.8.498.4242.1"


def _burned_in_ct(out: Path) -> Path:
    """A CT whose BurnedInAnnotation is YES: its pixels may carry identifying text."""
    from pydicom import dcmread

    ds = dcmread(find_template("CT_small.dcm"))
    ds.BurnedInAnnotation = "YES"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = BURNED_IN_SOP
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.4242.2"
    path = out / "burned_in_ct.dcm"
    ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def lake(spark, settings, sample_archives, tmp_path_factory):
    """A private lake (sample archives, a multi-frame file, an undecodable CT) ingested,
    embedded, de-identified, with an admin and an analyst; the shared session queries it
    until the module ends."""
    from dicomlake.sql.users import Role, UserStore

    home = tmp_path_factory.mktemp("sqlfunc-home")
    extra = tmp_path_factory.mktemp("sqlfunc-extra")
    shutil.copy(find_template("emri_small.dcm"), extra / "emri_small.dcm")
    (home / "sql").mkdir()
    key = home / "sql" / "deid.key"
    key.write_text("7a" * 32 + "\n")
    os.chmod(key, 0o600)
    lake_settings = Settings(home=home, spark=settings.spark)
    inputs = [str(p) for p in sample_archives] + [str(extra / "emri_small.dcm"),
                                                   str(_broken_ct(extra)),
                                                   str(_burned_in_ct(extra))]
    ingest(spark, Warehouse(lake_settings.warehouse_path), inputs)
    register_functions(spark, lake_settings, SIM)
    try:
        result = embed(spark, lake_settings, SIM)
        assert result.codes_written > 0 and result.pixel_errors > 0
        deid.refresh(lake_settings.warehouse_path, home)
        users = UserStore(home)
        users.add("root", PASSWORDS["root"], Role.ADMIN)
        users.add("ana", PASSWORDS["ana"], Role.ANALYST)
        yield lake_settings
    finally:  # give the shared session back its own lake
        Warehouse(settings.warehouse_path).register(spark)
        register_functions(spark, settings)


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_image_embedding_is_the_stored_frame_0_by_uid_and_path(spark, lake):
    rows = spark.sql("""
        SELECT i.number_of_frames AS frames, e.embedding AS stored,
               image_embedding(i.sop_instance_uid) AS by_uid, image_embedding(i.path) AS by_path
        FROM dicom.embeddings e JOIN dicom.instances i USING (sop_instance_uid)
        WHERE e.frame = 0""").collect()
    assert len(rows) == spark.sql("SELECT count(DISTINCT sop_instance_uid) "
                                  "FROM dicom.embeddings").first()[0]
    assert any((r.frames or 1) > 1 for r in rows)  # a multi-frame image gives its frame 0
    for r in rows:
        assert len(r.by_uid) == 1280
        assert _cos(r.stored, r.by_uid) > 0.9999 and _cos(r.stored, r.by_path) > 0.9999


def test_unknown_ids_and_undecodable_pixels_give_null(spark, lake, tmp_path):
    broken = spark.sql("SELECT sop_instance_uid FROM dicom.pixel_errors WHERE path LIKE "
                       "'%broken_ct.dcm'").first()
    assert broken is not None
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    row = spark.sql(f"""
        SELECT image_embedding('{broken.sop_instance_uid}') AS undecodable,
               image_embedding('9.9.9.9') AS unknown_uid, image_embedding(NULL) AS null_id,
               image_embedding('{text}') AS not_dicom,
               image_embedding('{tmp_path}/missing.dcm') AS missing_file,
               pq_encode(NULL) AS null_code, pq_distance(NULL, X'00') AS null_query""").first()
    assert all(v is None for v in row.asDict().values()), row


def test_admin_may_embed_a_file_outside_the_lake(spark, lake, tmp_path):
    ct = a_ct(spark)
    copy = tmp_path / "copy.dcm"
    from dicomlake.udfs.pixels import read_bytes

    copy.write_bytes(read_bytes(ct.path))
    row = spark.sql(f"SELECT image_embedding('{copy}') AS outside, e.embedding AS stored "
                    f"FROM dicom.embeddings e WHERE e.sop_instance_uid = "
                    f"'{ct.sop_instance_uid}' AND e.frame = 0").first()
    assert _cos(row.outside, row.stored) > 0.9999


def test_pq_encode_is_the_stored_code(spark, lake):
    rows = spark.sql("""
        SELECT c.code AS stored, pq_encode(e.embedding) AS code, e.embedding
        FROM dicom.codes c JOIN dicom.embeddings e USING (sop_instance_uid, frame)""").collect()
    assert len(rows) == lake_codes(spark)
    # a vector's code depends on that vector alone (Codebook.encode), whichever path
    # encoded it and with how many others
    assert all(bytes(r.code) == bytes(r.stored) for r in rows)


def lake_codes(spark) -> int:
    return spark.sql("SELECT count(*) FROM dicom.codes").first()[0]


def test_pq_distance_ranks_the_image_itself_first_like_image_knn(spark, lake):
    """Nothing is nearer than the image's own code (the sample holds exact copies of some
    images, so the first place may be shared), and the distances are image_knn's."""
    ct = a_ct(spark)
    query = (f"(SELECT embedding FROM dicom.embeddings WHERE sop_instance_uid = "
             f"'{ct.sop_instance_uid}' AND frame = 0)")
    ranked = spark.sql(f"""
        SELECT c.sop_instance_uid, c.frame, pq_distance({query}, c.code) AS distance
        FROM dicom.codes c ORDER BY distance""").collect()
    first = [r for r in ranked if r.distance <= ranked[0].distance * (1 + 1e-6)]
    assert (ct.sop_instance_uid, 0) in {(r.sop_instance_uid, r.frame) for r in first}
    assert ranked[0].distance < 0.1 < ranked[-1].distance
    knn = spark.sql(f"SELECT n.distance FROM {query} q, LATERAL image_knn(query => "
                    "q.embedding, k => 5, refine => 0) n ORDER BY n.rank").collect()
    assert [r.distance for r in ranked[:5]] == pytest.approx([r.distance for r in knn],
                                                             rel=1e-4)


def test_pq_distance_one_query_per_row_is_the_same_sum(spark, lake):
    """Each embedding against its own code (as many queries as rows: decoded codes) agrees
    with one query against every code (lookup tables)."""
    ct = a_ct(spark)
    own = spark.sql("""
        SELECT sop_instance_uid, frame, pq_distance(e.embedding, c.code) AS d
        FROM dicom.codes c JOIN dicom.embeddings e USING (sop_instance_uid, frame)""").collect()
    assert len(own) == lake_codes(spark) and all(r.d >= 0 for r in own)
    mine = next(r.d for r in own if r.sop_instance_uid == ct.sop_instance_uid and r.frame == 0)
    alone = spark.sql(f"""
        SELECT pq_distance(e.embedding, c.code) FROM dicom.codes c JOIN dicom.embeddings e
        USING (sop_instance_uid, frame)
        WHERE sop_instance_uid = '{ct.sop_instance_uid}' AND frame = 0""").first()[0]
    assert mine == pytest.approx(alone, rel=1e-4, abs=1e-4)


def test_admin_builds_a_custom_embedding_table(spark, lake):
    """The README's CREATE TABLE ... AS SELECT example, then a search over it."""
    spark.sql("DROP TABLE IF EXISTS default.sqlfunc_ct_embeddings")
    try:
        spark.sql("""
            CREATE TABLE default.sqlfunc_ct_embeddings AS
            SELECT sop_instance_uid, image_embedding(path) AS embedding,
                   pq_encode(image_embedding(path)) AS code
            FROM (SELECT /*+ REPARTITION(2) */ sop_instance_uid, path
                  FROM dicom.instances WHERE modality = 'CT')""")
        stats = spark.sql("SELECT count(*) AS n, count(embedding) AS embedded, "
                          "min(length(code)) AS bytes FROM default.sqlfunc_ct_embeddings"
                          ).first()
        assert stats.n > 0 and stats.embedded == stats.n - 1  # the broken CT is NULL
        assert stats.bytes == SIM.m
        ct = a_ct(spark)
        ranked = spark.sql(f"""
            SELECT t.sop_instance_uid, pq_distance(q.embedding, t.code) AS distance
            FROM default.sqlfunc_ct_embeddings t,
              (SELECT embedding FROM default.sqlfunc_ct_embeddings
               WHERE sop_instance_uid = '{ct.sop_instance_uid}') q
            WHERE t.code IS NOT NULL ORDER BY distance""").collect()
        mine = next(r.distance for r in ranked if r.sop_instance_uid == ct.sop_instance_uid)
        assert mine <= ranked[0].distance * (1 + 1e-6) and len(ranked) == stats.n - 1
    finally:
        spark.sql("DROP TABLE IF EXISTS default.sqlfunc_ct_embeddings")


@pytest.mark.parametrize("sql, message", [
    ("SELECT pq_encode(array(cast(1 AS float), 2))",
     r"pq_encode: vectors have 2 dimensions .* `dicomlake embed --retrain`"),
    ("SELECT pq_encode(array_repeat(cast('NaN' AS float), 1280))",
     r"pq_encode: 1 vector\(s\) contain NaN"),
    ("SELECT pq_distance(array_repeat(cast(0 AS float), 1280), X'0102')",
     r"pq_distance: a code has 2 bytes .* run `dicomlake embed`"),
])
def test_bad_vectors_and_codes_fail_naming_the_function(spark, lake, sql, message):
    with pytest.raises(Exception, match=message):
        spark.sql(sql).collect()


def test_codebook_of_another_model_fails_naming_dicomlake_embed(spark, lake):
    session = spark.newSession()
    register_functions(session, lake, SimilaritySettings(m=32, backend=ModelBackend.TENSORFLOW))
    for sql in ("SELECT pq_encode(array_repeat(cast(0 AS float), 512))",
                "SELECT pq_distance(array_repeat(cast(0 AS float), 512), X'00')"):
        with pytest.raises(Exception, match=r"(pq_encode|pq_distance): the current PQ "
                                            r"codebook .* trained on efficientnet-lite0-imagenet"
                                            r".* run `dicomlake embed`"):
            session.sql(sql).collect()


def _pseudonym(lake: Settings, uid: str) -> str:
    return deid.Pseudonymizer(deid.load_key(lake.home, create=False)).uid(uid)


def test_analysts_pass_pseudonyms_never_raw_ids_or_paths(spark, lake):
    ct = a_ct(spark)
    stored = spark.sql(f"SELECT embedding FROM dicom.embeddings WHERE sop_instance_uid = "
                       f"'{ct.sop_instance_uid}' AND frame = 0").first().embedding
    analyst = spark.newSession()
    register_functions(analyst, lake, SIM, scope=ANALYST_SCOPE)
    row = analyst.sql(f"""
        SELECT image_embedding('{_pseudonym(lake, ct.sop_instance_uid)}') AS pseudonym,
               image_embedding('{ct.sop_instance_uid}') AS raw_uid,
               image_embedding('{ct.path}') AS raw_path,
               image_embedding('/etc/hostname') AS file""").first()
    assert _cos(row.pseudonym, stored) > 0.9999
    assert (row.raw_uid, row.raw_path, row.file) == (None, None, None)
    clinician = spark.newSession()
    register_functions(clinician, lake, SIM, scope=CLINICIAN_SCOPE)
    row = clinician.sql(f"SELECT image_embedding('{ct.sop_instance_uid}') AS uid, "
                        f"image_embedding('{find_template('CT_small.dcm')}') AS file").first()
    assert _cos(row.uid, stored) > 0.9999 and row.file is None


def test_thumbnails_of_burned_in_images_are_withheld_from_de_identified_views(spark, lake):
    """The one pixel rule (udfs.images.pixels_allowed): an analyst's dicom_thumbnail of an
    image whose BurnedInAnnotation is YES is NULL; their other images and the same image for
    a clinician still have thumbnails."""
    ct = a_ct(spark)
    analyst = spark.newSession()
    register_functions(analyst, lake, SIM, scope=ANALYST_SCOPE)
    row = analyst.sql(f"""
        SELECT dicom_thumbnail('{_pseudonym(lake, BURNED_IN_SOP)}') AS burned,
               dicom_thumbnail('{_pseudonym(lake, ct.sop_instance_uid)}') AS plain""").first()
    assert row.burned is None and bytes(row.plain).startswith(b"\x89PNG")
    clinician = spark.newSession()
    register_functions(clinician, lake, SIM, scope=CLINICIAN_SCOPE)
    png = clinician.sql(f"SELECT dicom_thumbnail('{BURNED_IN_SOP}')").first()[0]
    assert bytes(png).startswith(b"\x89PNG")


def test_through_the_trino_server_analyst_and_admin(spark, lake):
    ct = a_ct(spark)
    stored = spark.sql(f"SELECT embedding FROM dicom.embeddings WHERE sop_instance_uid = "
                       f"'{ct.sop_instance_uid}' AND frame = 0").first().embedding
    pseudo = _pseudonym(lake, ct.sop_instance_uid)
    with serve(lake.home, "--port", "0", "--timeout", "120") as url:
        ana = connect(url, "ana", PASSWORDS["ana"], schema="dicom_deid").cursor()
        ana.execute(f"""
            SELECT image_embedding('{pseudo}'), image_embedding('{ct.path}'),
                   pq_distance(image_embedding('{pseudo}'), c.code)
            FROM codes c WHERE c.sop_instance_uid = '{pseudo}' AND c.frame = 0""")
        [(vector, by_path, distance)] = ana.fetchall()
        assert _cos(vector, stored) > 0.9999 and by_path is None and 0 <= distance < 1.0
        root = connect(url, "root", PASSWORDS["root"], schema="dicom").cursor()
        root.execute(f"SELECT pq_encode(embedding) FROM embeddings WHERE "
                     f"sop_instance_uid = '{ct.sop_instance_uid}' AND frame = 0")
        [(code,)] = root.fetchall()
    stored_code = spark.sql(f"SELECT code FROM dicom.codes WHERE sop_instance_uid = "
                            f"'{ct.sop_instance_uid}' AND frame = 0").first().code
    assert bytes(code) == bytes(stored_code)
