"""Users, roles and password checks for the SQL service.

Passwords are stored only as argon2id hashes (memory-hard, salted, parameters inside the
hash) in ``<home>/sql/users.json``, written atomically with mode 0600 under a file lock so
``dicomlake user ...`` and a running server never see half a file. The server re-reads the
file when it changes, so adding or removing a user needs no restart. Verified credentials are
cached for a few minutes (keyed by a SHA-256 of the password, never the password itself):
argon2 costs ~50 ms on purpose, and a Trino client sends the same credentials on every page
request.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dicomlake.sql.errors import AuthenticationError, UserStoreError

_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD_LENGTH = 8


class Role(StrEnum):
    """What a user may do (see :mod:`dicomlake.sql.roles` for how each is enforced)."""

    ADMIN = "admin"
    """Everything: DDL/DML, session settings, ``system.audit_log``, identifiers in clear."""
    CLINICIAN = "clinician"
    """Queries only; reads the lake's tables (identifiers included) but not ``system``."""
    ANALYST = "analyst"
    """Queries only; reads only the de-identified ``dicom_deid`` tables."""


@dataclass(frozen=True)
class Principal:
    """An authenticated user."""

    name: str
    role: Role


@dataclass(frozen=True)
class UserInfo:
    """A stored user as listed by ``dicomlake user list`` (never the hash)."""

    name: str
    role: Role
    created: str
    updated: str


def _hasher() -> object:
    try:
        from argon2 import PasswordHasher
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ImportError("argon2-cffi is required for SQL users. Install it with "
                          "`pip install --force-reinstall dicomlake`.") from exc
    return PasswordHasher()


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` (salt and cost parameters are inside the string)."""
    return _hasher().hash(password)  # type: ignore[attr-defined]


def verify_password(stored_hash: str, password: str) -> bool:
    """True if ``password`` matches ``stored_hash``; False for a mismatch or a bad hash."""
    from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

    try:
        return bool(_hasher().verify(stored_hash, password))  # type: ignore[attr-defined]
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise UserStoreError(f"user name {name!r} is not allowed; use 1-64 letters, digits, "
                             "'_', '.', '@' or '-'")


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserStoreError(f"password is too short; use at least {MIN_PASSWORD_LENGTH} "
                             "characters")


def parse_role(value: str) -> Role:
    """A role from its name, or an error listing the allowed names."""
    try:
        return Role(value.lower())
    except ValueError:
        allowed = ", ".join(r.value for r in Role)
        raise UserStoreError(f"role {value!r} does not exist; use one of: {allowed}") from None


class UserStore:
    """The users file of one lake home."""

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / "sql" / "users.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, dict[str, str]]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return dict(data["users"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserStoreError(f"users file {self.path} cannot be read ({exc}); restore it "
                                 "from a backup or delete it and add the users again") from exc

    def _write(self, users: dict[str, dict[str, str]]) -> None:
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": 1, "users": users}, fh, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def add(self, name: str, password: str, role: Role) -> None:
        """Create a user; fails if the name is taken."""
        _check_name(name)
        _check_password(password)
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self._locked():
            users = self._read()
            if name in users:
                raise UserStoreError(f"user {name!r} already exists; use `dicomlake user passwd "
                                     f"{name}` to change the password")
            users[name] = {"role": role.value, "hash": hash_password(password),
                           "created": now, "updated": now}
            self._write(users)

    def set_password(self, name: str, password: str) -> None:
        """Replace a user's password."""
        _check_password(password)
        with self._locked():
            users = self._read()
            if name not in users:
                raise UserStoreError(f"user {name!r} does not exist; see `dicomlake user list`")
            users[name]["hash"] = hash_password(password)
            users[name]["updated"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            self._write(users)

    def remove(self, name: str) -> None:
        """Delete a user."""
        with self._locked():
            users = self._read()
            if name not in users:
                raise UserStoreError(f"user {name!r} does not exist; see `dicomlake user list`")
            del users[name]
            self._write(users)

    def list(self) -> list[UserInfo]:
        """All users, sorted by name."""
        return [UserInfo(n, Role(u["role"]), u.get("created", ""), u.get("updated", ""))
                for n, u in sorted(self._read().items())]

    def records(self) -> dict[str, dict[str, str]]:
        """The raw records (name -> role, hash); for the authenticator."""
        return self._read()

    def mtime(self) -> float:
        """When the file last changed (0.0 if it does not exist)."""
        try:
            return self.path.stat().st_mtime_ns / 1e9
        except FileNotFoundError:
            return 0.0


_DUMMY_HASH: str | None = None


class Authenticator:
    """Checks HTTP Basic credentials against a :class:`UserStore`, with a short cache."""

    def __init__(self, store: UserStore, *, cache_seconds: float = 300.0) -> None:
        self.store = store
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], tuple[Principal, float]] = {}
        self._records: dict[str, dict[str, str]] = {}
        self._seen_mtime = -1.0

    def _refresh(self) -> None:
        mtime = self.store.mtime()
        if mtime != self._seen_mtime:
            self._records = self.store.records()
            self._cache.clear()
            self._seen_mtime = mtime

    def authenticate(self, name: str, password: str) -> Principal:
        """The principal for these credentials.

        Raises:
            AuthenticationError: unknown user or wrong password (same message for both, so a
                caller cannot probe for user names; the audit log records which).
        """
        global _DUMMY_HASH
        key = (name, hashlib.sha256(password.encode()).hexdigest())
        with self._lock:
            self._refresh()
            cached = self._cache.get(key)
            if cached is not None and cached[1] > time.monotonic():
                return cached[0]
            record = self._records.get(name)
        if record is None:
            if _DUMMY_HASH is None:
                _DUMMY_HASH = hash_password("not a real password")
            verify_password(_DUMMY_HASH, password)  # same cost as a real check
            raise AuthenticationError(f"unknown user {name!r}")
        if not verify_password(record["hash"], password):
            raise AuthenticationError(f"wrong password for user {name!r}")
        principal = Principal(name, Role(record["role"]))
        with self._lock:
            self._cache[key] = (principal, time.monotonic() + self.cache_seconds)
        return principal


