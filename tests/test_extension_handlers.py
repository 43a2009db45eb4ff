"""The extension's HTTP handlers in a real ``jupyter lab``, against a real ``dicomlake serve``
on a small embedded lake: authentication, identity mapping, the schema tree, paging, errors
with positions, cancel, the browser's statements, and upload (through the stream while its
job runs, else through ingest)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import time
import zipfile

import pytest
import requests
from _extension_helpers import SQL_PASSWORD, SQL_USER, lab_servers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(request, spark, settings, sample_archives, tmp_path_factory):
    servers = lab_servers(request, spark, settings, sample_archives, tmp_path_factory)
    servers.default_identity()
    yield servers
    servers.default_identity()


class Api:
    """One Jupyter user calling the extension: token auth makes a new anonymous user per
    request unless the login cookie it sets comes back, as it does from a browser."""

    def __init__(self, servers, session: requests.Session) -> None:
        self.servers, self.session = servers, session

    def get(self, path, **params):
        return self.session.get(self.servers.api(path), params=params, timeout=300)

    def post(self, path, body=None, **kwargs):
        if body is not None:
            kwargs["json"] = body
        return self.session.post(self.servers.api(path), timeout=300, **kwargs)

    def delete(self, path):
        return self.session.delete(self.servers.api(path), timeout=300)

    def run(self, sql, *, limit=100):
        started = self.post("queries", {"sql": sql})
        assert started.status_code == 201, started.text
        page = started.json()
        while not page["done"]:
            page = self.get(f"queries/{page['id']}", offset=0, limit=limit, wait=5).json()
        return self.get(f"queries/{page['id']}", offset=0, limit=limit).json()

    def browse(self, action, body):
        response = self.post(f"browse/{action}", body)
        assert response.status_code == 200, response.text
        doc = response.json()
        assert doc["error"] is None, doc["error"]
        return doc


@pytest.fixture(scope="module")
def api(servers):
    with requests.Session() as session:
        session.headers.update(servers.auth)
        yield Api(servers, session)


# ---- authentication and identity -----------------------------------------------------------


@pytest.mark.parametrize("path", ["status", "catalog", "completions", "queries/" + "0" * 32])
def test_unauthenticated_calls_are_refused(servers, path):
    response = requests.get(servers.api(path), timeout=30)
    assert response.status_code == 403
    response = requests.post(servers.api("queries"), json={"sql": "SELECT 1"}, timeout=30)
    assert response.status_code == 403


def test_status_shows_the_mapped_sql_user_not_its_password(api, servers):
    response = api.get("status")
    doc = response.json()
    assert doc["connected"] is True, doc
    assert doc["sqlUser"] == SQL_USER and doc["endpoint"] == servers.sql_url
    assert "dicomlake" in doc["serverVersion"]
    assert SQL_PASSWORD not in response.text


def test_unmapped_jupyter_user_is_refused_with_the_fix(api, servers):
    servers.map_identity({"somebody-else": {"sql_user": SQL_USER, "password": SQL_PASSWORD}})
    try:
        response = api.get("catalog")
        assert response.status_code == 403
        assert "dicomlake jupyter map" in response.json()["message"]
        assert api.get("status").json()["connected"] is False
    finally:
        servers.default_identity()
    assert api.get("catalog").status_code == 200


def test_wrong_sql_password_is_an_endpoint_error(api, servers):
    servers.map_identity({"*": {"sql_user": SQL_USER, "password": "not the password"}})
    try:
        response = api.get("catalog")
        assert response.status_code == 502
        assert "refused the credentials" in response.json()["message"]
    finally:
        servers.default_identity()


def test_endpoint_down_is_reported(api, servers):
    servers.map_identity({"*": {"sql_user": SQL_USER, "password": SQL_PASSWORD}})
    doc = servers.identities.read_text().replace(servers.sql_url, "http://127.0.0.1:9")
    servers.identities.write_text(doc)
    try:
        status = api.get("status").json()
        assert status["connected"] is False and "cannot be reached" in status["error"]
        assert api.get("catalog").status_code == 502
    finally:
        servers.default_identity()


# ---- schema tree and completion -------------------------------------------------------------


def test_schema_tree_levels(api):
    catalogs = api.get("catalog").json()
    assert catalogs["sql"] == "SHOW CATALOGS"
    assert "dicomlake" in [i["name"] for i in catalogs["items"]]
    schemas = api.get("catalog", catalog="dicomlake").json()
    assert "dicom" in [i["name"] for i in schemas["items"]]
    tables = api.get("catalog", catalog="dicomlake", schema="dicom").json()
    assert {"instances", "series", "studies"} <= {i["name"] for i in tables["items"]}
    columns = api.get("catalog", catalog="dicomlake", schema="dicom",
                  table="instances").json()
    types = {i["name"]: i["type"] for i in columns["items"]}
    assert types["modality"] == "varchar" and types["study_date"] == "date"
    assert columns["sql"] == 'SHOW COLUMNS FROM "dicomlake"."dicom"."instances"'


def test_missing_table_in_tree_is_an_error_document(api):
    doc = api.get("catalog", catalog="dicomlake", schema="dicom", table="nope").json()
    assert doc["items"] == [] and doc["error"]["name"] == "TABLE_NOT_FOUND"


def test_completions_list_tables_and_columns(api):
    doc = api.get("completions").json()
    assert "modality" in doc["tables"]["dicom.instances"]
    assert "study_instance_uid" in doc["tables"]["dicom.studies"]


# ---- sidebar queries: paging, errors, cancel ---------------------------------------------------


def test_paging_returns_every_row_once_in_order(api):
    sql = "SELECT id FROM range(0, 250) ORDER BY id"
    page = api.run(sql, limit=100)
    assert page["state"] == "FINISHED" and page["totalRows"] == 250
    assert [c["name"] for c in page["columns"]] == ["id"]
    ids = []
    for offset in (0, 100, 200):
        doc = api.get(f"queries/{page['id']}", offset=offset, limit=100).json()
        assert doc["offset"] == offset
        ids += [row[0] for row in doc["rows"]]
    assert ids == list(range(250))
    past = api.get(f"queries/{page['id']}", offset=1000, limit=100).json()
    assert past["rows"] == [] and past["totalRows"] == 250


def test_lake_rows_match_the_endpoint(api):
    page = api.run("SELECT modality, count(*) AS n FROM dicom.instances "
                              "GROUP BY modality ORDER BY n DESC, modality")
    assert page["error"] is None and page["rows"]
    assert sum(row[1] for row in page["rows"]) == sum(
        row[1] for row in api.run("SELECT 'all', count(*) FROM dicom.instances")
        ["rows"])


def test_unknown_column_error_has_its_position(api):
    page = api.run("SELECT modality,\n       no_such_column\nFROM dicom.instances")
    assert page["state"] == "FAILED"
    error = page["error"]
    assert error["name"] == "COLUMN_NOT_FOUND" and "no_such_column" in error["message"]
    assert (error["line"], error["column"]) == (2, 8)


def test_syntax_error_has_its_position(api):
    page = api.run("SELECT * FROM dicom.instances WHERE")
    assert page["error"]["name"] == "SYNTAX_ERROR" and page["error"]["line"] == 1


def test_cancel_stops_a_running_query(api):
    started = api.post("queries", {"sql": "SELECT count(*) FROM range(0, 20000000000)"})
    query_id = started.json()["id"]
    cancelled = api.delete(f"queries/{query_id}").json()
    assert cancelled["state"] == "CANCELED" and cancelled["done"]
    assert cancelled["error"]["name"] == "USER_CANCELED"
    assert api.get(f"queries/{query_id}").json()["state"] == "CANCELED"


def test_unknown_query_and_empty_sql(api):
    assert api.get("queries/" + "f" * 32).status_code == 404
    assert api.post("queries", {"sql": "  "}).status_code == 400


def test_read_only_role_is_enforced_by_the_endpoint(api):
    page = api.run("DROP TABLE dicom.instances")
    assert page["error"]["name"] == "PERMISSION_DENIED"


# ---- dataset browser ------------------------------------------------------------------------


def test_filter_choices_and_modality_filter(api):
    modalities = [r["value"] for r in api.browse("modalities", {})["records"]]
    assert "CT" in modalities
    studies = api.browse("studies", {"filters": {"modality": "CT"}})
    assert "modality = 'CT'" in studies["sql"]
    assert studies["records"] and all("CT" in s["modalities"] for s in studies["records"])
    every = api.browse("studies", {"limit": 200})["records"]
    assert len(every) >= len(studies["records"])


def test_free_text_and_dates_filter(api):
    every = api.browse("studies", {"limit": 200})["records"]
    dated = [s for s in every if s["study_date"]]
    assert dated
    day = dated[0]["study_date"]
    same_day = api.browse("studies", {"filters": {"dateFrom": day, "dateTo": day},
                                           "limit": 200})["records"]
    assert same_day and all(s["study_date"] == day for s in same_day)
    nothing = api.browse("studies", {"filters": {"text": "no such patient 'x%"}})
    assert nothing["records"] == [] and "ESCAPE" in nothing["sql"]


def test_study_series_instance_drill_down_with_thumbnails(api):
    study = api.browse("studies", {"filters": {"modality": "CT"}})["records"][0]
    series = api.browse("series", {"study": study["study_instance_uid"]})["records"]
    assert series and all(s["thumbnail"] for s in series)
    assert base64.b64decode(series[0]["thumbnail"]).startswith(b"\x89PNG")
    instances = api.browse("instances", {"series": series[0]["series_instance_uid"],
                                              "limit": 5})
    assert 0 < len(instances["records"]) <= 5 and "dicom_thumbnail(path)" in instances["sql"]
    detail = api.browse("instance", {"sop": instances["records"][0]["sop_instance_uid"]})
    record = detail["records"][0]
    assert record["meta"].startswith("{") and record["study_instance_uid"] == \
        study["study_instance_uid"]


def test_find_similar_orders_neighbours_by_distance(api):
    study = api.browse("studies", {"filters": {"modality": "CT"}})["records"][0]
    series = api.browse("series", {"study": study["study_instance_uid"]})["records"][0]
    sop = api.browse("instances", {"series": series["series_instance_uid"]}
                 )["records"][0]["sop_instance_uid"]
    similar = api.browse("similar", {"sop": sop, "k": 6})
    assert "image_knn(query =>" in similar["sql"]
    rows = similar["records"]
    assert len(rows) == 6 and [r["rank"] for r in rows] == sorted(r["rank"] for r in rows)
    distances = [r["distance"] for r in rows]
    assert distances == sorted(distances) and distances[0] == pytest.approx(0.0, abs=1e-3)
    # the image itself is among the nearest (the sample repeats some images exactly)
    assert sop in [r["sop_instance_uid"] for r in rows if r["distance"] < 1e-3]


def test_find_similar_error_is_shown_with_its_sql(api):
    response = api.post("browse/similar", {"sop": "9.9.9.9"})
    doc = response.json()
    assert response.status_code == 200 and doc["error"]["message"]
    assert doc["records"] == [] and "image_knn(query => '9.9.9.9'" in doc["sql"]


@pytest.mark.parametrize("action,body", [
    ("series", {"study": "1.2'; DROP TABLE dicom.instances; --"}),
    ("studies", {"filters": {"modality": "CT' OR 1=1 --"}}),
    ("studies", {"filters": {"dateFrom": "yesterday"}}),
    ("studies", {"filters": {"dateFrom": "2020-02-01", "dateTo": "2020-01-01"}}),
    ("instances", {"series": "1.2", "limit": 100000}),
    ("similar", {"sop": "1.2", "k": 0}),
])
def test_bad_browser_input_is_rejected_before_sql(api, action, body):
    response = api.post(f"browse/{action}", body)
    assert response.status_code == 400
    assert response.json()["message"]


def test_unknown_browse_action(api):
    assert api.post("browse/drop-everything", {}).status_code == 404


# ---- upload -----------------------------------------------------------------------------------


def test_upload_ingests_and_embeds(api, tmp_path):
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from dicomlake.catalog.sample import find_template

    ds = dcmread(find_template("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    upload = tmp_path / "ct scan.dcm"
    ds.save_as(upload)
    before = api.run("SELECT count(*) FROM dicom.instances")["rows"][0][0]
    with upload.open("rb") as fh:
        response = api.post("uploads",
                                 files={"files": (upload.name, fh, "application/dicom")})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["files"] == ["ct_scan.dcm"] and "dicomlake.extension.upload" in job["command"]
    assert job["path"] == "batch" and "no stream job runs" in job["pathReason"]
    deadline = time.monotonic() + 600
    while job["state"] == "RUNNING" and time.monotonic() < deadline:
        time.sleep(2)
        job = api.get(f"uploads/{job['id']}").json()
    assert job["state"] == "FINISHED", job["output"]
    assert (job["summary"]["files_seen"], job["summary"]["rows_written"]) == (1, 1)
    assert job["summary"]["embedded"] >= 1, job["summary"]
    assert job["check"]["records"][0]["instances"] == 1
    after = api.run("SELECT count(*) FROM dicom.instances")["rows"][0][0]
    assert after == before + 1
    similar = api.browse("similar", {"sop": str(ds.SOPInstanceUID), "k": 3})
    nearest = [r["sop_instance_uid"] for r in similar["records"] if r["distance"] < 1e-3]
    assert str(ds.SOPInstanceUID) in nearest


def test_upload_refuses_other_files_and_unpermitted_users(api, servers):
    response = api.post("uploads",
                             files={"files": ("notes.dcm", b"hello", "application/dicom")})
    message = response.json()["message"]
    assert response.status_code == 400 and "notes.dcm" in message and "b'hello'" in message
    servers.map_identity({"*": {"sql_user": SQL_USER, "password": SQL_PASSWORD,
                                "upload": False}})
    try:
        response = api.post("uploads",
                                 files={"files": ("a.dcm", b"DICM", "application/dicom")})
        assert response.status_code == 403
    finally:
        servers.default_identity()


@pytest.fixture
def stream_running(servers):
    """The lab's lake with the embedded broker and a job record naming a live process: what
    `dicomlake stream status` reads as a running job. No Flink job: the records are read back
    from the topic instead."""
    from dicomlake.config import Settings
    from dicomlake.streaming.broker import EmbeddedBroker, ensure_topics
    from dicomlake.streaming.settings import StreamSettings, state_dir

    state = state_dir(Settings(home=servers.home))
    broker = EmbeddedBroker.start(state)
    stand_in = subprocess.Popen(["sleep", "600"])
    try:
        ensure_topics(broker.bootstrap, StreamSettings())
        (state / "job.json").write_text(json.dumps({"pid": stand_in.pid,
                                                    "started_at": time.time()}))
        yield broker.bootstrap
    finally:
        (state / "job.json").unlink(missing_ok=True)
        stand_in.kill()
        stand_in.wait()
        broker.stop(state)


def _new_records(bootstrap, offsets, want, timeout=30.0):
    """Records after ``offsets`` on the upload topic, by their name header."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        consumer.assign(list(offsets))
        for tp, offset in offsets.items():
            consumer.seek(tp, offset)
        found = {}
        deadline = time.monotonic() + timeout
        while len(found) < want and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=300).values():
                for m in batch:
                    found[dict(m.headers)["dicomlake-name"].decode()] = m.value
        return found
    finally:
        consumer.close()


