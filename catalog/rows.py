"""One input's row: provenance plus header (``dicom.instances``) or the reason (``errors``).

The batch source and the stream's writer both build their rows here, so a file ingested from
a ZIP and the same file uploaded through the stream get the same columns filled the same way;
only the provenance values differ (an archive member vs. a Kafka record).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from dicomlake.catalog.archives import Found
from dicomlake.catalog.columns import promoted_values
from dicomlake.catalog.errors import ErrorKind


@dataclass(frozen=True)
class Origin:
    """Where a batch of inputs came from: a listed source (archive or file), or a record."""

    source: str
    fingerprint: str
    members: int


def provenance(origin: Origin, found: Found) -> dict[str, Any]:
    """The provenance columns every row of ``instances`` and ``errors`` starts with."""
    return {"path": found.path, "source": origin.source,
            "source_fingerprint": origin.fingerprint, "source_members": origin.members,
            "archive": found.archive, "member": found.member,
            "member_index": found.member_index, "file_size": found.file_size,
            "compressed_size": found.compressed_size, "crc32": found.crc32,
            "modified": found.modified}


def error_message(found: Found) -> str:
    """The error text of a found input, naming the archive member or file it concerns."""
    assert found.error is not None
    message = found.error[1]
    where = (f"archive {found.archive} member {found.member}" if found.archive and found.member
             else found.path)
    return message if found.path in message else f"{where}: {message}"


def instance_row(origin: Origin, found: Found) -> dict[str, Any]:
    """The ``dicom.instances`` row of a found input with a header (``warnings`` included:
    writers route them to ``dicom.warnings``)."""
    assert found.header is not None
    row = provenance(origin, found)
    row.update(promoted_values(found.header))
    return row


def error_row(origin: Origin, found: Found, *, kind: ErrorKind | str | None = None,
              message: str | None = None, at: dt.datetime | None = None) -> dict[str, Any]:
    """The ``dicom.errors`` row of a found input that is not an instance."""
    row = provenance(origin, found)
    if found.error is not None:
        kind = kind or found.error[0]
        message = message or error_message(found)
    row["error_kind"] = ErrorKind(kind).value if isinstance(kind, ErrorKind) else kind
    row["error"] = message
    row["ingested_at"] = at or dt.datetime.now(dt.UTC)
    return row
