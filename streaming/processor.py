"""What the Flink job does with a batch of upload records: the lake side, without Flink.

Each step is the batch path's own code, so an upload and an ingested file give the same rows:
the message check (:mod:`.messages`), the pre-check and header row
(:func:`dicomlake.catalog.preflight.parse_instance`, :mod:`dicomlake.catalog.rows`), the
duplicate rule (:mod:`dicomlake.catalog.duplicates`), the feature pipeline for the configured
backend (:mod:`dicomlake.udfs.features`), the code store (:mod:`dicomlake.udfs.codestore`),
and the summaries (:mod:`dicomlake.catalog.summaries`). Then one Delta commit per table, in
:data:`COMMIT_ORDER`, ``instances`` last, so a row visible in ``dicom.instances`` is already
searchable; ``series``/``studies`` follow from the committed instance rows.

Exactly-once: :class:`~dicomlake.streaming.commits.DeltaAppender` tags every commit with the
next offset per Kafka partition; rows of offsets a table already holds are dropped before
writing, so a replay after a crash (Flink restores an older checkpoint) adds nothing twice.
``instances`` is committed last, also when it gets no rows, so its transaction versions say
where every table is complete. Codes are de-duplicated by key in the store as well (the
catch-up encoder writes codes for replayed records without transactions). The dead-letter
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomlake.catalog import tables
from dicomlake.catalog.archives import Found
from dicomlake.catalog.duplicates import find_duplicates
from dicomlake.catalog.errors import ErrorKind, HeaderError
from dicomlake.catalog.rows import Origin, error_row, instance_row
from dicomlake.catalog.snapshots import FollowedTable, read_table, sql_string
from dicomlake.catalog.summaries import catch_up, update_summaries
from dicomlake.streaming import messages
from dicomlake.streaming.commits import DeltaAppender
from dicomlake.streaming.messages import BadMessageError
from dicomlake.streaming.settings import BAD_MESSAGE, StreamSettings

if TYPE_CHECKING:
    import pyarrow as pa

    from dicomlake.udfs.pq import Codebook

INSTANCES, ERRORS, WARNINGS, EMBEDDINGS, PIXEL_ERRORS, CODES = (
    tables.INSTANCES.name, tables.ERRORS.name, tables.WARNINGS.name, tables.EMBEDDINGS.name,
    tables.PIXEL_ERRORS.name, tables.CODES.name)
COMMIT_ORDER = (ERRORS, WARNINGS, PIXEL_ERRORS, EMBEDDINGS, CODES, INSTANCES)


@dataclass(frozen=True)
class Record:
    """One Kafka record as the job sees it."""

    partition: int
    offset: int
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int = 0


@dataclass
class _Accepted:
    """A record whose payload is a DICOM instance: its row and where its bytes go."""

    record: Record
    data: bytes
    target: Path
    row: dict[str, Any]


@dataclass
class _Batch:
    """Rows per table of one ``process`` call, each tagged with its record."""

    rows: dict[str, list[tuple[Record, dict[str, Any]]]] = field(
        default_factory=lambda: {t: [] for t in COMMIT_ORDER})
    arrow: dict[str, list[tuple[pa.Table, list[Record]]]] = field(
        default_factory=lambda: {t: [] for t in COMMIT_ORDER})

    def add(self, table: str, rec: Record, row: dict[str, Any]) -> None:
        self.rows[table].append((rec, row))

    def add_table(self, table: str, data: pa.Table, recs: list[Record]) -> None:
        if data.num_rows:
            self.arrow[table].append((data, recs))

    def table(self, table: str, schema: pa.Schema, done: dict[int, int]) -> pa.Table:
        """The table's rows of records at or past ``done`` (what it does not hold yet)."""
        import pyarrow as pa

        keep = [row for rec, row in self.rows[table] if rec.offset >= done[rec.partition]]
        parts = [pa.Table.from_pylist(keep, schema=schema)]
        for data, recs in self.arrow[table]:
            mask = pa.array([r.offset >= done[r.partition] for r in recs])
            parts.append(data.filter(mask).select(schema.names).cast(schema))
        return pa.concat_tables(parts)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def read_payload(warehouse: Path, upload: messages.Upload, value: bytes | None,
                 ) -> tuple[bytes, Path]:
    """The image bytes (inline, or the referenced file in the lake's upload folder), checked
    against the declared size and hash, and the content-addressed path they are kept at."""
    store = warehouse / "_uploads"
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
        data = value or b""
    if len(data) != upload.size:
        raise BadMessageError(ErrorKind.TRUNCATED.value,
                              f"{upload.name}: {len(data)} bytes arrived, {upload.size} "
                              "declared")
    if messages.sha256_of(data) != upload.sha256:
        raise BadMessageError(BAD_MESSAGE, f"{upload.name}: content does not match its "
                                           f"{messages.H_SHA} header (corrupted in transit)")
    return data, target


