"""``dicomlake bench stream``: upload -> searchable latency through the real stream.

A private lake, the embedded broker and the Flink job (``.venv-flink``). A warm-up batch
lets the job train the first PQ codebook and starts the session's ``image_knn`` workers (a
one-time cost of the session, like starting it); then images are uploaded one by one at a
steady rate. Freshness of an image = from just before its send until it is both a row of
``dicom.instances`` (delta-rs) and returned by ``image_knn`` (Spark SQL, the user's path).
``lost``/``duplicated`` compare the uploaded SOPInstanceUIDs with the rows at the end.

Uploads run on their own thread: when the checking loop also sent, every Spark query held
back the uploads due meanwhile, so images arrived in bursts instead of at the stated rate,
and each waited for the job to work through the whole burst.
"""

from __future__ import annotations

import io
import statistics
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any


def _uid(data: bytes) -> str:
    from pydicom import dcmread

    return str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def _column(settings: Any, table: str, column: str) -> list[Any]:
    from deltalake import DeltaTable

    from dicomlake.catalog import tables
    from dicomlake.catalog.snapshots import read_table

    path = tables.spec(table).path(settings.warehouse_path)
    return read_table(DeltaTable(str(path)), [column]).column(column).to_pylist()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _knn(spark: Any, uids: list[str]) -> list[Any]:
    """``image_knn`` of each uid as a query, as a user would ask (rows: uid, neighbour)."""
    values = ", ".join(f"('{u}')" for u in uids)
    return spark.sql(
        f"SELECT q.uid, n.sop_instance_uid FROM VALUES {values} AS q(uid), "
        "LATERAL image_knn(query => q.uid, k => 5) n").collect()


def run(images: int = 100, rate: float = 4.0, warmup: int = 32, burst: int = 100,
        ) -> dict[str, object]:
    from dicomlake.catalog.sample import Profile, make_sample
    from dicomlake.config import Settings, SparkSettings, load_settings
    from dicomlake.session import build_session
    from dicomlake.streaming import runner
    from dicomlake.streaming.producer import Uploader
    from dicomlake.streaming.settings import StreamSettings, load_stream

    tmp = Path(tempfile.mkdtemp(prefix="dicomlake-bench-stream-"))
    settings = Settings(home=tmp / "home",
                        spark=SparkSettings(master="local[2]", driver_memory="2g"))
    # the user's Flink interpreter (config, .venv-flink, or `dicomlake stream setup`'s)
    stream = StreamSettings(flink_python=load_stream(load_settings()).flink_python,
                            min_train=warmup)
    archives = make_sample(tmp / "data", archives=1, files=warmup + images + burst, seed=21,
                           profile=Profile.CTMR, workers=1)
    with zipfile.ZipFile(archives[0]) as zf:
        files = [(i.filename, zf.read(i)) for i in zf.infolist() if not i.is_dir()]
    spark = None
    try:
        runner.start(settings, stream)
        spark = build_session(settings, app_name="dicomlake-bench-stream")
        with Uploader(settings, stream) as up:
            for name, data in files[:warmup]:
                up.send(name, data)
            up._producer.flush()
            warm = {_uid(d) for _, d in files[:warmup]}
            deadline = time.monotonic() + 300
            while not warm <= set(_column(settings, "codes", "sop_instance_uid")):
                if time.monotonic() > deadline:
                    raise RuntimeError("the warm-up images were not coded within 300 s")
                time.sleep(0.5)

            _knn(spark, sorted(warm))  # starts the workers and loads the searcher

            sent: dict[str, float] = {}
            fresh: dict[str, float] = {}
            failures: list[str] = []
            lock = threading.Lock()
            todo = [(name, data, _uid(data)) for name, data in files[warmup:warmup + images]]

            def upload() -> None:
                """Send on schedule whatever the checking loop is doing."""
                next_send = time.perf_counter()
                for name, data, uid in todo:
                    time.sleep(max(0.0, next_send - time.perf_counter()))
                    with lock:
                        sent[uid] = time.perf_counter()
                    try:
                        up.send(name, data).get(timeout=30)  # type: ignore[attr-defined]
                    except Exception:
                        failures.append(uid)
                    next_send += 1.0 / rate

            sender = threading.Thread(target=upload, name="bench-upload", daemon=True)
            started = time.perf_counter()
            sender.start()
            while sender.is_alive() or (
                    len(fresh) + len(failures) < len(sent)
                    and time.perf_counter() - started < 300 + images / rate):
                with lock:
                    pending = [u for u in sent if u not in fresh]
                if pending:
                    visible = set(_column(settings, "instances", "sop_instance_uid"))
                    ready = [u for u in pending if u in visible]
                    if ready:
                        rows = _knn(spark, ready)
                        seen = time.perf_counter()
                        for r in rows:
                            if r["uid"] == r["sop_instance_uid"] and r["uid"] not in fresh:
                                fresh[r["uid"]] = seen - sent[r["uid"]]
                time.sleep(0.05)
            sender.join()
            failed = len(failures)
            # sustained throughput: a burst, timed until every image is a row and has a code
            burst_files = files[warmup + images:]
            burst_uids = {_uid(d) for _, d in burst_files}
            t0 = time.perf_counter()
            for name, data in burst_files:
                up.send(name, data)
            up._producer.flush()
            deadline = time.monotonic() + 600
            while not (burst_uids <= set(_column(settings, "codes", "sop_instance_uid"))
                       and burst_uids <= set(_column(settings, "instances",
                                                     "sop_instance_uid"))):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            burst_seconds = time.perf_counter() - t0
            sent.update({u: t0 for u in burst_uids})
            fresh.update({u: burst_seconds for u in burst_uids})  # not in the percentiles
            latencies = [v * 1000 for u, v in fresh.items() if u not in burst_uids]
        inst = _column(settings, "instances", "sop_instance_uid")
        codes = _column(settings, "codes", "sop_instance_uid")
        uploaded = set(sent)
        lost = len(uploaded - set(inst))
        duplicated = (sum(1 for u in inst if u in uploaded) - len(uploaded & set(inst))
                      + sum(1 for u in codes if u in uploaded) - len(uploaded & set(codes)))
        return {
            "images": len(sent),
            "upload_rate": rate,
            "burst_images": len(burst_uids),
            "images_per_second": len(burst_uids) / burst_seconds,
            "freshness_p50_ms": _pct(latencies, 0.5) if latencies else None,
            "freshness_p95_ms": _pct(latencies, 0.95) if latencies else None,
            "freshness_mean_ms": statistics.fmean(latencies) if latencies else None,
            "searchable": len(fresh),
            "send_failures": failed,
            "lost": lost,
            "duplicated": duplicated,
        }
    finally:
        if spark is not None:
            spark.stop()
        runner.stop(settings, stream)
