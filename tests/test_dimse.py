"""``dicomlake dimse`` against dcmtk's own clients (echoscu, storescu, findscu): files pushed
with C-STORE land in the lake by the batch path (no stream job) and C-FIND finds them, with
identifying values only for trusted AE titles; refused instances get a DIMSE failure status
and an audit record while the association goes on."""

from __future__ import annotations

import io
import shutil
import struct
import time
from pathlib import Path

import pytest
from _dimse_helpers import findscu, run_dcmtk
from click.testing import CliRunner
from dicom_files import make_dicom, shipped

from dicomlake.config import Settings
from dicomlake.dicomnet.dimse import DimseConfig, DimseServer, _FindError, _FindRequest
from dicomlake.dicomnet.intake import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    StoreError,
    check_instance,
)
from dicomlake.sql.users import Role

STUDY = "1.2.826.0.1.3680043.8.498.4242"
PATIENT = "DIMSE-P1"
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"

needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None,
                                 reason="dcmtk (echoscu/storescu/findscu) not installed")


# -- without a server --------------------------------------------------------------------------

def _uids(data: bytes) -> tuple[str, str]:
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def test_check_instance_accepts_what_the_lake_ingests():
    data = make_dicom(StudyInstanceUID=STUDY)
    check_instance(data, *_uids(data))


def test_check_instance_refuses_not_dicom_with_cannot_understand():
    with pytest.raises(StoreError, match="not_dicom") as err:
        check_instance(b"hello, this is a text file" * 20, CT_SOP_CLASS, "1.2.3")
    assert err.value.status == STATUS_CANNOT_UNDERSTAND


def test_check_instance_refuses_uids_other_than_announced():
    data = make_dicom()
    sop_class, _ = _uids(data)
    with pytest.raises(StoreError, match="SOPInstanceUID in the data set is") as err:
        check_instance(data, sop_class, "1.2.3.4")
    assert err.value.status == STATUS_DATASET_MISMATCH


def test_check_instance_refuses_an_instance_without_its_study():
    data = make_dicom(StudyInstanceUID="")
    with pytest.raises(StoreError, match=r"StudyInstanceUID \(0020,000D\) is missing"):
        check_instance(data, *_uids(data))


def test_find_request_splits_matching_and_return_keys():
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.PatientID = "P*"
    ds.StudyInstanceUID = ["1.2.3", "1.2.4"]
    ds.SeriesInstanceUID = ""
    ds.Modality = ""
    request = _FindRequest.parse(ds)
    assert request.query == {"PatientID": "P*", "StudyInstanceUID": "1.2.3\\1.2.4"}
    assert request.returned == ("Modality", "SeriesInstanceUID")  # in tag order

    ds.QueryRetrieveLevel = "PATIENT"
    with pytest.raises(_FindError, match="PATIENT: this service answers STUDY, SERIES or "
                                          "IMAGE"):
        _FindRequest.parse(ds)


def test_config_checks_ae_titles_and_roles():
    with pytest.raises(ValueError, match="1 to 16 printable ASCII"):
        DimseConfig(ae_title="A_NAME_LONGER_THAN_16")
    config = DimseConfig(trusted={"PACS": Role.CLINICIAN})
    assert config.role_for("PACS ") is Role.CLINICIAN
    assert config.role_for("MODALITY") is Role.ANALYST


