"""DICOMweb and DIMSE benchmark: QIDO-RS search latency, WADO-RS frame rate against file
reads, and C-STORE throughput from dcmtk's ``storescu``.

One process builds a 2,000-instance lake (512x512 CT/MR in ZIPs, the ingest benchmark's
profile) and runs ``dicomlake serve``'s server on loopback; the HTTP client runs in a
separate process (client and server would otherwise share one GIL), over one keep-alive
connection, as a viewer does. The client is the standard library's ``http.client``:
``requests`` reads a body in 10 KiB steps and spent ~4 ms of each 512 KB frame in the client
(153 frames/s against the same server that ``http.client`` read at 414/s), so it measured
itself rather than the servers:

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
plugin (:mod:`dicomlake.bench.orthanc`, which says how it is configured and why) beside our
server, and a second process running the same client code sends the same QIDO search under
Orthanc's ``/dicom-web`` root and fetches the same series' frames, one request each, stored
syntax, the same number of times. The two servers take turns (the searches in ten slices, the
frames one pass over the series at a time, who goes first alternating), so a load change on
these shared machines falls on both alike. ``orthanc_qido_p50_ms`` and
``orthanc_frames_per_second`` are its figures; ``qido_vs_orthanc`` and ``frames_vs_orthanc``
are ours over theirs as speed ratios, so above 1 means we are faster in both:
``orthanc_qido_p50_ms / qido_p50_ms`` (latency: their time over ours) and
``frames_per_second / orthanc_frames_per_second``. ``orthanc_version`` names the server and
plugin versions measured. Without Orthanc these keys are null and
``orthanc`` says why; nothing is estimated.

Both servers' answers are checked on the warm-up round before anything is timed: the search
must return 25 studies (``qido_studies_returned``: fewer only when the lake holds fewer) and
every frame response must be one part of exactly rows x columns x samples x bytes-per-sample
bytes, so a broken setup fails the bench instead of timing error pages.

``load_average`` is the machine's 1-minute load when the run ends (rates only compare
within one run on these shared machines).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PASSWORD = "bench password"
QIDO_LIMIT = 25
QIDO_SEARCH = f"/studies?StudyDate=19000101-&limit={QIDO_LIMIT}"
"""The 25-study search, under a server's DICOMweb root."""
OURS_ROOT = "/dicomweb"
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
_QIDO_SLICES = 10
ORTHANC_KEYS = ("orthanc_qido_p50_ms", "orthanc_frames_per_second", "qido_vs_orthanc",
                "frames_vs_orthanc", "orthanc_version")
"""Present in every result; null (with ``orthanc`` giving the reason) without Orthanc."""

_CLIENT = r"""
import base64, http.client, json, sys, time, urllib.parse

def single_part_length(url, content_type, body):
    params = [p.strip() for p in content_type.split(";")]
    boundary = next((p[9:].strip('"') for p in params if p.lower().startswith("boundary=")),
                    None)
    if boundary is None:
        raise SystemExit(f"{url}: not multipart: {content_type}")
    parts = [p for p in body.split(b"--" + boundary.encode())[1:] if not p.startswith(b"--")]
    if len(parts) != 1 or b"\r\n\r\n" not in parts[0]:
        raise SystemExit(f"{url}: {len(parts)} parts, expected one frame")
    data = parts[0].split(b"\r\n\r\n", 1)[1]
    return len(data) - 2 if data.endswith(b"\r\n") else len(data)

base, user, password = sys.argv[1:4]
where = urllib.parse.urlsplit(base)
connection = http.client.HTTPConnection(where.hostname, where.port)
auth = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        } if user else {}
for line in sys.stdin:
    job = json.loads(line)
    times = []
    for n, url in enumerate(job["urls"]):
        t = time.perf_counter()
        connection.request("GET", where.path + url, headers={"Accept": job["accept"], **auth})
        response = connection.getresponse()
        body = response.read()
        times.append(time.perf_counter() - t)
        if response.status != 200 or len(body) < job["min_bytes"]:
            raise SystemExit(f"{url}: {response.status} {body[:200]!r}")
        if job.get("entries") is not None and len(json.loads(body)) != job["entries"]:
            raise SystemExit(f"{url}: {len(json.loads(body))} entries, "
                             f"expected {job['entries']}")
        if job.get("part_bytes") is not None:
            got = single_part_length(url, response.getheader("Content-Type", ""), body)
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
    """The HTTP client process (one keep-alive ``http.client`` connection), fed jobs one JSON line
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
                result = _measure(server, settings, home, archives, qido_queries, min_frames)
            finally:
                server.shutdown(stop_spark=False)
        finally:
            spark.stop()  # the DIMSE ingest runs its own Spark child: one at a time
        result.update(_measure_cstore(settings, home, cstore_files))
        result["load_average"] = os.getloadavg()[0]
        return result


