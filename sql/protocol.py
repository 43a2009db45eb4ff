"""Trino client protocol documents: ``QueryResults``, stats, ``/v1/info``.

Kept apart from the HTTP handler and the query lifecycle so the wire format is in one place.
Result rows arrive here already JSON-encoded (by the query's producer thread) and are spliced
into the document, so a large page is never decoded and re-encoded.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicomlake.sql.query import Query


def stats_json(query: Query) -> dict[str, Any]:
    """The ``stats`` object; clients show ``state`` and progress from it."""
    elapsed = int(query.elapsed_seconds() * 1000)
    queued = int(query.queued_seconds() * 1000)
    state = query.state.value
    return {
        "state": state,
        "queued": state == "QUEUED",
        "scheduled": state != "QUEUED",
        "nodes": 1,
        "totalSplits": 0,
        "queuedSplits": 0,
        "runningSplits": 0,
        "completedSplits": 0,
        "cpuTimeMillis": 0,
        "wallTimeMillis": elapsed,
        "queuedTimeMillis": queued,
        "elapsedTimeMillis": elapsed,
        "processedRows": query.rows,
        "processedBytes": query.bytes,
        "physicalInputBytes": 0,
        "peakMemoryBytes": 0,
        "spilledBytes": 0,
    }


def results_json(query: Query, *, base_url: str, fragments: list[bytes],
                 next_uri: str | None) -> bytes:
    """One ``QueryResults`` document, with ``fragments`` (encoded rows) as ``data``."""
    doc: dict[str, Any] = {
        "id": query.id,
        "infoUri": f"{base_url}/v1/query/{query.id}",
    }
    if next_uri is not None:
        doc["nextUri"] = next_uri
    if query.columns is not None:
        doc["columns"] = query.columns
    doc["stats"] = stats_json(query)
    if query.error is not None and next_uri is None:
        doc["error"] = query.error.to_json()
    doc["warnings"] = []
    if query.update_type is not None:
        doc["updateType"] = query.update_type
        if query.update_count is not None:
            doc["updateCount"] = query.update_count
    body = json.dumps(doc, separators=(",", ":")).encode()
    if not fragments:
        return body
    return b"".join([body[:-1], b',"data":[', b",".join(fragments), b"]}"])


def info_json(version: str, uptime_seconds: float) -> bytes:
    """``GET /v1/info``: what Trino's coordinator reports about itself."""
    return json.dumps({
        "nodeVersion": {"version": version},
        "environment": "dicomlake",
        "coordinator": True,
        "starting": False,
        "uptime": f"{uptime_seconds:.2f}s",
    }).encode()


def message_json(message: str, **extra: Any) -> bytes:
    """A plain JSON error body for HTTP-level failures (bad request, not found, 401)."""
    return json.dumps({"message": message, **extra}).encode()
