"""DICOMweb on `dicomlake serve`, driven by dicomweb-client (a client nobody here wrote).

One server per module on the shared sample lake: ``root`` (admin), ``doc`` (clinician),
``ana`` (analyst). Results are compared with the catalog's rows (read with delta-rs) and the
original files' bytes.
"""

from __future__ import annotations

import copy
import io
import time
import zipfile
from pathlib import Path

import pydicom
import pytest
import requests
from _sql_helpers import PASSWORDS, lake_with_users, serve
from _sql_helpers import connect as connect_as
from deltalake import DeltaTable
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from PIL import Image
from pydicom.uid import generate_uid

from dicomlake.catalog.archives import read_input

pytestmark = pytest.mark.slow


MULTIFRAME = ("emri_small.dcm", "emri_small_RLE.dcm")
"""pydicom's 10-frame MR, stored uncompressed and RLE-encapsulated (given their own UIDs here,
as two instances of one series): frames are cut from the member at its stored offset."""


@pytest.fixture(scope="module")
def multiframe_archive(tmp_path_factory) -> Path:
    from pydicom.data import get_testdata_file

    out = tmp_path_factory.mktemp("multiframe") / "multiframe.zip"
    with zipfile.ZipFile(out, "w") as archive:
        for number, name in enumerate(MULTIFRAME, start=1):
            ds = pydicom.dcmread(get_testdata_file(name))
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = number
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            archive.writestr(f"mr/{name}", buffer.getvalue())
    return out


@pytest.fixture(scope="module")
def web_home(tmp_path_factory, spark, settings, sample_archives, multiframe_archive) -> Path:
    return lake_with_users(tmp_path_factory.mktemp("dicomweb-home"), spark, settings,
                           [*sample_archives, multiframe_archive])


@pytest.fixture(scope="module")
def server(web_home) -> str:
    with serve(web_home, "--port", "0") as url:
        yield url


def client(server: str, user: str, timeout: float = 20) -> DICOMwebClient:
    return DICOMwebClient(f"{server}/dicomweb", timeout=timeout,
                          session=create_session_from_user_pass(user, PASSWORDS[user]))


@pytest.fixture(scope="module")
def raw(web_home) -> list[dict]:
    """The raw catalog rows (what the files hold)."""
    columns = ["sop_instance_uid", "series_instance_uid", "study_instance_uid", "patient_id",
               "patient_name", "accession_number", "study_date", "modality", "path",
               "transfer_syntax_uid", "number_of_frames"]
    table = DeltaTable(str(web_home / "warehouse" / "dicom" / "instances"))
    return table.to_pyarrow_table(columns=columns).to_pylist()


def _value(dataset: dict, tag: str):
    values = dataset.get(tag, {}).get("Value") or [None]
    return values[0]


def test_search_studies_equals_the_catalog(server, raw):
    c = client(server, "doc")
    studies = c.search_for_studies()
    assert {_value(s, "0020000D") for s in studies} == {r["study_instance_uid"] for r in raw}
    one = next(r for r in raw if r["modality"] == "CT")
    found = c.search_for_studies(search_filters={"PatientID": one["patient_id"],
                                                 "ModalitiesInStudy": "CT"})
    expected = {r["study_instance_uid"] for r in raw
                if r["patient_id"] == one["patient_id"]
                and any(x["modality"] == "CT" and x["study_instance_uid"]
                        == r["study_instance_uid"] for x in raw)}
    assert {_value(s, "0020000D") for s in found} == expected
    day = one["study_date"].strftime("%Y%m%d")
    ranged = c.search_for_studies(search_filters={"StudyDate": f"{day}-{day}"})
    assert {_value(s, "0020000D") for s in ranged} == {
        r["study_instance_uid"] for r in raw if r["study_date"] == one["study_date"]}
    family = one["patient_name"].split("^")[0]
    fuzzy = c.search_for_studies(search_filters={"PatientName": family[:3].lower()},
                                 fuzzymatching=True)
    assert one["study_instance_uid"] in {_value(s, "0020000D") for s in fuzzy}
    assert c.search_for_studies(search_filters={"PatientName": family[:3].lower()}) == []
    page = c.search_for_studies(limit=2, offset=1)
    assert [_value(s, "0020000D") for s in page] == [_value(s, "0020000D")
                                                      for s in studies[1:3]]


