"""The ``dicom`` Spark data source: inputs, schema, partitioning, modes and bad input."""

from __future__ import annotations

import datetime as dt
import os
import zipfile
import zlib
from pathlib import Path

import pytest
from dicom_files import set_encrypted_flag, shipped, write_zip

from dicomlake.catalog.dicom_source import DicomOptions


def _read(spark, path, **options):
    reader = spark.read.format("dicom")
    for key, value in options.items():
        reader = reader.option(key, value)
    return reader.load(str(path))


def _rows(spark, path, **options):
    return sorted(_read(spark, path, **options).collect(), key=lambda r: r["path"])


class TestOptions:
    def test_bad_mode_names_the_option_and_the_choices(self):
        with pytest.raises(ValueError, match=r"option 'mode' is 'LOOSE'.*PERMISSIVE"):
            DicomOptions.parse({"path": "/x", "mode": "loose"})

    def test_non_numeric_partition_size(self):
        with pytest.raises(ValueError, match="'membersPerPartition' must be a positive integer"):
            DicomOptions.parse({"path": "/x", "membersperpartition": "many"})

    def test_a_path_is_required(self):
        with pytest.raises(ValueError, match="at least one path"):
            DicomOptions.parse({})


class TestReading:
    def test_archives_become_typed_rows(self, spark, sample_archives):
        df = _read(spark, sample_archives[1])
        rows = df.collect()
        assert len(rows) == 20
        assert dict(df.dtypes)["study_date"] == "date"
        assert dict(df.dtypes)["pixel_spacing"] == "array<double>"
        row = rows[0]
        assert row["archive"] == str(sample_archives[1])
        assert row["path"] == f"{row['archive']}!/{row['member']}"
        assert row["_corrupt_record"] is None
        assert row["modality"] in ("CT", "MR")
        assert isinstance(row["study_date"], dt.date)
        assert row["crc32"] == zipfile.ZipFile(row["archive"]).getinfo(row["member"]).CRC

    def test_extensionless_and_uppercase_members_are_read(self, spark, sample_archives):
        members = [r["member"] for r in _rows(spark, sample_archives[1])]
        assert any(m.endswith(".DCM") for m in members)
        assert any("." not in os.path.basename(m) for m in members)

    def test_meta_is_the_whole_header_as_json(self, spark, sample_archives):
        import json

        row = _rows(spark, sample_archives[1])[0]
        meta = json.loads(row["meta"])
        assert meta["00080018"]["Value"] == [row["sop_instance_uid"]]
        assert meta["7FE00010"]["BulkDataURI"].startswith(row["path"] + "#offset=")

    def test_folders_globs_plain_files_and_nested_archives(self, spark, tmp_path,
                                                           sample_archives):
        nested = tmp_path / "site" / "2024" / "week1"
        nested.mkdir(parents=True)
        (nested / "a.zip").write_bytes(sample_archives[1].read_bytes())
        (tmp_path / "site" / "loose.DCM").write_bytes(shipped("CT_small.dcm"))
        (tmp_path / "site" / "notes.txt").write_text("not DICOM, still an input")
        rows = _rows(spark, tmp_path / "site")
        assert len(rows) == 22
        assert sum(r["archive"] is None for r in rows) == 2
        notes = next(r for r in rows if r["path"].endswith("notes.txt"))
        assert notes["_error_kind"] == "not_dicom"
        assert len(_rows(spark, tmp_path / "site" / "**" / "*.zip")) == 20

    def test_archives_are_packed_and_split_into_tasks(self, spark, sample_archives):
        folder = str(sample_archives[0].parent)
        assert _read(spark, folder, minPartitions=1).rdd.getNumPartitions() == 1
        assert _read(spark, folder, minPartitions=3).rdd.getNumPartitions() == 3
        split = _read(spark, sample_archives[1], membersPerPartition=6, minPartitions=1)
        assert split.rdd.getNumPartitions() == 4
        assert split.count() == 20
        rows = _rows(spark, sample_archives[1], membersPerPartition=6, minPartitions=1)
        assert [r["path"] for r in rows] == [r["path"] for r in _rows(spark, sample_archives[1])]
        assert {r["source_members"] for r in rows} == {20}

    def test_pixel_data_is_never_decompressed(self, spark, tmp_path):
        """A member whose compressed pixel data is garbage still gives a row: we stop at the
        header, where a whole-file reader fails on the CRC/zlib error."""
        dicom = shipped("693_UNCI.dcm")
        archive = write_zip(tmp_path / "a.zip", {"IM1.dcm": dicom})
        data = bytearray(archive.read_bytes())
        info = zipfile.ZipFile(archive).getinfo("IM1.dcm")
        tail = info.header_offset + 30 + len("IM1.dcm") + info.compress_size - 2000
        data[tail:tail + 1500] = os.urandom(1500)
        archive.write_bytes(bytes(data))
        with zipfile.ZipFile(archive) as zf, pytest.raises((zlib.error, zipfile.BadZipFile)):
            zf.read("IM1.dcm")
        (row,) = _rows(spark, archive)
        assert row["_corrupt_record"] is None
        assert row["rows"] == 512


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory) -> Path:
    """Archives and files with every kind of damage the issue lists."""
    d = tmp_path_factory.mktemp("bad")
    good = shipped("CT_small.dcm")
    full = write_zip(d / "full.zip", {"a.dcm": good, "b.dcm": good})
    (d / "truncated.zip").write_bytes(full.read_bytes()[:3000])
    full.unlink()
    write_zip(d / "members.zip", {
        "ok.dcm": shipped("MR_small.dcm"),
        "notes/readme.txt": b"just text",
        "empty.dcm": b"",
        "badvr.dcm": shipped("badVR.dcm"),
        "cut.dcm": shipped("CT_small.dcm")[:700],
        "noext": shipped("MR_small.dcm"),
        "bomb.dcm": b"\0" * (8 << 20),
    })
    write_zip(d / "locked.zip", {"secret.dcm": good})
    set_encrypted_flag(d / "locked.zip")
    (d / "plain_empty.dcm").write_bytes(b"")
    return d