def test_upload_goes_through_the_stream_while_its_job_runs(api, stream_running):
    from kafka import KafkaConsumer, TopicPartition
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from dicomlake.catalog.sample import find_template

    ds = dcmread(find_template("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    image = io.BytesIO()
    ds.save_as(image)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("study/ct.dcm", image.getvalue())
        zf.writestr("study/notes.txt", b"not an image\n" * 20)
    probe = KafkaConsumer(bootstrap_servers=stream_running)
    offsets = probe.end_offsets([TopicPartition("imageupload", p) for p in range(9)])
    probe.close()
    before = api.run("SELECT count(*) FROM dicom.instances")["rows"][0][0]

    response = api.post("uploads", files={"files": ("study.zip", archive.getvalue(),
                                                    "application/zip")})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["path"] == "stream" and stream_running in job["pathReason"], job
    deadline = time.monotonic() + 60
    while job["state"] == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
        job = api.get(f"uploads/{job['id']}").json()
    assert job["state"] == "FINISHED", job["output"]
    assert {d["name"]: (d["status"], d["kind"]) for d in job["deliveries"]} == {
        "study.zip!/study/ct.dcm": ("sent", None),
        "study.zip!/study/notes.txt": ("not_sent", "not_dicom")}
    assert job["summary"]["path"] == "stream" and job["summary"]["sent"] == 1

    records = _new_records(stream_running, offsets, want=1)
    assert len(records) == 1, records.keys()
    (name, value), = records.items()
    assert name.endswith(f"/{job['id']}/study.zip!/study/ct.dcm") and value == image.getvalue()
    # the check counts what the stream job wrote from these images: no job writes here
    assert "source_fingerprint IN" in job["check"]["sql"] and job["check"]["error"] is None
    assert job["check"]["records"][0]["instances"] == 0
    assert api.run("SELECT count(*) FROM dicom.instances")["rows"][0][0] == before
