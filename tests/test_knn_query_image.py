"""``image_knn(query_image => <binary>)``: an image that is not in the lake (DICOM, PNG or
JPEG bytes) finds its neighbours through Spark SQL (an ``X'...'`` literal and a binary column
via LATERAL) and through the Trino-protocol server with the real ``trino`` client, for admins
and analysts (who get pseudonyms); bad bytes and oversized values fail saying what was given,
and a query leaves no file behind in the lake."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from _knn_helpers import a_ct, augment, is_source
from _sql_helpers import connect, serve
from PIL import Image

from dicomlake.catalog import deid
from dicomlake.catalog.ingest import ingest
from dicomlake.catalog.sample import find_template
from dicomlake.catalog.warehouse import Warehouse
from dicomlake.config import Settings
from dicomlake.udfs import register_functions
from dicomlake.udfs.errors import PixelError
from dicomlake.udfs.knn import MAX_QUERY_IMAGE_BYTES
from dicomlake.udfs.pipeline import embed
from dicomlake.udfs.pixels import (
    load_frames,
    model_inputs,
    query_image_inputs,
    read_bytes,
    to_uint8,
    windowed_png,
)
from dicomlake.udfs.settings import SimilaritySettings

SIM = SimilaritySettings(m=32)
PASSWORDS = {"root": "root password", "ana": "ana password"}


def _windowed(path: str) -> np.ndarray:
    """The first frame as the model sees it before resizing (what a viewer exports)."""
    frames = load_frames(read_bytes(path), path)
    return to_uint8(frames.data[0], frames)


def _encoded(image: np.ndarray, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **options)
    return buf.getvalue()


def _augmented_picture(path: str, fmt: str) -> bytes:
    """The lake image exported as PNG/JPEG, shifted 3 pixels and with noise added."""
    rng = np.random.default_rng(7)
    image = np.roll(_windowed(path).astype(np.int16), 3, axis=1)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    return _encoded(image, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


# -- decoding (no Spark) --------------------------------------------------------------------


def test_png_of_the_windowed_frame_is_exactly_the_dicom_model_input():
    path = str(find_template("CT_small.dcm"))
    png = _encoded(_windowed(path), "PNG")
    assert np.array_equal(query_image_inputs(png), model_inputs(path))
    assert np.array_equal(query_image_inputs(read_bytes(path)), model_inputs(path))


def test_windowed_png_of_a_multiframe_dicom_keeps_each_frames_model_input():
    path = str(find_template("emri_small.dcm"))
    data = read_bytes(path)
    for frame in (0, 3):
        assert np.array_equal(query_image_inputs(windowed_png(data, frame=frame))[0],
                              model_inputs(path)[frame])
    with pytest.raises(PixelError, match=r"frame 99 does not exist \(the image has 10\)"):
        windowed_png(data, frame=99)


def test_colour_sixteen_bit_and_tiny_pictures():
    rgb = np.zeros((40, 30, 3), np.uint8)
    rgb[:, :, 0] = 200
    inputs = query_image_inputs(_encoded(rgb, "PNG"))
    assert inputs.shape == (1, 224, 224, 3) and (inputs[0, :, :, 0] == 200).all()
    deep = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    spread = query_image_inputs(_encoded(deep, "PNG"))[0, :, :, 0]
    assert spread.min() == 0 and spread.max() == 255  # percentile window, as MR frames
    with pytest.raises(PixelError, match=r"query_image: image is 1x1"):
        query_image_inputs(_encoded(np.zeros((1, 1), np.uint8), "PNG"))


@pytest.mark.parametrize("data, message", [
    (b"garbage bytes!", "query_image is neither DICOM, PNG nor JPEG: starts with "
                        "67 61 72 62 61 67 65 20"),
    (b"", "query_image is neither DICOM, PNG nor JPEG: starts with nothing"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "query_image: not readable as PNG"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "query_image: not readable as JPEG"),
])
def test_bad_bytes_say_what_they_are(data, message):
    with pytest.raises(PixelError, match=message):
        query_image_inputs(data)


# -- Spark SQL and the endpoint (slow) ------------------------------------------------------


@pytest.fixture(scope="module")
def lake(spark, settings, sample_archives, tmp_path_factory):
    """A private lake: the sample archives ingested, embedded and de-identified, with an
    admin and an analyst; the shared session queries it until the module ends."""
    from dicomlake.sql.users import Role, UserStore

    home = tmp_path_factory.mktemp("query-image-home")
    (home / "sql").mkdir()
    key = home / "sql" / "deid.key"
    key.write_text("5c" * 32 + "\n")
    os.chmod(key, 0o600)
    lake_settings = Settings(home=home, spark=settings.spark)
    ingest(spark, Warehouse(lake_settings.warehouse_path), [str(p) for p in sample_archives])
    register_functions(spark, lake_settings, SIM)
    try:
        assert embed(spark, lake_settings, SIM).codes_written > 0
        deid.refresh(lake_settings.warehouse_path, home)
        users = UserStore(home)
        users.add("root", PASSWORDS["root"], Role.ADMIN)
        users.add("ana", PASSWORDS["ana"], Role.ANALYST)
        yield lake_settings
    finally:  # give the shared session back its own lake
        Warehouse(settings.warehouse_path).register(spark)
        register_functions(spark, settings)


def _files(home: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in home.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_literal_picture_of_a_lake_image_finds_its_source(spark, lake, fmt):
    ct = a_ct(spark)
    data = _augmented_picture(ct.path, fmt)
    before = _files(lake.home)
    rows = spark.sql(f"""
        SELECT n.rank, n.distance, i.path
        FROM image_knn(query_image => X'{data.hex()}', k => 3) n
        JOIN dicom.instances i USING (sop_instance_uid) ORDER BY n.rank""").collect()
    assert [r.rank for r in rows] == [1, 2, 3]
    assert any(is_source(ct.path, r.path) for r in rows)
    assert _files(lake.home) == before  # the query image is written nowhere in the lake


@pytest.mark.slow
def test_binary_column_via_lateral_with_dicom_bytes_not_in_the_lake(spark, lake, tmp_path):
    ct = a_ct(spark)
    augment(ct.path, tmp_path / "augmented.dcm")  # a new SOPInstanceUID: not in the lake
    uploads = spark.createDataFrame(
        [("dicom", (tmp_path / "augmented.dcm").read_bytes()),
         ("png", _augmented_picture(ct.path, "PNG"))], "name string, bytes binary")
    uploads.createOrReplaceTempView("query_uploads")
    rows = spark.sql("""
        SELECT u.name, n.rank, i.path
        FROM query_uploads u, LATERAL image_knn(query_image => u.bytes, k => 3) n
        JOIN dicom.instances i USING (sop_instance_uid)""").collect()
    for name in ("dicom", "png"):
        mine = [r for r in rows if r.name == name]
        assert sorted(r.rank for r in mine) == [1, 2, 3]
        assert any(is_source(ct.path, r.path) for r in mine), name


@pytest.mark.slow
@pytest.mark.parametrize("arguments, message", [
    ("query_image => X'676172626167652121'",
     r"image_knn: query_image is neither DICOM, PNG nor JPEG: starts with 67 61 72 62 61 67 "
     r"65 21 \(9 bytes\)"),
    ("query_image => X'89504E470D0A1A0A0000'", r"query_image: not readable as PNG"),
    (f"query_image => CAST(repeat('x', {MAX_QUERY_IMAGE_BYTES + 1}) AS BINARY)",
     rf"query_image is {MAX_QUERY_IMAGE_BYTES + 1} bytes; at most {MAX_QUERY_IMAGE_BYTES}"),
    ("query_image => 'not bytes'", r"query_image must be binary .* got a str"),
    ("query => '1.2.3', query_image => X'00'", r"either query or query_image, not both"),
    ("k => 3", r"query is NULL; .* image bytes as query_image"),
])
def test_bad_query_images_say_what_was_given(spark, lake, arguments, message):
    with pytest.raises(Exception, match=message):
        spark.sql(f"SELECT * FROM image_knn({arguments})").collect()


@pytest.mark.slow
def test_through_the_trino_endpoint_admin_and_analyst(spark, lake):
    ct = a_ct(spark)
    png = _augmented_picture(ct.path, "PNG")
    raw = {r.sop_instance_uid: r.path for r in spark.sql(
        "SELECT sop_instance_uid, path FROM dicom.instances").collect()}
    pseudonymizer = deid.Pseudonymizer(deid.load_key(lake.home, create=False))
    pseudonyms = {pseudonymizer.uid(uid): path for uid, path in raw.items()}
    sql = f"SELECT rank, sop_instance_uid FROM image_knn(query_image => X'{png.hex()}', k => 3)"
    with serve(lake.home, "--port", "0", "--timeout", "120") as url:
        root = connect(url, "root", PASSWORDS["root"], schema="dicom").cursor()
        root.execute(sql)
        admin_rows = root.fetchall()
        # the trino client sends a bytes parameter as an X'..' literal (EXECUTE ... USING)
        root.execute("SELECT rank, sop_instance_uid FROM image_knn(query_image => ?, k => 3)",
                     [png])
        assert root.fetchall() == admin_rows
        ana = connect(url, "ana", PASSWORDS["ana"], schema="dicom_deid").cursor()
        ana.execute(sql)
        analyst_rows = ana.fetchall()
    assert [r[0] for r in admin_rows] == [1, 2, 3] == [r[0] for r in analyst_rows]
    assert all(uid in raw for _, uid in admin_rows)
    assert any(is_source(ct.path, raw[uid]) for _, uid in admin_rows)
    assert not any(uid in raw for _, uid in analyst_rows)  # never a real UID
    assert any(is_source(ct.path, pseudonyms[uid]) for _, uid in analyst_rows)
