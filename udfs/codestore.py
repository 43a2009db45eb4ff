"""Code stores: where PQ codes are written (``dicomlake embed``, the stream) and read
(``image_knn``), over Arrow and without Spark, so batch jobs, the stream and SQL functions
use one interface.

Both stores hold the same rows (:data:`CODE_COLUMNS`) and answer the same calls
(:class:`CodeStore`):

- ``check()``: reachable, before anything is written;
- ``write(codes, replace=..., app_transactions=...)``: all-or-nothing for readers, with the
  writer's progress markers (Kafka offsets per partition) committed in the same step, so a
  replaying writer can tell what is already stored (``transaction_versions``);
- ``missing(codes)``: the rows whose (image, frame, codebook version) is not stored yet, so a
  replay after a crash writes nothing twice;
- ``load()``: every committed code, for the in-memory ADC index;
- ``generation()``: a cheap token that changes on every write, so a Python worker re-loads
  codes only when they changed.

What "all-or-nothing" rests on differs: ``dicom.codes`` is one Delta commit per write;
HBase publishes a write's generation number in one single-row mutation of its meta row
(see :mod:`dicomlake.udfs.hbase`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dicomlake.catalog import tables
from dicomlake.udfs.errors import CodebookError
from dicomlake.udfs.settings import CodeStoreKind, SimilaritySettings

if TYPE_CHECKING:
    import pyarrow as pa

CODES = tables.CODES.name
"""Table name (in the ``dicom`` database) of the embedded store."""
CODE_COLUMNS = ("sop_instance_uid", "frame", "codebook_version", "list_id", "code")
KEY_COLUMNS = ("sop_instance_uid", "frame", "codebook_version")
"""A code's identity: one code per image frame and codebook."""
CHECKPOINT_EVERY = 100
"""Write a Delta checkpoint every this many versions of ``dicom.codes`` (readers that open
the table replay the log from the newest checkpoint)."""

def codes_schema() -> pa.Schema:
    """The Arrow schema of :data:`CODE_COLUMNS` (``dicom.codes`` in the registry)."""
    return tables.CODES.schema


def empty_codes() -> pa.Table:
    """No codes, typed like :func:`codes_schema`."""
    return codes_schema().empty_table()


class CodeStore(Protocol):
    """What ``embed``, the stream and ``image_knn`` need from a code store.

    Example (the stream's exactly-once write of one batch; ``app_id`` names a Kafka
    partition and ``next_offset`` is where it resumes)::

        done = store.transaction_versions([app_id]).get(app_id, 0)
        fresh = store.missing(codes_of_records_from(done))
        store.write(fresh, replace=False, app_transactions={app_id: next_offset})
    """

    name: str
    columns: tuple[str, ...]
    """The input columns ``write`` keeps (others, such as ``thumbnail``, are dropped)."""

    def check(self) -> None:
        """Raise :class:`CodeStoreError` when the store cannot be reached."""

    def write(self, codes: pa.Table | pa.RecordBatchReader, *, replace: bool,
              app_transactions: Mapping[str, int] | None = None,
              operation: str = "ENCODE") -> int:
        """Write codes (replacing every stored code when ``replace``); rows written.

        ``app_transactions`` (application id -> version) become visible together with the
        codes; a write without rows still records them. ``operation`` names the writer in
        the store's history where it keeps one.
        """

    def transaction_versions(self, app_ids: list[str]) -> dict[str, int]:
        """The committed version of each of these application ids that has one."""

    def missing(self, codes: pa.Table) -> pa.Table:
        """The rows of ``codes`` whose :data:`KEY_COLUMNS` no committed code has."""

    def load(self) -> pa.Table:
        """Every committed code, columns :data:`CODE_COLUMNS`."""

    def generation(self) -> str:
        """Changes whenever committed codes change."""


def code_batches(codes: pa.Table | pa.RecordBatchReader, columns: tuple[str, ...],
                 ) -> Iterator[pa.RecordBatch]:
    """``codes``' non-empty batches: :data:`CODE_COLUMNS` cast to :func:`codes_schema`, then
    whichever of the other ``columns`` the input has (e.g. ``thumbnail``)."""
    import pyarrow as pa

    missing = [c for c in CODE_COLUMNS if c not in codes.schema.names]
    if missing:
        raise ValueError(f"codes lack column(s) {missing}; a code store needs "
                         f"{list(CODE_COLUMNS)}, got {codes.schema.names}")
    schema = codes_schema()
    extra = [c for c in columns if c not in CODE_COLUMNS and c in codes.schema.names]
    batches = codes.to_batches() if isinstance(codes, pa.Table) else codes
    for batch in batches:
        if batch.num_rows:
            arrays = [batch.column(f.name).cast(f.type) for f in schema]
            arrays += [batch.column(c) for c in extra]
            yield pa.RecordBatch.from_arrays(arrays, names=[*schema.names, *extra])