def test_includefield_repeated_or_comma_separated(server):
    auth = ("doc", PASSWORDS["doc"])
    comma = requests.get(f"{server}/dicomweb/studies?includefield=00081030,BodyPartExamined"
                         "&limit=3", auth=auth, timeout=30)
    repeated = requests.get(f"{server}/dicomweb/studies?includefield=00081030"
                            "&includefield=BodyPartExamined&limit=3", auth=auth, timeout=30)
    assert comma.status_code == repeated.status_code == 200
    assert comma.json() == repeated.json()
    assert all("00081030" in s for s in comma.json())
    assert comma.headers["Access-Control-Allow-Origin"] == "*"
    full = requests.get(f"{server}/dicomweb/studies?includefield=all&limit=1", auth=auth,
                        timeout=30).json()
    assert "00201208" in full[0]  # NumberOfStudyRelatedInstances


def test_bad_requests_name_the_parameter(server):
    auth = ("doc", PASSWORDS["doc"])
    bad_date = requests.get(f"{server}/dicomweb/studies?StudyDate=2020", auth=auth, timeout=30)
    assert bad_date.status_code == 400 and "StudyDate" in bad_date.json()["message"]
    bad_limit = requests.get(f"{server}/dicomweb/studies?limit=ten", auth=auth, timeout=30)
    assert bad_limit.status_code == 400 and "limit" in bad_limit.json()["message"]
    unknown = requests.get(f"{server}/dicomweb/studies?Nonsense=1", auth=auth, timeout=30)
    assert unknown.status_code == 400 and "Nonsense" in unknown.json()["message"]
    anonymous = requests.get(f"{server}/dicomweb/studies", timeout=30)
    assert anonymous.status_code == 401


def _uncompressed_ct(raw: list[dict]) -> dict:
    return next(r for r in raw if r["modality"] == "CT"
                and r["transfer_syntax_uid"] == "1.2.840.10008.1.2.1")


