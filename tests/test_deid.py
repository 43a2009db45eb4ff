"""De-identified twins (``dicomlake.catalog.deid``): values, the header profile, the key and
the file-by-file refresh. No Spark: raw tables are written with delta-rs here."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from dicomlake.catalog import deid
from dicomlake.catalog.deid import (
    DEID_SCHEMA,
    DeidError,
    Pseudonymizer,
    deidentify_message,
    deidentify_meta,
    load_key,
    refresh,
    rotate_key,
)

KEY = bytes(range(32))
RAW_UID = "1.2.826.0.1.3680043.8.498.1234567890"


def _pn(name: str) -> dict:
    return {"vr": "PN", "Value": [{"Alphabetic": name, "Ideographic": "山田"}]}


def _meta(patient: str = "PAT0001", name: str = "Doe^Jane") -> dict:
    return {
        "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
        "00080018": {"vr": "UI", "Value": [RAW_UID]},
        "00080020": {"vr": "DA", "Value": ["20200315"]},
        "0008002A": {"vr": "DT", "Value": ["20200315101500.000000"]},
        "00080030": {"vr": "TM", "Value": ["101500"]},
        "00080050": {"vr": "SH", "Value": ["ACC7654321"]},
        "00080080": {"vr": "LO", "Value": ["St Elsewhere Hospital"]},
        "00080090": _pn("House^Gregory"),
        "00081010": {"vr": "SH", "Value": ["CT-ROOM-7"]},
        "00081030": {"vr": "LO", "Value": ["CT CHEST for Jane Doe"]},
        "00100010": _pn(name),
        "00100020": {"vr": "LO", "Value": [patient]},
        "00100030": {"vr": "DA", "Value": ["19670216"]},
        "00100040": {"vr": "CS", "Value": ["F"]},
        "00101010": {"vr": "AS", "Value": ["093Y"]},
        "00101040": {"vr": "LO", "Value": ["1 Main Street"]},
        "00204000": {"vr": "LT", "Value": ["patient Jane Doe, call 555-0100"]},
        "00280010": {"vr": "US", "Value": [512]},
        "00090010": {"vr": "LO", "Value": ["ACME private"]},
        "00091001": {"vr": "LO", "Value": ["Jane Doe again"]},
        "00020016": {"vr": "AE", "Value": ["SCANNER7"]},
        "7FE00010": {"vr": "OW", "BulkDataURI": "/data/PAT0001/STUDY01/IM1.dcm?offset=1024"},
        "00081140": {"vr": "SQ", "Value": [{
            "00081155": {"vr": "UI", "Value": [RAW_UID]},
            "00081050": _pn("Performing^Person"),
            "00100020": {"vr": "LO", "Value": [patient]},
        }]},
    }


class TestValues:
    def test_pseudonyms_are_keyed_consistent_and_well_formed(self):
        a, b = Pseudonymizer(KEY), Pseudonymizer(bytes(32))
        assert a.text("PAT1") == a.text("PAT1") != b.text("PAT1")
        assert a.text("PAT1").startswith("anon-") and len(a.text("PAT1")) == 21
        uid = a.uid(RAW_UID)
        assert uid == a.uid(RAW_UID) and uid.startswith("2.25.") and len(uid) <= 64
        assert all(part.isdigit() for part in uid.split("."))
        assert a.uid("1.2.840.10008.1.2.1") == "1.2.840.10008.1.2.1"  # DICOM's own UIDs
        assert a.file("/data/PAT1/x.zip!/IM1").startswith("file-")
        assert 1 <= a.shift_days("PAT1") <= 365 and a.shift_days(None) == 0
        assert a.key_id != b.key_id and KEY.hex() not in a.key_id

    def test_header_profile(self):
        pseudo = Pseudonymizer(KEY)
        days = pseudo.shift_days("PAT0001")
        out = json.loads(deidentify_meta(json.dumps(_meta()), pseudo, days))
        text = json.dumps(out)
        for secret in ("Doe", "Jane", "PAT0001", "ACC7654321", "Elsewhere", "House", "CT-ROOM",
                       "Main Street", "555-0100", "ACME", "SCANNER7", "/data/", RAW_UID,
                       "19670216", "20200315", "山田", "Performing"):
            assert secret not in text, secret
        assert out["00100010"]["Value"] == [{"Alphabetic": pseudo.text("Doe^Jane")}]
        assert out["00100020"]["Value"] == [pseudo.text("PAT0001")]
        assert out["00080050"]["Value"] == [pseudo.text("ACC7654321")]
        assert out["00080080"]["Value"] == [pseudo.text("St Elsewhere Hospital")]
        assert out["00100030"]["Value"] == ["19670101"]  # year only
        shifted = (dt.date(2020, 3, 15) - dt.timedelta(days=days)).strftime("%Y%m%d")
        assert out["00080020"]["Value"] == [shifted]
        assert out["0008002A"]["Value"] == [shifted + "101500.000000"]
        assert out["00080030"]["Value"] == ["101500"]  # times stay
        assert out["00080016"]["Value"] == ["1.2.840.10008.5.1.4.1.1.2"]
        assert out["00080018"]["Value"] == [pseudo.uid(RAW_UID)]
        assert out["00081140"]["Value"][0]["00081155"]["Value"] == [pseudo.uid(RAW_UID)]
        assert "00081050" not in out["00081140"]["Value"][0]  # removed in sequences too
        assert out["00080090"] == {"vr": "PN"}  # Z: kept empty
        assert out["00101010"]["Value"] == ["090Y"]
        assert out["00100040"]["Value"] == ["F"] and out["00280010"]["Value"] == [512]
        for gone in ("00081010", "00081030", "00101040", "00204000", "00090010", "00091001",
                     "00020016"):
            assert gone not in out, gone
        assert out["7FE00010"] == {"vr": "OW"}
        assert deidentify_meta("not json", pseudo, 0) is None
        assert deidentify_meta("[1, 2]", pseudo, 0) is None
        assert deidentify_meta(None, pseudo, 0) is None

    def test_profile_keywords_are_dicom_keywords(self):
        assert len(deid.PROFILE) == len(deid._PROFILE_KEYWORDS)

    def test_messages_keep_kind_and_tags_only(self):
        message = ("/data/PAT0001/a.zip!/PAT0001/IM1.dcm: (0010,0030) PatientBirthDate "
                   "'19670216x' is not a date")
        assert deidentify_message("bad_value", message) == "bad_value at (0010,0030)"
        assert deidentify_message("not_dicom", "/data/Doe_Jane/notes.txt: no DICM") == \
            "not_dicom"
        assert deidentify_message("x", None) is None


class TestKey:
    def test_created_private_and_stable(self, tmp_path):
        key = load_key(tmp_path)
        path = tmp_path / "sql" / "deid.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert load_key(tmp_path) == key and len(key) == 32

    def test_refuses_a_key_others_can_read(self, tmp_path):
        load_key(tmp_path)
        os.chmod(tmp_path / "sql" / "deid.key", 0o644)
        with pytest.raises(DeidError, match="chmod 600"):
            load_key(tmp_path)

    def test_missing_without_create(self, tmp_path):
        with pytest.raises(DeidError, match="no de-identification key"):
            load_key(tmp_path, create=False)


# ---- refresh -----------------------------------------------------------------------------

INSTANCE_SCHEMA = pa.schema([
    ("path", pa.string()), ("source", pa.string()), ("source_fingerprint", pa.string()),
    ("crc32", pa.int64()), ("sop_instance_uid", pa.string()), ("study_instance_uid", pa.string()),
    ("patient_id", pa.string()), ("patient_name", pa.string()),
    ("patient_birth_date", pa.date32()), ("study_date", pa.date32()), ("modality", pa.string()),
    ("study_description", pa.string()), ("meta", pa.string()),
    ("something_new", pa.string()),
])


def _instances(n: int, start: int = 0) -> pa.Table:
    rows = []
    for i in range(start, start + n):
        patient = f"PAT{i % 3:04d}"
        uid = f"1.2.3.{i}"
        rows.append({
            "path": f"/data/{patient}.zip!/{patient}/IM{i}.dcm",
            "source": f"/data/{patient}.zip", "source_fingerprint": f"fp-{patient}",
            "crc32": 1000 + i, "sop_instance_uid": uid, "study_instance_uid": f"1.2.3.9{i % 3}",
            "patient_id": patient, "patient_name": f"Name{i % 3}^Given",
            "patient_birth_date": dt.date(1967, 2, 16), "study_date": dt.date(2020, 3, 15),
            "modality": "CT", "study_description": f"CT for Name{i % 3}",
            "meta": json.dumps({**_meta(patient, f"Name{i % 3}^Given"),
                                "00080018": {"vr": "UI", "Value": [uid]}}),
            "something_new": f"secret-{i}",
        })
    return pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA)


@pytest.fixture
def lake(tmp_path) -> tuple[Path, Path]:
    home = tmp_path / "home"
    warehouse = home / "warehouse"
    write_deltalake(str(warehouse / "dicom" / "instances"), _instances(6))
    return warehouse, home


def _twin(warehouse: Path, table: str = "instances") -> pa.Table:
    return DeltaTable(str(warehouse / DEID_SCHEMA / table)).to_pyarrow_table()


class TestRefresh:
    def test_twin_holds_no_identifier_and_keeps_joins(self, lake):
        warehouse, home = lake
        result = refresh(warehouse, home)
        assert result.versions == {"instances": 0} and result.rows_written == 6
        twin = _twin(warehouse)
        assert "source_fingerprint" not in twin.column_names  # not on the allow-list
        assert "crc32" not in twin.column_names and "study_description" not in twin.column_names
        assert "something_new" not in twin.column_names  # unknown columns are left out
        text = json.dumps(twin.to_pylist(), default=str)
        for secret in ("PAT0", "Name0", "Name1", "/data/", "1.2.3.", "1967-02-16",
                       "2020-03-15", "secret-", "fp-"):
            assert secret not in text, secret
        rows = twin.to_pylist()
        assert {r["patient_birth_date"] for r in rows} == {dt.date(1967, 1, 1)}
        assert len({r["patient_id"] for r in rows}) == 3  # still three patients
        pseudo = Pseudonymizer(load_key(home))
        patients = {pseudo.text(f"PAT{i:04d}"): f"PAT{i:04d}" for i in range(3)}
        for row in rows:  # the column and the header agree; dates move per patient
            meta = json.loads(row["meta"])
            assert meta["00080018"]["Value"] == [row["sop_instance_uid"]]
            assert meta["00100020"]["Value"] == [row["patient_id"]]
            days = pseudo.shift_days(patients[row["patient_id"]])
            assert row["study_date"] == dt.date(2020, 3, 15) - dt.timedelta(days=days)
            assert meta["00080020"]["Value"] == [row["study_date"].strftime("%Y%m%d")]

    def test_incremental_idempotent_and_removals(self, lake):
        warehouse, home = lake
        refresh(warehouse, home)
        assert refresh(warehouse, home).versions == {}  # nothing changed: no commit
        write_deltalake(str(warehouse / "dicom" / "instances"), _instances(2, start=6),
                        mode="append")
        result = refresh(warehouse, home)
        assert (result.files_added, result.files_removed, result.rows_written) == (1, 0, 2)
        assert _twin(warehouse).num_rows == 8
        raw = DeltaTable(str(warehouse / "dicom" / "instances"))
        raw.delete("sop_instance_uid = '1.2.3.0'")
        result = refresh(warehouse, home)
        assert result.files_removed >= 1
        uids = set(_twin(warehouse).column("sop_instance_uid").to_pylist())
        pseudo = Pseudonymizer(load_key(home))
        assert pseudo.uid("1.2.3.0") not in uids and pseudo.uid("1.2.3.7") in uids
        assert len(uids) == 7

    def test_only_named_tables_and_missing_raw_tables(self, lake):
        warehouse, home = lake
        assert refresh(warehouse, home, tables=["errors", "nope"]).versions == {}
        assert not (warehouse / DEID_SCHEMA / "instances").exists()

    def test_raw_schema_change_rebuilds_the_twin(self, lake):
        warehouse, home = lake
        refresh(warehouse, home)
        wider = _instances(1, start=20).append_column("member_index", pa.array([3], pa.int32()))
        write_deltalake(str(warehouse / "dicom" / "instances"), wider, mode="append",
                        schema_mode="merge")
        refresh(warehouse, home)
        twin = _twin(warehouse)
        assert "member_index" in twin.column_names and twin.num_rows == 7
        assert sorted(twin.column("member_index").to_pylist(), key=str) == [3] + [None] * 6

    def test_rotation_changes_every_pseudonym_and_vacuums(self, lake):
        warehouse, home = lake
        refresh(warehouse, home)
        before = set(_twin(warehouse).column("patient_id").to_pylist())
        old_files = set(os.listdir(warehouse / DEID_SCHEMA / "instances"))
        rotate_key(warehouse, home)
        after = set(_twin(warehouse).column("patient_id").to_pylist())
        assert len(after) == 3 and not before & after
        left = set(os.listdir(warehouse / DEID_SCHEMA / "instances"))
        assert not {f for f in old_files if f.endswith(".parquet")} & left

    def test_concurrent_refreshes_agree(self, lake):
        import threading

        warehouse, home = lake
        failures: list[BaseException] = []

        def run() -> None:
            try:
                refresh(warehouse, home)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=run) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures
        assert _twin(warehouse).num_rows == 6
        assert DeltaTable(str(warehouse / DEID_SCHEMA / "instances")).version() == 0

    def test_twin_files_are_plain_parquet(self, lake):
        warehouse, home = lake
        refresh(warehouse, home)
        files = DeltaTable(str(warehouse / DEID_SCHEMA / "instances")).file_uris()
        assert files and all(pq.read_metadata(f).num_rows == 6 for f in files)

