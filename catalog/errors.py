"""Errors raised while reading DICOM inputs.

Each carries an :class:`ErrorKind` so rejected inputs can be grouped in ``dicom.errors``
(``GROUP BY error_kind``) and a message that names the tag; the reader prefixes the archive
and member, so a message alone tells the user which file to look at.
"""

from __future__ import annotations

from enum import StrEnum

from dicomlake.errors import DicomlakeError

__all__ = ["DicomlakeError", "ErrorKind", "HeaderError"]


class ErrorKind(StrEnum):
    """Why an input became an error record instead of a row."""

    UNREADABLE = "unreadable"
    """The path cannot be opened (missing, permission denied, I/O error)."""
    BAD_ARCHIVE = "bad_archive"
    """The archive is truncated or corrupt (central directory, tar header, or the
    compressed stream of a member); never used for faults of the DICOM content."""
    ENCRYPTED = "encrypted"
    """The ZIP member is encrypted; dicomlake does not take passwords."""
    TOO_LARGE = "too_large"
    """The declared size is beyond the configured limit (zip bomb guard)."""
    EMPTY = "empty"
    """The file or member has zero bytes."""
    NOT_DICOM = "not_dicom"
    """No DICOM preamble/marker and not parseable as DICOM."""
    TRUNCATED = "truncated"
    """The file ends before its header (or declared pixel data) does."""
    BAD_HEADER = "bad_header"
    """The header structure cannot be parsed."""
    BAD_VALUE = "bad_value"
    """An element's value does not fit its VR (wrong VR, bad number or date)."""
    DUPLICATE = "duplicate"
    """Another input already holds this SOPInstanceUID."""
    DICOMDIR = "dicomdir"
    """A DICOMDIR: the index of a medium, recorded but not an instance."""
    SKIPPED = "skipped"
    """Operating-system litter skipped by a documented rule (``preflight.SKIP_RULES``)."""


class HeaderError(DicomlakeError):
    """A DICOM input cannot become a row; ``kind`` says why."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