def key_tuples(codes: pa.Table) -> Iterator[tuple[str, int, int]]:
    """(sop_instance_uid, frame, codebook_version) per row."""
    return zip(*(codes.column(c).to_pylist() for c in KEY_COLUMNS), strict=True)


class DeltaCodeStore:
    """``dicom.codes``: one Delta commit per write, so readers see all of it or none.

    The table is kept open (:class:`~dicomlake.catalog.snapshots.TableRows`): ``generation``
    costs an ``update_incremental`` (~0.5 ms when nothing changed), and ``load`` after
    commits that only appended reads just the new files.
    """

    name = "delta"
    columns: tuple[str, ...] = CODE_COLUMNS

    def __init__(self, location: str | Path) -> None:
        from dicomlake.catalog.snapshots import TableRows

        self._rows = TableRows(location, CODE_COLUMNS)
        self.uri = self._rows.followed.uri
        self._keys: set[tuple[str, int, int]] | None = None

    def check(self) -> None:
        """The folder above the table can be made (local disk or object storage)."""
        import pyarrow.fs as pafs

        filesystem, path = pafs.FileSystem.from_uri(self.uri)
        filesystem.create_dir(path.rstrip("/").rpartition("/")[0], recursive=True)

    def write(self, codes: pa.Table | pa.RecordBatchReader, *, replace: bool,
              app_transactions: Mapping[str, int] | None = None,
              operation: str = "ENCODE") -> int:
        """One Delta commit: appended files (or, with ``replace``, the whole table
        overwritten) plus the app transactions; nothing at all for an empty append without
        transactions, so the generation only moves when something changed."""
        import pyarrow as pa
        from deltalake import CommitProperties, Transaction, write_deltalake

        batches = code_batches(codes, CODE_COLUMNS)
        first = next(batches, None)
        if first is None and not replace and not app_transactions:
            return 0
        written = 0

        def counted() -> Iterator[pa.RecordBatch]:
            nonlocal written
            for batch in itertools.chain([first] if first is not None else [], batches):
                written += batch.num_rows
                yield batch

        props = CommitProperties(
            custom_metadata={"dicomlake.operation": operation},
            app_transactions=[Transaction(app, version)
                              for app, version in sorted((app_transactions or {}).items())])
        write_deltalake(self.uri, pa.RecordBatchReader.from_batches(codes_schema(), counted()),
                        mode="overwrite" if replace else "append", commit_properties=props)
        table = self._rows.followed.table()
        if table is not None and table.version() % CHECKPOINT_EVERY == 0:
            table.create_checkpoint()
        return written

    def transaction_versions(self, app_ids: list[str]) -> dict[str, int]:
        table = self._rows.followed.table()
        if table is None:
            return {}
        versions = {app: table.transaction_version(app) for app in app_ids}
        return {app: v for app, v in versions.items() if v is not None}

    def _refresh(self) -> pa.Table:
        """The newest codes; the key set (when built) follows appends row by row."""
        if self._rows.refresh() and self._keys is not None:
            if self._rows.added is None:
                self._keys = None
            else:
                self._keys.update(key_tuples(self._rows.added))
        return self._rows.rows if self._rows.rows is not None else empty_codes()

    def missing(self, codes: pa.Table) -> pa.Table:
        import pyarrow as pa

        stored = self._refresh()
        if self._keys is None:
            self._keys = set(key_tuples(stored))
        keys = self._keys
        return codes.filter(pa.array([k not in keys for k in key_tuples(codes)], pa.bool_()))

    def load(self) -> pa.Table:
        return self._refresh()

    def generation(self) -> str:
        """The table version ("-1" without a table)."""
        return str(self._rows.followed.version())


def open_store(warehouse_path: str | Path, similarity: SimilaritySettings) -> CodeStore:
    """The store the settings select."""
    if similarity.code_store is CodeStoreKind.HBASE:
        from dicomlake.udfs.hbase import HBaseCodeStore

        return HBaseCodeStore(similarity.hbase)
    return DeltaCodeStore(tables.CODES.path(warehouse_path))


def check_versions(codes: pa.Table, version: int, store: str) -> None:
    """Refuse to search codes made with another codebook (their distances mean nothing)."""
    import pyarrow.compute as pc

    if codes.num_rows == 0:
        return
    other = pc.not_equal(codes.column("codebook_version"), version)
    stale = pc.sum(pc.cast(other, "int64")).as_py() or 0
    if stale:
        found = sorted(set(pc.filter(codes.column("codebook_version"), other).to_pylist()))
        raise CodebookError(
            f"{stale} code(s) in the {store} code store were written with codebook "
            f"version(s) {found}, but the current codebook is v{version}; run "
            "`dicomlake embed` to re-encode them")
