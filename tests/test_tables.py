"""The table registry is the one declaration every writer and reader follows."""

from __future__ import annotations

import pyarrow as pa

from dicomlake.catalog import deid, tables


def test_every_twin_is_declared_and_keeps_only_declared_columns():
    assert set(deid.TABLES) == set(tables.TWINS)
    for name, twin in tables.TWINS.items():
        assert twin.qualified == f"dicom_deid.{name}"
        kept = deid.deid_schema(name, tables.spec(name).schema)
        assert set(kept.names) <= set(tables.spec(name).columns)


def test_the_data_source_schema_is_the_instances_schema_plus_its_own_columns():
    from pyspark.sql.pandas.types import to_arrow_schema

    from dicomlake.catalog.dicom_source import CORRUPT_RECORD, ERROR_KIND, dicom_schema

    source = to_arrow_schema(dicom_schema(), timezone="UTC")
    instances = tables.INSTANCES.schema
    own = {"warnings", CORRUPT_RECORD, ERROR_KIND}
    assert [f.name for f in source if f.name not in own] == \
        [n for n in instances.names if n != "ingested_at"]
    for f in source:
        if f.name in instances.names:
            assert f.type == instances.field(f.name).type, f.name


def test_created_tables_have_the_declared_schemas(tmp_path):
    from deltalake import DeltaTable

    created = tables.create_missing(tmp_path)
    assert created == list(tables.TABLES)
    for name in created:
        got = pa.schema(DeltaTable(str(tables.spec(name).path(tmp_path))).schema().to_arrow())
        assert got.equals(tables.spec(name).schema), name
    assert tables.create_missing(tmp_path) == []
