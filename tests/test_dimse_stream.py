"""``dicomlake dimse`` with the upload stream running (embedded Tansu broker + Flink job):
C-STORE takes the stream's way in, each Success only once the broker has confirmed the
record, and the instances become rows of ``dicom.instances`` that C-FIND then finds, for a
trusted peer and (de-identified) for any other.

One stream serves the module (~40 s and 1 GiB to start); the tests run in file order.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from pathlib import Path

import pytest
from _dimse_helpers import findscu, run_dcmtk
from dicom_files import make_dicom

from dicomlake.config import Settings
from dicomlake.dicomnet.dimse import DimseConfig, DimseServer
from dicomlake.sql.users import Role

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("storescu") is None,
                                 reason="dcmtk (storescu/findscu) not installed")]

FLINK_PYTHON = Path(__file__).resolve().parent.parent / ".venv-flink" / "bin" / "python"
STUDY = "1.2.826.0.1.3680043.8.498.7373"
PATIENT = "DIMSE-STREAM-P1"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A lake whose config file sets up the stream (so the runner, the job and the DIMSE
    intake read the same [stream] section), the stream running, and a DIMSE service."""
    from dicomlake.streaming import runner

    if not FLINK_PYTHON.exists():
        pytest.fail(f"{FLINK_PYTHON} is missing; `make install` builds .venv-flink")
    home = tmp_path_factory.mktemp("dimse-stream-home")
    config = home / "dicomlake.toml"
    config.write_text(f'[stream]\nflink_python = "{FLINK_PYTHON}"\nmin_train = 16\n'
                      "checkpoint_interval_ms = 1000\n")
    settings = Settings(home=home, config_file=config)
    try:
        runner.start(settings)
        server = DimseServer(settings, DimseConfig(port=0, trusted={"PACS": Role.CLINICIAN}))
        server.start()
        try:
            yield server
        finally:
            server.shutdown()
    finally:
        runner.stop(settings)


