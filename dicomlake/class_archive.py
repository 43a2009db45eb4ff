"""The JVM class archive (AppCDS) that lets the Spark driver start in about half the time.

Every ``dicomlake`` command starts a fresh JVM, and before a single row is read that JVM
loads and verifies ~15,000 Spark classes, twice over: at start-up and again in the first
job. A dynamic class-data-sharing archive (JDK 13+, ``-XX:ArchiveClassesAtExit`` /
``-XX:SharedArchiveFile``) maps them pre-parsed instead. Measured on this project's 2-core
machine, a quiet one, Spark 4 on OpenJDK 17 (``getOrCreate`` / first SQL job / first
Python job): 10.4 / 5.3 / 2.7 s without, 6.6 / 3.2 / 3.0 s with the archive.

The archive belongs to one JVM build and one Spark class path, so its name carries a digest
of both, and it lives in the user's cache (``$XDG_CACHE_HOME/dicomlake`` or
``~/.cache/dicomlake``), shared by every lake. The first session that finds none goes on
without it and starts a detached process that builds it (a small Spark job, then the JVM
dumps what it loaded on exit, ~30 s of background work once); later sessions use it. An
archive the JVM cannot use is ignored by the JVM itself (``-Xshare:auto``, the default),
so a stale one costs speed, never correctness. ``DICOMLAKE_JVM_ARCHIVE=off`` turns it off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

ENV = "DICOMLAKE_JVM_ARCHIVE"
"""``off`` disables the archive (neither used nor built)."""

_BUILD_TIMEOUT = 600
"""A build lock older than this (seconds) is a build that died: another may start."""

_QUIET = "-Xlog:cds=off -Xlog:cds+dynamic=off"
"""The JVM explains on stdout why it cannot map an archive; that is not the user's
business (the session simply starts at the usual speed)."""


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "dicomlake" / "jvm"


def _java() -> Path | None:
    """The ``java`` that ``spark-submit`` will run (``JAVA_HOME`` first, as it does)."""
    home = os.environ.get("JAVA_HOME")
    found = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    return Path(found).resolve() if found and Path(found).exists() else None


def archive_path() -> Path | None:
    """Where the archive for this JVM and this Spark lives (None: no ``java`` found).

    The digest covers the JVM binary (path, size, mtime) and every jar of the pyspark
    package (name and size): a JDK or Spark upgrade gets an archive of its own.
    """
    import pyspark

    java = _java()
    if java is None:
        return None
    stat = java.stat()
    digest = hashlib.blake2b(f"{java}:{stat.st_size}:{stat.st_mtime_ns}".encode(),
                             digest_size=8)
    jars = Path(pyspark.__file__).parent / "jars"
    for jar in sorted(jars.glob("*.jar")) if jars.is_dir() else []:
        digest.update(f"{jar.name}:{jar.stat().st_size}".encode())
    return _cache_dir() / f"spark-{pyspark.__version__}-{digest.hexdigest()}.jsa"


def java_options() -> str:
    """The driver JVM options that use the archive, or "" (and the archive's build is
    started in the background when it is missing)."""
    if os.environ.get(ENV, "").lower() == "off":
        return ""
    path = archive_path()
    if path is None:
        return ""
    if path.is_file():
        return f"-XX:SharedArchiveFile={path} {_QUIET}"
    _start_build(path)
    return ""


def _start_build(path: Path) -> None:
    """Start a detached build of ``path`` unless one is running (a lock file, taken
    atomically; a lock older than :data:`_BUILD_TIMEOUT` is a dead build's)."""
    lock = path.with_suffix(".building")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if lock.exists() and time.time() - lock.stat().st_mtime > _BUILD_TIMEOUT:
            lock.unlink(missing_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except OSError:  # being built, or the cache is not writable: go on without
        return
    os.close(fd)
    subprocess.Popen([sys.executable, "-m", "dicomlake.class_archive", str(path)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


def _pass(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield from batches


def build(path: Path) -> None:
    """Run what a dicomlake session runs first (a SQL job, a Python job), with the JVM told
    to archive every class it loaded when it exits; then wait for that exit and move the
    archive into place (a partial archive never gets the final name)."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    partial = path.with_suffix(f".{os.getpid()}.partial")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    try:
        spark = (SparkSession.builder.master("local[1]").appName("dicomlake-class-archive")
                 .config("spark.ui.enabled", "false")
                 .config("spark.ui.showConsoleProgress", "false")
                 .config("spark.driver.host", "127.0.0.1")
                 .config("spark.driver.bindAddress", "127.0.0.1")
                 .config("spark.driver.extraJavaOptions",
                         f"-XX:ArchiveClassesAtExit={partial} {_QUIET}")
                 .getOrCreate())
        spark.range(100).selectExpr("sum(id) AS n", "max(id)").collect()
        spark.range(0, 1, 1, 1).mapInArrow(_pass, "id long").collect()
        gateway = SparkContext._gateway
        assert gateway is not None
        process = gateway.proc
        spark.stop()
        gateway.shutdown()
        process.stdin.close()  # the JVM exits when its parent's pipe closes
        process.wait(timeout=_BUILD_TIMEOUT)
        if partial.is_file() and partial.stat().st_size > 0:
            os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
        path.with_suffix(".building").unlink(missing_ok=True)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
