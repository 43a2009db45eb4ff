"""DICOM-in-ZIP Spark data source, Delta tables and the table catalog.

The Spark classes are imported on first use (module ``__getattr__``), so pyspark-free modules
such as :mod:`dicomlake.catalog.header` also import in the streaming job's interpreter, which
has no Spark.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dicomlake.catalog.errors import DicomlakeError, ErrorKind, HeaderError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from dicomlake.catalog.dicom_source import DicomDataSource, ZipdcmDataSource
    from dicomlake.catalog.warehouse import Warehouse

__all__ = [
    "DicomDataSource",
    "DicomlakeError",
    "ErrorKind",
    "HeaderError",
    "Warehouse",
    "ZipdcmDataSource",
    "register_data_sources",
]

_LAZY = {
    "DicomDataSource": "dicomlake.catalog.dicom_source",
    "ZipdcmDataSource": "dicomlake.catalog.dicom_source",
    "Warehouse": "dicomlake.catalog.warehouse",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dicomlake.catalog' has no attribute {name!r}")


def register_data_sources(spark: SparkSession) -> None:
    """Register ``dicom`` and its alias ``zipdcm`` in a session."""
    from dicomlake.catalog.dicom_source import DicomDataSource, ZipdcmDataSource

    spark.dataSource.register(DicomDataSource)
    spark.dataSource.register(ZipdcmDataSource)
