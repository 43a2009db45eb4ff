"""Scalar SQL functions over images (vectorized pandas UDFs)."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from dicomlake.udfs.images import ImageScope


def _thumbnail_or_none(path: str) -> bytes | None:
    from dicomlake.udfs.errors import PixelError
    from dicomlake.udfs.pixels import thumbnail_png

    try:
        return thumbnail_png(path)
    except PixelError:
        return None  # dicom.pixel_errors says why; a thumbnail column should not fail a query


def make_thumbnail(home: str, warehouse: str,
                   scope: ImageScope) -> Callable[[pd.Series], pd.Series]:
    """``dicom_thumbnail(id)``: PNG bytes (128 px) of the first frame, NULL if undecodable.

    ``id`` is a ``sop_instance_uid`` or ``path`` of the scope's ``instances`` table; anything
    else fails the query without the file system being asked (see :mod:`.images`).
    """

    def dicom_thumbnail(refs: pd.Series) -> pd.Series:
        from dicomlake.udfs.images import image_index

        index = image_index(home, warehouse, scope)
        return refs.map(lambda ref: None if ref is None
                        else _thumbnail_or_none(index.path_of(str(ref))))

    return dicom_thumbnail
