"""``dicomlake bench ingest`` and ``bench scale`` end to end at tiny sizes.

Both benchmarks start ``dicomlake ingest`` subprocesses (a Spark session each, ~15 s on a quiet
machine), so this module is slow; it checks that every key is printed and that what was
measured is positive and finite. Fitted figures may be null at tiny sizes, where run-to-run
noise can exceed the work between the sizes; the benchmark then says so in a note. No timing
thresholds: the machines are shared.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DICOMLAKE = [sys.executable, "-m", "dicomlake"]


def _bench(home: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DICOMLAKE_WAREHOUSE", "DICOMLAKE_CONFIG")}
    env["DICOMLAKE_HOME"] = str(home)
    done = subprocess.run([*DICOMLAKE, "bench", *args, "--json"], env=env,
                          capture_output=True, text=True, timeout=3000, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _fitted(result: dict, key: str) -> None:
    value = result[key]
    assert _positive(value) or (value is None and "fit_note" in result), (key, value)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-home")


def test_bench_ingest_prints_end_to_end_and_read_keys(home: Path) -> None:
    result = _bench(home, "ingest", "--sizes", "20,40", "--files-per-archive", "10",
                    "--pixels", "32")

    assert result["ingest_files"] == [20, 40]
    assert result["cores"] >= 1
    for key in ("ingest_seconds", "zipdcm_ingest_seconds", "ingest_reported_seconds"):
        assert len(result[key]) == 2 and all(_positive(v) for v in result[key]), key
    assert _positive(result["spark_start_seconds"])
    assert math.isfinite(result["fixed_seconds"])
    assert math.isfinite(result["zipdcm_fixed_seconds"])
    for key in ("ingest_files_per_core_second", "zipdcm_ingest_files_per_core_second",
                "speedup_vs_zipdcm"):
        _fitted(result, key)
    for key in ("read_files_per_core_second", "read_speedup_vs_zipdcm",
                "zipdcm_files_per_core_second", "extract_files_per_core_second",
                "speedup_vs_extract", "seconds"):
        assert _positive(result[key]), key
    assert "files_per_core_second" not in result and "speedup_vs_zipdcm" in result
    assert result["files"] == 20
    assert result["header_elements"] > 120  # real scanners' element mix, not the templates'
    assert isinstance(result["realworld_files"], int)
    for key in ("load_average_start", "load_average_end"):
        assert len(result[key]) == 3 and all(v >= 0 for v in result[key])

    pool = home / "bench" / "seed-10pa-32px-v3"
    archives = sorted(pool.glob("*.zip"))
    assert len(archives) == 4
    with zipfile.ZipFile(archives[0]) as zf:
        assert len(zf.namelist()) == 10


def test_bench_scale_prints_growth_noop_and_append_keys(home: Path) -> None:
    result = _bench(home, "scale", "--sizes", "20,40", "--append", "20",
                    "--files-per-archive", "10", "--pixels", "32")

    assert result["files"] == [20, 40]
    assert result["append_files"] == 20
    assert len(result["seconds"]) == 2 and all(_positive(v) for v in result["seconds"])
    assert all(_positive(v) for v in result["files_per_core_second"])
    for key in ("fixed_seconds", "noop_reingest_seconds", "append_1k_seconds",
                "append_1k_empty_seconds", "append_ratio"):
        assert _positive(result[key]), key
    exponent = result["growth_exponent"]
    assert exponent is None or math.isfinite(exponent)
    # the unchanged lake: every source skipped by fingerprint, no member read
    assert result["noop_files_read"] == 0
    assert result["noop_sources_skipped"] == 4
    steps = {"fixed", "20", "40", "noop", "append", "append_empty"}
    assert set(result["spark_ready_seconds"]) == steps == set(result["time_lines"])
    assert all(line.startswith("time: ") for line in result["time_lines"].values())
    # the scale pool shares the ingest test's archives (same shape): 4 + 2 appended
    assert len(list((home / "bench" / "seed-10pa-32px-v3").glob("*.zip"))) == 6
