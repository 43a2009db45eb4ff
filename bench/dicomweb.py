"""DICOMweb and DIMSE benchmark: QIDO-RS search latency, WADO-RS frame rate against file
reads, and C-STORE throughput from dcmtk's ``storescu``.

One process builds a 2,000-instance lake (512x512 CT/MR in ZIPs, the ingest benchmark's
profile) and runs ``dicomlake serve``'s server on loopback; the HTTP client runs in a
separate process (client and server would otherwise share one GIL), over one keep-alive
connection, as a viewer does:

* ``qido_p50_ms``: a 25-study search (``/studies?StudyDate=19000101-&limit=25``), p50.
* ``frames_per_second``: every frame of the largest 512x512 uncompressed CT series, one
  request each (what OHIF sends), in the stored syntax, repeated to at least 300 frames.
* ``frames_vs_file_read``: that rate over pydicom reading the same frames (``dcmread`` +
  ``PixelData``) from the same instances extracted to plain files, in the same run.
* ``cstore_files_per_second``: ``dicomlake dimse``'s server (no stream job: the batch path)
  on a lake of its own beside the first (so the ingest it waits for is the pushed files',
  not embedding the 2,000 instances this bench never embeds), ``storescu`` pushing a folder
  of held-out 512x512 files over one association
  (:func:`dicomlake.bench.cstore.cstore_files_per_second`). The clock stops at
  the last acknowledgement, what a modality waits for; each Success comes after the
  instance's fsync. The batch ingest that follows is not counted there: the bench waits for
  it before shutting down and reports it as ``cstore_ingest_seconds`` (the association's
  end until the rows are in ``dicom.instances``), with ``cstore_ingested`` the pushed
  instances found there.

``load_average`` is the machine's 1-minute load when the run ends (rates only compare
within one run on these shared machines).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

_PASSWORD = "bench password"
QIDO = "/dicomweb/studies?StudyDate=19000101-&limit=25"

_CLIENT = r"""
import json, sys, time, requests
base, user, password = sys.argv[1:4]
s = requests.Session(); s.auth = (user, password)
for line in sys.stdin:
    job = json.loads(line)
    times = []
    for url in job["urls"]:
        t = time.perf_counter()
        r = s.get(base + url, headers={"Accept": job["accept"]})
        times.append(time.perf_counter() - t)
        if r.status_code != 200 or len(r.content) < job["min_bytes"]:
            raise SystemExit(f"{url}: {r.status_code} {r.text[:200]}")
    print(json.dumps(times), flush=True)