class TestBadInput:
    """Every bad input gives a row naming archive and member; the job goes on."""

    def test_truncated_archive(self, spark, bad_dir):
        (row,) = _rows(spark, bad_dir / "truncated.zip")
        assert row["_error_kind"] == "bad_archive"
        assert "truncated.zip is not a readable ZIP" in row["_corrupt_record"]
        assert "zip -FF" in row["_corrupt_record"]

    def test_encrypted_member(self, spark, bad_dir):
        (row,) = _rows(spark, bad_dir / "locked.zip")
        assert row["_error_kind"] == "encrypted"
        assert "locked.zip member secret.dcm" in row["_corrupt_record"]

    def test_each_bad_member_is_a_row_with_its_reason(self, spark, bad_dir):
        rows = {r["member"]: r for r in _rows(spark, bad_dir / "members.zip",
                                              maxCompressionRatio=100)}
        kinds = {m: r["_error_kind"] for m, r in rows.items()}
        assert kinds == {
            "ok.dcm": None, "noext": None, "notes/readme.txt": "not_dicom",
            "empty.dcm": "empty", "badvr.dcm": None, "cut.dcm": "truncated",
            "bomb.dcm": "too_large",
        }
        (warning,) = rows["badvr.dcm"]["warnings"]
        assert warning["tag"] == "(0028,0008)" and warning["keyword"] == "NumberOfFrames"
        assert rows["badvr.dcm"]["number_of_frames"] is None
        assert "zip bomb" in rows["bomb.dcm"]["_corrupt_record"]
        assert all(f"member {m}" in r["_corrupt_record"]
                   for m, r in rows.items() if r["_error_kind"])

    def test_corrupt_compressed_header(self, spark, tmp_path):
        """Garbage where the member's header is compressed: an error row, not a crash."""
        archive = write_zip(tmp_path / "c.zip", {"IM1.dcm": shipped("693_UNCI.dcm"),
                                                 "IM2.dcm": shipped("693_UNCI.dcm")})
        data = bytearray(archive.read_bytes())
        info = zipfile.ZipFile(archive).getinfo("IM1.dcm")
        start = info.header_offset + 30 + len("IM1.dcm")
        data[start + 10:start + 400] = os.urandom(390)
        archive.write_bytes(bytes(data))
        rows = {r["member"]: r for r in _rows(spark, archive)}
        assert rows["IM2.dcm"]["_corrupt_record"] is None
        bad = rows["IM1.dcm"]
        assert bad["_error_kind"] in ("bad_archive", "bad_header", "not_dicom", "truncated")
        assert f"archive {archive} member IM1.dcm" in bad["_corrupt_record"]

    def test_declared_size_limit(self, spark, bad_dir):
        rows = {r["member"]: r for r in _rows(spark, bad_dir / "members.zip",
                                              maxMemberBytes=1 << 20)}
        assert rows["bomb.dcm"]["_error_kind"] == "too_large"
        assert "maxMemberBytes=1048576" in rows["bomb.dcm"]["_corrupt_record"]

    def test_unreadable_and_empty_plain_files(self, spark, bad_dir, tmp_path):
        missing = tmp_path / "gone.zip"
        rows = _rows(spark, missing)
        assert [r["_error_kind"] for r in rows] == ["unreadable"]
        assert str(missing) in rows[0]["_corrupt_record"]
        (row,) = _rows(spark, bad_dir / "plain_empty.dcm")
        assert row["_error_kind"] == "empty"

    def test_dropmalformed_keeps_only_good_rows(self, spark, bad_dir):
        rows = _rows(spark, bad_dir / "members.zip", mode="DROPMALFORMED")
        assert sorted(r["member"] for r in rows) == ["badvr.dcm", "noext", "ok.dcm"]

    def test_failfast_stops_with_the_member_named(self, spark, bad_dir):
        with pytest.raises(Exception, match=r"FAILFAST.*locked\.zip member secret\.dcm"):
            _read(spark, bad_dir / "locked.zip", mode="FAILFAST").collect()
