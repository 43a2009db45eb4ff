"""Exactly-once appends to the lake's Delta tables, keyed by Kafka partition offsets.

Every commit carries a Delta app transaction per Kafka partition
(``dicomlake-stream/<epoch>/<topic>/<partition>`` = next offset), so what a table already
holds is read from the table itself, never from the job's own state: after a crash the job
filters out records below those versions and writes nothing twice.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomlake.catalog import tables

if TYPE_CHECKING:
    import pyarrow as pa

CHECKPOINT_EVERY = 100
"""Write a Delta checkpoint every this many versions of a table the stream appends to."""


class DeltaAppender:
    """Appends to the ``dicom`` tables of one warehouse with per-partition transactions."""

    def __init__(self, warehouse: str | Path, app_prefix: str) -> None:
        self.warehouse = Path(warehouse)
        self.app_prefix = app_prefix
        self._tables: dict[str, Any] = {}
        self._schemas: dict[str, pa.Schema] = {}

    def app_id(self, partition: int) -> str:
        return f"{self.app_prefix}/{partition}"

    def path(self, table: str) -> Path:
        return tables.spec(table).path(self.warehouse)

    def table(self, table: str) -> Any:
        """The table at its newest version.

        Kept open and brought up to date with ``update_incremental`` (reads only the commits
        since, a few ms) rather than opened per call: opening replays the whole log, 20-80 ms
        per table after a few dozen commits and growing, and a batch asks about every table
        twice (what is committed, then to commit).
        """
        from deltalake import DeltaTable

        cached = self._tables.get(table)
        if cached is not None:
            cached.update_incremental()
            return cached
        path = str(self.path(table))
        if not DeltaTable.is_deltatable(path):
            raise FileNotFoundError(f"table {tables.spec(table).qualified} does not exist at "
                                    f"{path}; `dicomlake stream start` creates it before the "
                                    "job runs")
        self._tables[table] = DeltaTable(path)
        return self._tables[table]

    def schema(self, table: str) -> pa.Schema:
        """The table's own schema (an older lake may lack columns the registry added since;
        batch ingest adds them, and the stream then follows)."""
        import pyarrow as pa

        if table not in self._schemas:
            self._schemas[table] = pa.schema(self.table(table).schema().to_arrow())
        return self._schemas[table]

    def committed(self, table: str, partitions: Iterable[int]) -> dict[int, int]:
        """Next offset per partition already in ``table`` (0 when none)."""
        target = self.table(table)
        return {p: target.transaction_version(self.app_id(p)) or 0 for p in partitions}

    def append(self, table: str, rows: pa.Table | None, ends: dict[int, int],
               operation: str) -> int:
        """Append ``rows`` (maybe none) in one commit that moves the partitions' transaction
        versions to ``ends``; returns the new table version."""
        import pyarrow.parquet as pq
        from deltalake import CommitProperties, Transaction
        from deltalake.transaction import AddAction

        schema = self.schema(table)
        actions = []
        if rows is not None and rows.num_rows:
            data = rows.select(schema.names).cast(schema)
            name = f"part-stream-{uuid.uuid4().hex}.parquet"
            full = self.path(table) / name
            pq.write_table(data, full, compression="zstd")
            st = full.stat()
            actions.append(AddAction(name, st.st_size, {}, int(st.st_mtime * 1000), True,
                                     json.dumps({"numRecords": data.num_rows})))
        props = CommitProperties(
            custom_metadata={"dicomlake.operation": operation},
            app_transactions=[Transaction(self.app_id(p), end) for p, end in sorted(ends.items())])
        target = self.table(table)
        target.create_write_transaction(actions, mode="append", schema=schema,
                                        commit_properties=props)
        target.update_incremental()
        version = int(target.version())
        if version % CHECKPOINT_EVERY == 0:
            # Every reader that opens the table replays the log from the newest checkpoint;
            # the stream commits several times a second, so without checkpoints that replay
            # grows without bound.
            target.create_checkpoint()
        return version
