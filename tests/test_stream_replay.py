"""Replays into the stream's lake writer (no broker, no Flink): what a job restored from an
older checkpoint sends again must not be written again, however the batches fall.

The records here are uploads whose bytes are not DICOM, so each becomes one
``dicom.errors`` row; the same exactly-once rule covers every table the writer appends to.
"""

from __future__ import annotations

from deltalake import DeltaTable

from dicomlake.config import Settings
from dicomlake.streaming import messages
from dicomlake.streaming.processor import ERRORS, INSTANCES, LakeWriter, Record
from dicomlake.streaming.settings import StreamSettings
from dicomlake.streaming.tables import ensure_tables


def _record(partition: int, offset: int) -> Record:
    data = f"not a DICOM file, upload {partition}/{offset}".encode()
    _, value, headers = messages.encode(f"scan-{offset}.dcm", data, size=len(data),
                                        sha256=messages.sha256_of(data))
    return Record(partition, offset, value, headers)


def test_replay_from_an_older_checkpoint_writes_nothing_twice(tmp_path):
    settings = Settings(home=tmp_path / "home")
    ensure_tables(settings)
    writer = LakeWriter(str(settings.home), str(settings.warehouse_path), StreamSettings(),
                        epoch="test")
    errors = DeltaTable(str(settings.warehouse_path / "dicom" / ERRORS))

    assert writer.process([_record(7, o) for o in range(8)]) == {7: 8}
    # The job died after these commits but before its next checkpoint; the restored state
    # says partition 7 starts at 5, and the first batch after the restart is short.
    assert writer.process([_record(7, 5), _record(7, 6)]) == {7: 8}
    assert writer.process([_record(7, 7)]) == {7: 8}
    assert writer.process([_record(7, o) for o in range(7, 10)]) == {7: 10}

    errors.update_incremental()
    sources = errors.to_pyarrow_table(columns=["source"]).column("source").to_pylist()
    assert sorted(sources) == sorted(f"kafka://imageupload/7/{o}" for o in range(10))
    for table in (ERRORS, INSTANCES):
        version = DeltaTable(str(settings.warehouse_path / "dicom" / table)) \
            .transaction_version(writer.app_id(7))
        assert version == 10, f"{table} transaction version moved to {version}"