def test_dimse_section_of_the_config_file_then_variables_then_flags(tmp_path, monkeypatch):
    from dicomlake.dicomnet.dimse import load_dimse
    from dicomlake.errors import ConfigError

    monkeypatch.delenv("DICOMLAKE_DIMSE_AE", raising=False)
    monkeypatch.delenv("DICOMLAKE_DIMSE_PORT", raising=False)
    config_file = tmp_path / "dicomlake.toml"
    settings = Settings(home=tmp_path, config_file=config_file)
    config_file.write_text('[dimse]\nae_title = "LAKE"\nhost = "0.0.0.0"\nport = 4242\n'
                           '[dimse.trusted]\nPACS = "clinician"\n"WS.1" = "Admin"\n')
    config = load_dimse(settings)
    assert (config.ae_title, config.host, config.port, config.max_associations) == (
        "LAKE", "0.0.0.0", 4242, 10)
    assert config.trusted == {"PACS": Role.CLINICIAN, "WS.1": Role.ADMIN}
    monkeypatch.setenv("DICOMLAKE_DIMSE_PORT", "5000")
    assert load_dimse(settings).port == 5000
    flagged = load_dimse(settings, port=0, ae_title="RUN", trusted={"CT1": "admin"})
    assert (flagged.ae_title, flagged.host, flagged.port) == ("RUN", "0.0.0.0", 0)
    assert flagged.trusted == {"CT1": Role.ADMIN}  # the flags' list replaces the file's
    with pytest.raises(ValueError, match="1 to 16 printable ASCII"):
        load_dimse(settings, ae_title="A_NAME_LONGER_THAN_16")

    monkeypatch.delenv("DICOMLAKE_DIMSE_PORT")
    config_file.write_text('[dimse]\n[dimse.trusted]\nPACS = "doctor"\n')
    with pytest.raises(ConfigError, match=rf"{config_file}.*\[dimse\].*'PACS' has role "
                                          "'doctor'; it must be one of: admin, clinician, "
                                          "analyst"):
        load_dimse(settings)
    config_file.write_text('[dimse]\nport = "eleven"\n')
    with pytest.raises(ConfigError, match=r"'dimse\.port' must be an integer"):
        load_dimse(settings)
    config_file.write_text('[dimse]\ncalled_ae = "X"\n')
    with pytest.raises(ConfigError, match="unknown key 'called_ae' in section \\[dimse\\]"):
        load_dimse(settings)


def test_cli_refuses_a_malformed_trusted_ae():
    from dicomlake.cli import main

    result = CliRunner().invoke(main, ["dimse", "--trusted-ae", "PACS=doctor"])
    assert result.exit_code == 2
    assert "'PACS=doctor' is not NAME=ROLE with ROLE one of analyst, clinician, admin" \
        in result.output


# -- against a running service (batch path: no stream job) ------------------------------------

