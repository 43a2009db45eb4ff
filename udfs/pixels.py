"""Pixels on demand: one member read out of its ZIP, decoded, rescaled, windowed, resized.

Nothing is unpacked to disk: ``dicom.instances.path`` (``<archive>!/<member>`` for ZIP
members) is enough to fetch one image. pydicom decodes with the pylibjpeg plug-ins
(JPEG, JPEG-LS via libjpeg, JPEG 2000 via openjpeg) and its own RLE decoder. Every failure
is a :class:`PixelError` whose message names the path and the transfer syntax, so a bad
image becomes a row in ``dicom.pixel_errors`` instead of failing a job.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, SupportsFloat, SupportsIndex

import numpy as np

from dicomlake.udfs.errors import PixelError, PixelErrorKind

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

MODEL_SIZE = 224
"""Side of the square image the CNNs take."""

DEFAULT_WINDOWS: dict[str, tuple[float, float]] = {
    "CT": (40.0, 400.0),  # soft tissue; the common reading window when the file has none
}
"""(center, width) per modality when the file has no WindowCenter/WindowWidth.

Other modalities have no meaningful fixed scale, so the frame's 0.5-99.5 percentile range is
used instead (what viewers do for MR and CR).
"""

def read_bytes(path: str) -> bytes:
    """The bytes of one instance by its ``path`` (plain file, archive member, nested)."""
    from dicomlake.catalog.archives import read_input

    try:
        return read_input(path)
    except Exception as exc:  # any archive library's failure: this image's error row
        raise PixelError(PixelErrorKind.UNREADABLE, f"{path}: cannot read: {exc}") from exc


def _decode(ds: Dataset, path: str) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise PixelError(PixelErrorKind.NO_PIXELS,
                         f"{path}: no Pixel Data (7FE0,0010); SOP class "
                         f"{ds.get('SOPClassUID', 'unknown')} has no image to embed")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 2 or cols < 2:
        raise PixelError(PixelErrorKind.TOO_SMALL,
                         f"{path}: image is {rows}x{cols} (Rows x Columns); at least 2x2 "
                         "pixels are needed")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID", "unknown") if meta is not None else "unknown"
    try:
        return np.asarray(ds.pixel_array)
    except NotImplementedError as exc:
        raise PixelError(PixelErrorKind.UNSUPPORTED_SYNTAX,
                         f"{path}: transfer syntax {syntax} ({getattr(syntax, 'name', '?')}) "
                         f"cannot be decoded by the installed codecs: {exc}") from exc
    except RuntimeError as exc:
        text = str(exc).lower()
        # pydicom: "exceptions were raised by all available plugins" = the codec tried and
        # failed (bad data); "missing dependencies"/"not supported" = no codec installed.
        missing = "missing" in text or "not supported" in text or "no pixel data" in text
        kind = PixelErrorKind.UNSUPPORTED_SYNTAX if missing and "were raised" not in text \
            else PixelErrorKind.UNDECODABLE
        raise PixelError(kind, f"{path}: pixel data with transfer syntax {syntax} cannot be "
                               f"decoded: {exc}") from exc
    except Exception as exc:  # codecs raise ValueError, struct.error, IndexError ...
        raise PixelError(PixelErrorKind.UNDECODABLE,
                         f"{path}: pixel data with transfer syntax {syntax} is corrupt or does "
                         f"not match Rows/Columns/BitsAllocated: {exc}") from exc


def _first(value: object) -> float | None:
    """The (first) value of a possibly multi-valued element (pydicom's MultiValue is a
    Sequence) as a number; None when absent or not a number, so callers fall back."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0] if len(value) else None
    if not isinstance(value, str | bytes | SupportsFloat | SupportsIndex):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Frames:
    """Decoded frames of one instance: (frames, rows, cols) gray or (frames, rows, cols, 3)."""

    data: np.ndarray
    color: bool
    modality: str
    window: tuple[float, float] | None
    monochrome1: bool

    @property
    def count(self) -> int:
        return int(self.data.shape[0])