@dataclass
class _Failures:
    count: int
    last: float


class LoginThrottle:
    """Back-off after failed logins, per user name and per client address.

    After ``free_per_user`` failures for a name (or ``free_per_address`` from an address,
    which catches one address spraying many names) each further attempt must wait twice as
    long as the one before (1, 2, 4 ... up to ``max_wait`` seconds); attempts inside the wait
    are refused before any password is checked, so guessing slows to one try per
    ``max_wait``. A success clears that name's and that address's counts; counts are
    forgotten ``forget_seconds`` after the last failure. The price: while someone guesses at
    a name, its owner is refused too (for at most ``max_wait`` seconds at a time).
    """

    def __init__(self, *, free_per_user: int = 5, free_per_address: int = 20,
                 max_wait: float = 60.0, forget_seconds: float = 900.0,
                 max_entries: int = 10_000) -> None:
        self.free = {"user": free_per_user, "address": free_per_address}
        self.max_wait = max_wait
        self.forget_seconds = forget_seconds
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._failures: dict[tuple[str, str], _Failures] = {}

    def _keys(self, user: str | None, address: str | None) -> list[tuple[str, str]]:
        return [(kind, value) for kind, value in (("user", user), ("address", address))
                if value]

    def wait_seconds(self, user: str | None, address: str | None) -> float:
        """Seconds before this user/address may try again (0.0: now)."""
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            for key in self._keys(user, address):
                found = self._failures.get(key)
                if found is None:
                    continue
                if now - found.last > self.forget_seconds:
                    del self._failures[key]
                    continue
                over = found.count - self.free[key[0]]
                if over > 0:
                    delay = min(self.max_wait, 2.0 ** (over - 1))
                    wait = max(wait, found.last + delay - now)
        return max(0.0, wait)

    def failed(self, user: str | None, address: str | None) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) >= self.max_entries:  # a flood of names: forget the oldest
                oldest = sorted(self._failures, key=lambda k: self._failures[k].last)
                for key in oldest[: self.max_entries // 10]:
                    del self._failures[key]
            for key in self._keys(user, address):
                found = self._failures.setdefault(key, _Failures(0, now))
                found.count += 1
                found.last = now

    def succeeded(self, user: str | None, address: str | None) -> None:
        with self._lock:
            for key in self._keys(user, address):
                self._failures.pop(key, None)