def _uid(data: bytes) -> str:
    from pydicom import dcmread

    return str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def _topic_names(settings: Settings) -> dict[str, bytes]:
    """Every record in the upload topic: its name header to its value."""
    from kafka import KafkaConsumer, TopicPartition

    from dicomlake.streaming.producer import stream_bootstrap
    from dicomlake.streaming.settings import load_stream

    stream = load_stream(settings)
    bootstrap = stream_bootstrap(settings, stream)
    assert bootstrap is not None, "the stream job is not running"
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = [TopicPartition(stream.topic, p) for p in range(stream.partitions)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        out: dict[str, bytes] = {}
        deadline = time.monotonic() + 30
        while any(consumer.position(tp) < end[tp] for tp in parts):
            assert time.monotonic() < deadline, "the upload topic cannot be read back"
            for batch in consumer.poll(timeout_ms=300).values():
                for m in batch:
                    out[dict(m.headers)["dicomlake-name"].decode()] = m.value
        return out
    finally:
        consumer.close()


def _poll(condition, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s: {what}"
        time.sleep(1)
    return value


def test_storescu_through_the_stream_becomes_rows_and_c_find_finds_them(node, tmp_path):
    from deltalake import DeltaTable

    folder = tmp_path / "push"
    folder.mkdir()
    sent = {}
    for i in range(3):
        data = make_dicom(StudyInstanceUID=STUDY, SeriesInstanceUID=f"{STUDY}.1",
                          PatientID=PATIENT, PatientName="Stream^Dimse", InstanceNumber=i + 1)
        (folder / f"{i}.dcm").write_bytes(data)
        sent[_uid(data)] = data
    host, port = node.address
    done = run_dcmtk("storescu", "-aec", node.config.ae_title, "-aet", "MODALITY", "+sd",
                host, str(port), str(folder))
    assert done.returncode == 0, done.stderr

    # Every Success came after the broker's confirmation: the records are there the moment
    # storescu is done, named dimse/<job>/<SOPInstanceUID>.dcm, holding the data sets sent.
    records = {name: value for name, value in _topic_names(node.settings).items()
               if name.startswith("dimse/")}
    assert {name.rsplit("/", 1)[1].removesuffix(".dcm") for name in records} == set(sent)
    assert {_uid(value) for value in records.values()} == set(sent)
    assert len({name.split("/")[1] for name in records}) == 1  # one association, one job
    # nothing went the batch way: no folder on disk waits for a batch ingest
    assert not list((node.settings.home / "uploads" / "dimse").glob("*"))
    node.audit.flush()
    audit = DeltaTable(str(node.audit.table_path)).to_pyarrow_table().to_pylist()
    stores = [r for r in audit if r["event"] == "dimse_store" and r["user"] == "MODALITY"]
    assert len(stores) == 3 and all(r["state"] == "FINISHED" and " -> stream dimse/" in r["sql"]
                                    for r in stores)

    # the stream job turns the records into rows
    instances = node.settings.warehouse_path / "dicom" / "instances"

    def landed() -> bool:
        if not DeltaTable.is_deltatable(str(instances)):
            return False
        uids = DeltaTable(str(instances)).to_pyarrow_table(
            columns=["sop_instance_uid"]).column("sop_instance_uid").to_pylist()
        return set(sent) <= set(uids)

    _poll(landed, "the pushed instances never reached dicom.instances", 240)

    # C-FIND finds them: a trusted peer by the real identifiers...
    studies = _poll(lambda: findscu(node, "PACS", ["QueryRetrieveLevel=STUDY",
                                                 f"PatientID={PATIENT}", "StudyInstanceUID",
                                                 "NumberOfStudyRelatedInstances"],
                                  tmp_path / "a"),
                    "a trusted C-FIND never found the streamed study", 30)
    assert [(s.StudyInstanceUID, int(s.NumberOfStudyRelatedInstances)) for s in studies] == [
        (STUDY, 3)]
    # ...and any other peer in the de-identified view, which the stream's rows reach too
    # (the twins are refreshed by an analyst's C-FIND, at most deid_check_seconds stale)
    seen = _poll(lambda: [s for s in findscu(node, "MODALITY", [
        "QueryRetrieveLevel=STUDY", "PatientID", "StudyInstanceUID",
        "NumberOfStudyRelatedInstances"], tmp_path / "b")
        if int(s.NumberOfStudyRelatedInstances) == 3],
        "an analyst's C-FIND never found the streamed study", node.deid_check_seconds + 30)
    assert len(seen) == 1
    assert str(seen[0].PatientID).startswith("anon-") and seen[0].StudyInstanceUID != STUDY


def test_no_success_without_the_brokers_confirmation(node, tmp_path):
    """A broker that stops answering mid-association: the next instance is refused with
    0x0110 (the peer keeps it and may retry), never acknowledged."""
    from kafka.errors import KafkaTimeoutError

    from dicomlake.dicomnet.intake import (
        STATUS_PROCESSING_FAILURE,
        DimseIntake,
        Intake,
        StoreError,
    )
    from dicomlake.streaming.broker import EmbeddedBroker, ensure_topics
    from dicomlake.streaming.producer import Uploader
    from dicomlake.streaming.settings import load_stream

    state = tmp_path / "second-broker"
    state.mkdir()
    broker = EmbeddedBroker.start(state)
    try:
        ensure_topics(broker.bootstrap, load_stream(node.settings))
        uploader = Uploader(node.settings, bootstrap=broker.bootstrap, timeout_s=3)
        try:
            intake = Intake("20261130T000000-CT1-00000000", "stream", "test",
                            uploader=uploader)
            service = DimseIntake(node.settings, confirm_timeout_s=3)  # the service's, shorter
            first, second = make_dicom(), make_dicom()
            assert service.store(intake, _uid(first), first).startswith("dimse/")
            broker.stop(state)
            with pytest.raises(StoreError, match="did not confirm") as refused:
                service.store(intake, _uid(second), second)
            assert refused.value.status == STATUS_PROCESSING_FAILURE
            assert [n.rsplit("/", 1)[1] for n in intake.names] == [f"{_uid(first)}.dcm"]
        finally:
            with contextlib.suppress(KafkaTimeoutError):  # the unconfirmed record stays
                uploader.close()
    finally:
        broker.stop(state)
