"""The one pre-check every path runs before a DICOM header becomes a row.

Batch tasks, the stream's writer and uploads all decide here, from the bytes and never from a
file or member name, what an input is: a DICOM file (with the 128-byte preamble and ``DICM``,
or a raw dataset whose first element is a plausible group 0002/0008 element), an archive to
open (ZIP, tar, gzip/bzip2/xz), a documented skip (operating-system litter such as
``__MACOSX/``), or something that is not DICOM. :func:`parse_instance` then reads the header
and turns *any* exception into a :class:`HeaderError` naming the fault, so one bad input can
never abort a job.

Spark-free and Flink-free: it runs in Spark's Python workers, in the Flink venv and in the
Jupyter server alike.
"""

from __future__ import annotations

import struct
import zlib
from enum import StrEnum
from typing import IO, TYPE_CHECKING

from dicomlake.catalog.errors import ErrorKind, HeaderError

if TYPE_CHECKING:
    from dicomlake.catalog.header import Header

SNIFF_BYTES = 512
"""Bytes read to decide what an input is (tar's ``ustar`` magic sits at byte 257)."""

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
"""Media Storage Directory Storage: a DICOMDIR indexes a medium; it is not an instance."""


class Content(StrEnum):
    """What the first bytes of an input say it is."""

    DICOM = "dicom"
    """128-byte preamble followed by ``DICM`` (PS3.10)."""
    DICOM_RAW = "dicom_raw"
    """No preamble, but the bytes start with a plausible group 0002 or 0008 element."""
    ZIP = "zip"
    TAR = "tar"
    GZIP = "gzip"
    BZIP2 = "bzip2"
    XZ = "xz"
    EMPTY = "empty"
    OTHER = "other"
    """Anything else: not DICOM."""


ARCHIVES = frozenset({Content.ZIP, Content.TAR, Content.GZIP, Content.BZIP2, Content.XZ})
"""Contents that hold other inputs."""

_RAW_GROUPS = frozenset({0x0002, 0x0008})
VR_CODES = frozenset({
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB",
    b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM",
    b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV"})
"""Every VR of PS3.5: two bytes that are one of these start an explicit VR element."""
_MAX_PLAUSIBLE_IMPLICIT_LENGTH = 1 << 16
"""An implicit-VR first element longer than this is not how real raw datasets start."""


def _plausible_first_element(head: bytes) -> bool:
    """Whether ``head`` starts like a dataset without preamble (ACR-NEMA, raw exports).

    Little endian: group 0002/0008 then an explicit VR, or (implicit VR) a sane length.
    Big endian: group 0002/0008 then an explicit VR (there is no implicit big endian).
    """
    if len(head) < 8:
        return False
    group_le, elem_le, length_le = struct.unpack_from("<HHI", head)
    if group_le in _RAW_GROUPS:
        if head[4:6] in VR_CODES:
            return True
        return elem_le <= 0x1FFF and 0 < length_le < _MAX_PLAUSIBLE_IMPLICIT_LENGTH
    group_be = struct.unpack_from(">H", head)[0]
    return group_be in _RAW_GROUPS and head[4:6] in VR_CODES


def sniff(head: bytes) -> Content:
    """What an input is, from its first bytes (give at least :data:`SNIFF_BYTES`)."""
    if not head:
        return Content.EMPTY
    if head[128:132] == b"DICM":
        return Content.DICOM
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return Content.ZIP
    if head[257:262] == b"ustar":
        return Content.TAR
    if head[:2] == b"\x1f\x8b":
        return Content.GZIP
    if head[:3] == b"BZh":
        return Content.BZIP2
    if head[:6] == b"\xfd7zXZ\x00":
        return Content.XZ
    if _plausible_first_element(head):
        return Content.DICOM_RAW
    return Content.OTHER


SKIP_RULES: tuple[tuple[str, str], ...] = (
    ("__MACOSX/", "macOS resource fork folder (__MACOSX/)"),
    ("._", "macOS AppleDouble file (._*)"),
    (".DS_Store", "macOS Finder metadata (.DS_Store)"),
    ("Thumbs.db", "Windows Explorer thumbnail cache (Thumbs.db)"),
    ("desktop.ini", "Windows Explorer folder settings (desktop.ini)"),
)
"""The documented skips: operating-system litter that archives and folders carry.

A skipped input is still accounted for: it is recorded in ``dicom.errors`` with
``error_kind = 'skipped'`` and the rule's description, and the ingest summary counts it.
"""


def skip_reason(name: str) -> str | None:
    """The skip rule ``name`` (a member name or a path inside a walked folder) falls under."""
    parts = name.replace("\\", "/").split("/")
    base = parts[-1]
    for pattern, reason in SKIP_RULES:
        if pattern.endswith("/"):
            if pattern[:-1] in parts[:-1]:
                return reason
        elif pattern == "._":
            if base.startswith("._"):
                return reason
        elif base == pattern:
            return reason
    return None


def not_dicom_message(head: bytes) -> str:
    """Why bytes that start with ``head`` are not DICOM, showing what they start with."""
    return ("not DICOM: no DICM marker at byte 128 and the first bytes are not a DICOM "
            f"element (they start with {head[:16]!r})")


def parse_instance(fp: IO[bytes], *, uri: str, size: int | None, head: bytes,
                   max_header_bytes: int = 64 << 20) -> Header:
    """Read the header of one input whose first bytes are ``head`` (``fp`` at its start).

    Raises:
        HeaderError: the input cannot become an instance row; ``kind`` names the fault:
            ``empty``, ``not_dicom``, ``dicomdir``, ``truncated``, ``bad_header``,
            ``too_large``, or ``bad_archive`` when the compressed stream it comes from is
            damaged. Every other exception is turned into ``bad_header`` with its text.
    """
    from dicomlake.catalog.header import read_header

    content = sniff(head)
    if content is Content.EMPTY:
        raise HeaderError(ErrorKind.EMPTY, "file is empty (0 bytes)")
    if content not in (Content.DICOM, Content.DICOM_RAW):
        raise HeaderError(ErrorKind.NOT_DICOM, not_dicom_message(head))
    try:
        header = read_header(fp, uri=uri, size=size, has_preamble=content is Content.DICOM,
                             max_header_bytes=max_header_bytes)
    except HeaderError:
        raise
    except zlib.error as exc:  # only a deflated dataset is inflated while parsing
        raise HeaderError(ErrorKind.BAD_HEADER,
                          "the deflated dataset (transfer syntax 1.2.840.10008.1.2.1.99) is "
                          f"corrupt: {exc}") from exc
    except Exception as exc:  # any library's failure is this input's error
        raise HeaderError(ErrorKind.BAD_HEADER,
                          f"header cannot be parsed ({type(exc).__name__}: {exc})") from exc
    if (header.media_storage_sop_class_uid == DICOMDIR_SOP_CLASS
            or "00041220" in header.meta):
        raise HeaderError(ErrorKind.DICOMDIR,
                          "a DICOMDIR (media directory, SOP class 1.2.840.10008.1.3.10): it "
                          "indexes the files beside it and is not an instance; recorded, not "
                          "ingested")
    return header
