"""DICOM-in-ZIP Spark data source, Delta tables and the table catalog."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicomlake.catalog.dicom_source import DicomDataSource, ZipdcmDataSource
from dicomlake.catalog.errors import DicomlakeError, ErrorKind, HeaderError
from dicomlake.catalog.warehouse import Warehouse

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = [
    "DicomDataSource",
    "DicomlakeError",
    "ErrorKind",
    "HeaderError",
    "Warehouse",
    "ZipdcmDataSource",
    "register_data_sources",
]


def register_data_sources(spark: SparkSession) -> None:
    """Register ``dicom`` and its alias ``zipdcm`` in a session."""
    spark.dataSource.register(DicomDataSource)
    spark.dataSource.register(ZipdcmDataSource)
