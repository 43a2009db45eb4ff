"""WADO-RS bodies: instance files, frames, metadata and rendered pictures of catalog rows.

Bytes come from where ingest found them: the ZIP member (or file) named by the row's path,
read whole (a deflated member cannot be entered in the middle) and kept in a small cache, so
the frames of one series, fetched one request each as viewers do, cost one member read each.
A frame is sliced out of the pixel data at the row's stored ``pixel_data_offset``, in the
stored transfer syntax; uncompressed pixel data is the same bytes in every little-endian
uncompressed syntax, so Explicit VR Little Endian is offered beside the stored syntax
(compressed frames are decoded for it). Other syntaxes are refused (406).

Analysts get a de-identified file: the de-identified header (``dicom_deid`` meta) with the
original pixel data, never the original bytes, which carry names and ids.
"""

from __future__ import annotations

import io
import struct
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import orjson

from dicomlake.errors import DicomlakeError

if TYPE_CHECKING:
    from dicomlake.dicomnet.index import InstanceRef

__all__ = ["EXPLICIT_LE", "Frames", "MemberCache", "NotAcceptable", "choose_frame_syntax",
           "deidentified_file", "frame_bytes", "metadata", "multipart", "rendered"]

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
_NATIVE_LE = frozenset({IMPLICIT_LE, EXPLICIT_LE})
"""Syntaxes whose pixel data is plain little-endian bytes (identical between them)."""

IMAGE_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc", "1.2.840.10008.1.2.5": "image/dicom-rle",
}
"""PS3.18 Table 8.7.3-2: the single-frame media type of each compressed syntax."""


class NotAcceptable(DicomlakeError, ValueError):
    """No representation the client accepts can be produced (406); says what can."""


class MemberCache:
    """The bytes of the instances read last, up to ``max_bytes`` in all.

    A viewer fetches a series frame by frame, one request each, and scrolls back and forth:
    each member is read whole (a deflated member cannot be entered in the middle), so it
    is kept for the frames and passes that follow. The budget is in bytes, not members: a
    count of 16 made every request of a 40-image series miss (each image read and inflated
    again per frame).
    """

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def read(self, path: str) -> bytes:
        """The bytes of the instance at the raw ``path`` (file, ZIP member, nested)."""
        with self._lock:
            data = self._items.get(path)
            if data is not None:
                self._items.move_to_end(path)
                return data
        from dicomlake.catalog.archives import read_input

        data = read_input(path)
        if len(data) > self.max_bytes:
            return data
        with self._lock:
            if path not in self._items:
                self._items[path] = data
                self._bytes += len(data)
            while self._bytes > self.max_bytes:
                self._bytes -= len(self._items.popitem(last=False)[1])
        return data


@dataclass(frozen=True)
class Frames:
    """The frames of one instance as the client will get them."""

    syntax: str
    media_type: str
    parts: list[bytes]


@lru_cache(maxsize=256)
def choose_frame_syntax(accept: str | None, stored: str) -> tuple[str, str]:
    """(transfer syntax, part media type) for frames, from the request's Accept header
    (cached: a viewer sends the same header with every frame request).

    Raises:
        NotAcceptable: the client accepts only syntaxes other than the stored one and
            Explicit VR Little Endian.
    """
    entries = _accept_entries(accept)
    image_type = IMAGE_TYPES.get(stored)
    for media, params in entries:
        kind = params.get("type", "application/octet-stream") \
            if media == "multipart/related" else media
        syntax = params.get("transfer-syntax")
        if kind in ("*", "*/*", "multipart/*"):
            if syntax in (None, "*", stored):
                return stored, image_type or "application/octet-stream"
            if syntax == EXPLICIT_LE:
                return EXPLICIT_LE, "application/octet-stream"
            continue
        if kind == "application/octet-stream":
            if syntax == "*" or syntax == stored or (syntax is None and stored in _NATIVE_LE):
                return stored, "application/octet-stream" if image_type is None else image_type
            if syntax in (None, EXPLICIT_LE):
                return EXPLICIT_LE, "application/octet-stream"
            continue
        if image_type is not None and kind in (image_type, image_type.split("/")[0] + "/*") \
                and syntax in (None, "*", stored):
            return stored, image_type
    offered = (f"multipart/related; type=\"{image_type or 'application/octet-stream'}\"; "
               f"transfer-syntax={stored}")
    if stored != EXPLICIT_LE:
        offered += (f", or multipart/related; type=\"application/octet-stream\"; "
                    f"transfer-syntax={EXPLICIT_LE}")
    raise NotAcceptable(f"Accept {accept!r} names no representation of these frames this "
                        f"server offers; it offers the stored syntax and Explicit VR Little "
                        f"Endian: {offered}")


