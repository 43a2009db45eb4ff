"""Fast checks of the extension's pure parts: the browser's SQL and its input rules, the
identities file, ``dicomlake.extension.browse`` in a notebook, and the CLI mapping command."""

from __future__ import annotations

import json
import os
import stat

import pytest
from click.testing import CliRunner

from dicomlake.extension import browse
from dicomlake.extension.browse_sql import (
    BrowseInputError,
    Filters,
    check_uid,
    page_args,
    similar_sql,
    studies_sql,
)
from dicomlake.extension.identities import IdentityError, IdentityMap


def test_studies_sql_without_filters_pages_newest_first():
    sql = studies_sql(Filters(), 50, 25)
    assert "WHERE" not in sql
    assert sql.endswith("ORDER BY s.study_date DESC NULLS LAST, s.study_instance_uid\n"
                        "OFFSET 50 LIMIT 25")


def test_filters_become_conditions():
    filters = Filters.from_json({"modality": "MR", "bodyPart": "HEAD", "dateFrom": "2020-01-01",
                                 "dateTo": "2020-12-31", "text": "O'Brien 50%_"})
    sql = studies_sql(filters, 0, 10)
    assert "se.modality = 'MR' AND se.body_part_examined = 'HEAD'" in sql
    assert "s.study_date >= DATE '2020-01-01'" in sql
    assert "s.study_date <= DATE '2020-12-31'" in sql
    assert "LIKE '%o''brien 50\\%\\_%' ESCAPE '\\'" in sql


@pytest.mark.parametrize("doc, message", [
    ({"modality": "CT'--"}, "modality must be a short code"),
    ({"dateFrom": "01/02/2020"}, "dateFrom must be a date"),
    ({"dateFrom": "2021-01-01", "dateTo": "2020-01-01"}, "is after dateTo"),
    ({"text": "x" * 201}, "longer than 200"),
    ({"text": "a\nb"}, "control characters"),
])
def test_bad_filters_are_refused(doc, message):
    with pytest.raises(BrowseInputError, match=message):
        Filters.from_json(doc)


def test_uids_and_paging_are_checked():
    assert check_uid("1.2.840.10008.1", "sop") == "1.2.840.10008.1"
    for bad in ("", "1.2.", "1..2", "1.2 OR 1=1", "9" * 65):
        with pytest.raises(BrowseInputError, match="sop must be a DICOM UID"):
            check_uid(bad, "sop")
    assert page_args({}) == (0, 50)
    with pytest.raises(BrowseInputError, match="limit must be between 1 and 200"):
        page_args({"limit": 500})
    with pytest.raises(BrowseInputError, match="offset must be an integer"):
        page_args({"offset": "x"})


def test_similar_sql_orders_by_distance():
    sql = similar_sql("1.2.3", 7)
    assert "FROM image_knn(query => '1.2.3', k => 7) n" in sql
    assert sql.endswith("ORDER BY n.distance, n.rank")


def test_browse_in_a_notebook_is_a_mime_bundle():
    view = browse(modality="CT", date_from="2020-01-02")
    bundle = view._repr_mimebundle_()
    assert bundle["application/vnd.dicomlake.browser+json"] == {
        "filters": {"modality": "CT", "dateFrom": "2020-01-02"}}
    assert "dataset browser" in bundle["text/plain"]
    with pytest.raises(ValueError, match="date_from must be a date"):
        browse(date_from="yesterday")


def test_identities_map_star_and_named_users(tmp_path, monkeypatch):
    monkeypatch.delenv("DICOMLAKE_SQL_URL", raising=False)
    path = tmp_path / "identities.json"
    identities = IdentityMap(path)
    with pytest.raises(IdentityError, match="dicomlake jupyter map alice"):
        identities.connection_for("alice")
    path.write_text(json.dumps({"endpoint": "http://127.0.0.1:9999/", "users": {
        "*": {"sql_user": "reader", "password": "p1"},
        "alice": {"sql_user": "alice", "password": "p2", "upload": True}}}))
    assert identities.connection_for("alice").identity.sql_user == "alice"
    bob = identities.connection_for("bob")
    assert (bob.endpoint, bob.identity.sql_user, bob.identity.upload) == \
        ("http://127.0.0.1:9999", "reader", False)
    monkeypatch.setenv("DICOMLAKE_SQL_URL", "http://127.0.0.1:7777")
    assert identities.connection_for("bob").endpoint == "http://127.0.0.1:7777"


def test_broken_identities_file_names_the_file(tmp_path):
    path = tmp_path / "identities.json"
    path.write_text(json.dumps({"users": {"*": {"sql_user": "x"}}}))
    with pytest.raises(IdentityError, match="needs 'sql_user' and 'password'"):
        IdentityMap(path).connection_for("anyone")


def test_jupyter_map_command_writes_a_private_file(tmp_path, monkeypatch):
    from dicomlake.cli import main

    path = tmp_path / "ids.json"
    monkeypatch.setenv("DICOMLAKE_JUPYTER_IDENTITIES", str(path))
    result = CliRunner().invoke(main, ["jupyter", "map", "*", "--sql-user", "lab",
                                       "--password-stdin", "--upload",
                                       "--endpoint", "http://127.0.0.1:8081"],
                                input="s3cret pass\n")
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc == {"endpoint": "http://127.0.0.1:8081", "users": {
        "*": {"sql_user": "lab", "password": "s3cret pass", "upload": True}}}
