"""Ingest benchmark: our header-only reader vs the two ways people read DICOM-in-ZIP today.

All three run through Spark on the same files with the same partitioning (one task per
archive, :func:`plan_partitions`), writing to Spark's ``noop`` sink so every column is
computed and nothing else is measured:

* ``dicom``: this project's source: member streamed up to the pixel data, header to JSON.
* zipdcm method: read each whole member, parse everything with pydicom, drop the pixel tags,
  convert to JSON (``to_json_dict``), as the zipdcm data source does.
* extract method: unzip each archive to a temporary folder, then ``dcmread`` each file and
  convert to JSON without pixel tags.

Plus the real-world check (``realworld_*`` keys): the corpus of :mod:`dicomlake.bench.realworld`
(other packages' DICOM files and variants derived from them), packed the ways archives arrive
(a ZIP with UID-named members, a ``.tgz``, a CD-style folder of extensionless files), read
through the ``dicom`` source; ``realworld_false_errors`` counts files pydicom reads that
became error rows (target 0).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pyspark.sql.datasource import DataSource, DataSourceReader

from dicomlake.catalog.dicom_source import DicomInputPartition, DicomOptions, plan_partitions
from dicomlake.catalog.inputs import plan_sources
from dicomlake.catalog.sample import Profile, make_sample
from dicomlake.config import load_settings

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _to_json(ds: Any) -> str:
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            del ds[keyword]
    return json.dumps(ds.to_json_dict())


class _BaselineReader(DataSourceReader):
    def __init__(self, paths: tuple[str, ...],
                 parse: Callable[[str], Iterator[tuple[str, str]]]) -> None:
        self.paths = paths
        self.parse = parse

    def partitions(self) -> list[DicomInputPartition]:
        options = DicomOptions(paths=self.paths)
        return plan_partitions(plan_sources(self.paths), options)

    def read(self, partition: DicomInputPartition) -> Iterator[tuple[str, str]]:
        for piece in partition.slices:
            yield from self.parse(piece.source.path)


def _zipdcm_rows(archive: str) -> Iterator[tuple[str, str]]:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if not info.is_dir() and not info.filename.startswith("__MACOSX/"):
                ds = dcmread(io.BytesIO(zf.read(info)), force=True)
                yield f"{archive}!/{info.filename}", _to_json(ds)


def _extract_rows(archive: str) -> Iterator[tuple[str, str]]:
    with tempfile.TemporaryDirectory(prefix="dicomlake-bench-") as tmp:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        for root, _, files in os.walk(tmp):
            for name in sorted(files):
                ds = dcmread(os.path.join(root, name), force=True)
                yield os.path.join(root, name), _to_json(ds)


class ZipdcmBaselineDataSource(DataSource):
    """The zipdcm method: whole member, full parse, JSON, pixel tags dropped."""

    @classmethod
    def name(cls) -> str:
        return "bench_zipdcm"

    def schema(self) -> str:
        return "path string, meta string"

    def reader(self, schema: Any) -> _BaselineReader:
        return _BaselineReader((self.options["path"],), _zipdcm_rows)


class ExtractBaselineDataSource(ZipdcmBaselineDataSource):
    """Unzip to a temp folder, then parse the files."""

    @classmethod
    def name(cls) -> str:
        return "bench_extract"

    def reader(self, schema: Any) -> _BaselineReader:
        return _BaselineReader((self.options["path"],), _extract_rows)


def sample_dir(files: int, files_per_archive: int) -> Path:
    """A cached sample of 512x512 CT/MR archives (made on first use)."""
    archives = max(1, files // files_per_archive)
    out = load_settings().home / "bench" / f"ctmr-{archives}x{files_per_archive}"
    if len(list(out.glob("*.zip"))) != archives:
        make_sample(out, archives=archives, files=files_per_archive, seed=7,
                    profile=Profile.CTMR)
    return out


def _pack_realworld(files: list[Path], root: Path) -> dict[str, bool]:
    """Lay ``files`` out as archives arrive; returns each input's path -> pydicom reads it."""
    import shutil
    import tarfile
    import warnings

    def readable(path: Path) -> bool:
        data = path.read_bytes()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcmread(io.BytesIO(data), stop_before_pixels=True,
                        force=data[128:132] != b"DICM")
            return True
        except Exception:
            return False

    expected: dict[str, bool] = {}
    cd = root / "cd" / "DICOM"
    cd.mkdir(parents=True)
    zip_path, tar_path = root / "export.zip", root / "archive.tgz"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf, \
            tarfile.open(tar_path, "w:gz") as tf:
        for i, path in enumerate(files):
            uid_name = f"1.2.826.0.1.3680043.8.498.{i}"
            where = i % 3
            if where == 0:
                zf.write(path, f"S{i // 10}/{uid_name}")
                key = f"{zip_path}!/S{i // 10}/{uid_name}"
            elif where == 1:
                tf.add(path, f"study/{path.name}")
                key = f"{tar_path}!/study/{path.name}"
            else:
                shutil.copy(path, cd / uid_name)
                key = str(cd / uid_name)
            expected[key] = readable(path)
    return expected


