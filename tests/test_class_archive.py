"""The JVM class archive: built once in the background, used by later sessions, never in
the way (off by a variable, ignored by the JVM when it cannot be used)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicomlake import class_archive


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(class_archive.ENV, raising=False)
    return tmp_path / "dicomlake" / "jvm"


def test_off_means_neither_used_nor_built(cache: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(class_archive.ENV, "off")
    assert class_archive.java_options() == ""
    assert not cache.exists()


def test_the_archive_is_named_for_this_jvm_and_this_spark(cache: Path):
    import pyspark

    path = class_archive.archive_path()
    assert path is not None and path.parent == cache
    assert path.name.startswith(f"spark-{pyspark.__version__}-") and path.suffix == ".jsa"
    assert class_archive.archive_path() == path  # stable: later sessions find it


def test_a_build_in_progress_is_not_started_twice(cache: Path, monkeypatch: pytest.MonkeyPatch):
    started: list[list[str]] = []
    monkeypatch.setattr(class_archive.subprocess, "Popen",
                        lambda args, **_: started.append(args))
    assert class_archive.java_options() == ""  # no archive yet: the session goes without
    assert class_archive.java_options() == ""
    assert len(started) == 1 and started[0][-1] == str(class_archive.archive_path())
    lock = cache / Path(started[0][-1]).with_suffix(".building").name
    old = time.time() - class_archive._BUILD_TIMEOUT - 1
    os.utime(lock, (old, old))  # a build that died long ago
    class_archive.java_options()
    assert len(started) == 2


@pytest.mark.slow
def test_first_session_builds_it_and_the_next_starts_spark_with_it(cache: Path):
    """The real thing: a detached build, then a Spark session on the archive that runs
    Python work; a damaged archive only costs speed."""
    assert class_archive.java_options() == ""
    path = class_archive.archive_path()
    assert path is not None
    deadline = time.monotonic() + 300
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(2)
    assert path.is_file() and path.stat().st_size > 1 << 20
    assert not list(cache.glob("*.building")) and not list(cache.glob("*.partial"))
    options = class_archive.java_options()
    assert options.startswith(f"-XX:SharedArchiveFile={path}")

    script = (
        "import sys\n"
        "from pyspark.sql import SparkSession\n"
        "spark = (SparkSession.builder.master('local[1]')"
        ".config('spark.ui.enabled', 'false')"
        ".config('spark.driver.host', '127.0.0.1')"
        ".config('spark.driver.bindAddress', '127.0.0.1')"
        ".config('spark.driver.extraJavaOptions', sys.argv[1]).getOrCreate())\n"
        "print('rows', spark.range(5).selectExpr('sum(id) AS n').first()['n'])\n"
    )
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    for archive in (options, options.replace(str(path), str(cache / "damaged.jsa"))):
        (cache / "damaged.jsa").write_bytes(b"\0" * 4096)
        done = subprocess.run([sys.executable, "-c", script, archive], env=env,
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "rows 10" in done.stdout
        assert "cds" not in (done.stdout + done.stderr).lower()
