"""HBase code store: table ``image_info``, families ``MD`` / ``MI``, 9 salted regions.

Row key (the reference system's design): ``000x|`` + the last 8 hex characters of the MD5 of
the image id, where ``x`` = MD5 (as a number) mod 9. The image id is the SOPInstanceUID, with
``#<frame>`` appended for frames after the first. ``MI`` holds the image info and code
(``uid``, ``frame``, ``code``, ``cbv`` codebook version, ``list`` IVF list, ``gen``), ``MD``
the PNG thumbnail. The salt spreads writes over the 9 regions; reads scan the 9 regions in
parallel, one thread and connection per region.

Writes are all-or-nothing for readers while one writer publishes at a time: every write
takes a new generation number from a counter in the meta row (``0000|~meta``, outside the hex
key space), stamps its rows with it, and only after every put succeeded publishes it in ONE
mutation of the meta row (HBase and Bigtable apply a single-row mutation atomically): the
newest generation as ``committed``, the writer's app transactions (``txn/<app id>``), and
for a replacing write a ``floor``. Readers keep rows of generations in ``floor ..
committed``, so a write that dies half way is invisible (its rows are rewritten by the next
write), and a replacing write hides every older code at once (older rows are deleted after
publishing, as clean-up). What does not hold: while writer A is still putting rows,
a writer B that started later may publish, and A's rows written so far become visible before
A is complete (its generation is below B's ``committed``). Row keys come from the image id,
so writing the same code again (a replay) overwrites its own row.

Two clients with one Table API: ``happybase`` (HBase Thrift server, ``host``/``port``) and
``google-cloud-happybase`` (Cloud Bigtable or its emulator, ``emulator``). Pre-splitting into
9 regions is done through the Bigtable admin API; happybase's Thrift ``create_table`` cannot
pre-split, so on real HBase create the table with ``SPLITS`` in the HBase shell.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import struct
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dicomlake.udfs.codestore import (
    CODE_COLUMNS,
    code_batches,
    codes_schema,
    empty_codes,
    key_tuples,
)
from dicomlake.udfs.errors import CodeStoreError
from dicomlake.udfs.settings import HBaseSettings

if TYPE_CHECKING:
    import pyarrow as pa

REGIONS = 9
FAMILIES = ("MD", "MI")
META_ROW = b"0000|~meta"
_SPLITS = [f"{i:04d}|".encode() for i in range(1, REGIONS)]
_TXN = b"MI:txn/"
"""Meta-row column prefix of an app transaction (``MI:txn/<app id>``)."""


def image_id(sop_instance_uid: str, frame: int) -> str:
    """The id hashed into the row key (one row per frame)."""
    return sop_instance_uid if frame == 0 else f"{sop_instance_uid}#{frame}"


def row_key(image: str) -> bytes:
    """``000x|`` salt (MD5 mod 9) + last 8 hex characters of the MD5."""
    digest = hashlib.md5(image.encode(), usedforsecurity=False).hexdigest()
    return f"{int(digest, 16) % REGIONS:04d}|{digest[-8:]}".encode()


def _reachable(address: str, port: int, timeout: float) -> None:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return
    except OSError as exc:
        raise CodeStoreError(
            f"HBase code store at {address}:{port} is unreachable ({exc.strerror or exc}); "
            "start it, fix [similarity.hbase] in dicomlake.toml, or set "
            "similarity.code_store = \"delta\". Nothing was written.") from exc


class HBaseCodeStore:
    """Codes in HBase (or Bigtable) under salted row keys."""

    name = "hbase"
    columns: tuple[str, ...] = (*CODE_COLUMNS, "thumbnail")

    def __init__(self, settings: HBaseSettings) -> None:
        self.settings = settings

    # -- connections -------------------------------------------------------------------
    def _address(self) -> tuple[str, int]:
        if self.settings.emulator:
            host, _, port = self.settings.emulator.rpartition(":")
            return host, int(port)
        return self.settings.host, self.settings.port

    def _instance(self) -> Any:
        from google.cloud import bigtable

        os.environ["BIGTABLE_EMULATOR_HOST"] = str(self.settings.emulator)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "Connecting to emulator at"
            client = bigtable.Client(project=self.settings.project, admin=True)
        return client.instance(self.settings.instance)

    def connect(self) -> Any:
        """A happybase-API connection (not thread-safe: one per thread)."""
        _reachable(*self._address(), self.settings.timeout_ms / 1000)
        if self.settings.emulator:
            import google.cloud.happybase as hb

            return hb.Connection(instance=self._instance())
        import happybase

        return happybase.Connection(self.settings.host, self.settings.port,
                                    timeout=self.settings.timeout_ms)

    def _table(self) -> Any:
        return self.connect().table(self.settings.table)

    # -- the CodeStore protocol -----------------------------------------------------
    def check(self) -> None:
        """Reachable, and the table exists (created pre-split into 9 regions if not)."""
        conn = self.connect()
        name = self.settings.table
        tables = [t.decode() if isinstance(t, bytes) else t for t in conn.tables()]
        if name in tables:
            return
        if self.settings.emulator:
            from google.cloud.bigtable import column_family

            self._instance().table(name).create(
                initial_split_keys=_SPLITS,
                column_families={f: column_family.MaxVersionsGCRule(1) for f in FAMILIES})
        else:
            conn.create_table(name, {f: {"max_versions": 1} for f in FAMILIES})

    def _meta(self, table: Any) -> _Meta:
        return _Meta.of(table.row(META_ROW, columns=[b"MI"]))

    def generation(self) -> str:
        """The last published generation (every write publishes a new one)."""
        meta = self._meta(self._table())
        return str(meta.published or meta.committed)

    def transaction_versions(self, app_ids: list[str]) -> dict[str, int]:
        txns = self._meta(self._table()).txns
        return {app: txns[app] for app in app_ids if app in txns}

    def write(self, codes: pa.Table | pa.RecordBatchReader, *, replace: bool,
              app_transactions: Mapping[str, int] | None = None,
              operation: str = "ENCODE") -> int:
        """Put every row under a new generation, then publish it (see the module docstring).

        ``operation`` is not recorded: HBase keeps no history of writes.
        """
        self.check()
        table = self._table()
        batches = code_batches(codes, self.columns)
        first = next(batches, None)
        if first is None and not replace and not app_transactions:
            return 0
        gen = table.counter_inc(META_ROW, b"MI:next_gen")
        written = 0
        try:
            with table.batch(batch_size=500) as batch:
                for rb in itertools.chain([first] if first is not None else [], batches):
                    written += _put_rows(batch, rb.to_pylist(), gen)
        except Exception as exc:
            raise CodeStoreError(
                f"writing codes to HBase table {self.settings.table!r} failed: "
                f"{str(exc).splitlines()[0]}; readers still see generation "
                f"{self._meta(table).committed} (nothing of this write is visible)") from exc
        meta = self._meta(table)
        publish = {b"MI:published": _pack(gen)}
        if gen > meta.committed:
            publish[b"MI:committed"] = _pack(gen)
        if replace:
            publish[b"MI:floor"] = _pack(gen)
        for app, version in (app_transactions or {}).items():
            publish[_TXN + app.encode()] = _pack(version)
        table.put(META_ROW, publish)  # one row: atomic
        if replace:
            self._drop_below(gen)
        return written

    def missing(self, codes: pa.Table) -> pa.Table:
        """Looks up each row's key (a batch of gets): stored means the row holds this image,
        frame and codebook version under a visible generation."""
        import pyarrow as pa

        if not codes.num_rows:
            return codes
        table = self._table()
        meta = self._meta(table)
        keys = list(key_tuples(codes))
        found = dict(table.rows([row_key(image_id(u, f)) for u, f, _ in keys],
                                columns=[b"MI:uid", b"MI:frame", b"MI:cbv", b"MI:gen"]))
        stored = []
        for uid, frame, version in keys:
            data = found.get(row_key(image_id(uid, frame)), {})
            stored.append(bool(data) and meta.visible(data)
                          and data.get(b"MI:uid") == uid.encode()
                          and data.get(b"MI:frame") == str(frame).encode()
                          and data.get(b"MI:cbv") == str(version).encode())
        return codes.filter(pa.array([not s for s in stored], pa.bool_()))

    def _drop_below(self, floor: int) -> None:
        """Delete rows a replacing write hid (readers skip them already)."""
        table = self._table()
        with table.batch(batch_size=500) as batch:
            for key, data in table.scan(columns=[b"MI:gen"]):
                if key != META_ROW and int(data.get(b"MI:gen", b"0")) < floor:
                    batch.delete(key)

    def _scan_region(self, region: int, meta: _Meta) -> dict[str, list[Any]]:
        table = self._table()
        out: dict[str, list[Any]] = {c: [] for c in CODE_COLUMNS}
        prefix = f"{region:04d}|".encode()
        for key, data in table.scan(row_prefix=prefix, columns=[b"MI"]):
            if key == META_ROW or b"MI:code" not in data or not meta.visible(data):
                continue  # a write that has not (or never) published, or was replaced
            out["sop_instance_uid"].append(data[b"MI:uid"].decode())
            out["frame"].append(int(data[b"MI:frame"]))
            out["codebook_version"].append(int(data[b"MI:cbv"]))
            out["list_id"].append(int(data[b"MI:list"]))
            out["code"].append(data[b"MI:code"])
        return out

    def load(self) -> pa.Table:
        """Every committed code: 9 region scans in parallel."""
        import pyarrow as pa

        conn = self.connect()
        names = [t.decode() if isinstance(t, bytes) else t for t in conn.tables()]
        if self.settings.table not in names:
            return empty_codes()
        meta = self._meta(conn.table(self.settings.table))
        with ThreadPoolExecutor(REGIONS) as pool:
            parts = list(pool.map(lambda r: self._scan_region(r, meta), range(REGIONS)))
        cols = {c: list(itertools.chain.from_iterable(p[c] for p in parts)) for c in CODE_COLUMNS}
        return pa.table({f.name: pa.array(cols[f.name], f.type) for f in codes_schema()})

    def thumbnail(self, sop_instance_uid: str, frame: int = 0) -> bytes | None:
        """The PNG kept in ``MD:thumb`` for one image."""
        row = self._table().row(row_key(image_id(sop_instance_uid, frame)),
                                columns=[b"MD:thumb"])
        return row.get(b"MD:thumb")


def _put_rows(batch: Any, rows: list[dict[str, Any]], gen: int) -> int:
    """Queue one put per code row (``MI`` info and code, ``MD`` thumbnail when given)."""
    for row in rows:
        uid, frame = row["sop_instance_uid"], row["frame"]
        data = {
            b"MI:uid": uid.encode(), b"MI:frame": str(frame).encode(),
            b"MI:code": row["code"], b"MI:cbv": str(row["codebook_version"]).encode(),
            b"MI:list": str(row["list_id"]).encode(), b"MI:gen": str(gen).encode(),
        }
        if row.get("thumbnail") is not None:
            data[b"MD:thumb"] = row["thumbnail"]
        batch.put(row_key(image_id(uid, frame)), data)
    return len(rows)


def _pack(value: int) -> bytes:
    return struct.pack(">q", value)


@dataclass(frozen=True)
class _Meta:
    """The published state in the meta row: which generations readers see, app versions."""

    committed: int = 0
    floor: int = 0
    published: int = 0
    txns: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, row: dict[bytes, bytes]) -> _Meta:
        def number(column: bytes) -> int:
            raw = row.get(column)
            return struct.unpack(">q", raw)[0] if raw else 0

        txns = {k[len(_TXN):].decode(): struct.unpack(">q", v)[0]
                for k, v in row.items() if k.startswith(_TXN)}
        return cls(number(b"MI:committed"), number(b"MI:floor"), number(b"MI:published"),
                   txns)

    def visible(self, data: dict[bytes, bytes]) -> bool:
        """Whether a code row's generation is published and not replaced."""
        return self.floor <= int(data.get(b"MI:gen", b"0")) <= self.committed