@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A DIMSE service on a fresh lake, PACS trusted as clinician, on a free port."""
    home = tmp_path_factory.mktemp("dimse-home")
    settings = Settings(home=home)
    server = DimseServer(settings, DimseConfig(port=0, trusted={"PACS": Role.CLINICIAN}))
    server.start()
    try:
        yield server
    finally:
        server.shutdown()


def _table(path: Path):
    from deltalake import DeltaTable

    return DeltaTable(str(path)).to_pyarrow_table()


def _audit(server: DimseServer) -> list[dict]:
    server.audit.flush()
    rows = _table(server.audit.table_path).to_pylist()
    return [r for r in rows if (r["source"] or "").startswith("dimse")]


def _wait_idle(server: DimseServer, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not server.intake.idle():
        assert time.monotonic() < deadline, "the batch ingest of the received files hangs"
        time.sleep(1)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> dict[str, bytes]:
    """Files the lake has never seen: two of pydicom's own test files and a 3-image series of
    a study of patient DIMSE-P1."""
    folder = tmp_path_factory.mktemp("held-out")
    files = {"CT_small.dcm": shipped("CT_small.dcm"), "MR_small.dcm": shipped("MR_small.dcm")}
    for i in range(3):
        files[f"series-{i}.dcm"] = make_dicom(
            StudyInstanceUID=STUDY, SeriesInstanceUID=f"{STUDY}.1", PatientID=PATIENT,
            PatientName="Lake^Dimse", InstanceNumber=i + 1, SeriesDescription="pushed")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {"folder": folder, **files}  # type: ignore[dict-item]


@pytest.mark.slow
@needs_dcmtk
def test_echoscu(node):
    host, port = node.address
    done = run_dcmtk("echoscu", "-aec", node.config.ae_title, host, str(port))
    assert done.returncode == 0, done.stderr
    wrong = run_dcmtk("echoscu", "-aec", "SOMEONE_ELSE", host, str(port))
    assert wrong.returncode != 0  # the called AE title must be ours
    events = [(r["event"], r["state"]) for r in _audit(node)]
    assert ("dimse_echo", "FINISHED") in events
    assert ("dimse_association", "REJECTED") in events


@pytest.mark.slow
@needs_dcmtk
def test_storescu_folder_becomes_searchable(node, held_out, tmp_path):
    from dicomlake.catalog.warehouse import Warehouse

    host, port = node.address
    done = run_dcmtk("storescu", "-aec", node.config.ae_title, "-aet", "MODALITY", "+sd",
                host, str(port), str(held_out["folder"]))
    assert done.returncode == 0, done.stderr
    _wait_idle(node)
    # what was sent, kept (storescu re-encodes what it read: the same elements, not the same
    # file; byte-for-byte keeping is proved in the next test)
    from pydicom import dcmread

    kept = {p.name: p.read_bytes() for p in (node.settings.home / "uploads" / "dimse").glob(
        "*/*.dcm")}
    originals = {_uids(held_out[n])[1]: held_out[n] for n in held_out if n != "folder"}
    assert {n.removesuffix(".dcm") for n in kept} == set(originals)
    def elements(data: bytes) -> dict:  # dcmtk leaves out group lengths and padding
        return {e.tag: e.value for e in dcmread(io.BytesIO(data))
                if e.tag.element != 0 and e.tag != 0xFFFCFFFC}

    for name, data in kept.items():
        assert elements(data) == elements(originals[name[:-4]])
    instances = _table(Warehouse(node.settings.warehouse_path).table_path("dicom",
                                                                        "instances"))
    assert set(originals) <= set(instances.column("sop_instance_uid").to_pylist())
    assert not list((node.settings.home / "uploads" / "dimse").glob("*.pending"))
    audit = _audit(node)
    stored = [r for r in audit if r["event"] == "dimse_store" and r["user"] == "MODALITY"]
    assert len(stored) == 5 and all(r["state"] == "FINISHED" for r in stored)
    assert any(r["event"] == "dimse_ingest" and r["state"] == "FINISHED" and r["rows"] == 5
               for r in audit)

    # C-FIND, trusted peer: study level by PatientID, then the study's series
    studies = findscu(node, "PACS", ["QueryRetrieveLevel=STUDY", f"PatientID={PATIENT}",
                                   "StudyInstanceUID", "PatientName",
                                   "NumberOfStudyRelatedInstances"], tmp_path / "a")
    assert [(s.StudyInstanceUID, str(s.PatientName), int(s.NumberOfStudyRelatedInstances))
            for s in studies] == [(STUDY, "Lake^Dimse", 3)]
    assert "ModalitiesInStudy" not in studies[0]  # only the keys asked for
    series = findscu(node, "PACS", ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={STUDY}",
                                  "SeriesInstanceUID", "Modality", "SeriesDescription",
                                  "NumberOfSeriesRelatedInstances"], tmp_path / "b")
    assert [(s.SeriesInstanceUID, s.Modality, s.SeriesDescription,
             int(s.NumberOfSeriesRelatedInstances)) for s in series] == [
        (f"{STUDY}.1", "CT", "pushed", 3)]
    images = findscu(node, "PACS", ["QueryRetrieveLevel=IMAGE", f"SeriesInstanceUID={STUDY}.1",
                                  "SOPInstanceUID", "InstanceNumber"], tmp_path / "c")
    assert sorted(int(i.InstanceNumber) for i in images) == [1, 2, 3]

    # an untrusted peer: the de-identified view, the real identifiers match nothing
    assert findscu(node, "MODALITY", ["QueryRetrieveLevel=STUDY", f"PatientID={PATIENT}",
                                    "StudyInstanceUID"], tmp_path / "d") == []
    seen = findscu(node, "MODALITY", ["QueryRetrieveLevel=STUDY", "PatientID", "PatientName",
                                    "StudyInstanceUID", "NumberOfStudyRelatedInstances"],
                 tmp_path / "e")
    assert len(seen) == 3  # our study, CT_small's and MR_small's
    for study in seen:
        assert str(study.PatientID).startswith("anon-")
        assert str(study.StudyInstanceUID).startswith("2.25.")
        assert "Lake" not in str(study.PatientName)
    assert sorted(int(s.NumberOfStudyRelatedInstances) for s in seen) == [1, 1, 3]
    finds = [r for r in _audit(node) if r["event"] == "dimse_find"]
    assert {(r["user"], r["role"]) for r in finds} == {("PACS", "clinician"),
                                                      ("MODALITY", "analyst")}


@pytest.mark.slow
@needs_dcmtk
def test_refused_instances_are_reported_audited_and_the_association_goes_on(node, tmp_path):
    """A data set without its study (sent by storescu) and one whose bytes are no DICOM data
    set at all (sent by pynetdicom's SCU, which forwards a file's data set unparsed) are
    refused with their status; the next instance on the same association is stored."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage

    folder = tmp_path / "push"
    folder.mkdir()
    (folder / "a-no-study.dcm").write_bytes(make_dicom(StudyInstanceUID=""))
    (folder / "b-good.dcm").write_bytes(make_dicom(StudyInstanceUID=STUDY + ".9"))
    host, port = node.address
    done = run_dcmtk("storescu", "-v", "-nh", "-aec", node.config.ae_title, "-aet", "BROKENSCU",
                "+sd", host, str(port), str(folder))
    responses = [line for line in done.stderr.splitlines() if "Store Response" in line]
    assert responses == ["I: Received Store Response (Error: DataSetDoesNotMatchSOPClass)",
                         "I: Received Store Response (Success)"], done.stderr

    good = make_dicom(StudyInstanceUID=STUDY + ".9")
    garbage = tmp_path / "garbage.dcm"
    # the file meta of a real file, then an element claiming 65535 bytes it does not have
    (meta_length,) = struct.unpack("<I", good[140:144])  # (0002,0000) UL after 128+4+8 bytes
    garbage.write_bytes(good[:144 + meta_length]
                        + b"\x08\x00\x16\x00UI\xff\xffnot a data set" * 8)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)  # as the files are
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's data set as it is
    try:
        assoc = ae.associate(host, port, ae_title=node.config.ae_title)
        assert assoc.is_established
        refused = assoc.send_c_store(garbage)
        (tmp_path / "good.dcm").write_bytes(good)
        accepted = assoc.send_c_store(tmp_path / "good.dcm")
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved
    assert refused.Status == STATUS_CANNOT_UNDERSTAND
    assert "header" in refused.ErrorComment or "truncated" in refused.ErrorComment
    assert accepted.Status == 0x0000
    # the data set is kept byte for byte as the peer encoded it, behind its file meta
    sop = _uids(good)[1]
    [kept] = (node.settings.home / "uploads" / "dimse").glob(f"*PYSCU*/{sop}.dcm")
    assert kept.read_bytes()[128:132] == b"DICM"
    assert kept.read_bytes().endswith(good[144 + meta_length:])
    _wait_idle(node)
    audit = _audit(node)
    failed = {(r["user"], r["error_name"]) for r in audit
              if r["event"] == "dimse_store" and r["state"] == "FAILED"}
    assert failed == {("BROKENSCU", "DIMSE_STATUS_0xA900"), ("PYSCU", "DIMSE_STATUS_0xC000")}
    sessions = {r["user"]: r for r in audit if r["event"] == "dimse_association"
                and r["user"] in ("BROKENSCU", "PYSCU")}
    assert "1 stored, 1 refused" in sessions["BROKENSCU"]["sql"]
    assert "1 stored, 1 refused" in sessions["PYSCU"]["sql"]