def store_payload(target: Path, data: bytes) -> None:
    """Keep the bytes at their content address (atomic rename: readers never see half)."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


class LakeWriter:
    """Turns batches of records into Delta commits (one per table per batch)."""

    def __init__(self, home: str, warehouse: str, stream: StreamSettings, epoch: str,
                 dead_letter: Any | None = None) -> None:
        from dicomlake.config import Settings
        from dicomlake.udfs.codestore import open_store
        from dicomlake.udfs.features import FeatureModel
        from dicomlake.udfs.settings import load_similarity

        self.home = Path(home)
        self.warehouse = Path(warehouse)
        self.stream = stream
        self.epoch = epoch
        self.similarity = load_similarity(Settings(home=self.home, warehouse=self.warehouse))
        self.model = FeatureModel(self.similarity.backend,
                                  int(os.environ.get("DICOMLAKE_ONNX_THREADS", "2")),
                                  device=self.similarity.device)
        self.store = open_store(self.warehouse, self.similarity)
        self.store.check()
        self.appender = DeltaAppender(self.warehouse, f"dicomlake-stream/{epoch}/{stream.topic}")
        # a writer that died between its instances and summary commits left them behind
        catch_up(self.warehouse)
        self.dead_letter = dead_letter
        self.counts: Counter[str] = Counter()
        self._uids: dict[str, tuple[str, str]] = {}
        self._uids_version = -2
        self._book: Codebook | None = None
        self._book_version = -2
        self._books = FollowedTable(tables.CODEBOOKS.path(self.warehouse))

    # -- tables -------------------------------------------------------------------------
    def app_id(self, partition: int) -> str:
        return self.appender.app_id(partition)

    def committed(self, table: str, partitions: list[int]) -> dict[int, int]:
        """Next offset per partition already in ``table`` (0 when none); codes ask the
        code store, which records the same markers with its writes."""
        if table == CODES:
            ids = {p: self.app_id(p) for p in partitions}
            versions = self.store.transaction_versions(list(ids.values()))
            return {p: versions.get(app, 0) for p, app in ids.items()}
        return self.appender.committed(table, partitions)

    def start_offsets(self, partitions: list[int]) -> dict[int, int]:
        """Where to start without Flink state: where ``instances`` (committed last) is."""
        return self.committed(INSTANCES, partitions)

    def _refresh_uids(self) -> None:
        table = self.appender.table(INSTANCES)
        if table.version() == self._uids_version:
            return
        data = read_table(table, ["sop_instance_uid", "path", "source"])
        self._uids = {u: (p, s) for u, p, s in zip(
            data.column("sop_instance_uid").to_pylist(), data.column("path").to_pylist(),
            data.column("source").to_pylist(), strict=True) if u is not None}
        self._uids_version = table.version()

    def codebook(self) -> Codebook | None:
        """The current codebook (re-read when ``dicom.codebooks`` changes); refuses one made
        for another model than the configured backend's, as batch ``embed`` would retrain."""
        from dicomlake.udfs import features

        version = self._books.version()
        if version != self._book_version:
            book = features.current_codebook(self.warehouse)
            if book is not None:
                features.require_fitting(book, self.model.info)
            self._book, self._book_version = book, version
            if book is not None:
                self._catch_up(book)
        return self._book

    # -- one record -------------------------------------------------------------------
    def _source(self, rec: Record) -> str:
        return f"kafka://{self.stream.topic}/{rec.partition}/{rec.offset}"

    def _origin(self, rec: Record, upload: messages.Upload | None) -> Origin:
        return Origin(self._source(rec), upload.sha256 if upload else "", 1)

    @staticmethod
    def _found(upload: messages.Upload | None, path: str, size: int, sent_ms: int) -> Found:
        return Found(path=path, member=upload.name if upload else None, file_size=size,
                     modified=dt.datetime.fromtimestamp(sent_ms / 1000, dt.UTC)
                     if sent_ms else None)

    def _reject(self, rec: Record, upload: messages.Upload | None, kind: str, message: str,
                out: _Batch, dead: list[tuple[Record, str, str]]) -> None:
        src = self._source(rec)
        found = self._found(upload, src, upload.size if upload else len(rec.value or b""),
                            rec.timestamp_ms)
        out.add(ERRORS, rec, error_row(self._origin(rec, upload), found, kind=kind,
                                       message=f"{src}: {message}"))
        dead.append((rec, kind, message))

    def _accept(self, rec: Record, out: _Batch, dead: list[tuple[Record, str, str]],
                ) -> _Accepted | None:
        from dicomlake.catalog.preflight import SNIFF_BYTES, parse_instance

        upload = None
        try:
            upload = messages.decode(rec.headers, rec.value,
                                     inline_max_bytes=self.stream.inline_max_bytes,
                                     max_image_bytes=self.stream.max_image_bytes)
            data, target = read_payload(self.warehouse, upload, rec.value)
            # The batch source's own pre-check: content decides, never the upload's name.
            header = parse_instance(io.BytesIO(data), uri=str(target), size=len(data),
                                    head=data[:SNIFF_BYTES])
        except (BadMessageError, HeaderError) as exc:
            kind = exc.kind.value if isinstance(exc, HeaderError) else exc.kind
            self._reject(rec, upload, kind, str(exc), out, dead)
            return None
        found = replace(self._found(upload, str(target), len(data), upload.sent_ms),
                        header=header)
        row = instance_row(self._origin(rec, upload), found)
        row["ingested_at"] = _now()
        return _Accepted(rec, data, target, row)

    # -- writing ----------------------------------------------------------------------
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
        out = _Batch()
        dead: list[tuple[Record, str, str]] = []
        accepted = [a for rec in todo if (a := self._accept(rec, out, dead)) is not None]
        accepted = self._drop_duplicates(accepted, out, dead)
        for item in accepted:
            store_payload(item.target, item.data)
            out.add(INSTANCES, item.record, item.row)
            for warning in item.row.get("warnings") or ():
                out.add(WARNINGS, item.record, {
                    "path": item.row["path"], "source": item.row["source"],
                    "sop_instance_uid": item.row["sop_instance_uid"], **warning,
                    "ingested_at": item.row["ingested_at"]})
        self._featurize([a for a in accepted if a.row["sop_instance_uid"]], out)
        self._send_dead(dead, done[ERRORS])
        instances = None
        for table in COMMIT_ORDER:
            if table == CODES:
                self._write_codes(out, done[CODES], ends)
                continue
            schema = self.appender.schema(table)
            rows = out.table(table, schema, done[table])
            if not rows.num_rows and table != INSTANCES:
                continue
            # A restored checkpoint can replay records older than a table already holds;
            # its transaction version must never move back, or the records after it would
            # pass the filter above a second time.
            table_ends = {p: max(end, done[table][p]) for p, end in ends.items()}
            version = self.appender.append(table, rows, table_ends, "STREAM")
            self.counts[table] += rows.num_rows
            if table == INSTANCES:
                self._uids_version = version  # our own rows are already in self._uids
                instances = rows
        if instances is not None and instances.num_rows:
            self._update_summaries(instances)
        self.counts["dead_letters"] += len(dead)
        if self._book is None and self.counts[EMBEDDINGS]:
            self.maybe_train()
        return complete

    def _drop_duplicates(self, accepted: list[_Accepted], out: _Batch,
                         dead: list[tuple[Record, str, str]]) -> list[_Accepted]:
        """The shared duplicate rule; the losers become ``errors`` rows."""
        losers = find_duplicates(self._uids, [(a.row["path"], a.row["sop_instance_uid"],
                                               a.row["source"]) for a in accepted])
        kept = []
        for i, item in enumerate(accepted):
            if i in losers:
                found = self._found(None, item.row["path"], item.row["file_size"], 0)
                found = replace(found, member=item.row["member"], modified=item.row["modified"])
                origin = Origin(item.row["source"], item.row["source_fingerprint"], 1)
                out.add(ERRORS, item.record, error_row(origin, found,
                                                       kind=ErrorKind.DUPLICATE,
                                                       message=losers[i]))
                dead.append((item.record, ErrorKind.DUPLICATE.value, losers[i]))
                continue
            uid = item.row["sop_instance_uid"]
            if uid:
                self._uids[uid] = (item.row["path"], item.row["source"])
            kept.append(item)
        return kept

    def _featurize(self, accepted: list[_Accepted], out: _Batch) -> None:
        """Embeddings (or pixel errors) of the configured backend, and codes when the
        current codebook fits."""
        from dicomlake.udfs.features import ImageInput, encode, featurize

        if not accepted:
            return
        inputs = [ImageInput(a.row["sop_instance_uid"], str(a.target), a.data)
                  for a in accepted]
        book = self.codebook()
        for feats in featurize(inputs, self.model, batch_size=32):
            out.add_table(EMBEDDINGS, feats.embeddings,
                          [accepted[i].record for i in feats.embedding_inputs])
            out.add_table(PIXEL_ERRORS, feats.pixel_errors,
                          [accepted[i].record for i in feats.error_inputs])
            if book is not None:
                out.add_table(CODES, encode(feats.embeddings, book),
                              [accepted[i].record for i in feats.embedding_inputs])

    def _write_codes(self, out: _Batch, done: dict[int, int], ends: dict[int, int]) -> None:
        """Codes through the configured store, skipping keys it already holds."""
        codes = out.table(CODES, tables.CODES.schema, done)
        if not codes.num_rows:
            return
        table_ends = {self.app_id(p): max(end, done[p]) for p, end in ends.items()}
        self.counts[CODES] += self.store.write(self.store.missing(codes), replace=False,
                                               app_transactions=table_ends,
                                               operation="STREAM")

    def _update_summaries(self, instances: pa.Table) -> None:
        update_summaries(self.warehouse, instances)

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
        """Encode stored embeddings that have no code of ``book`` (made before the first
        codebook existed, or when the job died between two commits)."""
        from dicomlake.udfs.features import encode

        emb = read_table(self.appender.table(EMBEDDINGS),
                         ["sop_instance_uid", "frame", "embedding"],
                         f"model_version = {sql_string(book.model_version)}")
        if emb.num_rows:
            self.counts[CODES] += self.store.write(self.store.missing(encode(emb, book)),
                                                   replace=False, operation="STREAM-CATCH-UP")

    def maybe_train(self) -> bool:
        """Train the first codebook once ``min_train`` embeddings of the configured model
        exist (nobody else has), with the batch path's own rule."""
        from dicomlake.udfs import features

        if self.codebook() is not None:
            return False
        book = features.train(self.warehouse, self.similarity, self.model.info,
                              min_rows=self.stream.min_train)
        if book is None:
            return False
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