def realworld(spark: Any) -> dict[str, Any]:
    """The ``realworld_*`` keys: the real-world corpus through the ``dicom`` source."""
    from dicomlake.bench.realworld import make_variants, shipped_files

    try:
        shipped = shipped_files()
    except FileNotFoundError as exc:
        return {"realworld_files": None, "realworld_note": str(exc)}
    with tempfile.TemporaryDirectory(prefix="dicomlake-realworld-") as tmp:
        files = shipped + make_variants(Path(tmp) / "variants")
        expected = _pack_realworld(files, Path(tmp) / "in")
        rows = (spark.read.format("dicom").load(str(Path(tmp) / "in"))
                .select("path", "_error_kind").collect())
    errors = [r["path"] for r in rows if r["_error_kind"] is not None]
    return {
        "realworld_files": len(files),
        "realworld_rows": len(rows) - len(errors),
        "realworld_errors": len(errors),
        "realworld_false_errors": sum(1 for p in errors if expected.get(p)),
        "realworld_unaccounted": len(set(expected) - {r["path"] for r in rows}),
    }


def _timed_noop(spark: Any, fmt: str, path: str) -> float:
    started = time.perf_counter()
    spark.read.format(fmt).load(path).write.format("noop").mode("overwrite").save()
    return time.perf_counter() - started


def run(*, files: int = 2000, files_per_archive: int = 50, rounds: int = 2) -> dict[str, Any]:
    """Run the three readers and return the benchmark keys.

    Each reader is warmed up once (Python worker start-up is not what we measure), then the
    readers run interleaved ``rounds`` times and each keeps its best time, so a burst of
    load on a shared machine hits all of them alike instead of skewing one.
    """
    from dicomlake.console import start_session

    folder = sample_dir(files, files_per_archive)
    n_files = len(plan_sources([str(folder)])) * files_per_archive
    _, spark = start_session()
    spark.dataSource.register(ZipdcmBaselineDataSource)
    spark.dataSource.register(ExtractBaselineDataSource)
    cores = spark.sparkContext.defaultParallelism
    warm = str(sorted(folder.glob("*.zip"))[0])
    formats = ("dicom", "bench_zipdcm", "bench_extract")
    for fmt in formats:
        _timed_noop(spark, fmt, warm)
    seconds = {fmt: float("inf") for fmt in formats}
    for _ in range(rounds):
        for fmt in formats:
            seconds[fmt] = min(seconds[fmt], _timed_noop(spark, fmt, str(folder)))

    def per_core(key: str) -> float:
        return n_files / seconds[key] / cores

    ours = per_core("dicom")
    return {
        **realworld(spark),
        "files": n_files,
        "rounds": rounds,
        "archives": n_files // files_per_archive,
        "cores": cores,
        "seconds": round(seconds["dicom"], 3),
        "files_per_core_second": round(ours, 1),
        "zipdcm_seconds": round(seconds["bench_zipdcm"], 3),
        "zipdcm_files_per_core_second": round(per_core("bench_zipdcm"), 1),
        "extract_seconds": round(seconds["bench_extract"], 3),
        "extract_files_per_core_second": round(per_core("bench_extract"), 1),
        "speedup_vs_zipdcm": round(ours / per_core("bench_zipdcm"), 2),
        "speedup_vs_extract": round(ours / per_core("bench_extract"), 2),
    }
