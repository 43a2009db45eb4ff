"""Create the tables the stream writes, with the schemas the batch jobs write them with.

Runs in the main venv (it derives Arrow schemas from the Spark schema of the ``dicom``
source), before the job starts, so the job (no pyspark there) only ever appends with each
table's own schema.
"""

from __future__ import annotations

from pathlib import Path

from dicomlake.config import Settings


def _arrow_schemas() -> dict[str, object]:
    from pyspark.sql.pandas.types import to_arrow_schema
    from pyspark.sql.types import (
        ArrayType,
        BinaryType,
        FloatType,
        IntegerType,
        StringType,
        StructField,
        StructType,
        TimestampType,
    )

    from dicomlake.catalog.dicom_source import PROVENANCE, dicom_schema
    from dicomlake.catalog.ingest import INSTANCE_COLUMNS, WARNING_COLUMNS

    stamp = StructField("ingested_at", TimestampType(), False)
    instances = StructType([f for f in dicom_schema().fields if f.name in INSTANCE_COLUMNS]
                           + [stamp])
    errors = StructType([*PROVENANCE.fields, StructField("error_kind", StringType()),
                         StructField("error", StringType()), stamp])
    s, i = StringType(), IntegerType()
    warnings = StructType([StructField(n, s) for n in WARNING_COLUMNS if n != "ingested_at"]
                          + [stamp])
    embeddings = StructType([
        StructField("sop_instance_uid", s), StructField("frame", i),
        StructField("embedding", ArrayType(FloatType())), StructField("model_id", s),
        StructField("model_version", s), StructField("thumbnail", BinaryType()),
        StructField("embedded_at", TimestampType())])
    pixel_errors = StructType([
        StructField(n, s) for n in ("sop_instance_uid", "path", "error_kind", "error",
                                    "model_id", "model_version")]
        + [StructField("embedded_at", TimestampType())])
    codes = StructType([
        StructField("sop_instance_uid", s), StructField("frame", i),
        StructField("codebook_version", i), StructField("list_id", i),
        StructField("code", BinaryType())])
    return {name: to_arrow_schema(struct, timezone="UTC") for name, struct in (
        ("instances", instances), ("errors", errors), ("warnings", warnings),
        ("embeddings", embeddings),
        ("pixel_errors", pixel_errors), ("codes", codes))}


def ensure_tables(settings: Settings) -> list[str]:
    """Create missing ``dicom`` tables the stream appends to; returns the ones created."""
    from deltalake import DeltaTable, Schema
    from deltalake.transaction import create_table_with_add_actions

    created = []
    for table, schema in _arrow_schemas().items():
        path = Path(settings.warehouse_path) / "dicom" / table
        if DeltaTable.is_deltatable(str(path)):
            continue
        path.mkdir(parents=True, exist_ok=True)
        create_table_with_add_actions(str(path), Schema.from_arrow(schema), [], mode="append")
        created.append(table)
    return created
