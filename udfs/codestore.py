"""Code stores: where PQ codes are written by ``dicomlake embed`` and read by ``image_knn``.

Both stores hold the same rows (``sop_instance_uid, frame, codebook_version, list_id, code``)
and expose the same three calls: ``check`` (reachable, before anything is written), ``write``
(a Spark DataFrame of codes, all-or-nothing) and ``load`` (every code, as Arrow, for the
in-memory ADC index). ``generation`` is a cheap token that changes on every write, so a
Python worker re-loads codes only when they changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dicomlake.udfs.errors import CodebookError
from dicomlake.udfs.settings import CodeStoreKind, SimilaritySettings

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame

CODES = "codes"
"""Delta table name (schema ``dicom``) of the embedded store."""
CODE_COLUMNS = ("sop_instance_uid", "frame", "codebook_version", "list_id", "code")
CODES_DDL = ("sop_instance_uid string, frame int, codebook_version int, list_id int, "
             "code binary, thumbnail binary")
"""What the encode function yields (the thumbnail only goes to stores that keep one)."""


class CodeStore(Protocol):
    """What ``embed`` and ``image_knn`` need from a code store."""

    name: str

    def check(self) -> None:
        """Raise :class:`CodeStoreError` when the store cannot be reached."""

    def write(self, codes: DataFrame, *, replace: bool) -> int:
        """Write codes (replacing every stored code when ``replace``); rows written."""

    def load(self) -> pa.Table:
        """Every committed code, columns :data:`CODE_COLUMNS`."""

    def generation(self) -> str:
        """Changes whenever committed codes change."""


class DeltaCodeStore:
    """``dicom.codes``: one Delta commit per write, so readers see all of it or none."""

    name = "delta"

    def __init__(self, table_path: str | Path) -> None:
        self.table_path = Path(table_path)

    def check(self) -> None:
        self.table_path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, codes: DataFrame, *, replace: bool) -> int:
        from dicomlake.catalog.delta import (
            TableTarget,
            active_files,
            arrow_schema_of,
            commit,
            write_files,
        )

        codes = codes.select(*CODE_COLUMNS)
        written = write_files(codes, [TableTarget(CODES, str(self.table_path), CODE_COLUMNS)])
        removes = active_files(self.table_path) if replace else []
        commit(self.table_path, arrow_schema_of(codes, CODE_COLUMNS), written, removes,
               operation="ENCODE")
        return sum(f.rows for f in written)

    def load(self) -> pa.Table:
        from dicomlake.catalog.delta import read_columns

        return read_columns(self.table_path, list(CODE_COLUMNS)).drop_columns(["_file"])

    def generation(self) -> str:
        """The table version ("-1" without a table), from a listing of its log: asked once
        per ``image_knn`` task, so it must not replay the log (see ``udfs.deltalog``)."""
        from dicomlake.udfs.deltalog import latest_version

        return str(latest_version(self.table_path))


def open_store(warehouse_path: str | Path, similarity: SimilaritySettings) -> CodeStore:
    """The store the settings select."""
    if similarity.code_store is CodeStoreKind.HBASE:
        from dicomlake.udfs.hbase import HBaseCodeStore

        return HBaseCodeStore(similarity.hbase)
    return DeltaCodeStore(Path(warehouse_path) / "dicom" / CODES)


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
