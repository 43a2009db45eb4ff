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

The peer, in the same run: where Debian's ``orthanc`` and ``orthanc-dicomweb`` are
installed, the same ZIP members are loaded into a private Orthanc 1.10 with its DICOMweb
plugin (:mod:`dicomlake.bench.orthanc`, which says how it is configured and why) after our
server has stopped, and the same client code runs the same QIDO search under Orthanc's
``/dicom-web`` root and fetches the same series' frames, one request each, stored syntax, the
same number of times. ``orthanc_qido_p50_ms`` and ``orthanc_frames_per_second`` are its
figures; ``qido_vs_orthanc`` and ``frames_vs_orthanc`` are ours over theirs as speed ratios,
so above 1 means we are faster in both: ``orthanc_qido_p50_ms / qido_p50_ms`` (latency: their
time over ours) and ``frames_per_second / orthanc_frames_per_second``. ``orthanc_version``
names the server and plugin versions measured. Without Orthanc these keys are null and
``orthanc`` says why; nothing is estimated.

Both servers' answers are checked on the warm-up round before anything is timed: the search
must return the lake's first 25 studies (``qido_studies_returned``: fewer only when the lake
holds fewer) and every frame response must be one part of exactly rows x columns x samples x
bytes-per-sample bytes, so a broken setup fails the bench instead of timing error pages.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PASSWORD = "bench password"
QIDO_LIMIT = 25
QIDO_SEARCH = f"/studies?StudyDate=19000101-&limit={QIDO_LIMIT}"
"""The 25-study search, under a server's DICOMweb root."""
OURS_ROOT = "/dicomweb"
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
ORTHANC_KEYS = ("orthanc_qido_p50_ms", "orthanc_frames_per_second", "qido_vs_orthanc",
                "frames_vs_orthanc", "orthanc_version")
"""Present in every result; null (with ``orthanc`` giving the reason) without Orthanc."""

_CLIENT = r"""
import json, sys, time, requests

def single_part_length(r):
    params = [p.strip() for p in r.headers.get("Content-Type", "").split(";")]
    boundary = next((p[9:].strip('"') for p in params if p.lower().startswith("boundary=")),
                    None)
    if boundary is None:
        raise SystemExit(f"{r.url}: not multipart: {r.headers.get('Content-Type')}")
    parts = [p for p in r.content.split(b"--" + boundary.encode())[1:]
             if not p.startswith(b"--")]
    if len(parts) != 1 or b"\r\n\r\n" not in parts[0]:
        raise SystemExit(f"{r.url}: {len(parts)} parts, expected one frame")
    data = parts[0].split(b"\r\n\r\n", 1)[1]
    return len(data) - 2 if data.endswith(b"\r\n") else len(data)

base, user, password = sys.argv[1:4]
s = requests.Session()
if user:
    s.auth = (user, password)
for line in sys.stdin:
    job = json.loads(line)
    times = []
    for n, url in enumerate(job["urls"]):
        t = time.perf_counter()
        r = s.get(base + url, headers={"Accept": job["accept"]})
        times.append(time.perf_counter() - t)
        if r.status_code != 200 or len(r.content) < job["min_bytes"]:
            raise SystemExit(f"{url}: {r.status_code} {r.text[:200]}")
        if job.get("entries") is not None and len(r.json()) != job["entries"]:
            raise SystemExit(f"{url}: {len(r.json())} entries, expected {job['entries']}")
        if job.get("part_bytes") is not None:
            got = single_part_length(r)
            if got != job["part_bytes"][n]:
                raise SystemExit(f"{url}: a {got}-byte frame, expected {job['part_bytes'][n]}")
    print(json.dumps(times), flush=True)
"""


@dataclass(frozen=True)
class _Workload:
    """What every server is asked, and what its answers must hold: the series' frame paths
    under a DICOMweb root with each frame's exact size in bytes, the rounds over them, the
    studies the search must return, and the instances the lake holds."""

    frame_paths: list[str]
    frame_bytes: list[int]
    rounds: int
    qido_studies: int
    instances: int


@dataclass(frozen=True)
class OrthancFigures:
    """Orthanc's side of the comparison, measured in the same run."""

    qido_p50_ms: float
    frames_per_second: float
    version: str


class _Client:
    """The HTTP client process (one keep-alive ``requests`` session), fed jobs one JSON line
    at a time; a separate process so that it never shares the server's GIL."""

    def __init__(self, base: str, user: str = "", password: str = "") -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self._process = subprocess.Popen([sys.executable, "-c", _CLIENT, base, user, password],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, env=env)

    def ask(self, urls: list[str], accept: str, *, min_bytes: int,
            entries: int | None = None, part_bytes: list[int] | None = None) -> list[float]:
        """Each request's seconds, after the client checked every answer."""
        stdin, stdout = self._process.stdin, self._process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps({"urls": urls, "accept": accept, "min_bytes": min_bytes,
                                "entries": entries, "part_bytes": part_bytes}) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError("the benchmark's HTTP client failed (see its error above)")
        return [float(t) for t in json.loads(line)]

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(timeout=30)


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
                result, work = _measure(server, settings, home, qido_queries, min_frames)
            finally:
                server.shutdown(stop_spark=False)
        finally:
            spark.stop()  # the DIMSE ingest runs its own Spark child: one at a time
        result.update(compare_with_orthanc(
            qido_p50_ms=result["qido_p50_ms"], frames_per_second=result["frames_per_second"],
            theirs=_measure_orthanc(archives, work, qido_queries)))
        result.update(_measure_cstore(settings, home, cstore_files))
        result["load_average"] = os.getloadavg()[0]
        return result


