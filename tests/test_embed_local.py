"""`dicomlake embed` without Spark (the path a GPU runs) writes the rows the Spark tasks write.

One small lake (CT, a 10-frame MR, JPEG 2000 US, JPEG RGB, an RT plan without pixels and an MR
cut inside its pixel data after the ingest) is ingested once and copied; the Spark path embeds
one copy, :func:`embed_instances_local` others with the CPU model (ONNX Runtime), and their
tables are compared row for row. The CUDA run end to end is tested where torch sees a GPU;
elsewhere ``device = "cuda"`` must fail with what to install.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from click.testing import CliRunner
from deltalake import DeltaTable, write_deltalake

from dicomlake.catalog import tables
from dicomlake.catalog.ingest import ingest
from dicomlake.catalog.sample import find_template
from dicomlake.catalog.warehouse import Warehouse
from dicomlake.cli import main
from dicomlake.config import Settings
from dicomlake.udfs import register_functions
from dicomlake.udfs.features import FeatureModel
from dicomlake.udfs.pipeline import embed, embed_instances, embed_instances_local
from dicomlake.udfs.settings import CodeStoreKind, Device, SimilaritySettings
from dicomlake.udfs.torch_model import FP32_MIN_COSINE


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


CUDA = _cuda()
NO_CUDA = ("no CUDA device (torch is missing or torch.cuda.is_available() is False): the "
           "end-to-end GPU embed runs on GPU machines only")
FILES = {"ct/CT_small.dcm": "CT_small.dcm", "mr/broken.dcm": "MR_small.dcm",
         "mr/multiframe.dcm": "emri_small.dcm", "us/US1_J2KR.dcm": "US1_J2KR.dcm",
         "rt/rtplan.dcm": "rtplan.dcm", "sc/rgb.dcm": "SC_rgb_jpeg_gdcm.dcm"}
BROKEN = "mr/broken.dcm"
"""Ingested whole, then cut inside its pixel data: the header is fine, the pixels are not."""
SIM = SimilaritySettings(code_store=CodeStoreKind.DELTA, m=8, nlist=0, train_sample=1000)


@dataclass(frozen=True)
class Embedded:
    """A lake the Spark path embedded, and what ``embed_instances`` returned."""

    warehouse: Path
    counts: tuple[int, int, int]


@pytest.fixture(scope="module")
def base(spark, tmp_path_factory) -> Path:
    """The ingested, not embedded, lake's warehouse (copied by each test that embeds)."""
    root = tmp_path_factory.mktemp("embed-local")
    for rel, name in FILES.items():
        (root / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(find_template(name), root / "in" / rel)
    lake = Settings(home=root / "base")
    result = ingest(spark, Warehouse(lake.warehouse_path), [str(root / "in")], register=False)
    assert result.balanced and result.rows_written == len(FILES)
    whole = (root / "in" / BROKEN).read_bytes()
    (root / "in" / BROKEN).write_bytes(whole[:len(whole) * 2 // 3])
    return lake.warehouse_path


def _copy(base: Path, home: Path) -> Settings:
    lake = Settings(home=home)
    shutil.copytree(base, lake.warehouse_path)
    return lake


@pytest.fixture(scope="module")
def by_spark(spark, settings, base, tmp_path_factory) -> Embedded:
    lake = _copy(base, tmp_path_factory.mktemp("spark") / "home")
    Warehouse(lake.warehouse_path).register(spark)
    try:
        counts = embed_instances(spark, lake, SIM)
    finally:
        Warehouse(settings.warehouse_path).register(spark)  # the shared session's own lake
    assert counts[1] > counts[0] - counts[2] > 0  # the multi-frame MR gives 10 rows
    return Embedded(lake.warehouse_path, counts)


def _read(warehouse: Path, spec: tables.TableSpec) -> pa.Table:
    return DeltaTable(str(spec.path(warehouse))).to_pyarrow_table()


def _vectors(rows: pa.Table) -> dict[tuple[str, int], np.ndarray]:
    return {(r["sop_instance_uid"], r["frame"]): np.asarray(r["embedding"], np.float32)
            for r in rows.to_pylist()}


def _same_except_vectors(expected: Path, got: Path) -> tuple[pa.Table, pa.Table]:
    """Both lakes' embeddings (checked equal but for the vectors) and equal pixel errors."""
    def rows(table: pa.Table, drop: set[str]) -> list[dict]:
        out = [{k: v for k, v in r.items() if k not in drop} for r in table.to_pylist()]
        return sorted(out, key=lambda r: (r["sop_instance_uid"], r.get("frame", 0)))

    left, right = _read(expected, tables.EMBEDDINGS), _read(got, tables.EMBEDDINGS)
    assert rows(right, {"embedding", "embedded_at"}) == rows(left, {"embedding", "embedded_at"})
    errors = [rows(_read(lake, tables.PIXEL_ERRORS), {"embedded_at"})
              for lake in (expected, got)]
    assert errors[1] == errors[0]
    assert sorted(e["error_kind"] for e in errors[1]) == ["no_pixels", "undecodable"]
    assert any(e["path"].endswith(BROKEN) for e in errors[1])
    return left, right


def _same_rows(expected: Path, got: Path) -> None:
    """Every row equal, vectors to 1e-5 (the same model, one thread, as the Spark tasks)."""
    left, right = _same_except_vectors(expected, got)
    a, b = _vectors(left), _vectors(right)
    assert a.keys() == b.keys()
    for key, vector in a.items():
        np.testing.assert_allclose(b[key], vector, rtol=1e-5, atol=1e-5, err_msg=str(key))


def _versions(warehouse: Path) -> list[int]:
    return [DeltaTable(str(spec.path(warehouse))).version()
            for spec in (tables.EMBEDDINGS, tables.PIXEL_ERRORS)]


@pytest.fixture(scope="module")
def cpu_model() -> FeatureModel:
    return FeatureModel("onnx", threads=1, device=Device.CPU)


def test_local_path_writes_the_spark_rows_once(spark, settings, base, by_spark, cpu_model,
                                               tmp_path):
    lake = _copy(base, tmp_path / "local")
    planned: list[int] = []
    done: list[int] = []
    counts = embed_instances_local(lake, SIM, cpu_model, workers=1, progress=done.append,
                                   on_plan=planned.append)
    assert counts == by_spark.counts
    assert planned == [counts[0]] and sum(done) == counts[0]
    _same_rows(by_spark.warehouse, lake.warehouse_path)
    assert _versions(lake.warehouse_path) == [0, 0]  # one commit per table
    # a second run finds nothing to do and commits nothing
    assert embed_instances_local(lake, SIM, cpu_model, workers=0,
                                 on_plan=planned.append) == (0, 0, 0)
    assert planned[-1] == 0 and _versions(lake.warehouse_path) == [0, 0]
    # Spark reads the files as it reads its own (the codes step does)
    Warehouse(lake.warehouse_path).register(spark)
    try:
        seen = spark.sql("SELECT count(*) AS n, sum(size(embedding)) AS d FROM "
                         "dicom.embeddings").first()
    finally:
        Warehouse(settings.warehouse_path).register(spark)
    assert (seen.n, seen.d) == (counts[1], counts[1] * cpu_model.info.dim)


def test_a_partly_embedded_lake_gets_the_rest(base, by_spark, cpu_model, tmp_path):
    """Rows committed by an earlier run (the Spark path's here) are kept, never redone."""
    lake = _copy(base, tmp_path / "partial")
    uids = [sorted(set(_read(by_spark.warehouse, spec).column("sop_instance_uid").to_pylist()))
            for spec in (tables.EMBEDDINGS, tables.PIXEL_ERRORS)]
    kept = pa.array(uids[0][:2] + uids[1][:1])  # two images and one pixel error
    for spec in (tables.EMBEDDINGS, tables.PIXEL_ERRORS):
        rows = _read(by_spark.warehouse, spec)
        mine = rows.filter(pc.is_in(rows.column("sop_instance_uid"), value_set=kept))
        write_deltalake(str(spec.path(lake.warehouse_path)), mine.cast(spec.schema),
                        mode="append")
    planned: list[int] = []
    counts = embed_instances_local(lake, SIM, cpu_model, workers=0, on_plan=planned.append)
    assert planned == [by_spark.counts[0] - 3] == [counts[0]]
    _same_rows(by_spark.warehouse, lake.warehouse_path)


def test_an_interrupted_run_commits_nothing_and_the_next_does_it_all(base, by_spark, cpu_model,
                                                                    tmp_path):
    lake = _copy(base, tmp_path / "interrupted")
    small = replace(SIM, batch_size=2)  # several batches: files are written before the stop

    class Stopped(Exception):
        pass

    def stop(images: int) -> None:
        raise Stopped

    with pytest.raises(Stopped):
        embed_instances_local(lake, small, cpu_model, workers=1, progress=stop)
    for spec in (tables.EMBEDDINGS, tables.PIXEL_ERRORS):
        folder = spec.path(lake.warehouse_path)
        assert not DeltaTable.is_deltatable(str(folder))
        assert not list(folder.glob("*.parquet"))  # the uncommitted files are gone too
    assert embed_instances_local(lake, small, cpu_model, workers=1) == by_spark.counts
    _same_rows(by_spark.warehouse, lake.warehouse_path)


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA device: device = cuda works here")
def test_cli_embed_on_cuda_without_a_gpu_says_what_to_install(spark, settings, base, tmp_path,
                                                              monkeypatch):
    lake = _copy(base, tmp_path / "cli")
    for name in ("DICOMLAKE_CONFIG", "DICOMLAKE_EMBED_DEVICE", "DICOMLAKE_EMBED_BACKEND",
                 "DICOMLAKE_EMBED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    (lake.home / "dicomlake.toml").write_text('[similarity]\ndevice = "cuda"\n')
    monkeypatch.setenv("DICOMLAKE_HOME", str(lake.home))
    try:
        result = CliRunner().invoke(main, ["embed"])
    finally:
        Warehouse(settings.warehouse_path).register(spark)
        register_functions(spark, settings)
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert 'error: [similarity] device = "cuda"' in message
    assert "pip install dicomlake[gpu]" in message and 'set device = "cpu"' in message
    assert not (tables.EMBEDDINGS.path(lake.warehouse_path) / "_delta_log").exists()


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_embed_on_cuda_gives_the_cpu_vectors(spark, settings, base, by_spark, tmp_path):
    """The whole `embed` with device = cuda: the Spark-free path, then codebook and codes."""
    lake = _copy(base, tmp_path / "cuda")
    Warehouse(lake.warehouse_path).register(spark)
    try:
        result = embed(spark, lake, replace(SIM, device=Device.CUDA))
    finally:
        Warehouse(settings.warehouse_path).register(spark)
    assert (result.instances, result.embeddings, result.pixel_errors) == by_spark.counts
    assert result.codes_written == result.embeddings and result.trained
    left, right = _same_except_vectors(by_spark.warehouse, lake.warehouse_path)
    cpu, gpu = _vectors(left), _vectors(right)
    assert cpu.keys() == gpu.keys()
    for key, vector in cpu.items():
        cosine = float(vector @ gpu[key] / (np.linalg.norm(vector) * np.linalg.norm(gpu[key])))
        assert cosine >= FP32_MIN_COSINE, (key, cosine)