def load_frames(data: bytes, path: str) -> Frames:
    """Decode an instance's frames and apply the modality rescale (slope/intercept)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        ds = dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, ValueError, OSError) as exc:
        raise PixelError(PixelErrorKind.UNDECODABLE, f"{path}: not readable as DICOM: {exc}"
                         ) from exc
    arr = _decode(ds, path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    color = spp > 1
    if frames == 1:
        arr = arr[np.newaxis]
    if arr.ndim != (4 if color else 3) or min(arr.shape[1:3]) < 2:
        raise PixelError(PixelErrorKind.UNDECODABLE,
                         f"{path}: decoded pixel array has shape {arr.shape}, which does not "
                         f"match NumberOfFrames={frames}, SamplesPerPixel={spp}")
    if not color:
        slope = _first(ds.get("RescaleSlope")) or 1.0
        intercept = _first(ds.get("RescaleIntercept")) or 0.0
        arr = arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    modality = str(ds.get("Modality", "OT"))
    window = (center, width) if center is not None and width else DEFAULT_WINDOWS.get(modality)
    return Frames(arr, color, modality, window,
                  str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1")


def to_uint8(frame: np.ndarray, frames: Frames,
             window: tuple[float, float] | None = None) -> np.ndarray:
    """One frame windowed to 0..255 (gray) or scaled to 0..255 (color)."""
    frame = frame.astype(np.float32)
    if frames.color:
        hi = float(frame.max())
        scale = 255.0 / hi if hi > 255 else 1.0
        return np.clip(frame * scale, 0, 255).astype(np.uint8)
    window = window or frames.window
    if window is not None:
        center, width = window
        lo, hi = center - width / 2.0, center + width / 2.0
    else:
        lo, hi = (float(v) for v in np.percentile(frame, (0.5, 99.5)))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        hi = lo + 1.0
    out = np.clip((frame - lo) * (255.0 / (hi - lo)), 0, 255)
    if frames.monochrome1:
        out = 255.0 - out
    return out.astype(np.uint8)


def resize(image: np.ndarray, size: int = MODEL_SIZE) -> np.ndarray:
    """A uint8 image squashed to ``size`` x ``size`` x 3 (gray is repeated into RGB)."""
    from PIL import Image

    mode = "RGB" if image.ndim == 3 else "L"
    img = Image.fromarray(image, mode=mode).resize((size, size), Image.Resampling.BILINEAR)
    out = np.asarray(img)
    if out.ndim == 2:
        out = np.repeat(out[:, :, np.newaxis], 3, axis=2)
    return out


def _png(image: np.ndarray, size: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(image)
    img.thumbnail((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def frame_inputs(data: bytes, path: str, *, thumbnail_size: int = 128,
                 ) -> list[tuple[np.ndarray, bytes]]:
    """(model input, PNG thumbnail) per frame of one instance; raises :class:`PixelError`.

    The one way from an instance's bytes to what the model sees: batch tasks, the stream,
    SQL functions and ``image_knn`` queries all call it, so an image is embedded the same way
    whichever path it took.
    """
    frames = load_frames(data, path)
    out = []
    for raw in frames.data:
        img = to_uint8(raw, frames)
        out.append((resize(img), _png(img, thumbnail_size)))
    return out


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
MAX_PICTURE_PIXELS = 1 << 26
"""Largest PNG/JPEG (width x height) decoded for a query; a bigger one is refused before
its pixels are unpacked (a small compressed file can claim a huge picture)."""
_IDENTITY_WINDOW = (127.5, 255.0)
"""The window that maps 0..255 onto itself in :func:`to_uint8`: 8-bit pictures already hold
display values (a lake image exported as PNG is exactly the windowed frame the model saw)."""


def image_kind(data: bytes) -> str | None:
    """``dicom``, ``png`` or ``jpeg`` from the first bytes; None for anything else.

    What counts as DICOM is the ingest's own rule (:func:`dicomlake.catalog.preflight.sniff`:
    the ``DICM`` preamble or a plausible first element), so a query image is DICOM exactly
    when a file with those bytes would be ingested as one.
    """
    from dicomlake.catalog.preflight import SNIFF_BYTES, Content, sniff

    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SIGNATURE):
        return "jpeg"
    if sniff(data[:SNIFF_BYTES]) in (Content.DICOM, Content.DICOM_RAW):
        return "dicom"
    return None


def _picture_frames(data: bytes, what: str, kind: str) -> Frames:
    """A PNG or JPEG as one frame: gray or RGB, 8-bit values kept as they are (the identity
    window), 16-bit gray windowed by its percentiles as MR and CR frames without a window."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > MAX_PICTURE_PIXELS:
            raise PixelError(PixelErrorKind.UNDECODABLE,
                             f"{what}: {kind.upper()} of {width}x{height} pixels is larger "
                             f"than the {MAX_PICTURE_PIXELS} pixels a query image may have")
        img.load()
    except PixelError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise PixelError(PixelErrorKind.UNDECODABLE,
                         f"{what}: not readable as {kind.upper()}: {exc}") from exc
    if min(img.size) < 2:
        raise PixelError(PixelErrorKind.TOO_SMALL, f"{what}: image is {img.height}x"
                                                   f"{img.width}; at least 2x2 pixels are needed")
    window: tuple[float, float] | None = _IDENTITY_WINDOW
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float32)
        window = None
    elif img.mode in ("1", "L", "LA"):
        arr = np.asarray(img.convert("L"))
    else:  # RGB, RGBA, P, CMYK, YCbCr...: the colours as shown
        arr = np.asarray(img.convert("RGB"))
    color = arr.ndim == 3
    return Frames(arr[np.newaxis], color, "OT", None if color else window, False)


