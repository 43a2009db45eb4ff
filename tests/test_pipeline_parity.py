"""Batch and stream give the same rows: one pipeline, two ways in.

The same files (a CT, an MR named ``.IMA``, a multi-frame MR, an RT plan without pixels, an
exact copy of the CT under another name, a text file) go through ``dicomlake ingest`` +
``embed`` (Spark) into one lake and through the stream's writer (no broker, no Flink: the
records are built here) into another that holds the same codebook. Tables are compared row
for row, provenance (``path``, ``source``, times) aside, for both embedding backends.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from dicomlake.catalog import tables
from dicomlake.catalog.sample import find_template
from dicomlake.config import Settings
from dicomlake.streaming import messages
from dicomlake.streaming.processor import LakeWriter, Record
from dicomlake.streaming.settings import StreamSettings
from dicomlake.streaming.tables import ensure_tables
from dicomlake.udfs.settings import CodeStoreKind, ModelBackend, SimilaritySettings

FILES = {"ct/CT_small.dcm": "CT_small.dcm", "mr/scan.IMA": "MR_small.dcm",
         "mr/multiframe.dcm": "emri_small.dcm", "rt/rtplan.dcm": "rtplan.dcm",
         "copy/zz_CT_small.dcm": "CT_small.dcm"}
PROVENANCE = {"path", "source", "source_fingerprint", "source_members", "archive", "member",
              "member_index", "compressed_size", "crc32", "modified", "ingested_at",
              "embedded_at"}


def _inputs(folder: Path) -> list[Path]:
    for rel, name in FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(find_template(name), folder / rel)
    (folder / "notes.txt").write_text("not an image")
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _read(warehouse: Path, table: str) -> pa.Table:
    path = tables.spec(table).path(warehouse)
    return DeltaTable(str(path)).to_pyarrow_table() if path.exists() else \
        tables.spec(table).schema.empty_table()


def _comparable(rows: pa.Table) -> list[dict]:
    out = []
    for row in rows.to_pylist():
        path = row.get("path")
        clean = {k: v for k, v in row.items() if k not in PROVENANCE}
        if path and isinstance(clean.get("meta"), str):
            clean["meta"] = clean["meta"].replace(json.dumps(path)[1:-1], "<path>")
        clean.pop("embedding", None)  # compared with a tolerance: see _same_vectors
        out.append(clean)
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True, default=str))


def _same_vectors(left: pa.Table, right: pa.Table) -> None:
    """Same vectors per (uid, frame), up to float rounding: a model's threads and batch
    composition change the order of its sums (batch tasks run one thread, the stream two)."""
    def by_key(rows: pa.Table) -> dict[tuple[str, int], np.ndarray]:
        return {(r["sop_instance_uid"], r["frame"]): np.asarray(r["embedding"], np.float32)
                for r in rows.to_pylist()}

    a, b = by_key(left), by_key(right)
    assert a.keys() == b.keys()
    for key, vector in a.items():
        np.testing.assert_allclose(b[key], vector, rtol=1e-4, atol=1e-3, err_msg=str(key))


def _batch(spark, settings, home: Path, folder: Path, similarity) -> Path:
    from dicomlake.catalog.ingest import ingest
    from dicomlake.catalog.warehouse import Warehouse
    from dicomlake.udfs.pipeline import embed

    lake = Settings(home=home)
    try:
        result = ingest(spark, Warehouse(lake.warehouse_path), [str(folder)])
        assert result.balanced
        embedded = embed(spark, lake, similarity)
        assert embedded.embeddings > 0 and embedded.codes_written == embedded.embeddings
    finally:
        Warehouse(settings.warehouse_path).register(spark)  # the shared session's own lake
    return lake.warehouse_path


def _stream(home: Path, files: list[Path], books: Path, backend: ModelBackend) -> Path:
    lake = Settings(home=home)
    ensure_tables(lake)
    shutil.copytree(books, tables.CODEBOOKS.path(lake.warehouse_path))
    (home / "dicomlake.toml").write_text(f'[similarity]\nbackend = "{backend.value}"\n')
    writer = LakeWriter(str(home), str(lake.warehouse_path), StreamSettings(), epoch="test")
    records = []
    for offset, path in enumerate(files):
        data = path.read_bytes()
        _, value, headers = messages.encode(path.name, data, size=len(data),
                                            sha256=messages.sha256_of(data))
        records.append(Record(0, offset, value, headers))
    assert writer.codebook() is not None
    writer.process(records)
    return lake.warehouse_path


@pytest.mark.parametrize("backend", [
    ModelBackend.ONNX,
    pytest.param(ModelBackend.TENSORFLOW, marks=pytest.mark.slow)])
def test_batch_and_stream_write_the_same_rows(spark, settings, tmp_path, backend):
    files = _inputs(tmp_path / "in")
    similarity = SimilaritySettings(backend=backend, code_store=CodeStoreKind.DELTA, m=8,
                                    nlist=0, train_sample=1000)
    batch = _batch(spark, settings, tmp_path / "batch", tmp_path / "in", similarity)
    stream = _stream(tmp_path / "stream", files,
                     tables.CODEBOOKS.path(batch), backend)

    for table in ("instances", "warnings", "embeddings", "codes", "series", "studies"):
        left, right = _read(batch, table), _read(stream, table)
        assert left.num_rows == right.num_rows, table
        assert _comparable(left) == _comparable(right), table
        if table == "embeddings":
            _same_vectors(left, right)
    instances = _read(batch, "instances")
    assert instances.num_rows == 4  # the copy of the CT is a duplicate on both paths
    for table in ("errors", "pixel_errors"):
        kinds = [sorted(_read(lake, table).column("error_kind").to_pylist())
                 for lake in (batch, stream)]
        assert kinds[0] == kinds[1], table
    assert sorted(_read(batch, "errors").column("error_kind").to_pylist()) == [
        "duplicate", "not_dicom"]
    assert _read(stream, "pixel_errors").column("error_kind").to_pylist() == ["no_pixels"]
    info = {(r["model_id"], r["model_version"])
            for r in _read(stream, "embeddings").to_pylist()}
    from dicomlake.udfs.model import model_info

    expected = model_info(backend)
    assert info == {(expected.model_id, expected.version)}