def _accept_entries(accept: str | None) -> list[tuple[str, dict[str, str]]]:
    """The Accept header as (media type, parameters) in order (missing: anything)."""
    if not accept or not accept.strip():
        return [("*/*", {})]
    entries = []
    for item in _split_outside_quotes(accept, ","):
        parts = _split_outside_quotes(item, ";")
        media = parts[0].strip().lower()
        params = {}
        for part in parts[1:]:
            name, _, value = part.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        if media:
            entries.append((media, params))
    return entries


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return out


def _pixel_value(data: bytes, ref: InstanceRef) -> tuple[bytes | memoryview, bool]:
    """The pixel data element's value at the stored offset, and whether it is encapsulated."""
    offset = ref.pixel_data_offset
    if offset is None or data[offset:offset + 4] != b"\xe0\x7f\x10\x00":
        raise ValueError(f"instance {ref.sop_instance_uid} has no pixel data at its stored "
                         f"offset {offset}")
    vr = data[offset + 4:offset + 6]
    if vr.isalpha() and vr.isupper():
        if vr in (b"OB", b"OW", b"OF", b"OD", b"UN", b"OV", b"OL"):
            length, start = struct.unpack_from("<I", data, offset + 8)[0], offset + 12
        else:
            length, start = struct.unpack_from("<H", data, offset + 6)[0], offset + 8
    else:
        length, start = struct.unpack_from("<I", data, offset + 4)[0], offset + 8
    view = memoryview(data)
    if length == 0xFFFFFFFF:
        return view[start:], True
    return view[start:start + length], False


def frame_bytes(data: bytes, ref: InstanceRef, numbers: Iterable[int], syntax: str,
                ) -> Sequence[bytes | memoryview]:
    """The requested frames (1-based) of one instance's bytes, in ``syntax`` (the stored
    one, or Explicit VR Little Endian). Uncompressed frames are views into ``data``, not
    copies (the response is assembled from them once).

    Raises:
        IndexError: a frame number the instance does not have.
    """
    numbers = list(numbers)
    for n in numbers:
        if not 1 <= n <= ref.frames:
            raise IndexError(f"frame {n} does not exist; instance {ref.sop_instance_uid} "
                             f"has {ref.frames} frame(s), numbered from 1")
    stored = ref.transfer_syntax_uid or EXPLICIT_LE
    if stored in _NATIVE_LE and ref.pixel_data_offset is not None:
        value, _ = _pixel_value(data, ref)
        size = _frame_size(ref)
        return [value[(n - 1) * size:n * size] for n in numbers]
    if syntax == stored and ref.pixel_data_offset is not None:
        from pydicom.encaps import generate_frames

        value, encapsulated = _pixel_value(data, ref)
        if encapsulated:
            frames = list(generate_frames(bytes(value), number_of_frames=ref.frames))
            return [frames[n - 1] for n in numbers]
    return _decoded_frames(data, ref, numbers)


def _frame_size(ref: InstanceRef) -> int:
    bits = ref.bits_allocated or 8
    if bits % 8:
        raise ValueError(f"instance {ref.sop_instance_uid}: BitsAllocated {bits} frames are "
                         "not byte aligned")
    return int(ref.rows or 0) * int(ref.columns or 0) * ref.samples_per_pixel * bits // 8


