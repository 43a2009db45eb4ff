"""The ``dicomlake`` command as users run it (in-process, on the shared Spark session)."""

from __future__ import annotations

import io
import re
import zipfile

from click.testing import CliRunner

from dicomlake.cli import main
from dicomlake.console import StageBars


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
    # without a terminal: one line per stage as it ends, then where the time went
    lines = result.output.splitlines()
    stages = [m[1] for line in lines
              if (m := re.match(r"^(plan|read\+write|commit|summaries|register): ", line))]
    assert stages == ["plan", "read+write", "commit", "summaries"]  # the CLI registers nothing
    assert re.search(r"^read\+write: 61 files in [\d.]+ s \(\d+ files/s\)$", result.output,
                     re.MULTILINE)
    assert re.search(r"^commit: 61 files in", result.output, re.MULTILINE)
    final = re.search(r"^time: ([\d.]+) s \(\d+ files/s\): plan ([\d.]+) s, "
                      r"read\+write ([\d.]+) s, commit ([\d.]+) s, summaries ([\d.]+) s$",
                      result.output, re.MULTILINE)
    assert final, result.output
    total, *parts = (float(x) for x in final.groups())
    assert 0 < sum(parts) <= total + 0.2  # each 0.05 of rounding at most
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


def test_stage_bars_draw_rate_and_time_left_on_a_terminal():
    out = io.StringIO()
    bars = StageBars(file=out, bars=True)
    bars.stage("read+write", 10)
    bars.advance(4)
    bars.advance(6)
    bars.stage("commit", 10)
    bars.advance(10)
    bars.close()
    text = out.getvalue()
    assert re.search(r"read\+write\s*: 100%.*10/10 \[[\d:]+<[\d:]+, +[\d.]+ *file/s\]", text)
    assert re.search(r"commit\s*: 100%.*10/10", text)


def test_stage_bars_print_a_line_per_stage_elsewhere():
    out = io.StringIO()
    bars = StageBars(file=out)  # a StringIO is no terminal
    bars.stage("plan", 0)
    bars.stage("read+write", 3)
    bars.advance(3)
    bars.close()
    bars.close()  # a second close adds nothing
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"plan: [\d.]+ s", lines[0])
    assert re.fullmatch(r"read\+write: 3 files in [\d.]+ s \(\d+ files/s\)", lines[1])


def test_sample_profiles_are_the_sample_modules_own():
    """The option lists its choices literally (importing pydicom would slow every command)."""
    from dicomlake.catalog.commands import sample
    from dicomlake.catalog.sample import Profile

    option = next(p for p in sample.params if p.name == "profile")
    assert list(option.type.choices) == [p.value for p in Profile]
