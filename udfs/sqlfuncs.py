"""Scalar SQL functions over images (vectorized pandas UDFs)."""

from __future__ import annotations

import pandas as pd


def _thumbnail_or_none(path: str | None) -> bytes | None:
    from dicomlake.udfs.errors import PixelError
    from dicomlake.udfs.pixels import thumbnail_png

    if path is None:
        return None
    try:
        return thumbnail_png(path)
    except PixelError:
        return None  # dicom.pixel_errors says why; a thumbnail column should not fail a query


def dicom_thumbnail(paths: pd.Series) -> pd.Series:
    """``dicom_thumbnail(path)``: PNG bytes (128 px) of the first frame, NULL if undecodable."""
    return paths.map(_thumbnail_or_none)
