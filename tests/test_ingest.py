"""``ingest``: every input is a row or an error, one commit per table, idempotent re-runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from deltalake import DeltaTable
from dicom_files import shipped, write_zip

from dicomlake.catalog.ingest import STAGES, ingest
from dicomlake.catalog.sample import Profile, make_sample
from dicomlake.catalog.warehouse import Warehouse


class _Recorder:
    """An ingest's progress, as a display would receive it."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, int]] = []
        self.done: dict[str, int] = {}

    def stage(self, name: str, files: int) -> None:
        self.stages.append((name, files))
        self.done[name] = 0

    def advance(self, files: int) -> None:
        assert files > 0
        self.done[self.stages[-1][0]] += files


@pytest.fixture
def lake(tmp_path):
    return Warehouse(tmp_path / "warehouse")


def _count(spark, table: str) -> int:
    return spark.sql(f"SELECT count(*) AS n FROM {table}").first()["n"]


def _version(lake: Warehouse, table: str) -> int:
    return DeltaTable(str(lake.table_path("dicom", table))).version()


def test_every_input_is_a_row_or_an_error(spark, lake, tmp_path, sample_archives):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(sample_archives[0], inputs / "a.zip")  # 20 images + README.txt
    (inputs / "broken.zip").write_bytes(sample_archives[1].read_bytes()[:5000])
    write_zip(inputs / "mixed.zip", {"ok.dcm": shipped("MR_small.dcm"), "empty.dcm": b""})
    missing = str(tmp_path / "nowhere.zip")
    progress = _Recorder()

    result = ingest(spark, lake, [str(inputs), missing], progress=progress)

    assert result.files_seen == 21 + 1 + 2 + 1
    # every stage reported, in order, each counting up to what it processed
    assert [name for name, _ in progress.stages] == list(STAGES)
    assert progress.stages == [("plan", 0), ("read+write", 25), ("commit", 25),
                               ("summaries", 21), ("register", 0)]
    assert progress.done == {"plan": 0, "read+write": 25, "commit": 25, "summaries": 21,
                             "register": 0}
    assert list(result.stage_seconds) == list(STAGES)
    assert sum(result.stage_seconds.values()) <= result.seconds
    assert result.balanced
    assert (result.rows_written, result.errors_recorded) == (21, 4)
    assert result.error_kinds == {"bad_archive": 1, "empty": 1, "not_dicom": 1,
                                  "unreadable": 1}
    assert _count(spark, "dicom.instances") == 21
    errors = {r["error_kind"]: r for r in spark.sql("SELECT * FROM dicom.errors").collect()}
    assert errors["empty"]["member"] == "empty.dcm"
    assert "broken.zip" in errors["bad_archive"]["error"]
    assert errors["unreadable"]["path"] == missing
    # one atomic commit per table for the whole job
    assert _version(lake, "instances") == 0 and _version(lake, "errors") == 0


def test_tasks_report_rows_as_they_write_them(spark, tmp_path):
    """Progress comes from the tasks' own markers (no SparkContext needed): the rows a job's
    tasks report add up to the rows written, and the markers are gone afterwards."""
    from dicomlake.catalog.delta import PROGRESS_FOLDER, TableTarget, write_files

    df = spark.range(0, 3000, 1, 3).selectExpr("id", "CAST(id AS STRING) AS name")
    reports: list[int] = []
    target = TableTarget("t", str(tmp_path / "t"), ("id", "name"), key_columns=("name",))
    written = write_files(df, [target], progress=reports.append)
    assert sum(reports) == 3000 == sum(f.rows for f in written)
    assert sorted(int(k[0]) for f in written for k in f.keys) == list(range(3000))
    assert not (tmp_path / "t" / PROGRESS_FOLDER).exists()


def test_summaries_agree_with_instances(spark, lake, sample_archives):
    ingest(spark, lake, [str(sample_archives[1]), str(sample_archives[2])])
    series = spark.sql("SELECT count(DISTINCT series_instance_uid) AS n FROM dicom.instances")
    assert _count(spark, "dicom.series") == series.first()["n"]
    total = spark.sql("SELECT sum(instances) AS n FROM dicom.studies").first()["n"]
    assert total == _count(spark, "dicom.instances") == 40


def test_reingest_adds_nothing_and_commits_nothing(spark, lake, sample_archives):
    first = ingest(spark, lake, [str(sample_archives[1])])
    version = _version(lake, "instances")
    again = ingest(spark, lake, [str(sample_archives[1])])
    assert first.rows_written == 20
    assert (again.sources_skipped, again.files_seen) == (1, 0)
    assert _version(lake, "instances") == version
    assert _count(spark, "dicom.instances") == 20