def query_image_inputs(data: bytes, what: str = "query_image") -> np.ndarray:
    """Every frame of an image given as bytes (DICOM, PNG or JPEG), ready for the model:
    (frames, 224, 224, 3) uint8, through the same windowing and resizing as lake images.

    Raises:
        PixelError: the bytes are none of the three (naming their first bytes), or they
            cannot be decoded; messages name ``what``, never the bytes themselves.
    """
    kind = image_kind(data)
    if kind is None:
        raise PixelError(PixelErrorKind.UNDECODABLE,
                         f"{what} is neither DICOM, PNG nor JPEG: starts with "
                         f"{data[:8].hex(' ') or 'nothing (0 bytes)'}")
    frames = load_frames(data, what) if kind == "dicom" else _picture_frames(data, what, kind)
    return np.stack([resize(to_uint8(f, frames)) for f in frames.data])


def windowed_png(data: bytes, what: str = "query image", *, frame: int = 0) -> bytes:
    """One frame of DICOM bytes as the 8-bit PNG the model's input is resized from.

    :func:`query_image_inputs` reads such a PNG with the identity window, so its model input
    is exactly the DICOM frame's: a client whose channel limits the size of what it sends
    (the SQL endpoint's statement length) can send this PNG instead of a large DICOM file.
    """
    from PIL import Image

    frames = load_frames(data, what)
    if not 0 <= frame < frames.count:
        raise PixelError(PixelErrorKind.NO_PIXELS,
                         f"{what}: frame {frame} does not exist (the image has {frames.count})")
    buf = io.BytesIO()
    Image.fromarray(to_uint8(frames.data[frame], frames)).save(buf, format="PNG")
    return buf.getvalue()


def model_inputs(path: str, data: bytes | None = None,
                 window: tuple[float, float] | None = None) -> np.ndarray:
    """All frames of an instance ready for the model: (frames, 224, 224, 3) uint8."""
    frames = load_frames(read_bytes(path) if data is None else data, path)
    return np.stack([resize(to_uint8(f, frames, window)) for f in frames.data])


def thumbnail_png(path: str, *, size: int = 128, frame: int = 0) -> bytes:
    """A PNG thumbnail (longest side ``size``) of one frame, windowed as for the model."""
    frames = load_frames(read_bytes(path), path)
    if not 0 <= frame < frames.count:
        raise PixelError(PixelErrorKind.NO_PIXELS,
                         f"{path}: frame {frame} does not exist (the image has {frames.count})")
    return _png(to_uint8(frames.data[frame], frames), size)