"""


def run(*, instances: int = 2000, qido_queries: int = 200, min_frames: int = 300,
        cstore_files: int = 200) -> dict[str, object]:
    """Run the benchmark and return its result object."""
    from dicomlake.catalog import deid
    from dicomlake.catalog.ingest import ingest
    from dicomlake.catalog.sample import Profile, make_sample
    from dicomlake.catalog.warehouse import Warehouse
    from dicomlake.config import Settings, SparkSettings, load_settings
    from dicomlake.session import build_session
    from dicomlake.sql.server import ServerConfig, SqlServer
    from dicomlake.sql.users import Role, UserStore

    base = load_settings()
    per_archive = 50
    with tempfile.TemporaryDirectory(prefix="dicomlake-bench-dicomweb-") as tmp:
        home = Path(tmp)
        settings = Settings(home=home, spark=SparkSettings(
            master=base.spark.master, driver_memory=base.spark.driver_memory,
            conf=base.spark.conf))
        archives = make_sample(home / "samples", archives=max(1, instances // per_archive),
                               files=per_archive, seed=7, profile=Profile.CTMR)
        spark = build_session(settings, app_name="dicomlake-bench-dicomweb")
        try:
            ingest(spark, Warehouse(settings.warehouse_path), [str(p) for p in archives])
            deid.refresh(settings.warehouse_path, home)
            UserStore(home).add("bench", _PASSWORD, Role.CLINICIAN)
            server = SqlServer(settings, ServerConfig(port=0), spark).start().serve_in_thread()
            try:
                result = _measure(server, settings, home, qido_queries, min_frames)
            finally:
                server.shutdown(stop_spark=False)
        finally:
            spark.stop()  # the DIMSE ingest runs its own Spark child: one at a time
        result.update(_measure_cstore(settings, home, cstore_files))
        result["load_average"] = os.getloadavg()[0]
        return result


def _measure(server: Any, settings: Any, home: Path, qido_queries: int,
             min_frames: int) -> dict[str, object]:
    from dicomlake.dicomnet.index import catalog_index
    from dicomlake.sql.users import Role

    index = catalog_index(settings, Role.CLINICIAN)
    index.refresh(force=True)
    series = max((s for s in index.series({"Modality": "CT"})),
                 key=lambda s: s["00201209"]["Value"][0])
    study_uid = series["0020000D"]["Value"][0]
    series_uid = series["0020000E"]["Value"][0]
    refs = [r for r in index.instance_refs(study_uid, series_uid)
            if r.rows == 512 and r.columns == 512
            and r.transfer_syntax_uid in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")]
    frame_urls = [f"/dicomweb/studies/{r.study_instance_uid}/series/{r.series_instance_uid}/"
                  f"instances/{r.sop_instance_uid}/frames/1" for r in refs]
    rounds = -(-min_frames // len(frame_urls))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    client = subprocess.Popen([sys.executable, "-c", _CLIENT, server.url, "bench", _PASSWORD],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert client.stdin is not None and client.stdout is not None

    def ask(urls: list[str], accept: str, min_bytes: int) -> list[float]:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(json.dumps({"urls": urls, "accept": accept,
                                       "min_bytes": min_bytes}) + "\n")
        client.stdin.flush()
        line = client.stdout.readline()
        if not line:
            raise RuntimeError("the benchmark's HTTP client failed (see its error above)")
        return [float(t) for t in json.loads(line)]

    try:
        ask([QIDO] * 20, "application/dicom+json", 2)  # warm-up
        qido = ask([QIDO] * qido_queries, "application/dicom+json", 2)
        accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
        ask(frame_urls, accept, 512 * 512)  # warm-up: the OS page cache, not our cache
        started = time.perf_counter()
        frames = ask(frame_urls * rounds, accept, 512 * 512)
        frames_elapsed = time.perf_counter() - started
    finally:
        client.stdin.close()
        client.wait(timeout=30)
    file_rate = _file_read_rate([r.path for r in refs], home / "extracted", len(frames))
    rate = len(frames) / frames_elapsed
    return {
        "instances": len(index.instances({})),
        "studies": len(index.studies({})),
        "qido_p50_ms": round(statistics.median(qido) * 1000, 2),
        "qido_p95_ms": round(sorted(qido)[int(0.95 * (len(qido) - 1))] * 1000, 2),
        "qido_studies_returned": 25,
        "frames": len(frames),
        "series_instances": len(frame_urls),
        "frames_per_second": round(rate, 1),
        "file_read_frames_per_second": round(file_rate, 1),
        "frames_vs_file_read": round(rate / file_rate, 3),
    }


def _file_read_rate(paths: list[str], folder: Path, count: int) -> float:
    """Frames per second pydicom reads the same instances from extracted files."""
    from pydicom import dcmread

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for n, path in enumerate(paths):
        archive, member = path.split("!/", 1)
        target = folder / f"{n:05d}.dcm"
        with zipfile.ZipFile(archive) as zf:
            target.write_bytes(zf.read(member))
        files.append(target)
    for f in files:  # warm the page cache, as the server's reads were
        dcmread(f).PixelData  # noqa: B018
    started = time.perf_counter()
    done = 0
    while done < count:
        for f in files:
            if len(dcmread(f).PixelData) < 512 * 512:
                raise RuntimeError(f"{f}: no 512x512 frame")
            done += 1
            if done >= count:
                break
    return done / (time.perf_counter() - started)


def _measure_cstore(settings: Any, home: Path, count: int) -> dict[str, object]:
    """C-STORE of ``count`` held-out 512x512 files into a lake under ``home``, then their
    batch ingest (and embedding)."""
    import dataclasses

    from deltalake import DeltaTable
    from pydicom import dcmread

    from dicomlake.bench.cstore import cstore_files_per_second
    from dicomlake.catalog.sample import Profile, make_sample
    from dicomlake.catalog.warehouse import Warehouse
    from dicomlake.dicomnet.dimse import DimseConfig, DimseServer

    per_archive = 50
    archives = make_sample(home / "cstore-samples", archives=-(-count // per_archive),
                           files=per_archive, seed=8, profile=Profile.CTMR)
    folder = home / "cstore"
    folder.mkdir()
    files: list[Path] = []
    for archive in archives:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist()[:count - len(files)]:
                target = folder / f"{len(files):05d}.dcm"
                target.write_bytes(zf.read(member))
                files.append(target)
    sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    lake = dataclasses.replace(settings, home=home / "dimse-lake", warehouse=None)
    server = DimseServer(lake, DimseConfig(port=0)).start()
    try:
        host, port = server.address
        rate = cstore_files_per_second(files, host=host, port=port,
                                       ae_title=server.config.ae_title)
    finally:
        pushed = time.perf_counter()
        server.shutdown()  # waits for the association's end, then for its batch ingest
    ingest_seconds = time.perf_counter() - pushed
    path = str(Warehouse(lake.warehouse_path).table_path("dicom", "instances"))
    found = set(DeltaTable(path).to_pyarrow_table(columns=["sop_instance_uid"])
                .column("sop_instance_uid").to_pylist()) \
        if DeltaTable.is_deltatable(path) else set()  # no table: the ingest failed (logged)
    return {
        "cstore_files": len(files),
        "cstore_files_per_second": round(rate, 1),
        "cstore_ingest_seconds": round(ingest_seconds, 1),
        "cstore_ingested": len(sent & found),
    }
