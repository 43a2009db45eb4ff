"""Create the tables the stream appends to, with the registry's schemas, before it runs.

The job only ever appends (with each table's own schema), so every table must exist first;
``dicomlake stream start`` calls this.
"""

from __future__ import annotations

from dicomlake.catalog import tables
from dicomlake.config import Settings

STREAM_TABLES = tuple(t.name for t in (tables.INSTANCES, tables.ERRORS, tables.WARNINGS,
                                        tables.EMBEDDINGS, tables.PIXEL_ERRORS, tables.CODES))
"""What the job appends to (``series``/``studies`` are created by their first update)."""


def ensure_tables(settings: Settings) -> list[str]:
    """Create missing tables the stream appends to; returns the ones created."""
    return tables.create_missing(settings.warehouse_path, STREAM_TABLES)
