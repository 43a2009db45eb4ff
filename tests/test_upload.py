"""The upload producer against a real Kafka-protocol broker (embedded Tansu, no Flink job):
archives expand into one record per DICOM member, what is no image is counted and never sent,
and a browser upload takes the stream when the stream job runs (else the batch fallback)."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from dicom_files import make_dicom

from dicomlake.config import Settings
from dicomlake.streaming.settings import StreamSettings, state_dir


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """A private home with the embedded broker and the upload topics (no job)."""
    from dicomlake.streaming.broker import EmbeddedBroker, ensure_topics

    home = tmp_path_factory.mktemp("upload-home")
    settings, stream = Settings(home=home), StreamSettings()
    broker = EmbeddedBroker.start(state_dir(settings))
    try:
        ensure_topics(broker.bootstrap, stream)
        yield settings, stream, broker.bootstrap
    finally:
        broker.stop(state_dir(settings))


class Topic:
    """Reads back what was sent to the upload topic after this object was made."""

    def __init__(self, bootstrap: str, stream: StreamSettings) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self.parts = [TopicPartition(stream.topic, p) for p in range(stream.partitions)]
        self.start = self.consumer.end_offsets(self.parts)

    def records(self, count: int, prefix: str, timeout: float = 20.0,
                ) -> dict[str, tuple[bytes, dict]]:
        """``count`` new records whose name header starts with ``prefix``: (value, headers).

        The embedded broker's end offsets can lag behind the previous test's confirmed sends
        on a loaded machine (seen in CI: one record of the test before came back), so the
        names, unique per test, tell this test's records apart as well.
        """
        self.consumer.assign(self.parts)
        for tp in self.parts:
            self.consumer.seek(tp, self.start[tp])
        out: dict[str, tuple[bytes, dict]] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(out) < count and time.monotonic() < deadline:
                for batch in self.consumer.poll(timeout_ms=300).values():
                    for m in batch:
                        headers = {k: v.decode() for k, v in m.headers}
                        if headers["dicomlake-name"].startswith(prefix):
                            out[headers["dicomlake-name"]] = (m.value, headers)
            # nothing beyond what was expected arrives either
            for batch in self.consumer.poll(timeout_ms=300).values():
                for m in batch:
                    name = dict(m.headers)["dicomlake-name"].decode()
                    if name.startswith(prefix):
                        out[name] = (m.value, {})
        finally:
            self.consumer.close()
        return out


def _images(n: int) -> list[bytes]:
    return [make_dicom(SeriesDescription=f"upload test {i}") for i in range(n)]


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(zipfile.ZipInfo("series1/"), b"")  # a folder entry: no input
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        folder = tarfile.TarInfo("study")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _by_name(results) -> dict:
    return {r.name: r for r in results}


def test_zip_members_become_one_record_each(lake, tmp_path):
    from dicomlake.streaming.producer import Uploader, summarize

    settings, stream, bootstrap = lake
    a, b = _images(2)
    archive = _zip(tmp_path / "study.zip", {
        "series1/a.dcm": a, "series1/deeper/b.dcm": b, "README.txt": b"not an image\n" * 20,
        "__MACOSX/series1/._a.dcm": b"\0\5\26\7" * 64})
    topic = Topic(bootstrap, stream)
    with Uploader(settings, stream) as up:
        results = _by_name(up.upload([archive], relative_to=tmp_path))

    assert set(results) == {"study.zip!/series1/a.dcm", "study.zip!/series1/deeper/b.dcm",
                            "study.zip!/README.txt", "study.zip!/__MACOSX/series1/._a.dcm"}
    sent = {n: r for n, r in results.items() if r.ok}
    assert set(sent) == {"study.zip!/series1/a.dcm", "study.zip!/series1/deeper/b.dcm"}
    assert all(r.partition is not None and r.offset is not None for r in sent.values())
    assert results["study.zip!/README.txt"].kind == "not_dicom"
    assert results["study.zip!/__MACOSX/series1/._a.dcm"].kind == "skipped"
    assert summarize(results.values()) == {"inputs": 4, "sent": 2, "failed": 0,
                                           "not_sent": 2,
                                           "not_sent_kinds": {"not_dicom": 1, "skipped": 1}}

    records = topic.records(2, "study.zip!/")
    assert set(records) == set(sent)  # nothing else reached the topic
    value, headers = records["study.zip!/series1/deeper/b.dcm"]
    assert value == b and headers["dicomlake-sha256"] == sent[
        "study.zip!/series1/deeper/b.dcm"].sha256
    assert records["study.zip!/series1/a.dcm"][0] == a


def test_tar_members_damaged_and_other_members_are_counted(lake, tmp_path):
    from dicomlake.streaming.producer import Uploader

    settings, stream, bootstrap = lake
    a, b, c, d = _images(4)
    inner = _zip(tmp_path / "inner.zip", {"c.dcm": c})
    archive = _tar(tmp_path / "export.tgz", {
        "study/a.dcm": a, "study/series/b": b, "study/notes.txt": b"hello\n" * 100,
        "study/cut.dcm": a[:300], "study/inner.zip": inner.read_bytes(),
        "study/d.dcm.gz": gzip.compress(d)})
    topic = Topic(bootstrap, stream)
    with Uploader(settings, stream) as up:
        results = _by_name(up.upload([archive], relative_to=tmp_path))

    sent = {"export.tgz!/study/a.dcm": a, "export.tgz!/study/series/b": b,
            "export.tgz!/study/inner.zip!/c.dcm": c, "export.tgz!/study/d.dcm.gz": d}
    assert {n for n, r in results.items() if r.ok} == set(sent)
    assert results["export.tgz!/study/notes.txt"].kind == "not_dicom"
    cut = results["export.tgz!/study/cut.dcm"]
    assert cut.rejected and cut.kind in {"truncated", "bad_header"} and cut.error
    records = topic.records(len(sent), "export.tgz!/")
    assert {n: v for n, (v, _) in records.items()} == sent


def test_cli_upload_reports_what_was_not_sent(lake, tmp_path):
    from dicomlake.cli import main

    settings, stream, bootstrap = lake
    (image,) = _images(1)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "scan").write_bytes(image)  # no suffix: content decides
    _zip(folder / "more.zip", {"x/y.dcm": image, "odd.bin": b"\x00\x01" * 300})
    topic = Topic(bootstrap, stream)
    run = CliRunner().invoke(main, ["upload", str(folder)],
                             env={"DICOMLAKE_HOME": str(settings.home)})
    assert run.exit_code == 0, run.output
    assert "uploaded 2 of 3 input(s); 1 not sent (1 not_dicom)" in run.output
    assert f"not sent {folder / 'more.zip'}!/odd.bin: not_dicom" in run.output
    assert set(topic.records(2, str(folder))) == {str(folder / "scan"),
                                                 f"{folder / 'more.zip'}!/x/y.dcm"}

    as_json = CliRunner().invoke(main, ["upload", "--json", str(folder / "more.zip")],
                                 env={"DICOMLAKE_HOME": str(settings.home)})
    rows = [json.loads(line) for line in as_json.output.splitlines()]
    assert len(rows) == 2 and {(r["kind"], r["offset"] is None) for r in rows} == {
        (None, False), ("not_dicom", True)}


@pytest.fixture
def job_running(lake):
    """The stream's job record pointing at a live process: what `stream status` reads."""
    settings = lake[0]
    proc = subprocess.Popen(["sleep", "300"])
    record = state_dir(settings) / "job.json"
    record.write_text(json.dumps({"pid": proc.pid, "started_at": time.time()}))
    try:
        yield proc
    finally:
        record.unlink(missing_ok=True)
        proc.kill()
        proc.wait()


