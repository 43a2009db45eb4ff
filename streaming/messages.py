"""The upload message: one DICOM file per Kafka record, described by headers.

Key: the SHA-256 of the file (hex), so re-sending a file lands in the same partition.
Value: the file's bytes, or nothing when the file was larger than ``inline_max_bytes``; then
the producer stored it in the lake first and ``dicomlake-ref`` names that file (a Kafka
record of hundreds of megabytes would block its partition and every broker's memory).

Headers (all UTF-8 text): ``dicomlake-schema`` (``upload/1``), ``dicomlake-name`` (original
file or ``archive!/member`` name), ``dicomlake-size``, ``dicomlake-sha256``,
``dicomlake-sent-ms`` (producer clock; freshness is measured from it), ``dicomlake-ref``.
Only this module knows the header names; producer and job both go through it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from dicomlake.errors import DicomlakeError

SCHEMA = "upload/1"
H_SCHEMA, H_NAME, H_SIZE, H_SHA, H_SENT, H_REF = (
    "dicomlake-schema", "dicomlake-name", "dicomlake-size", "dicomlake-sha256",
    "dicomlake-sent-ms", "dicomlake-ref")


class BadMessageError(DicomlakeError, ValueError):
    """A record that cannot be an upload; ``kind`` is the ``dicom.errors.error_kind``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Upload:
    """A validated upload header set (the bytes are fetched separately)."""

    name: str
    size: int
    sha256: str
    sent_ms: int
    ref: str | None


def encode(name: str, data: bytes | None, *, size: int, sha256: str, ref: str | None = None,
           ) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of an upload record; ``data`` is None when ``ref`` is given."""
    headers = [(H_SCHEMA, SCHEMA.encode()), (H_NAME, name.encode()),
               (H_SIZE, str(size).encode()), (H_SHA, sha256.encode()),
               (H_SENT, str(int(time.time() * 1000)).encode())]
    if ref is not None:
        headers.append((H_REF, ref.encode()))
    return sha256.encode(), data or b"", headers


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(headers: list[tuple[str, bytes]] | None, value: bytes | None, *,
           inline_max_bytes: int, max_image_bytes: int) -> Upload:
    """Check a record's headers and size limits; raises :class:`BadMessageError`."""
    from dicomlake.catalog.errors import ErrorKind
    from dicomlake.streaming.settings import BAD_MESSAGE

    found = {k: v for k, v in headers or []}
    schema = found.get(H_SCHEMA)
    if schema is None:
        raise BadMessageError(BAD_MESSAGE, f"wrong schema: header {H_SCHEMA!r} is missing; "
                                           f"a dicomlake upload has {H_SCHEMA}={SCHEMA!r} "
                                           "(send with `dicomlake upload`)")
    if schema != SCHEMA.encode():
        raise BadMessageError(BAD_MESSAGE, f"wrong schema: {H_SCHEMA} is "
                                           f"{schema[:40]!r}, this job reads {SCHEMA!r}")
    try:
        name = found[H_NAME].decode()
        size = int(found[H_SIZE])
        sha = found[H_SHA].decode()
        sent = int(found.get(H_SENT, b"0"))
        ref = found[H_REF].decode() if H_REF in found else None
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise BadMessageError(BAD_MESSAGE, f"wrong schema: headers {H_NAME}, {H_SIZE} and "
                                           f"{H_SHA} must be text (bad or missing: {exc})"
                              ) from None
    inline = len(value or b"")
    if size > max_image_bytes or inline > inline_max_bytes:
        raise BadMessageError(ErrorKind.TOO_LARGE.value,
                              f"{name}: oversized upload ({max(size, inline)} bytes; limits: "
                              f"{max_image_bytes} per image, {inline_max_bytes} inline; larger "
                              "files must be stored in the lake and sent as a reference)")
    if ref is None and inline != size:
        kind = ErrorKind.TRUNCATED if inline < size else ErrorKind.BAD_VALUE
        raise BadMessageError(kind.value, f"{name}: message carries {inline} bytes but "
                                          f"declares {H_SIZE}={size} (truncated in transit?)")
    return Upload(name, size, sha, sent, ref)
