"""The one way dicomlake builds a Spark session.

Every session the project builds registers the ``dicom`` data source and the warehouse's
Delta tables, so ``SELECT * FROM dicom.instances`` works in any process (CLI, SQL service,
notebooks, tests) without a shared metastore: the catalog is rebuilt from the warehouse
directory at start-up, which is cheap and avoids the single-process Derby metastore.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from dicomlake.config import Settings, load_settings

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import SparkSession

SESSION_HOOKS = ("dicomlake.catalog:register_data_sources", "dicomlake.udfs:register_functions")
"""``module:function`` called with every new session (data sources, UDFs, UDTFs), in order."""

_SESSION_DEFAULTS = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}
"""Per-session SQL settings: set in every session, Spark Connect's included."""

_CLASSIC_DEFAULTS = {
    "spark.ui.showConsoleProgress": "false",
    "spark.python.worker.reuse": "true",
    "spark.executorEnv.PYTHONSAFEPATH": "1",  # see build_session: the worker's cwd
}
"""Set when this process starts the Spark driver (a Connect server keeps its own)."""

_LOCAL_DEFAULTS = {
    # Small data on a small machine: 200 shuffle partitions would mostly schedule empty tasks.
    "spark.sql.shuffle.partitions": "8",
    "spark.ui.enabled": "false",
    # Embedded means loopback only. A cluster's executors must reach the driver, so these
    # (and SPARK_LOCAL_IP) are left to the user's network for spark://, k8s:// and yarn.
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
}
"""Added for ``local`` masters only."""


def is_connect(spark: SparkSession) -> bool:
    """True for a Spark Connect session: no JVM and no ``SparkContext`` in this process
    (told by what the session lacks, so anything without a JVM is treated alike)."""
    return not hasattr(spark, "_jsparkSession")


def default_parallelism(spark: SparkSession) -> int:
    """How many tasks keep every core busy, asked of Spark the same way on both kinds of
    session.

    ``spark.default.parallelism`` wins when configured. A classic session knows its cores
    (``SparkContext.defaultParallelism``); a Connect client does not, so it asks the server:
    ``range`` without a partition count is split into exactly that many partitions (a job of
    empty tasks, a second or so).
    """
    configured = spark.conf.get("spark.default.parallelism", None)
    if configured:
        return int(configured)
    if not is_connect(spark):
        return spark.sparkContext.defaultParallelism
    row = spark.sql("SELECT max(p) + 1 AS n FROM "
                    "(SELECT spark_partition_id() AS p FROM range(65536))").first()
    assert row is not None
    return max(1, int(row["n"]))


def _import_then_pass(modules: Sequence[str], batches: Iterator[pa.RecordBatch],
                      ) -> Iterator[pa.RecordBatch]:
    """A warm-up task's body: import what the job's tasks will need, pass the rows on."""
    for name in modules:
        importlib.import_module(name)
    yield from batches


def warm_workers(spark: SparkSession, modules: Sequence[str]) -> threading.Thread | None:
    """Start Python workers in the background: one tiny task per slot that imports
    ``modules``, so the job that follows finds workers started and imported (Spark reuses
    them) instead of paying that first.

    Why: in a fresh process, the first Python job costs seconds before any row is read
    (the JVM's first job, the worker daemon, each worker's imports), and the session's own
    set-up (registering sources and functions) leaves the cores mostly idle waiting on the
    JVM; run together, the two overlap. Best effort: a failure here is the real job's to
    report. A Spark Connect client has no workers of its own to warm: nothing starts there.
    """
    if is_connect(spark) or not modules:
        return None
    slots = default_parallelism(spark)
    task = functools.partial(_import_then_pass, tuple(modules))

    def run() -> None:
        try:
            spark.range(0, slots, 1, slots).mapInArrow(task, "id long").collect()
        except Exception:  # the session stopped, or the real job will fail and say why
            return

    thread = threading.Thread(target=run, name="dicomlake-warm-workers", daemon=True)
    thread.start()
    return thread


def build_session(settings: Settings | None = None, *, app_name: str = "dicomlake",
                  warm: Sequence[str] = (), jobs_only: bool = False) -> SparkSession:
    """Start (or reuse) the Spark session and register the dicomlake catalog in it.

    Workers must run this interpreter (it has pyarrow and pydicom), and a ``local`` driver
    binds loopback only, so both are set here before the JVM starts. ``sc://`` builds a Spark
    Connect client: the server's JVM keeps its own static settings (memory, warehouse dir),
    and the lake's paths must mean the same files on the server (a shared disk).

    ``warm``: modules the caller's Python tasks will import; workers start and import them
    (:func:`warm_workers`) while the session registers its sources and functions.

    ``jobs_only``: a process that runs Python jobs of its own and ends, like ``dicomlake
    ingest``. It skips the registration (:data:`SESSION_HOOKS` and the lake's tables):
    nobody queries by name there, and in a fresh JVM registering costs seconds (first use
    of the Python data source and UDTF machinery, of the DDL parser). Its driver JVM
    compiles with the quick JIT only (``-XX:TieredStopAtLevel=1``): in such a job the JVM
    only hands task ids to Python workers and collects their manifests, so start-up is
    what its JIT time buys (measured: a 988-file CLI ingest 16.2 s -> 12.8 s in all).
    """
    settings = settings or load_settings()
    master = settings.spark.master
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    # Python workers run `python -m pyspark.daemon` in the current directory, and `-m` puts
    # that directory first on sys.path: standing in a checkout, its `dicomlake/` folder (which
    # lacks the mapped subpackages) would shadow an installed package. Safe-path mode keeps
    # the current directory off sys.path; workers inherit this process's environment in
    # local mode and get it through spark.executorEnv elsewhere.
    os.environ["PYTHONSAFEPATH"] = "1"
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    from pyspark.sql import SparkSession

    if master.startswith("sc://"):
        # The server owns the JVM: its warehouse dir, memory and defaults are static there.
        builder = SparkSession.builder.remote(master).appName(app_name)
        defaults = dict(_SESSION_DEFAULTS)
    else:
        builder = (SparkSession.builder.master(master).appName(app_name)
                   .config("spark.driver.memory", settings.spark.driver_memory)
                   .config("spark.sql.warehouse.dir", str(settings.home / "spark-warehouse")))
        defaults = {**_SESSION_DEFAULTS, **_CLASSIC_DEFAULTS,
                    **(_LOCAL_DEFAULTS if master.startswith("local") else {})}
    conf = {**defaults, **settings.spark.conf}
    if not master.startswith("sc://"):
        from dicomlake.class_archive import java_options

        # ours go first: options the user configured win where they differ
        quick = "-XX:TieredStopAtLevel=1" if jobs_only else ""
        extra = " ".join(filter(None, (java_options(), quick,
                                       conf.get("spark.driver.extraJavaOptions", ""))))
        if extra:
            conf["spark.driver.extraJavaOptions"] = extra
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    if not is_connect(spark):
        spark.sparkContext.setLogLevel("ERROR")
    warm_workers(spark, warm)
    if jobs_only:
        return spark

    for hook in SESSION_HOOKS:
        module, function = hook.split(":")
        getattr(importlib.import_module(module), function)(spark)
    from dicomlake.catalog import Warehouse

    Warehouse(settings.warehouse_path).register(spark)
    return spark