def test_stream_is_used_only_while_its_job_runs(lake, request):
    from dicomlake.streaming.producer import stream_bootstrap

    settings, stream, bootstrap = lake
    assert stream_bootstrap(settings, stream) is None
    request.getfixturevalue("job_running")
    assert stream_bootstrap(settings, stream) == bootstrap


def test_browser_upload_goes_through_the_stream(lake, job_running):
    from dicomlake.catalog.errors import DicomlakeError
    from dicomlake.extension.upload import UploadError, UploadManager

    settings, stream, bootstrap = lake
    manager = UploadManager(settings.home, settings)
    with pytest.raises(DicomlakeError) as refused:
        manager.save("alice", [("notes.dcm", b"hello")])
    assert isinstance(refused.value, UploadError) and isinstance(refused.value, ValueError)

    a, b = _images(2)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("s/a.dcm", a)
        zf.writestr("s/readme.md", b"# not an image\n" * 10)
    topic = Topic(bootstrap, stream)
    job = manager.save("alice", [("study.zip", buffer.getvalue()), ("b.dcm", b)])

    async def run() -> None:
        await manager.start(job)
        assert job.path == "stream" and "imageupload" in job.path_reason
        while job.state == "RUNNING":
            await asyncio.sleep(0.05)

    asyncio.run(run())
    doc = job.to_json()
    assert doc["state"] == "FINISHED" and doc["path"] == "stream", doc
    status = {d["name"]: (d["status"], d["kind"]) for d in doc["deliveries"]}
    assert status == {"study.zip!/s/a.dcm": ("sent", None), "b.dcm": ("sent", None),
                      "study.zip!/s/readme.md": ("not_sent", "not_dicom")}
    assert doc["summary"]["sent"] == 2 and doc["summary"]["not_sent_kinds"] == {
        "not_dicom": 1}
    assert not job.folder.exists()  # every image is in the broker: no second copy
    prefix = f"alice/{job.id}/"
    records = topic.records(2, prefix)
    assert {n: v for n, (v, _) in records.items()} == {f"{prefix}study.zip!/s/a.dcm": a,
                                                        f"{prefix}b.dcm": b}
    assert sorted(job.sent_sha256) == sorted(h["dicomlake-sha256"]
                                             for _, h in records.values())


def test_adopt_makes_a_job_of_a_folder_already_written(tmp_path):
    """What DIMSE's batch path has: a folder written (and fsync'd) by its caller. The job is
    the folder's, lists its files but not a half-written temporary one, and runs the same
    child command as a saved upload."""
    import sys

    from dicomlake.extension.upload import UploadError, UploadManager

    manager = UploadManager(tmp_path, Settings(home=tmp_path))
    folder = tmp_path / "uploads" / "dimse" / "20261130T120000-CT1-0a1b2c3d"
    with pytest.raises(UploadError, match="does not exist"):
        manager.adopt("dimse", folder)
    folder.mkdir(parents=True)
    (folder / ".2.dcm.tmp").write_bytes(b"half")
    with pytest.raises(UploadError, match="holds no file"):
        manager.adopt("dimse", folder)
    for name in ("b.dcm", "a.dcm"):
        (folder / name).write_bytes(make_dicom())
    job = manager.adopt("dimse", folder)
    assert (job.id, job.owner, job.files) == (folder.name, "dimse", ["a.dcm", "b.dcm"])
    assert manager.get("dimse", job.id) is job and manager.get("alice", job.id) is None
    saved = manager.save("alice", [("c.dcm", make_dicom())])
    assert job.command == [sys.executable, "-m", "dicomlake.extension.upload", str(folder)]
    assert saved.command == [*job.command[:-1], str(saved.folder)]
