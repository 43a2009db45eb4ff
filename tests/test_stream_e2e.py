"""The streaming path end to end: real Tansu broker, real Flink mini cluster (.venv-flink),
real Delta tables, image_knn through the shared Spark session.

One broker and one job serve the whole module (each start costs ~40 s); tests run in file
order and each checks only the rows it caused.
"""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import pytest

from dicomlake.catalog.sample import Profile, make_sample
from dicomlake.config import Settings

pytestmark = pytest.mark.slow

FLINK_PYTHON = Path(__file__).resolve().parent.parent / ".venv-flink" / "bin" / "python"


def _rows(settings: Settings, table: str, columns: list[str]):
    from deltalake import DeltaTable

    path = settings.warehouse_path / "dicom" / table
    return DeltaTable(str(path)).to_pyarrow_table(columns=columns).to_pylist()


def _wait(condition, what: str, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def _members(archive: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(archive) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}


def _uid(data: bytes) -> str:
    from pydicom import dcmread

    return str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """A private lake with a running stream (broker + job), stopped even if a test fails."""
    from dicomlake.streaming import runner
    from dicomlake.streaming.settings import StreamSettings

    if not FLINK_PYTHON.exists():
        pytest.fail(f"{FLINK_PYTHON} is missing; `make install` builds .venv-flink")
    home = tmp_path_factory.mktemp("stream-home")
    settings = Settings(home=home)
    stream = StreamSettings(flink_python=str(FLINK_PYTHON), min_train=16,
                            inline_max_bytes=2 << 20, checkpoint_interval_ms=1000)
    try:
        runner.start(settings, stream)
        yield settings, stream
    finally:
        runner.stop(settings, stream)


@pytest.fixture(scope="module")
def knn(spark, lake, settings):
    """image_knn pointed at the stream's lake for this module, restored afterwards."""
    from dicomlake.udfs import register_functions

    register_functions(spark, lake[0])
    yield spark
    register_functions(spark, settings)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream-samples")
    return make_sample(out, archives=2, files=50, seed=11, profile=Profile.CTMR, workers=1)


def test_upload_50_images_all_searchable(lake, knn, samples):
    from dicomlake.streaming.producer import Uploader

    settings, stream = lake
    uids = sorted(_uid(d) for d in _members(samples[0]).values())
    with Uploader(settings, stream) as up:
        results = up.upload([samples[0]])
    assert len(results) == 50 and all(r.ok for r in results), [r.error for r in results]

    def coded():
        codes = {r["sop_instance_uid"] for r in _rows(settings, "codes", ["sop_instance_uid"])}
        inst = {r["sop_instance_uid"] for r in _rows(settings, "instances",
                                                     ["sop_instance_uid"])}
        return set(uids) <= codes and set(uids) <= inst
    _wait(coded, "50 uploaded images in dicom.instances and dicom.codes")

    values = ", ".join(f"('{u}')" for u in uids)
    found = knn.sql(
        f"SELECT q.uid, n.sop_instance_uid FROM VALUES {values} AS q(uid), "
        "LATERAL image_knn(query => q.uid, k => 5) n").collect()
    hits = {r["uid"] for r in found if r["uid"] == r["sop_instance_uid"]}
    assert hits == set(uids)
    stored = _rows(settings, "instances", ["sop_instance_uid", "path", "source"])
    assert all(Path(r["path"]).is_file() and r["source"].startswith("kafka://imageupload/")
               for r in stored)


def test_malformed_messages_go_to_dead_letter_and_errors(lake):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from dicomlake.streaming import messages
    from dicomlake.streaming.broker import bootstrap_servers
    from dicomlake.streaming.settings import state_dir

    settings, stream = lake
    bootstrap = bootstrap_servers(stream, state_dir(settings))
    real = next(iter(_members(make_sample(settings.home / "bad", archives=1, files=1,
                                          seed=99, profile=Profile.CTMR,
                                          workers=1)[0]).values()))
    cases = {
        "not_dicom": ("notes.txt", b"hello, not an image\n" * 50, None),
        "truncated": ("cut.dcm", real, "cut in transit"),
        "too_large": ("huge.dcm", b"\0" * (3 << 20), None),
        "bad_message": ("nohdr.dcm", real, "no headers"),
    }
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=8 << 20)
    try:
        for name, data, mode in cases.values():
            if mode == "no headers":
                producer.send(stream.topic, value=data).get(30)
            elif mode == "cut in transit":  # headers describe the whole file, half arrives
                key, _, headers = messages.encode(name, data, size=len(data),
                                                  sha256=messages.sha256_of(data))
                producer.send(stream.topic, key=key, value=data[:600], headers=headers).get(30)
            else:
                key, value, headers = messages.encode(name, data, size=len(data),
                                                      sha256=messages.sha256_of(data))
                producer.send(stream.topic, key=key, value=value, headers=headers).get(30)
    finally:
        producer.close()

    def recorded():
        rows = _rows(settings, "errors", ["error_kind", "error", "member"])
        return rows if {r["error_kind"] for r in rows} >= set(cases) else None
    rows = recorded() or _wait(recorded, "four error rows in dicom.errors")
    by_kind = {r["error_kind"]: r["error"] for r in rows}
    assert "DICM" in by_kind["not_dicom"]
    assert "oversized" in by_kind["too_large"]
    assert "wrong schema" in by_kind["bad_message"]
    assert "declares" in by_kind["truncated"]

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tp = TopicPartition(stream.dead_letter_topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        dead: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while set(dead) < set(cases) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                for m in batch:
                    h = dict(m.headers)
                    dead[h["dicomlake-error-kind"].decode()] = h["dicomlake-error"].decode()
    finally:
        consumer.close()
    assert set(dead) >= set(cases)
    assert all(dead[k] for k in cases)


def test_sigkill_mid_stream_then_restart_loses_and_duplicates_nothing(lake, samples):
    from dicomlake.streaming import runner
    from dicomlake.streaming.producer import Uploader

    settings, stream = lake
    uids = {_uid(d) for d in _members(samples[1]).values()}
    before = len(_rows(settings, "instances", ["sop_instance_uid"]))
    with Uploader(settings, stream) as up:
        results = up.upload([samples[1]])
    assert all(r.ok for r in results)
    _wait(lambda: len(_rows(settings, "instances", ["sop_instance_uid"])) > before,
          "the first streamed batch", timeout=120)
    assert runner.kill_job(settings) is not None  # SIGKILL the whole job, JVM included
    time.sleep(1)
    runner.start(settings, stream)

    def complete():
        inst = [r["sop_instance_uid"] for r in _rows(settings, "instances",
                                                     ["sop_instance_uid"])]
        codes = [r["sop_instance_uid"] for r in _rows(settings, "codes", ["sop_instance_uid"])]
        return (inst, codes) if uids <= set(inst) and uids <= set(codes) else None
    inst, codes = _wait(complete, "all 50 images after the restart")
    emb = [(r["sop_instance_uid"], r["frame"]) for r in _rows(
        settings, "embeddings", ["sop_instance_uid", "frame"])]
    assert len(inst) == len(set(inst)), "duplicate rows in dicom.instances"
    assert len(codes) == len(set(codes)), "duplicate codes"
    assert len(emb) == len(set(emb)), "duplicate embeddings"
    errors = _rows(settings, "errors", ["error_kind"])
    assert not [e for e in errors if e["error_kind"] == "duplicate"]
