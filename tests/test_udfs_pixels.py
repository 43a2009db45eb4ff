"""Pixels: decoding the shipped transfer syntaxes, windowing, frames, thumbnails, bad input."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import UID

from dicomlake.catalog.archives import MEMBER_SEPARATOR
from dicomlake.catalog.sample import find_template
from dicomlake.udfs.errors import PixelError, PixelErrorKind
from dicomlake.udfs.pixels import (
    load_frames,
    model_inputs,
    read_bytes,
    thumbnail_png,
    to_uint8,
)


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KR.dcm", "MR_small_RLE.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_compressed_and_plain_syntaxes_decode_to_model_input(name):
    images = model_inputs(str(find_template(name)))
    assert images.shape[1:] == (224, 224, 3)
    assert images.dtype == np.uint8
    assert images.std() > 0  # not a blank image


def test_lossless_codecs_give_the_same_pixels_as_uncompressed():
    plain = load_frames(read_bytes(str(find_template("MR_small.dcm"))), "MR_small.dcm")
    rle = load_frames(read_bytes(str(find_template("MR_small_RLE.dcm"))), "rle")
    np.testing.assert_array_equal(plain.data, rle.data)


def test_multiframe_gives_one_input_per_frame():
    images = model_inputs(str(find_template("emri_small.dcm")))
    assert len(images) == 10
    assert not np.array_equal(images[0], images[5])


def test_rescale_and_ct_default_window():
    ds = dcmread(find_template("CT_small.dcm"))
    frames = load_frames(read_bytes(str(find_template("CT_small.dcm"))), "ct")
    raw = ds.pixel_array.astype(np.float32)
    expected = raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(frames.data[0], expected)
    # The file has no window, so CT gets the soft-tissue window (40, 400): -160 HU -> 0.
    assert "WindowCenter" not in ds
    assert frames.window == (40.0, 400.0)
    img = to_uint8(frames.data[0], frames)
    assert img[frames.data[0] <= -160].max() == 0
    assert img[frames.data[0] >= 240].min() == 255


def test_file_window_is_used_when_present():
    buf = io.BytesIO()
    ds = dcmread(find_template("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 300, 1000
    ds.save_as(buf)
    frames = load_frames(buf.getvalue(), "windowed")
    assert frames.window == (300.0, 1000.0)


def test_member_is_read_from_zip_without_unpacking(tmp_path):
    archive = tmp_path / "a.zip"
    data = find_template("CT_small.dcm").read_bytes()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("P1/IM1", data)
    assert read_bytes(f"{archive}{MEMBER_SEPARATOR}P1/IM1") == data
    png = thumbnail_png(f"{archive}{MEMBER_SEPARATOR}P1/IM1")
    assert png.startswith(b"\x89PNG")
    from PIL import Image

    assert max(Image.open(io.BytesIO(png)).size) == 128


def _saved(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_missing_member_is_unreadable(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("x", b"1")
    with pytest.raises(PixelError, match="nope") as info:
        read_bytes(f"{archive}{MEMBER_SEPARATOR}nope")
    assert info.value.kind is PixelErrorKind.UNREADABLE


def test_undecodable_pixel_data_names_file_and_syntax():
    ds = dcmread(find_template("CT_small.dcm"))
    ds.PixelData = ds.PixelData[:100]  # truncated
    with pytest.raises(PixelError, match=r"bad\.dcm.*1\.2\.840\.10008\.1\.2\.1") as info:
        load_frames(_saved(ds), "bad.dcm")
    assert info.value.kind is PixelErrorKind.UNDECODABLE


def test_corrupt_jpeg2000_stream_is_undecodable():
    ds = dcmread(find_template("693_J2KR.dcm"))
    from pydicom.encaps import encapsulate, generate_frames

    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:40] + b"\x00" * 200])
    with pytest.raises(PixelError) as info:
        load_frames(_saved(ds), "j2k.dcm")
    assert info.value.kind is PixelErrorKind.UNDECODABLE


def test_unsupported_transfer_syntax():
    ds = dcmread(find_template("693_J2KR.dcm"))
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 video
    with pytest.raises(PixelError, match=r"1\.2\.840\.10008\.1\.2\.4\.100") as info:
        load_frames(_saved(ds), "mpeg.dcm")
    assert info.value.kind is PixelErrorKind.UNSUPPORTED_SYNTAX


@pytest.mark.parametrize("rows, cols", [(0, 0), (1, 1), (1, 64)])
def test_zero_size_and_one_pixel_images_are_refused(rows, cols):
    ds = dcmread(find_template("CT_small.dcm"))
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = b"\x00\x00" * (rows * cols) if rows * cols else b""
    with pytest.raises(PixelError, match=f"{rows}x{cols}") as info:
        load_frames(_saved(ds), "tiny.dcm")
    assert info.value.kind is PixelErrorKind.TOO_SMALL


def test_no_pixel_data():
    with pytest.raises(PixelError, match="no Pixel Data") as info:
        model_inputs(str(find_template("rtplan.dcm")))
    assert info.value.kind is PixelErrorKind.NO_PIXELS