def test_metadata_instances_and_frames_equal_the_files(server, raw):
    c = client(server, "doc")
    row = _uncompressed_ct(raw)
    study, series, sop = (row["study_instance_uid"], row["series_instance_uid"],
                          row["sop_instance_uid"])
    metadata = c.retrieve_series_metadata(study, series)
    assert {_value(m, "00080018") for m in metadata} == {
        r["sop_instance_uid"] for r in raw if r["series_instance_uid"] == series}
    original = read_input(row["path"])
    ds = c.retrieve_instance(study, series, sop)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    fetched = requests.get(f"{server}/dicomweb/studies/{study}/series/{series}/instances/{sop}",
                           auth=("doc", PASSWORDS["doc"]), timeout=30,
                           headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert original in fetched.content  # the original bytes, untouched, as the part
    expected = pydicom.dcmread(io.BytesIO(original)).PixelData
    assert c.retrieve_instance_frames(study, series, sop, [1])[0] == expected
    explicit = c.retrieve_instance_frames(
        study, series, sop, [1],
        media_types=(("application/octet-stream", "1.2.840.10008.1.2.1"),))
    assert explicit[0] == expected
    refused = requests.get(
        f"{server}/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/1",
        auth=("doc", PASSWORDS["doc"]), timeout=30,
        headers={"Accept": 'multipart/related; type="image/jls"; '
                           "transfer-syntax=1.2.840.10008.1.2.4.80"})
    assert refused.status_code == 406 and "Explicit VR Little Endian" in refused.text
    assert "gzip" not in (refused.headers.get("Content-Encoding") or "")
    jpeg = c.retrieve_instance_rendered(study, series, sop, media_types=("image/jpeg",))
    assert Image.open(io.BytesIO(jpeg)).size == (512, 512)


@pytest.mark.parametrize("name", MULTIFRAME)
def test_multiframe_frames_equal_the_files_frames(server, raw, name):
    c = client(server, "doc")
    row = next(r for r in raw if r["path"].endswith(f"mr/{name}"))
    assert row["number_of_frames"] == 10
    original = pydicom.dcmread(io.BytesIO(read_input(row["path"])))
    frames = c.retrieve_instance_frames(row["study_instance_uid"], row["series_instance_uid"],
                                        row["sop_instance_uid"], [2, 10],
                                        media_types=(("*/*"),))
    if original.file_meta.TransferSyntaxUID.is_compressed:
        expected = list(pydicom.encaps.generate_frames(original.PixelData,
                                                       number_of_frames=10))
        assert frames == [expected[1], expected[9]]
    else:
        size = len(original.PixelData) // 10
        assert frames == [original.PixelData[size:2 * size], original.PixelData[9 * size:]]
    metadata = c.retrieve_instance_metadata(row["study_instance_uid"],
                                            row["series_instance_uid"], row["sop_instance_uid"])
    assert metadata["00280008"]["Value"] == [10]
    beyond = requests.get(
        f"{server}/dicomweb/studies/{row['study_instance_uid']}/series/"
        f"{row['series_instance_uid']}/instances/{row['sop_instance_uid']}/frames/11",
        auth=("doc", PASSWORDS["doc"]), timeout=30)
    assert beyond.status_code in (400, 404) and "11" in beyond.text


def test_analyst_sees_no_identifying_values(server, raw):
    a = client(server, "ana")
    identifying = {v for r in raw for v in (r["patient_id"], r["patient_name"],
                                            r["accession_number"], r["sop_instance_uid"],
                                            r["series_instance_uid"], r["study_instance_uid"])
                   if v}
    studies = a.search_for_studies(fields=["all"])
    assert len(studies) == len({r["study_instance_uid"] for r in raw})
    study = _value(studies[0], "0020000D")
    series = a.search_for_series(study)
    instances = a.search_for_instances(study, fields=["00100010", "00100020"])
    seen = repr([studies, series, instances, a.retrieve_study_metadata(study)])
    sop = instances[0]
    ds = a.retrieve_instance(study, _value(sop, "0020000E"), _value(sop, "00080018"))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    header = buffer.getvalue()[:-len(ds.PixelData)]
    for value in identifying:
        assert value not in seen, value
        assert value.encode() not in header, value
    raw_row = next(r for r in raw if r["study_instance_uid"] not in seen)
    hidden = requests.get(f"{server}/dicomweb/studies/{raw_row['study_instance_uid']}/metadata",
                          auth=("ana", PASSWORDS["ana"]), timeout=30)
    assert hidden.status_code == 404  # a raw UID names nothing in the analyst's view


def test_an_analysts_search_is_no_oracle_for_raw_identifiers(server, raw):
    """An attacker who knows a patient's real ID, name, accession number or UIDs cannot learn
    from an analyst's QIDO-RS whether that patient is in the lake: matching runs over the
    de-identified values only, so every such probe (exact, wildcard, fuzzy) finds nothing,
    at every level, while the same probes as a clinician find the patient."""
    a, doc = client(server, "ana"), client(server, "doc")
    row = next(r for r in raw if r["patient_id"] and r["patient_name"])
    family = str(row["patient_name"]).split("^")[0]
    study = [{"PatientID": row["patient_id"]}, {"PatientID": f"{row['patient_id'][:-1]}*"},
             {"PatientName": f"{family}*"}, {"StudyInstanceUID": row["study_instance_uid"]}]
    if row["accession_number"]:
        study.append({"AccessionNumber": row["accession_number"]})
    series = [*study, {"SeriesInstanceUID": row["series_instance_uid"]}]
    instances = [*series, {"SOPInstanceUID": row["sop_instance_uid"]}]
    for search, probes in (("search_for_studies", study), ("search_for_series", series),
                           ("search_for_instances", instances)):
        for probe in probes:
            assert getattr(doc, search)(search_filters=probe), (search, probe)
            assert getattr(a, search)(search_filters=probe) == [], (search, probe)
    assert a.search_for_studies(search_filters={"PatientName": family[:3]},
                                fuzzymatching=True) == []


def _held_out_file(raw: list[dict], burned_in: bool) -> bytes:
    row = _uncompressed_ct(raw)
    ds = pydicom.dcmread(io.BytesIO(read_input(row["path"])))
    ds = copy.deepcopy(ds)
    ds.PatientID, ds.PatientName = "STOW-HELD-OUT", "Stow^Held"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_store_then_find_and_burned_in_pixels_withheld(server, raw):
    data = _held_out_file(raw, burned_in=True)
    ds = pydicom.dcmread(io.BytesIO(data))
    refused = client(server, "ana")
    with pytest.raises(requests.HTTPError) as info:
        refused.store_instances([ds])
    assert info.value.response.status_code == 403
    # without a running stream the store answers once the batch ingest child is done (a
    # Spark start and an ingest: longer than the client's default 20 s, after which it
    # would send the same instances again)
    response = client(server, "doc", timeout=600).store_instances([ds])
    referenced = response.ReferencedSOPSequence
    assert [str(x.ReferencedSOPInstanceUID) for x in referenced] == [str(ds.SOPInstanceUID)]
    doc = client(server, "doc")
    found = doc.search_for_instances(search_filters={"SOPInstanceUID": str(ds.SOPInstanceUID)})
    assert len(found) == 1  # stored means findable: the response waited for the way in
    frames = doc.retrieve_instance_frames(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                          str(ds.SOPInstanceUID), [1])
    assert frames[0] == ds.PixelData
    ana = client(server, "ana")
    deadline = time.monotonic() + 120
    mine: list[dict] = []
    while time.monotonic() < deadline and not mine:  # the de-identified twin follows
        mine = [i for i in ana.search_for_instances(search_filters={"Rows": "512"},
                                                    fields=["00280301"])
                if _value(i, "00280301") == "YES"]
        time.sleep(1)
    assert mine, "the stored instance never reached the analyst's view"
    target = mine[0]
    withheld = requests.get(
        f"{server}/dicomweb/studies/{_value(target, '0020000D')}/series/"
        f"{_value(target, '0020000E')}/instances/{_value(target, '00080018')}/frames/1",
        auth=("ana", PASSWORDS["ana"]), timeout=30)
    assert withheld.status_code == 403 and "BurnedInAnnotation" in withheld.json()["message"]


def test_refusals_are_audited(server):
    requests.get(f"{server}/dicomweb/studies?StudyDate=nonsense",
                 auth=("ana", PASSWORDS["ana"]), timeout=30)
    with connect_as(server, "root", PASSWORDS["root"]) as conn:
        cur = conn.cursor()
        cur.execute("SELECT error_message, http_status FROM system.audit_log "
                    "WHERE event = 'request_refused' AND \"user\" = 'ana'")
        refusals = cur.fetchall()
        cur.execute("SELECT count(*) FROM system.audit_log WHERE event = 'dicomweb'")
        answered = cur.fetchall()[0][0]
    assert any("StudyDate" in m and status == 400 for m, status in refusals)
    assert any(status == 403 for _, status in refusals)  # the analyst's STOW
    assert answered > 0


def test_member_cache_keeps_a_whole_series_by_bytes(tmp_path):
    """A viewer walks a series frame by frame and back: a 40-image series must stay cached
    (a cache of 16 members missed on every request), and the byte budget is what evicts."""
    import zipfile

    from dicomlake.catalog.archives import MEMBER_SEPARATOR
    from dicomlake.dicomnet.wado import MemberCache

    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for n in range(40):
            zf.writestr(f"IM{n:03d}", bytes([n]) * 1000)
    paths = [f"{archive}{MEMBER_SEPARATOR}IM{n:03d}" for n in range(40)]
    cache = MemberCache(max_bytes=40_000)
    first = [cache.read(p) for p in paths]
    assert [cache.read(p) for p in paths] == first
    assert all(a is b for a, b in zip(first, [cache.read(p) for p in paths], strict=True))
    small = MemberCache(max_bytes=2_500)
    a, b = small.read(paths[0]), small.read(paths[1])
    assert small.read(paths[0]) is a and small.read(paths[1]) is b
    small.read(paths[2])  # 3,000 bytes > 2,500: the least recently used (IM000) goes
    assert small.read(paths[1]) is b
    again = small.read(paths[0])
    assert again == a and again is not a
