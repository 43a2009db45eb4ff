"""The ``dicomlake`` command as users run it (in-process, on the shared Spark session)."""

from __future__ import annotations

import zipfile

from click.testing import CliRunner

from dicomlake.cli import main


def test_sample_writes_archives_of_dicom(tmp_path):
    result = CliRunner().invoke(main, ["sample", "--out", str(tmp_path), "--archives", "2",
                                       "--files", "5", "--profile", "ctmr"])
    assert result.exit_code == 0, result.output
    archives = sorted(tmp_path.glob("*.zip"))
    assert len(archives) == 2
    names = zipfile.ZipFile(archives[0]).namelist()
    assert len(names) == 5
    assert zipfile.ZipFile(archives[0]).read(names[0])[128:132] == b"DICM"


def test_ingest_prints_the_accounting(spark, settings, sample_archives):
    result = CliRunner().invoke(main, ["ingest", str(sample_archives[0].parent)])
    assert result.exit_code == 0, result.output
    assert "files seen: 61 = rows written: 60 + errors recorded: 1" in result.output
    assert "not_dicom: 1" in result.output
    again = CliRunner().invoke(main, ["ingest", str(sample_archives[0].parent)])
    assert "sources: 3 (3 unchanged, skipped)" in again.output
    tables = CliRunner().invoke(main, ["tables"])
    assert "dicom.instances" in tables.output and "60 rows" in tables.output


def test_sql_runs_statements(spark, settings, sample_archives):
    CliRunner().invoke(main, ["ingest", str(sample_archives[0].parent)])
    result = CliRunner().invoke(main, ["sql", "-e", "SELECT count(*) AS n FROM dicom.errors"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-2].strip() == "1"


def test_bench_commands_are_listed():
    result = CliRunner().invoke(main, ["bench", "--help"])
    assert result.exit_code == 0
    assert "ingest" in result.output


def test_bad_sql_is_reported_not_a_traceback(spark, settings):
    result = CliRunner().invoke(main, ["sql", "-e", "SELEC 1"])
    assert result.exit_code == 1
    assert "Error: [PARSE_SYNTAX_ERROR]" in result.output
    assert "Traceback" not in result.output


def test_ingest_of_damaged_and_odd_inputs_exits_0_and_counts_every_input(spark, settings,
                                                                           sample_archives,
                                                                           tmp_path):
    """`dicomlake ingest` as users run it, on the inputs that used to abort it or vanish:
    a corrupt bzip2 member, repeated member names, a .tgz with a DICOMDIR, UID-named files,
    operating-system litter. Exit code 0, and the summary accounts for all of them."""
    from test_ingest import _real_world_folder

    folder = _real_world_folder(tmp_path / "in", sample_archives[0])
    (folder / "good.zip").unlink()  # its images are already in the shared lake
    result = CliRunner().invoke(main, ["ingest", str(folder)])
    assert result.exit_code == 0, result.output
    assert ("files seen: 8 = rows written: 4 + errors recorded: 4 (of which skipped by rule: 2)"
            in result.output)
    assert "bad_archive: 1, dicomdir: 1, skipped: 2" in result.output
    assert "values kept as text: 1" in result.output