def test_changed_archive_replaces_its_rows(spark, lake, tmp_path, sample_archives):
    archive = tmp_path / "site.zip"
    shutil.copy(sample_archives[1], archive)
    ingest(spark, lake, [str(archive), str(sample_archives[2])])
    replacement = make_sample(tmp_path / "new", archives=1, files=7, seed=42,
                              profile=Profile.CTMR, workers=1)[0]
    shutil.copy(replacement, archive)

    result = ingest(spark, lake, [str(archive), str(sample_archives[2])])

    assert (result.sources_skipped, result.rows_written) == (1, 7)
    assert _count(spark, "dicom.instances") == 7 + 20
    members = {r["member"] for r in spark.sql(
        f"SELECT member FROM dicom.instances WHERE archive = '{archive}'").collect()}
    assert members == set(zipfile.ZipFile(archive).namelist())
    # Spark reads only the active files: it agrees with delta-rs after the replacement.
    table = DeltaTable(str(lake.table_path("dicom", "instances")))
    assert table.to_pyarrow_table().num_rows == 27
    # The summaries were updated from this run's rows alone (added and removed): they agree
    # with a full aggregation, and the replaced archive's vanished series are gone.
    _assert_summaries_agree(spark)


def _assert_summaries_agree(spark) -> None:
    for table, key in (("series", "series_instance_uid"), ("studies", "study_instance_uid")):
        expected = {(r[key], r["n"]) for r in spark.sql(
            f"SELECT {key}, count(*) AS n FROM dicom.instances WHERE {key} IS NOT NULL "
            f"GROUP BY {key}").collect()}
        stored = [(r[key], r["instances"]) for r in spark.sql(
            f"SELECT {key}, instances FROM dicom.{table}").collect()]
        assert sorted(stored) == sorted(expected)


def test_duplicate_sop_instance_uids_become_errors(spark, lake, tmp_path, sample_archives):
    ingest(spark, lake, [str(sample_archives[1])])
    copy = tmp_path / "copy_of_1.zip"
    shutil.copy(sample_archives[1], copy)

    result = ingest(spark, lake, [str(copy)])

    assert result.balanced
    assert (result.rows_written, result.errors_recorded, result.duplicates) == (0, 20, 20)
    assert _count(spark, "dicom.instances") == 20
    dup = spark.sql("SELECT * FROM dicom.errors WHERE error_kind = 'duplicate' "
                    "ORDER BY member LIMIT 1").first()
    assert dup["archive"] == str(copy)
    assert f"already stored for {sample_archives[1]}!/" in dup["error"]
    _assert_summaries_agree(spark)


@pytest.mark.slow
def test_a_new_process_sees_the_tables_by_name(spark, lake, sample_archives, settings):
    """The README's CLI path: `dicomlake sql` in a fresh process finds dicom.* by name."""
    ingest(spark, lake, [str(sample_archives[2])])
    env = dict(os.environ, DICOMLAKE_HOME=str(settings.home),
               DICOMLAKE_WAREHOUSE=str(lake.root), DICOMLAKE_SPARK_MASTER="local[1]")
    out = subprocess.run(
        [sys.executable, "-m", "dicomlake", "sql", "-e",
         "SELECT count(*) AS n FROM dicom.instances WHERE modality IN ('CT', 'MR')"],
        env=env, capture_output=True, text=True, timeout=300, check=True)
    assert " 20 " in out.stdout.splitlines()[2] + " "


