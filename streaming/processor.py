"""What the Flink job does with a batch of upload records: the lake side, without Flink.

For each record: check the message, parse the header with the batch source's parser
(:func:`dicomlake.catalog.header.read_header` + the same promoted columns), store the image
in the lake, embed it with the batch UDF's code and encode it with the current PQ codebook.
Then one Delta commit per table, in this order: ``errors``, ``pixel_errors``,
``embeddings``, ``codes``, and ``instances`` last, so a row visible in ``dicom.instances`` is
already searchable.

Exactly-once: every commit carries a Delta app transaction per Kafka partition
(``dicomlake-stream/<epoch>/<topic>/<partition>`` = next offset). Before writing, rows of
offsets a table already committed are dropped, so a replay after a crash (Flink restores an
older checkpoint) adds nothing twice; a transaction version only ever moves forward, also
when a replayed batch ends before what a table already holds. ``instances`` is committed
last, also when it gets no rows, so its transaction versions say where every table is
complete: the start offsets when the job has no state. With the HBase code store
(``similarity.code_store = "hbase"``) codes go there instead of ``dicom.codes``, under row
keys derived from the image id, so a replayed code overwrites its own row. The dead-letter
topic is at-least-once (a record is re-sent only if the job died between sending it and
committing ``dicom.errors``).

This module imports neither pyspark nor pyflink: it runs in the Flink venv and is tested on
its own.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomlake.catalog.errors import ErrorKind, HeaderError
from dicomlake.streaming import messages
from dicomlake.streaming.messages import BadMessageError
from dicomlake.streaming.settings import BAD_MESSAGE, StreamSettings

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from dicomlake.udfs.pq import Codebook

SCHEMA = "dicom"
INSTANCES, ERRORS, WARNINGS, EMBEDDINGS, PIXEL_ERRORS, CODES = (
    "instances", "errors", "warnings", "embeddings", "pixel_errors", "codes")
COMMIT_ORDER = (ERRORS, WARNINGS, PIXEL_ERRORS, EMBEDDINGS, CODES, INSTANCES)
CHECKPOINT_EVERY = 100
"""Write a Delta checkpoint every this many versions of a table the stream appends to."""


@dataclass(frozen=True)
class Record:
    """One Kafka record as the job sees it."""

    partition: int
    offset: int
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int = 0


@dataclass
class _Rows:
    """Rows per table, each tagged with the (partition, offset) it came from."""

    rows: dict[str, list[tuple[int, int, dict[str, Any]]]] = field(
        default_factory=lambda: {t: [] for t in COMMIT_ORDER})

    def add(self, table: str, rec: Record, row: dict[str, Any]) -> None:
        self.rows[table].append((rec.partition, rec.offset, row))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LakeWriter:
    """Turns batches of records into Delta commits (one per table per batch)."""

    def __init__(self, home: str, warehouse: str, stream: StreamSettings, epoch: str,
                 dead_letter: Any | None = None) -> None:
        from dicomlake.config import Settings
        from dicomlake.udfs.settings import CodeStoreKind, load_similarity

        self.home = Path(home)
        self.warehouse = Path(warehouse)
        self.stream = stream
        self.epoch = epoch
        self.similarity = load_similarity(Settings(home=self.home, warehouse=self.warehouse))
        self._hbase: Any = None
        if self.similarity.code_store is CodeStoreKind.HBASE:
            from dicomlake.udfs.hbase import HBaseCodeStore

            self._hbase = HBaseCodeStore(self.similarity.hbase)
            self._hbase.check()
        self.dead_letter = dead_letter
        self.counts: Counter[str] = Counter()
        self._uids: dict[str, str] = {}
        self._uids_version = -2
        self._book: Codebook | None = None
        self._book_version = -2
        self._codes: set[tuple[str, int, int]] = set()
        self._codes_version = -2
        self._schemas: dict[str, pa.Schema] = {}
        self._embedder: Any = None
        self._tables: dict[str, Any] = {}

    # -- tables -------------------------------------------------------------------------
    def path(self, table: str) -> Path:
        return self.warehouse / SCHEMA / table

    def app_id(self, partition: int) -> str:
        return f"dicomlake-stream/{self.epoch}/{self.stream.topic}/{partition}"

    def _table(self, table: str) -> Any:
        """The table at its newest version.

        Kept open and brought up to date with ``update_incremental`` (reads only the commits
        since, a few ms) rather than opened per call: opening replays the whole log, 20-80 ms
        per table after a few dozen commits and growing, and a batch asks about every table
        twice (what is committed, then to commit), which made commits the slowest part of
        an upload's way to ``dicom.instances``.
        """
        from deltalake import DeltaTable

        cached = self._tables.get(table)
        if cached is not None:
            cached.update_incremental()
            return cached
        path = str(self.path(table))
        if not DeltaTable.is_deltatable(path):
            raise FileNotFoundError(f"table {SCHEMA}.{table} does not exist at {path}; "
                                    "`dicomlake stream start` creates it before the job runs")
        self._tables[table] = DeltaTable(path)
        return self._tables[table]

    def schema(self, table: str) -> pa.Schema:
        import pyarrow as pa

        if table not in self._schemas:
            self._schemas[table] = pa.schema(self._table(table).schema().to_arrow())
        return self._schemas[table]

    def committed(self, table: str, partitions: Iterable[int]) -> dict[int, int]:
        """Next offset per partition already in ``table`` (0 when none)."""
        dt_ = self._table(table)
        return {p: dt_.transaction_version(self.app_id(p)) or 0 for p in partitions}

    def start_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        """Where to start without Flink state: where ``instances`` (committed last) is."""
        return self.committed(INSTANCES, partitions)

    def _refresh_uids(self) -> None:
        table = self._table(INSTANCES)
        if table.version() == self._uids_version:
            return
        data = table.to_pyarrow_table(columns=["sop_instance_uid", "source"])
        self._uids = dict(zip(data.column("sop_instance_uid").to_pylist(),
                              data.column("source").to_pylist(), strict=True))
        self._uids_version = table.version()

    def _code_keys(self) -> set[tuple[str, int, int]]:
        """(uid, frame, codebook version) of every stored code, re-read when the table moves.

        Codes are de-duplicated by key, not only by the per-partition transaction ids: the
        catch-up encoder commits codes for replayed records without those ids, so after a
        crash the ids alone would let the replay write the same codes again.
        """
        if self._hbase is not None:  # read only when a codebook appears (catch-up)
            data = self._hbase.load()
            return set(zip(data.column("sop_instance_uid").to_pylist(),
                           data.column("frame").to_pylist(),
                           data.column("codebook_version").to_pylist(), strict=True))
        table = self._table(CODES)
        if table.version() != self._codes_version:
            data = table.to_pyarrow_table(columns=["sop_instance_uid", "frame",
                                                   "codebook_version"])
            self._codes = set(zip(data.column("sop_instance_uid").to_pylist(),
                                  data.column("frame").to_pylist(),
                                  data.column("codebook_version").to_pylist(), strict=True))
            self._codes_version = table.version()
        return self._codes

    def _new_codes(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        have = self._code_keys()
        return [r for r in rows
                if (r["sop_instance_uid"], r["frame"], r["codebook_version"]) not in have]

    def _codes_committed(self, rows: list[dict[str, Any]], version: int) -> None:
        if version != self._codes_version + 1:
            return  # someone else committed in between: re-read on the next call
        self._codes.update((r["sop_instance_uid"], r["frame"], r["codebook_version"])
                           for r in rows)
        self._codes_version = version

    def codebook(self) -> Codebook | None:
        """The current codebook (re-read when ``dicom.codebooks`` changes)."""
        from deltalake import DeltaTable

        from dicomlake.udfs import pq

        path = str(self.path(pq.CODEBOOKS))
        version = DeltaTable(path).version() if DeltaTable.is_deltatable(path) else -1
        if version != self._book_version:
            self._book = pq.latest(path)
            self._book_version = version
            if self._book is not None:
                self._catch_up(self._book)
        return self._book

    # -- one record -------------------------------------------------------------------
    def _source(self, rec: Record) -> str:
        return f"kafka://{self.stream.topic}/{rec.partition}/{rec.offset}"

    def _error_row(self, rec: Record, kind: str, message: str, upload: Any = None,
                   ) -> dict[str, Any]:
        src = self._source(rec)
        return {"path": src, "source": src,
                "source_fingerprint": upload.sha256 if upload else "",
                "source_members": 1, "archive": None,
                "member": upload.name if upload else None,
                "file_size": upload.size if upload else len(rec.value or b""),
                "compressed_size": None, "crc32": None,
                "modified": dt.datetime.fromtimestamp(rec.timestamp_ms / 1000, dt.UTC)
                if rec.timestamp_ms else None,
                "error_kind": kind, "error": f"{src}: {message}", "ingested_at": _now()}

    def _payload(self, rec: Record, upload: messages.Upload) -> tuple[bytes, Path]:
        """The image bytes and where they are stored in the lake."""
        store = self.warehouse / "_uploads"
        target = store / upload.sha256[:2] / f"{upload.sha256}.dcm"
        if upload.ref is not None:
            ref = Path(upload.ref).resolve()
            if not ref.is_relative_to(store.resolve()):
                raise BadMessageError(BAD_MESSAGE, f"{upload.name}: reference {upload.ref} is "
                                                   f"outside the lake's upload folder {store}")
            try:
                data = ref.read_bytes()
            except OSError as exc:
                raise BadMessageError(ErrorKind.UNREADABLE.value,
                                      f"{upload.name}: referenced file {ref} cannot be read "
                                      f"({exc.strerror})") from None
        else:
            data = rec.value or b""
        if len(data) != upload.size:
            raise BadMessageError(ErrorKind.TRUNCATED.value,
                                  f"{upload.name}: {len(data)} bytes arrived, {upload.size} "
                                  "declared")
        if messages.sha256_of(data) != upload.sha256:
            raise BadMessageError(BAD_MESSAGE, f"{upload.name}: content does not match its "
                                               f"{messages.H_SHA} header (corrupted in transit)")
        return data, target

    def _instance_row(self, rec: Record, upload: messages.Upload, data: bytes, target: Path,
                      ) -> dict[str, Any]:
        from dicomlake.catalog.columns import promoted_values
        from dicomlake.catalog.preflight import SNIFF_BYTES, parse_instance

        # The batch source's own pre-check: content decides, never the upload's name.
        header = parse_instance(io.BytesIO(data), uri=str(target), size=len(data),
                                head=data[:SNIFF_BYTES])
        row: dict[str, Any] = {
            "path": str(target), "source": self._source(rec),
            "source_fingerprint": upload.sha256, "source_members": 1, "archive": None,
            "member": upload.name, "file_size": len(data), "compressed_size": None,
            "crc32": None,
            "modified": dt.datetime.fromtimestamp(upload.sent_ms / 1000, dt.UTC)
            if upload.sent_ms else None,
        }
        row.update(promoted_values(header))
        row["ingested_at"] = _now()
        return row

    def _handle(self, rec: Record, out: _Rows, images: list[tuple[Record, str, str, int,
                                                                   np.ndarray, bytes]],
                dead: list[tuple[Record, str, str]]) -> None:
        from dicomlake.udfs.embeddings import frame_inputs
        from dicomlake.udfs.errors import PixelError

        upload = None
        try:
            upload = messages.decode(rec.headers, rec.value,
                                     inline_max_bytes=self.stream.inline_max_bytes,
                                     max_image_bytes=self.stream.max_image_bytes)
            data, target = self._payload(rec, upload)
            row = self._instance_row(rec, upload, data, target)
        except (BadMessageError, HeaderError) as exc:
            kind = exc.kind.value if isinstance(exc, HeaderError) else exc.kind
            out.add(ERRORS, rec, self._error_row(rec, kind, str(exc), upload))
            dead.append((rec, kind, str(exc)))
            return
        uid = row["sop_instance_uid"]
        first = self._uids.get(uid) if uid else None
        if first is not None and first != row["source"]:
            message = (f"duplicate SOPInstanceUID {uid}; the same UID is already stored for "
                       f"{first}")
            out.add(ERRORS, rec, self._error_row(rec, ErrorKind.DUPLICATE.value, message,
                                                 upload))
            dead.append((rec, ErrorKind.DUPLICATE.value, message))
            return
        if uid:
            self._uids[uid] = row["source"]
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        out.add(INSTANCES, rec, row)
        for warning in row.get("warnings") or ():
            out.add(WARNINGS, rec, {"path": row["path"], "source": row["source"],
                                    "sop_instance_uid": uid, **warning,
                                    "ingested_at": row["ingested_at"]})
        if not uid:
            return
        try:
            for i, (image, thumb) in enumerate(frame_inputs(data, str(target))):
                images.append((rec, uid, str(target), i, image, thumb))
        except PixelError as exc:
            out.add(PIXEL_ERRORS, rec, self._pixel_error(uid, str(target), exc.kind.value,
                                                         str(exc)))

    def _pixel_error(self, uid: str, path: str, kind: str, message: str) -> dict[str, Any]:
        from dicomlake.udfs import model as model_mod

        return {"sop_instance_uid": uid, "path": path, "error_kind": kind, "error": message,
                "model_id": model_mod.MODEL_ID, "model_version": model_mod.model_version(),
                "embedded_at": _now()}

    def _embed(self, images: list[tuple[Record, str, str, int, np.ndarray, bytes]],
               out: _Rows) -> None:
        import numpy as np

        from dicomlake.udfs import model as model_mod

        if not images:
            return
        if self._embedder is None:
            self._embedder = model_mod.get_embedder(self.home,
                                                    int(os.environ.get("DICOMLAKE_ONNX_THREADS",
                                                                       "2")))
        vectors = np.concatenate([
            self._embedder.embed(np.stack([im[4] for im in images[i:i + 32]]))
            for i in range(0, len(images), 32)])
        version = model_mod.model_version()
        book = self.codebook()
        codes = lists = None
        if book is not None and book.model_version == version:
            codes, lists = book.encode(vectors)
        for j, (rec, uid, _path, frame, _img, thumb) in enumerate(images):
            out.add(EMBEDDINGS, rec, {
                "sop_instance_uid": uid, "frame": frame, "embedding": vectors[j].tolist(),
                "model_id": model_mod.MODEL_ID, "model_version": version, "thumbnail": thumb,
                "embedded_at": _now()})
            if codes is not None and book is not None and lists is not None:
                out.add(CODES, rec, {"sop_instance_uid": uid, "frame": frame,
                                     "codebook_version": book.version,
                                     "list_id": int(lists[j]), "code": codes[j].tobytes()})

    # -- writing ----------------------------------------------------------------------
    def _commit(self, table: str, rows: list[dict[str, Any]], ends: dict[int, int],
                operation: str) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from deltalake import CommitProperties, Transaction
        from deltalake.transaction import AddAction

        schema = self.schema(table)
        actions = []
        if rows:
            data = pa.Table.from_pylist(rows, schema=schema)
            name = f"part-stream-{uuid.uuid4().hex}.parquet"
            full = self.path(table) / name
            pq.write_table(data, full, compression="zstd")
            st = full.stat()
            actions.append(AddAction(name, st.st_size, {}, int(st.st_mtime * 1000), True,
                                     json.dumps({"numRecords": len(rows)})))
        props = CommitProperties(
            custom_metadata={"dicomlake.operation": operation},
            app_transactions=[Transaction(self.app_id(p), end) for p, end in sorted(ends.items())])
        target = self._table(table)
        target.create_write_transaction(actions, mode="append", schema=schema,
                                        commit_properties=props)
        target.update_incremental()
        version = int(target.version())
        if version % CHECKPOINT_EVERY == 0:
            # Every reader that opens the table (Spark, image_knn's full reloads, a restarted
            # job) replays the log from the newest checkpoint; the stream commits several
            # times a second, so without checkpoints that replay grows without bound.
            target.create_checkpoint()
        return version

    def process(self, records: list[Record]) -> dict[int, int]:
        """Process records (any partitions, ascending offsets per partition); returns the
        next offset per partition seen. Safe to call again with the same records."""
        if not records:
            return {}
        parts = sorted({r.partition for r in records})
        ends = {p: max(r.offset for r in records if r.partition == p) + 1 for p in parts}
        done = {t: self.committed(t, parts) for t in COMMIT_ORDER}
        complete = {p: max(end, done[INSTANCES][p]) for p, end in ends.items()}
        todo = [r for r in records if r.offset >= done[INSTANCES][r.partition]]
        if not todo:
            return complete
        self._refresh_uids()
        out = _Rows()
        images: list[tuple[Record, str, str, int, np.ndarray, bytes]] = []
        dead: list[tuple[Record, str, str]] = []
        for rec in todo:
            self._handle(rec, out, images, dead)
        self._embed(images, out)
        self._send_dead(dead, done[ERRORS])
        for table in COMMIT_ORDER:
            rows = [row for p, off, row in out.rows[table] if off >= done[table][p]]
            if table == CODES and self._hbase is not None:
                # Row keys come from the image id: a replayed code overwrites its own row.
                self.counts[table] += self._hbase.put_codes(rows)
                continue
            if table == CODES:
                rows = self._new_codes(rows)
            if not rows and table != INSTANCES:
                continue
            # A restored checkpoint can replay records older than a table already holds;
            # its transaction version must never move back, or the records after it would
            # pass the filter above a second time.
            table_ends = {p: max(end, done[table][p]) for p, end in ends.items()}
            version = self._commit(table, rows, table_ends, "STREAM")
            if table == CODES:
                self._codes_committed(rows, version)
            self.counts[table] += len(rows)
            if table == INSTANCES:
                self._uids_version = version  # our own rows are already in self._uids
        self.counts["dead_letters"] += len(dead)
        if self._book is None and self.counts[EMBEDDINGS]:
            self.maybe_train()
        return complete

    def _send_dead(self, dead: list[tuple[Record, str, str]], committed: dict[int, int]) -> None:
        """Dead-letter records not yet in ``dicom.errors``; confirmed before the commit."""
        if self.dead_letter is None:
            return
        futures = []
        for rec, kind, reason in dead:
            if rec.offset < committed[rec.partition]:
                continue
            value = rec.value if len(rec.value or b"") <= self.stream.inline_max_bytes else b""
            headers = [*[(k, v) for k, v in rec.headers if k.startswith("dicomlake-")],
                       ("dicomlake-error-kind", kind.encode()),
                       ("dicomlake-error", reason.encode()[:4000]),
                       ("dicomlake-origin", self._source(rec).encode())]
            futures.append(self.dead_letter.send(self.stream.dead_letter_topic,
                                                 key=self._source(rec).encode(),
                                                 value=value or b"", headers=headers))
        for future in futures:
            future.get(timeout=30)

    def _catch_up(self, book: Codebook) -> None:
        """Encode stored embeddings that have no code of ``book`` (e.g. made before the
        first codebook existed, or when the job died between two commits)."""
        import numpy as np
        import pyarrow.compute as pc

        emb = self._table(EMBEDDINGS).to_pyarrow_table(
            columns=["sop_instance_uid", "frame", "model_version", "embedding"])
        emb = emb.filter(pc.equal(emb.column("model_version"), book.model_version))
        done = {(u, f) for u, f, v in self._code_keys() if v == book.version}
        keys = list(zip(emb.column("sop_instance_uid").to_pylist(),
                        emb.column("frame").to_pylist(), strict=True))
        idx = [i for i, k in enumerate(keys) if k not in done]
        if not idx:
            return
        emb = emb.take(idx)
        flat = emb.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors = np.asarray(flat, np.float32).reshape(emb.num_rows, -1)
        codes, lists = book.encode(vectors)
        rows = [{"sop_instance_uid": u, "frame": f, "codebook_version": book.version,
                 "list_id": int(lists[i]), "code": codes[i].tobytes()}
                for i, (u, f) in enumerate(keys[j] for j in idx)]
        if self._hbase is not None:
            self._hbase.put_codes(rows)
        else:
            self._codes_committed(rows, self._commit(CODES, rows, {}, "STREAM-CATCH-UP"))
        self.counts[CODES] += len(rows)

    def maybe_train(self) -> bool:
        """Train the first codebook once ``min_train`` embeddings exist (nobody else has)."""
        import numpy as np
        import pyarrow.compute as pc

        from dicomlake.udfs import model as model_mod
        from dicomlake.udfs import pq

        if self.codebook() is not None:
            return False
        version = model_mod.model_version()
        emb = self._table(EMBEDDINGS).to_pyarrow_table(columns=["model_version", "embedding"])
        emb = emb.filter(pc.equal(emb.column("model_version"), version))
        if emb.num_rows < self.stream.min_train:
            return False
        sample = emb.slice(0, self.similarity.train_sample)
        flat = sample.column("embedding").combine_chunks().flatten().to_numpy(
            zero_copy_only=False)
        vectors = np.asarray(flat, np.float32).reshape(sample.num_rows, -1)
        nlist = min(self.similarity.nlist, len(vectors)) if self.similarity.nlist else 0
        book = pq.train(vectors, m=self.similarity.m, nlist=nlist, version=1,
                        model_id=model_mod.MODEL_ID, model_version=version)
        pq.save(self.path(pq.CODEBOOKS), book)
        self.codebook()  # loads it and encodes every stored embedding
        return True

    def write_status(self, state: Path, offsets: dict[int, int], extra: dict[str, Any]) -> None:
        """Atomically publish progress for ``dicomlake stream status``."""
        status = {"pid": os.getpid(), "updated_at": time.time(), "epoch": self.epoch,
                  "offsets": {str(p): o for p, o in sorted(offsets.items())},
                  "counts": dict(self.counts),
                  "codebook_version": self._book.version if self._book else None, **extra}
        tmp = state / f"status.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(status, sort_keys=True))
        os.replace(tmp, state / "status.json")
