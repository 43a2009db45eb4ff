"""The one way dicomlake builds a Spark session.

Every session the project builds registers the ``dicom`` data source and the warehouse's
Delta tables, so ``SELECT * FROM dicom.instances`` works in any process (CLI, SQL service,
notebooks, tests) without a shared metastore: the catalog is rebuilt from the warehouse
directory at start-up, which is cheap and avoids the single-process Derby metastore.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

from dicomlake.config import Settings, load_settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

SESSION_HOOKS = ("dicomlake.catalog:register_data_sources", "dicomlake.udfs:register_functions")
"""``module:function`` called with every new session (data sources, UDFs, UDTFs), in order."""

_LOCAL_DEFAULTS = {
    # Small data on a small machine: 200 shuffle partitions would mostly schedule empty tasks.
    "spark.sql.shuffle.partitions": "8",
    "spark.sql.session.timeZone": "UTC",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.python.worker.reuse": "true",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
}


def build_session(settings: Settings | None = None, *, app_name: str = "dicomlake") -> SparkSession:
    """Start (or reuse) the Spark session and register the dicomlake catalog in it.

    Workers must run this interpreter (it has pyarrow and pydicom), and embedded servers bind
    loopback only, so both are set here before the JVM starts.
    """
    settings = settings or load_settings()
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    from pyspark.sql import SparkSession

    master = settings.spark.master
    if master.startswith("sc://"):
        builder = SparkSession.builder.remote(master)
    else:
        builder = SparkSession.builder.master(master).config(
            "spark.driver.memory", settings.spark.driver_memory
        )
        for key, value in _LOCAL_DEFAULTS.items():
            builder = builder.config(key, value)
    builder = builder.appName(app_name).config(
        "spark.sql.warehouse.dir", str(settings.home / "spark-warehouse")
    )
    for key, value in settings.spark.conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    if not master.startswith("sc://"):
        spark.sparkContext.setLogLevel("ERROR")

    for hook in SESSION_HOOKS:
        module, function = hook.split(":")
        getattr(importlib.import_module(module), function)(spark)
    from dicomlake.catalog import Warehouse

    Warehouse(settings.warehouse_path).register(spark)
    return spark