def _real_world_folder(root, sample_archive):
    """Archives and folders as they arrive, with the damage that used to abort an ingest."""
    import io
    import tarfile

    from dicom_files import make_dicom

    root.mkdir()
    shutil.copy(sample_archive, root / "good.zip")  # 20 images + README.txt
    with zipfile.ZipFile(root / "bz.zip", "w", zipfile.ZIP_BZIP2) as zf:
        zf.writestr("IM1.dcm", shipped("CT_small.dcm"))
    data = bytearray((root / "bz.zip").read_bytes())
    data[60:300] = b"\xa5" * 240  # inside the bzip2 stream: OSError: Invalid data stream
    (root / "bz.zip").write_bytes(bytes(data))
    with zipfile.ZipFile(root / "dupes.zip", "w") as zf:
        zf.writestr("IM1", make_dicom(preamble=False))
        zf.writestr("IM1", make_dicom(pixels=False))
        zf.writestr("__MACOSX/._IM1", b"\0\5\26\7")
    with tarfile.open(root / "cd.tgz", "w:gz") as tf:
        for name, payload in (("DICOMDIR", shipped("DICOMDIR")),
                              ("DICOM/1.3.6.1.4.1.5962.99.4",
                               make_dicom(StudyDate="19770707", raw={"19770707": b"1990/01/"}))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    uids = root / "export" / "1.2.840.113619"
    uids.mkdir(parents=True)
    (uids / "1.2.840.113619.2.1").write_bytes(make_dicom())
    (uids / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


def test_damaged_and_odd_inputs_never_abort_an_ingest(spark, lake, tmp_path, sample_archives):
    """One damaged member (a corrupt bzip2 stream) used to abort the job and lose the good
    archives of the same run; now it is one error row and everything else is ingested."""
    folder = _real_world_folder(tmp_path / "in", sample_archives[0])

    result = ingest(spark, lake, [str(folder)])

    assert result.balanced, result.unaccounted
    assert result.error_kinds == {"bad_archive": 1, "dicomdir": 1, "not_dicom": 1,
                                  "skipped": 2}
    assert (result.rows_written, result.errors_recorded, result.skipped) == (20 + 2 + 1 + 1,
                                                                             5, 2)
    paths = [r["path"] for r in spark.sql("SELECT path FROM dicom.instances").collect()]
    assert len(paths) == len(set(paths))
    assert f"{folder}/dupes.zip!/IM1[1]" in paths
    (warning,) = spark.sql("SELECT * FROM dicom.warnings").collect()
    assert (warning["tag"], warning["value"]) == ("(0008,0020)", "1990/01/")
    assert warning["path"] == f"{folder}/cd.tgz!/DICOM/1.3.6.1.4.1.5962.99.4"
    bad = spark.sql("SELECT * FROM dicom.errors WHERE error_kind = 'bad_archive'").first()
    assert bad["member"] == "IM1.dcm" and "bz.zip member IM1.dcm" in bad["error"]

    again = ingest(spark, lake, [str(folder)])  # unchanged sources, skips included: no work
    assert (again.files_seen, again.sources_skipped) == (0, result.sources)


def test_a_table_written_by_an_older_version_gains_the_new_columns(tmp_path):
    """A lake made before ``member_index`` existed: the next commit adds the column instead
    of silently dropping it (a plain Delta commit keeps the old schema)."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import write_deltalake

    from dicomlake.catalog.delta import WrittenFile, commit

    path = tmp_path / "instances"
    write_deltalake(str(path), pa.table({"path": ["old"]}))
    schema = pa.schema([("path", pa.string()), ("member_index", pa.int32())])
    pq.write_table(pa.table({"path": ["new"], "member_index": [3]}, schema=schema),
                   path / "new.parquet")
    st = os.stat(path / "new.parquet")
    commit(path, schema, [WrittenFile("instances", "new.parquet", st.st_size, 1,
                                      int(st.st_mtime * 1000))])
    rows = DeltaTable(str(path)).to_pyarrow_table().sort_by("path").to_pylist()
    assert rows == [{"path": "new", "member_index": 3}, {"path": "old", "member_index": None}]


def test_the_benchmark_compares_the_zipdcm_parse_through_the_same_writer(spark, tmp_path,
                                                                         sample_archives):
    """``bench ingest`` measures the zipdcm method end to end by handing the ingest its
    reader; the rows it writes must come from that parse (whole member, full ``dcmread``:
    no pixel data offsets) while the product's reader records them, and both must find the
    same instances with the same typed columns."""
    from dicomlake.bench.ingest import ZipdcmMethodReader

    ours, theirs = Warehouse(tmp_path / "ours"), Warehouse(tmp_path / "theirs")
    archive = str(tmp_path / "images.zip")  # zipdcm reads a README as an image: DICOM only
    with zipfile.ZipFile(sample_archives[0]) as zf:
        write_zip(archive, {name: zf.read(name) for name in zf.namelist()
                            if name.endswith(".dcm")})
    ingest(spark, ours, [archive], register=False)
    result = ingest(spark, theirs, [archive], register=False, reader=ZipdcmMethodReader)

    columns = ["path", "sop_instance_uid", "modality", "rows", "pixel_data_offset"]

    def rows(lake: Warehouse) -> dict[str, dict]:
        table = DeltaTable(str(lake.table_path("dicom", "instances"))).to_pyarrow_table(
            columns=columns)
        return {r["path"]: r for r in table.to_pylist()}

    mine, zipdcm = rows(ours), rows(theirs)
    assert result.rows_written == len(mine) >= 10
    assert set(zipdcm) == set(mine)
    assert all(r["pixel_data_offset"] is None for r in zipdcm.values())
    assert all(r["pixel_data_offset"] is not None for r in mine.values())
    for path, row in mine.items():
        for column in ("sop_instance_uid", "modality", "rows"):
            assert zipdcm[path][column] == row[column], (path, column)
