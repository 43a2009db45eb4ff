"""``dicomlake.sql.notebook``: a notebook kernel connects as the SQL user the Jupyter server's
identities file maps its user to, at the endpoint named there. (Running a query through it
against a real ``dicomlake serve`` is in ``test_extension_results.py``, where the servers are.)
"""

from __future__ import annotations

import json
import os

import pytest

from dicomlake.extension.identities import IdentityError
from dicomlake.sql.notebook import connect


@pytest.fixture
def identities(tmp_path, monkeypatch):
    """An identities file with a '*' entry and one for alice; JUPYTERHUB_USER unset."""
    path = tmp_path / "identities.json"
    path.write_text(json.dumps({"endpoint": "http://127.0.0.1:18080", "users": {
        "*": {"sql_user": "everyone", "password": "pw-everyone"},
        "alice": {"sql_user": "alice_sql", "password": "pw-alice"}}}))
    os.chmod(path, 0o600)
    monkeypatch.setenv("DICOMLAKE_JUPYTER_IDENTITIES", str(path))
    monkeypatch.delenv("JUPYTERHUB_USER", raising=False)
    monkeypatch.delenv("DICOMLAKE_SQL_URL", raising=False)
    return path


def test_single_user_lab_uses_the_star_entry(identities):
    conn = connect()
    assert (conn.host, conn.port, conn.http_scheme) == ("127.0.0.1", 18080, "http")
    assert conn.user == "everyone" and conn.auth._password == "pw-everyone"
    assert (conn.catalog, conn.schema, conn.source) == ("dicomlake", "dicom",
                                                          "dicomlake-notebook")


def test_hub_user_and_explicit_user_get_their_own_mapping(identities, monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    assert connect().user == "alice_sql"
    monkeypatch.delenv("JUPYTERHUB_USER")
    assert connect(jupyter_user="alice").user == "alice_sql"
    # an unmapped name falls back to '*', as the Jupyter server's own lookup does
    assert connect(jupyter_user="bob").user == "everyone"


def test_sql_url_override_and_https(identities, monkeypatch):
    monkeypatch.setenv("DICOMLAKE_SQL_URL", "https://lake.example:8443")
    conn = connect()
    assert (conn.host, conn.port, conn.http_scheme) == ("lake.example", 8443, "https")


def test_no_mapping_says_how_to_add_one(tmp_path, monkeypatch):
    path = tmp_path / "identities.json"
    path.write_text(json.dumps({"endpoint": "http://127.0.0.1:18080", "users": {
        "alice": {"sql_user": "alice_sql", "password": "pw"}}}))
    monkeypatch.setenv("DICOMLAKE_JUPYTER_IDENTITIES", str(path))
    monkeypatch.delenv("JUPYTERHUB_USER", raising=False)
    with pytest.raises(IdentityError, match="dicomlake jupyter map"):
        connect()
