"""Helpers shared by the image_knn test modules."""

from __future__ import annotations

import io

import numpy as np
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicomlake.udfs.pixels import load_frames, read_bytes


def a_ct(spark):
    return spark.sql("SELECT i.sop_instance_uid, i.path FROM dicom.instances i JOIN "
                     "dicom.embeddings e USING (sop_instance_uid) WHERE i.modality = 'CT' "
                     "AND i.rows = 512 ORDER BY i.path LIMIT 1").first()


def augment(path: str, out) -> None:
    """Noise, a 3-pixel shift and a window change: the same anatomy, other bytes."""
    ds = dcmread(io.BytesIO(read_bytes(path)))
    arr = ds.pixel_array.astype(np.int32)
    rng = np.random.default_rng(1)
    arr = np.roll(arr, 3, axis=1) + rng.normal(0, 8, arr.shape).astype(np.int32)
    info = np.iinfo(ds.pixel_array.dtype)
    ds.PixelData = np.clip(arr, info.min, info.max).astype(ds.pixel_array.dtype).tobytes()
    ds.WindowCenter, ds.WindowWidth = 60, 450
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(out)


def is_source(source_path: str, found_path: str) -> bool:
    """The found image is the source, or a copy of it rolled by a few rows.

    The sample makes each series from one template, slice k being the template rolled by k
    rows; those copies are the source up to a shift smaller than the augmentation's, so
    finding one of them (and not another template) is finding the source.
    """
    if found_path == source_path:
        return True
    source = load_frames(read_bytes(source_path), source_path).data[0]
    found = load_frames(read_bytes(found_path), found_path).data[0]
    return source.shape == found.shape and any(
        np.array_equal(np.roll(source, k, axis=0), found) for k in range(-40, 41))
