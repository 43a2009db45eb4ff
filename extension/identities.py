"""Which dicomlake SQL user a Jupyter user acts as, and where the SQL endpoint is.

The browser never holds lake credentials: the Jupyter server looks its authenticated user up
in a server-side file, ``<home>/jupyter/identities.json`` (mode 0600, written by
``dicomlake lab`` or ``dicomlake jupyter map``), and sends that SQL user's credentials to the
Trino-protocol endpoint itself. A ``"*"`` entry maps every Jupyter user not named explicitly
(single-user JupyterLab gives its user a random name). The file is re-read when it changes, so
mapping a user needs no server restart.

``$DICOMLAKE_JUPYTER_IDENTITIES`` points at another file; ``$DICOMLAKE_SQL_URL`` overrides the
endpoint written in it.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from dicomlake.config import load_settings
from dicomlake.errors import DicomlakeError

DEFAULT_ENDPOINT = "http://127.0.0.1:8080"
"""Where ``dicomlake serve`` listens by default."""
ANY_USER = "*"
"""The entry that maps every Jupyter user without an entry of their own."""


class IdentityError(DicomlakeError):
    """No usable mapping for a Jupyter user (the message says how to add one)."""


@dataclass(frozen=True)
class Identity:
    """The SQL user one Jupyter user acts as."""

    sql_user: str
    password: str
    upload: bool = False
    """May this user add files to the lake (upload runs an ingest on the server)."""


@dataclass(frozen=True)
class Connection:
    """The endpoint and the identity to use for one request."""

    endpoint: str
    identity: Identity


def identities_path() -> Path:
    """The identities file of the current lake home (or ``$DICOMLAKE_JUPYTER_IDENTITIES``)."""
    named = os.environ.get("DICOMLAKE_JUPYTER_IDENTITIES")
    if named:
        return Path(named).expanduser()
    return load_settings().home / "jupyter" / "identities.json"


def _parse_identity(name: str, raw: object, path: Path) -> Identity:
    if not isinstance(raw, dict) or not raw.get("sql_user") or "password" not in raw:
        raise IdentityError(f"dicomlake identities file {path}: entry {name!r} needs "
                            "'sql_user' and 'password'")
    return Identity(str(raw["sql_user"]), str(raw["password"]), bool(raw.get("upload", False)))


class IdentityMap:
    """The identities file, re-read when its modification time changes."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or identities_path()
        self._lock = threading.Lock()
        self._seen: int | None = None
        self._endpoint = DEFAULT_ENDPOINT
        self._users: dict[str, Identity] = {}

    def _refresh(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._seen, self._users, self._endpoint = None, {}, DEFAULT_ENDPOINT
            return
        if mtime == self._seen:
            return
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise IdentityError(f"dicomlake identities file {self.path} cannot be read: "
                                f"{exc}") from exc
        users = data.get("users", {}) if isinstance(data, dict) else {}
        self._users = {str(k): _parse_identity(str(k), v, self.path) for k, v in users.items()}
        self._endpoint = str(data.get("endpoint") or DEFAULT_ENDPOINT).rstrip("/")
        self._seen = mtime

    @property
    def endpoint(self) -> str:
        """The SQL endpoint URL (``$DICOMLAKE_SQL_URL`` wins over the file)."""
        with self._lock:
            self._refresh()
            return os.environ.get("DICOMLAKE_SQL_URL", self._endpoint).rstrip("/")

    def connection_for(self, jupyter_user: str) -> Connection:
        """Endpoint and identity for ``jupyter_user``.

        Raises:
            IdentityError: no entry for the user and no ``"*"`` entry.
        """
        endpoint = self.endpoint
        with self._lock:
            identity = self._users.get(jupyter_user) or self._users.get(ANY_USER)
        if identity is None:
            raise IdentityError(
                f"Jupyter user {jupyter_user!r} is not mapped to a dicomlake SQL user in "
                f"{self.path}; an administrator adds one with `dicomlake jupyter map "
                f"{jupyter_user} --sql-user NAME --password-stdin` (or '*' for everyone)")
        return Connection(endpoint, identity)


def write_identity(path: Path, jupyter_user: str, identity: Identity, *,
                   endpoint: str | None = None) -> None:
    """Add or replace one mapping (and optionally the endpoint); the file stays mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, object] = {"endpoint": DEFAULT_ENDPOINT, "users": {}}
    if path.exists():
        data = json.loads(path.read_text())
    if endpoint:
        data["endpoint"] = endpoint
    users = dict(data.get("users", {}))  # type: ignore[call-overload]
    users[jupyter_user] = {"sql_user": identity.sql_user, "password": identity.password,
                           "upload": identity.upload}
    data["users"] = users
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)