@dataclass
class _Timings:
    """One server's measured requests: each search's seconds, frames fetched, their seconds."""

    qido: list[float] = field(default_factory=list)
    frames: int = 0
    frame_seconds: float = 0.0


def _timed_dicomweb(targets: list[tuple[_Client, str]], work: _Workload,
                    qido_queries: int) -> list[_Timings]:
    """The same requests to every server (a client and its DICOMweb root), taking turns: the
    searches in slices and the frames one pass over the series at a time, the first server
    changing every turn, so a load change on this shared machine falls on all alike."""
    timings = [_Timings() for _ in targets]
    for client, root in targets:  # warm-ups, which also check the answers
        client.ask([root + QIDO_SEARCH] * 20, "application/dicom+json", min_bytes=2,
                   entries=work.qido_studies)
        # the OS page cache, not a server's cache; and every frame's exact size
        client.ask([root + p for p in work.frame_paths], FRAME_ACCEPT,
                   min_bytes=min(work.frame_bytes), part_bytes=work.frame_bytes)
    slices = [qido_queries // _QIDO_SLICES + (n < qido_queries % _QIDO_SLICES)
              for n in range(_QIDO_SLICES)]
    for turn, count in enumerate(slices):
        for k in _turn_order(turn, len(targets)):
            client, root = targets[k]
            timings[k].qido += client.ask([root + QIDO_SEARCH] * count,
                                          "application/dicom+json", min_bytes=2)
    for turn in range(work.rounds):
        for k in _turn_order(turn, len(targets)):
            client, root = targets[k]
            started = time.perf_counter()
            timings[k].frames += len(client.ask([root + p for p in work.frame_paths],
                                                FRAME_ACCEPT, min_bytes=min(work.frame_bytes)))
            timings[k].frame_seconds += time.perf_counter() - started
    return timings


def _turn_order(turn: int, count: int) -> list[int]:
    return [(turn + k) % count for k in range(count)]


def _measure(server: Any, settings: Any, home: Path, archives: list[Path], qido_queries: int,
             min_frames: int) -> dict[str, object]:
    """Our server's figures (and Orthanc's, with the ratios, or the reason it is absent)."""
    from dicomlake.bench.orthanc import DICOMWEB_ROOT, OrthancServer, find_orthanc
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
    install = find_orthanc()
    with contextlib.ExitStack() as stack:
        targets = [(stack.enter_context(_Client(server.url, "bench", _PASSWORD)), OURS_ROOT)]
        if not isinstance(install, str):
            orthanc = stack.enter_context(OrthancServer(install))
            version = _load_orthanc(orthanc, archives, work)
            targets.append((stack.enter_context(_Client(orthanc.url)), DICOMWEB_ROOT))
        timings = _timed_dicomweb(targets, work, qido_queries)
    ours = timings[0]
    file_rate = _file_read_rate([r.path for r in refs], home / "extracted", ours.frames)
    rate = ours.frames / ours.frame_seconds
    result: dict[str, object] = {
        "instances": work.instances,
        "studies": len(index.studies({})),
        "qido_p50_ms": _p50_ms(ours.qido),
        "qido_p95_ms": round(sorted(ours.qido)[int(0.95 * (len(ours.qido) - 1))] * 1000, 2),
        "qido_studies_returned": work.qido_studies,
        "frames": ours.frames,
        "series_instances": len(refs),
        "frames_per_second": round(rate, 1),
        "file_read_frames_per_second": round(file_rate, 1),
        "frames_vs_file_read": round(rate / file_rate, 3),
    }
    theirs = install if isinstance(install, str) else OrthancFigures(
        qido_p50_ms=_p50_ms(timings[1].qido),
        frames_per_second=round(timings[1].frames / timings[1].frame_seconds, 1),
        version=version)
    result.update(compare_with_orthanc(qido_p50_ms=_p50_ms(ours.qido),
                                       frames_per_second=round(rate, 1), theirs=theirs))
    return result


def _p50_ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1000, 2)


def _load_orthanc(orthanc: Any, archives: list[Path], work: _Workload) -> str:
    """Load every member of the lake's archives into ``orthanc`` and return its version.

    Raises:
        RuntimeError: it refused a file or holds another number of instances than the
            lake (its figures would not be of the same data).
    """
    def members() -> Iterator[bytes]:
        for archive in archives:
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    yield zf.read(name)

    held = orthanc.load(members())
    if held != work.instances:
        raise RuntimeError(f"Orthanc holds {held} instances after loading the lake's "
                           f"{work.instances}; its figures would not be of the same data")
    return (f"Orthanc {orthanc.get_json('/system')['Version']}, DICOMweb plugin "
            f"{orthanc.get_json('/plugins/dicom-web')['Version']}")


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