def _decoded_frames(data: bytes, ref: InstanceRef, numbers: list[int]) -> list[bytes]:
    """Frames decoded to little-endian native bytes (the Explicit VR Little Endian value)."""
    import numpy as np
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(data), force=True)
    array = np.asarray(ds.pixel_array)
    if ref.frames == 1:
        array = array[np.newaxis]
    return [np.ascontiguousarray(array[n - 1]).astype(array.dtype.newbyteorder("<")).tobytes()
            for n in numbers]


def multipart(parts: Sequence[tuple[bytes | memoryview, str]], kind: str,
              extra: str = "") -> tuple[bytes, str]:
    """A multipart/related body and its Content-Type (``kind``: the parts' type)."""
    boundary = uuid.uuid4().hex
    chunks: list[bytes | memoryview] = []
    for body, content_type in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {content_type}\r\nContent-Length: "
                      f"{len(body)}\r\n\r\n".encode())
        chunks.append(body)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="{kind}"{extra}; boundary={boundary}'


def metadata(ref: InstanceRef, instance_url: str) -> dict[str, Any]:
    """The instance's stored header as DICOM JSON, pixel data pointing at its frames
    resource (never at a file path) and the transfer syntax added (viewers decode by it)."""
    dataset = orjson.loads(ref.meta)
    for tag, element in list(dataset.items()):
        if isinstance(element, dict) and "BulkDataURI" in element:
            if tag == "7FE00010":
                frames = ",".join(str(n) for n in range(1, ref.frames + 1))
                dataset[tag] = {"vr": element.get("vr", "OW"),
                                "BulkDataURI": f"{instance_url}/frames/{frames}"}
            else:
                dataset[tag] = {"vr": element.get("vr", "UN")}
    if ref.transfer_syntax_uid and "00020010" not in dataset:
        dataset["00020010"] = {"vr": "UI", "Value": [ref.transfer_syntax_uid]}
    return dataset


def deidentified_file(data: bytes, ref: InstanceRef) -> bytes:
    """A Part 10 file of the de-identified header (``ref.meta``, analysts' view) and the
    original pixel data: what an analyst gets instead of the original bytes."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID

    original = dcmread(io.BytesIO(data), force=True)
    header = {tag: element for tag, element in orjson.loads(ref.meta).items()
              if not (isinstance(element, dict) and "BulkDataURI" in element)
              and not tag.startswith("0002")}
    dataset = Dataset.from_json(header)
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in original:
            dataset[keyword] = original[keyword]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ref.sop_class_uid or "1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = UID(ref.sop_instance_uid)
    meta.TransferSyntaxUID = UID(ref.transfer_syntax_uid or EXPLICIT_LE)
    dataset.file_meta = meta
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def rendered(data: bytes, ref: InstanceRef, *, frame: int = 1, media_type: str = "image/jpeg",
             window: tuple[float, float] | None = None, size: int | None = None,
             quality: int = 90) -> bytes:
    """One frame windowed to 8 bits (udfs.pixels' windowing, as thumbnails and the model
    see it) as JPEG or PNG, fitted into ``size`` pixels when given."""
    from PIL import Image

    from dicomlake.udfs.pixels import load_frames, to_uint8

    frames = load_frames(data, ref.path)
    if not 1 <= frame <= frames.count:
        raise IndexError(f"frame {frame} does not exist; instance {ref.sop_instance_uid} has "
                         f"{frames.count} frame(s), numbered from 1")
    image = Image.fromarray(to_uint8(frames.data[frame - 1], frames, window))
    if size is not None:
        image.thumbnail((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    if media_type == "image/png":
        image.save(out, format="PNG")
    else:
        image.convert("RGB" if frames.color else "L").save(out, format="JPEG", quality=quality)
    return out.getvalue()
