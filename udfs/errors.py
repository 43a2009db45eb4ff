"""Errors of the similarity stack, each naming what failed and what to do next.

They share :class:`dicomlake.errors.DicomlakeError` so callers can catch everything the
project raises with one ``except``.
"""

from __future__ import annotations

from enum import StrEnum

from dicomlake.errors import DicomlakeError


class PixelErrorKind(StrEnum):
    """Why an image produced no pixels (recorded in ``dicom.pixel_errors.error_kind``)."""

    UNREADABLE = "unreadable"
    """The archive or member cannot be opened."""
    NO_PIXELS = "no_pixels"
    """The instance has no Pixel Data element (e.g. a structured report)."""
    UNSUPPORTED_SYNTAX = "unsupported_transfer_syntax"
    """No installed codec decodes this transfer syntax."""
    UNDECODABLE = "undecodable"
    """The pixel data is corrupt or does not match Rows/Columns/BitsAllocated."""
    TOO_SMALL = "too_small"
    """Zero-size or 1-pixel-wide images carry no structure to embed."""


class PixelError(DicomlakeError):
    """An image's pixels cannot be decoded; ``kind`` groups the failures."""

    def __init__(self, kind: PixelErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class EmbeddingError(DicomlakeError):
    """The model cannot be loaded or produced unusable vectors."""


class CodebookError(DicomlakeError):
    """No codebook, a codebook that does not fit the vectors, or codes from another one."""


class CodeStoreError(DicomlakeError):
    """The code store is unreachable or inconsistent; nothing was written."""


class KnnError(DicomlakeError):
    """A bad ``image_knn`` call: unknown id, bad ``k``, bad filter."""


class UnknownImageError(DicomlakeError):
    """An image argument names no image of the lake (the file system is never consulted)."""