def _timed_dicomweb(client: _Client, root: str, work: _Workload,
                    qido_queries: int) -> tuple[list[float], int, float]:
    """The QIDO timings, the frames fetched and their seconds, from one server whose
    DICOMweb root is ``root``: the same requests in the same order for every server."""
    search = root + QIDO_SEARCH
    urls = [root + p for p in work.frame_paths]
    client.ask([search] * 20, "application/dicom+json", min_bytes=2,  # warm-up
               entries=work.qido_studies)
    qido = client.ask([search] * qido_queries, "application/dicom+json", min_bytes=2)
    # warm-up: the OS page cache, not our cache; and the check of every frame's size
    client.ask(urls, FRAME_ACCEPT, min_bytes=min(work.frame_bytes),
               part_bytes=work.frame_bytes)
    started = time.perf_counter()
    frames = client.ask(urls * work.rounds, FRAME_ACCEPT, min_bytes=min(work.frame_bytes))
    return qido, len(frames), time.perf_counter() - started


def _measure(server: Any, settings: Any, home: Path, qido_queries: int,
             min_frames: int) -> tuple[dict[str, Any], _Workload]:
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
    work = _Workload(
        frame_paths=[f"/studies/{r.study_instance_uid}/series/{r.series_instance_uid}/"
                     f"instances/{r.sop_instance_uid}/frames/1" for r in refs],
        frame_bytes=[512 * 512 * r.samples_per_pixel * ((r.bits_allocated or 8) // 8)
                     for r in refs],
        rounds=-(-min_frames // len(refs)),
        qido_studies=min(QIDO_LIMIT, len(index.studies({}))),
        instances=len(index.instances({})))
    with _Client(server.url, "bench", _PASSWORD) as client:
        qido, frames, frames_elapsed = _timed_dicomweb(client, OURS_ROOT, work, qido_queries)
    file_rate = _file_read_rate([r.path for r in refs], home / "extracted", frames)
    rate = frames / frames_elapsed
    return {
        "instances": work.instances,
        "studies": len(index.studies({})),
        "qido_p50_ms": round(statistics.median(qido) * 1000, 2),
        "qido_p95_ms": round(sorted(qido)[int(0.95 * (len(qido) - 1))] * 1000, 2),
        "qido_studies_returned": work.qido_studies,
        "frames": frames,
        "series_instances": len(refs),
        "frames_per_second": round(rate, 1),
        "file_read_frames_per_second": round(file_rate, 1),
        "frames_vs_file_read": round(rate / file_rate, 3),
    }, work


def _measure_orthanc(archives: list[Path], work: _Workload,
                     qido_queries: int) -> OrthancFigures | str:
    """Orthanc's QIDO p50 and frame rate on the same instances, or why it was not run.

    Raises:
        RuntimeError: Orthanc is installed but failed: it refused a file, holds another
            number of instances than the lake, or answered a request wrongly.
    """
    from dicomlake.bench.orthanc import DICOMWEB_ROOT, OrthancServer, find_orthanc

    install = find_orthanc()
    if isinstance(install, str):
        return install

    def members() -> Iterator[bytes]:
        for archive in archives:
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    yield zf.read(name)

    with OrthancServer(install) as orthanc:
        held = orthanc.load(members())
        if held != work.instances:
            raise RuntimeError(f"Orthanc holds {held} instances after loading the lake's "
                               f"{work.instances}; its figures would not be of the same data")
        version = (f"Orthanc {orthanc.get_json('/system')['Version']}, DICOMweb plugin "
                   f"{orthanc.get_json('/plugins/dicom-web')['Version']}")
        with _Client(orthanc.url) as client:
            qido, frames, elapsed = _timed_dicomweb(client, DICOMWEB_ROOT, work, qido_queries)
    return OrthancFigures(qido_p50_ms=round(statistics.median(qido) * 1000, 2),
                          frames_per_second=round(frames / elapsed, 1), version=version)


def compare_with_orthanc(*, qido_p50_ms: float, frames_per_second: float,
                         theirs: OrthancFigures | str) -> dict[str, object]:
    """The Orthanc keys of the result, given our two figures: its figures and ours over
    theirs as speed ratios (above 1: we are faster), or, when ``theirs`` is the reason
    Orthanc was not measured, every key null and ``orthanc`` holding that reason."""
    if isinstance(theirs, str):
        return {**dict.fromkeys(ORTHANC_KEYS), "orthanc": theirs}
    return {
        "orthanc_qido_p50_ms": theirs.qido_p50_ms,
        "orthanc_frames_per_second": theirs.frames_per_second,
        "qido_vs_orthanc": round(theirs.qido_p50_ms / qido_p50_ms, 3),
        "frames_vs_orthanc": round(frames_per_second / theirs.frames_per_second, 3),
        "orthanc_version": theirs.version,
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
