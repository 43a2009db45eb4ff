"""HBase code store: table ``image_info``, families ``MD`` / ``MI``, 9 salted regions.

Row key (the reference system's design): ``000x|`` + the last 8 hex characters of the MD5 of
the image id, where ``x`` = MD5 (as a number) mod 9. The image id is the SOPInstanceUID, with
``#<frame>`` appended for frames after the first. ``MI`` holds the image info and code
(``uid``, ``frame``, ``code``, ``cbv`` codebook version, ``list`` IVF list, ``gen``), ``MD``
the PNG thumbnail. The salt spreads writes over the 9 regions; reads scan the 9 regions in
parallel, one thread and connection per region.

Writes are all-or-nothing for readers: every write takes a new generation number from a
counter in the meta row (``0000|~meta``, outside the hex key space), stamps its rows with
it, and only after every task succeeded publishes it as ``committed``. Readers skip rows of
generations above ``committed``, so a write that dies half way is invisible (its rows are
rewritten by the next ``dicomlake embed``).

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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from dicomlake.udfs.codestore import CODE_COLUMNS
from dicomlake.udfs.errors import CodeStoreError
from dicomlake.udfs.settings import HBaseSettings

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame

REGIONS = 9
FAMILIES = ("MD", "MI")
META_ROW = b"0000|~meta"
_SPLITS = [f"{i:04d}|".encode() for i in range(1, REGIONS)]


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

    def _committed(self, table: Any) -> int:
        row = table.row(META_ROW, columns=[b"MI:committed"])
        raw = row.get(b"MI:committed")
        return struct.unpack(">q", raw)[0] if raw else 0

    def generation(self) -> str:
        return str(self._committed(self._table()))

    def write(self, codes: DataFrame, *, replace: bool) -> int:
        """Write codes from Spark tasks (each task batches its puts), then publish."""
        self.check()
        table = self._table()
        gen = table.counter_inc(META_ROW, b"MI:next_gen")
        settings = self.settings

        def put(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            import pyarrow as pa

            store = HBaseCodeStore(settings)
            tbl = store._table()
            n = 0
            with tbl.batch(batch_size=500) as batch:
                for rb in batches:
                    n += _put_rows(batch, rb.to_pylist(), gen)
            yield pa.RecordBatch.from_pydict({"rows": [n]})

        try:
            written = sum(r["rows"] for r in codes.mapInArrow(put, "rows long").collect())
        except Exception as exc:
            raise CodeStoreError(
                f"writing codes to HBase table {settings.table!r} failed: "
                f"{str(exc).splitlines()[0]}; readers still see generation "
                f"{self._committed(table)} (nothing of this write is visible)") from exc
        table.put(META_ROW, {b"MI:committed": struct.pack(">q", gen)})
        return written

    def put_codes(self, rows: list[dict[str, Any]]) -> int:
        """Write codes from one process (the stream job) and publish them at once.

        Row keys are derived from the image id, so writing the same code again (a replay
        after a crash) overwrites its row instead of adding one.
        """
        if not rows:
            return 0
        table = self._table()
        gen = table.counter_inc(META_ROW, b"MI:next_gen")
        with table.batch(batch_size=500) as batch:
            written = _put_rows(batch, rows, gen)
        if gen > self._committed(table):
            table.put(META_ROW, {b"MI:committed": struct.pack(">q", gen)})
        return written

    def _scan_region(self, region: int, committed: int) -> dict[str, list[Any]]:
        table = self._table()
        out: dict[str, list[Any]] = {c: [] for c in CODE_COLUMNS}
        prefix = f"{region:04d}|".encode()
        for key, data in table.scan(row_prefix=prefix, columns=[b"MI"]):
            if key == META_ROW or b"MI:code" not in data:
                continue
            if int(data.get(b"MI:gen", b"0")) > committed:
                continue  # a write that has not (or never) published
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
            return _empty()
        table = conn.table(self.settings.table)
        committed = self._committed(table)
        with ThreadPoolExecutor(REGIONS) as pool:
            parts = list(pool.map(lambda r: self._scan_region(r, committed), range(REGIONS)))
        cols = {c: list(itertools.chain.from_iterable(p[c] for p in parts)) for c in CODE_COLUMNS}
        return pa.table({
            "sop_instance_uid": pa.array(cols["sop_instance_uid"], pa.string()),
            "frame": pa.array(cols["frame"], pa.int32()),
            "codebook_version": pa.array(cols["codebook_version"], pa.int32()),
            "list_id": pa.array(cols["list_id"], pa.int32()),
            "code": pa.array(cols["code"], pa.binary()),
        })

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


def _empty() -> pa.Table:
    import pyarrow as pa

    return pa.table({"sop_instance_uid": pa.array([], pa.string()),
                     "frame": pa.array([], pa.int32()),
                     "codebook_version": pa.array([], pa.int32()),
                     "list_id": pa.array([], pa.int32()), "code": pa.array([], pa.binary())})
