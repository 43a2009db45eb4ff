"""The warehouse: a folder of Delta tables, ``<root>/<schema>/<table>``, seen by Spark by name.

There is no metastore to keep in sync: each session lists the folder and registers a source
per table (``CREATE TABLE dicom.instances USING dicomlake_dicom_instances``) in Spark's
in-memory catalog. That costs milliseconds and lets any number of processes share the lake.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dicomlake.catalog.delta import table_source_class

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


@dataclass(frozen=True)
class Warehouse:
    """A root folder holding one Delta table per ``<schema>/<table>`` sub-folder."""

    root: Path

    def table_path(self, schema: str, table: str) -> Path:
        """Where ``schema.table`` lives (whether or not it exists yet)."""
        return Path(self.root) / schema / table

    def tables(self) -> list[tuple[str, str]]:
        """Existing ``(schema, table)`` pairs, sorted."""
        root = Path(self.root)
        if not root.is_dir():
            return []
        return sorted(
            (log.parent.parent.name, log.parent.name)
            for log in root.glob("*/*/_delta_log")
            if log.is_dir()
        )

    def register(self, spark: SparkSession, only: tuple[str, str] | None = None) -> None:
        """Make every table (or just ``only``) queryable by name in this session."""
        for schema, table in self.tables():
            if only is not None and (schema, table) != only:
                continue
            source = table_source_class(schema, table, str(self.table_path(schema, table)))
            spark.dataSource.register(source)
            spark.sql(f"CREATE DATABASE IF NOT EXISTS `{schema}`")
            spark.sql(
                f"CREATE TABLE IF NOT EXISTS `{schema}`.`{table}` USING {source.source_name}"
            )
