"""Parse a DICOM header from a byte stream and turn it into columns plus DICOM JSON.

pydicom reads the header (``stop_before_pixels``: the pixel data is never read, so for a ZIP
member it is never decompressed). pydicom keeps every element as raw bytes until it is
touched; its own ``to_json_dict`` converts each one to a full ``DataElement`` first and costs
about five times the parse itself. So leaf values are decoded here, straight from the raw
bytes, into PS3.18 F.2 JSON; pydicom still does the parts that need its knowledge: sequences,
character sets and the data dictionary.

Anything that cannot be decoded raises :class:`HeaderError` naming the tag and keyword; the
caller adds the file and member.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import math
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import IO, Any

import orjson
from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import ReadableBuffer
from pydicom.tag import BaseTag

from dicomlake.catalog.errors import ErrorKind, HeaderError
from dicomlake.catalog.preflight import VR_CODES

PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
"""Pixel Data, Float Pixel Data, Double Float Pixel Data: where a header ends."""

DEFLATED_EXPLICIT_VR = "1.2.840.10008.1.2.1.99"

INLINE_BINARY_MAX = 64
"""Binary values up to this many bytes go inline (base64); larger ones become BulkDataURIs."""

_STRUCT_FORMATS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d",
                   "UV": "Q", "SV": "q"}
_STRUCT_SIZES = {vr: struct.calcsize(fmt) for vr, fmt in _STRUCT_FORMATS.items()}
_ONE_LE = {vr: struct.Struct(f"<{fmt}").unpack for vr, fmt in _STRUCT_FORMATS.items()}
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_UNSPLIT_TEXT_VRS = frozenset({"ST", "LT", "UT", "UR"})
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "PN", "UC"})
_DEFAULT_ENCODINGS = ("iso8859",)
_PN_DELIMS = {0x5C, 0x3D, 0x5E}
_VALUE_DELIMS = {0x5C}
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def _stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) in PIXEL_DATA_TAGS


def _tag_label(tag: int) -> str:
    keyword = keyword_for_tag(tag) or "private or unknown"
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword}"


@lru_cache(maxsize=8192)
def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        if (tag >> 16) & 1 and 0x10 <= (tag & 0xFFFF) <= 0xFF:
            return "LO"  # private creator
        return "UN"


def _resolve_vr(tag: int, vr: str | None, context: _Context) -> str:
    if vr is None:
        vr = _dictionary_vr(tag)
    if " or " in vr:
        if "OW" in vr or "OB" in vr:
            return "OW" if "OW" in vr else "OB"
        return "SS" if context.pixel_representation == 1 else "US"
    return vr


@dataclass(frozen=True)
class ValueWarning:
    """An element whose value does not parse: kept as raw text in ``meta``, NULL in its
    typed column, and reported in ``dicom.warnings`` (the value may identify a patient)."""

    tag: str
    keyword: str
    value: str
    reason: str

    def as_row(self) -> dict[str, str]:
        return {"tag": self.tag, "keyword": self.keyword, "value": self.value,
                "reason": self.reason}


WARNING_VALUE_MAX = 256
"""A warning keeps at most this many characters of the offending value."""


def value_warning(tag: int, value: str | bytes, reason: str) -> ValueWarning:
    """A :class:`ValueWarning` for ``tag``; bytes are shown as hex."""
    text = value.hex() if isinstance(value, bytes) else value
    return ValueWarning(f"({tag >> 16:04X},{tag & 0xFFFF:04X})",
                        keyword_for_tag(tag) or "private or unknown",
                        text[:WARNING_VALUE_MAX], reason)


@dataclass
class _Context:
    uri: str
    pixel_representation: int = 0
    warnings: list[ValueWarning] = field(default_factory=list)


def _strings(value: bytes, vr: str, encodings: tuple[str, ...]) -> list[str | None]:
    """The values of a text element (``encodings``: the character sets in force, as
    pydicom's ``convert_encodings`` names them). The hot path of a header parse: most
    elements are single-valued text in the default character set."""
    if vr in _TEXT_VRS and encodings != _DEFAULT_ENCODINGS:
        text = decode_bytes(value, encodings, _PN_DELIMS if vr == "PN" else _VALUE_DELIMS)
    else:
        text = value.decode("latin-1")
    text = text.rstrip("\x00 ")
    if vr in _UNSPLIT_TEXT_VRS:
        return [text or None]
    if "\\" not in text:
        return [text.strip(" \x00") or None]
    return [part.strip(" \x00") or None for part in text.split("\\")]


def _number(text: str | None, vr: str) -> int | float | None:
    if text is None:
        return None
    if vr == "IS":
        try:
            return int(text)
        except ValueError:
            as_float = float(text)  # "12.0" is common in the wild and unambiguous
            if not as_float.is_integer():
                raise
            return int(as_float)
    number = float(text)
    return number if math.isfinite(number) else None


def _finite(value: float) -> float | str:
    # JSON has no NaN/Infinity; PS3.18 writes them as strings.
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


_PLAIN_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC",
                             "UI", "UR", "UT"})
"""Text VRs whose values go to JSON as the strings themselves (not numbers, not names)."""


def _decode(tag: int, vr: str, value: bytes, length: int, offset: int, little: bool,
            encodings: tuple[str, ...], ctx: _Context) -> dict[str, Any]:
    """One leaf element (not SQ) to its DICOM JSON object."""
    if length != 0xFFFFFFFF and len(value) != length:
        raise HeaderError(
            ErrorKind.TRUNCATED,
            f"{_tag_label(tag)}: header declares {length} bytes but only {len(value)} "
            "are present (file truncated)",
        )
    if not value:
        return {"vr": vr}
    if vr in _PLAIN_TEXT_VRS:
        return {"vr": vr, "Value": _strings(value, vr, encodings)}
    element: dict[str, Any] = {"vr": vr}
    if vr in _BINARY_VRS:
        if len(value) <= INLINE_BINARY_MAX:
            element["InlineBinary"] = base64.b64encode(value).decode("ascii")
        else:
            element["BulkDataURI"] = f"{ctx.uri}#offset={offset}&length={len(value)}"
        return element
    fmt = _STRUCT_FORMATS.get(vr)
    if fmt is not None:
        size = _STRUCT_SIZES[vr]
        if len(value) == size and little:  # the common case: one little-endian number
            (number,) = _ONE_LE[vr](value)
            element["Value"] = [_finite(number) if vr in ("FL", "FD") else number]
            return element
        if len(value) % size:
            ctx.warnings.append(value_warning(
                tag, value, f"VR {vr} needs a multiple of {size} bytes, found {len(value)} "
                "(wrong VR?); kept as InlineBinary"))
            element["InlineBinary"] = base64.b64encode(value).decode("ascii")
            return element
        order = "<" if little else ">"
        numbers = struct.unpack(f"{order}{len(value) // size}{fmt}", value)
        element["Value"] = [_finite(n) for n in numbers] if vr in ("FL", "FD") else list(numbers)
        return element
    if vr == "AT":
        if len(value) % 4:
            ctx.warnings.append(value_warning(tag, value, "AT needs 4-byte values; kept as "
                                                          "InlineBinary"))
            element["InlineBinary"] = base64.b64encode(value).decode("ascii")
            return element
        order = "<" if little else ">"
        pairs = struct.unpack(f"{order}{len(value) // 2}H", value)
        element["Value"] = [f"{pairs[i]:04X}{pairs[i + 1]:04X}" for i in range(0, len(pairs), 2)]
        return element
    strings = _strings(value, vr, encodings)
    if vr in ("IS", "DS"):
        try:
            element["Value"] = [_number(s, vr) for s in strings]
        except ValueError:
            # pydicom reads such files; the raw text stays in meta, the typed column is NULL
            ctx.warnings.append(value_warning(
                tag, value.decode("latin-1").strip(" \x00"),
                f"{vr} value is not a number; kept as text"))
            element["Value"] = strings
    elif vr == "PN":
        element["Value"] = [
            None if s is None else {
                group: part for group, part in zip(_PN_GROUPS, s.split("="), strict=False) if part
            }
            for s in strings
        ]
    else:
        element["Value"] = strings
    return element


def _dataset_to_json(ds: Dataset, ctx: _Context) -> dict[str, Any]:
    charset = ds._character_set
    encodings = (charset,) if isinstance(charset, str) else tuple(charset)
    out: dict[str, Any] = {}
    for key, raw in ds._dict.items():
        tag = int(key)
        raw_vr = raw.VR
        if raw_vr == "UN" and _dictionary_vr(tag) != "UN":
            raw_vr = None  # a known element written as UN: use its real VR, as the fast path
        vr = _resolve_vr(tag, raw_vr, ctx)
        if vr == "SQ":
            try:
                items = ds[tag].value
            except Exception as exc:
                raise HeaderError(
                    ErrorKind.BAD_VALUE, f"{_tag_label(tag)}: sequence cannot be parsed: {exc}"
                ) from exc
            element: dict[str, Any] = {"vr": "SQ"}
            if items:
                element["Value"] = [_dataset_to_json(item, ctx) for item in items]
            out[f"{tag:08X}"] = element
            continue
        if isinstance(raw, RawDataElement):
            out[f"{tag:08X}"] = _decode(tag, vr, raw.value or b"", raw.length, raw.value_tell,
                                        raw.is_little_endian, encodings, ctx)
        else:  # pydicom already decoded it while reading (e.g. SpecificCharacterSet)
            out[f"{tag:08X}"] = raw.to_json_dict(None, INLINE_BINARY_MAX)
    return out


class _BoundedReader(io.RawIOBase):
    """A seekable view that refuses to read past ``limit`` bytes (zip-bomb and giant-header
    guard): pydicom would otherwise inflate whatever a hostile header declares."""

    def __init__(self, raw: IO[bytes], limit: int, size: int | None = None) -> None:
        super().__init__()
        self._raw = raw
        self._limit = limit
        self._size = size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        at = self._raw.tell()
        if self._size is not None and size is not None and at + size > self._size:
            # A length running past the end of a file of known size: the stream ends first,
            # so this reads no more than the file has; pydicom then reports the short read.
            # (Only lengths the file could hold are a "header too large" question.)
            return self._raw.read(max(0, min(size, self._size - at, self._limit - at)))
        room = self._limit - at
        # A declared length past the limit fails at once, without inflating anything; a
        # read-to-end (deflated datasets) may take what is left of the allowance.
        data = b"" if size is not None and size > room else self._raw.read(
            room + 1 if size is None or size < 0 else size)
        if (size is not None and size > room) or len(data) > room:
            raise HeaderError(
                ErrorKind.TOO_LARGE,
                f"header is larger than maxHeaderBytes={self._limit}; raise the option if this "
                "file is legitimate",
            )
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


@dataclass(frozen=True)
class Header:
    """What a header parse yields: the JSON dataset plus facts needed for columns."""

    meta: dict[str, Any]
    transfer_syntax_uid: str | None
    pixel_data_offset: int | None
    pixel_data_length: int | None
    warnings: list[ValueWarning] = field(default_factory=list)
    media_storage_sop_class_uid: str | None = None

    def values(self, key: str) -> list[Any] | None:
        """All values of a top-level element (key: 8 hex digits, e.g. ``"00080060"``)."""
        element = self.meta.get(key)
        return element.get("Value") or None if element is not None else None

    def meta_json(self) -> str:
        """The dataset as compact PS3.18 DICOM JSON text (orjson: ~5x the stdlib's speed)."""
        return orjson.dumps(self.meta).decode()


def _pixel_element_header(buf: bytes, pos: int, little: bool) -> tuple[str, int, int]:
    """VR, value length and element-header length of the pixel data element at ``pos``.

    The encoding is read off the bytes rather than the transfer syntax: files in the wild
    declare explicit VR and are implicit (pydicom reads them with a warning).
    """
    order = "<" if little else ">"
    vr_bytes = buf[pos + 4:pos + 6]
    if not (vr_bytes.isalpha() and vr_bytes.isupper()):
        return "OW", struct.unpack_from(f"{order}I", buf, pos + 4)[0], 8
    vr = vr_bytes.decode("ascii")
    if vr in ("OB", "OW", "OF", "OD", "UN"):
        return vr, struct.unpack_from(f"{order}I", buf, pos + 8)[0], 12
    return vr, struct.unpack_from(f"{order}H", buf, pos + 6)[0], 8


def _with_pixel_data(meta: dict[str, Any], tsuid: str, ctx: _Context, size: int | None,
                     offset: int, pixel: tuple[str, int, int] | None,
                     media_class: str | None) -> Header:
    """The Header, with the pixel data as a bulk reference and truncation checked.

    Pixel data declaring more bytes than the file has is caught here without reading a
    pixel. A complete file with Rows/Columns but no pixel data is a header-only object (dose
    screenshots, CSA normalisation files, some DX): an instance, not a truncation; a cut
    file is caught where an element runs past the end.
    """
    uri = ctx.uri
    if pixel is None:
        return Header(meta, tsuid or None, None, None, ctx.warnings, media_class)
    vr, length, head_len = pixel
    pixel_length = None
    if length != 0xFFFFFFFF:
        pixel_length = length
        end = offset + head_len + length
        if size is not None and end > size:
            raise HeaderError(
                ErrorKind.TRUNCATED,
                f"(7FE0,0010) PixelData: declares {length} bytes but the file ends "
                f"{end - size} bytes short (file truncated)",
            )
    meta["7FE00010"] = {"vr": vr, "BulkDataURI": f"{uri}#offset={offset}"}
    return Header(meta, tsuid or None, offset, pixel_length, ctx.warnings, media_class)


def read_header(fp: IO[bytes], *, uri: str, size: int | None, has_preamble: bool,
                max_header_bytes: int = 64 << 20) -> Header:
    """Parse the header at ``fp`` (positioned at the file start); never reads pixel values.

    Args:
        fp: a readable stream; a ZIP member stream is fine (decompressed lazily).
        uri: the ``path`` of this instance, used for BulkDataURI references.
        size: the file's full size when known (ZIP central directory or file system),
            to detect truncated pixel data without reading it.
        has_preamble: whether the 128-byte preamble + ``DICM`` marker was seen; files
            without it (old ACR-NEMA style) are parsed with ``force=True``.
        max_header_bytes: a header larger than this is an error (hostile length fields).

    Raises:
        HeaderError: the bytes are not a readable DICOM header.
    """
    if has_preamble:
        start = fp.tell()
        try:
            return _fast_header(fp, uri, size, max_header_bytes)
        except _UsePydicom:
            fp.seek(start)
    return _read_header(_BoundedReader(fp, max_header_bytes, size), uri=uri, size=size,
                        has_preamble=has_preamble)


def _read_header(fp: ReadableBuffer, *, uri: str, size: int | None, has_preamble: bool) -> Header:
    try:
        ds = dcmread(fp, stop_before_pixels=True, force=not has_preamble)
    except InvalidDicomError as exc:
        raise HeaderError(ErrorKind.NOT_DICOM, f"not a DICOM file: {exc}") from exc
    except (EOFError, struct.error) as exc:
        raise HeaderError(ErrorKind.TRUNCATED, f"header ends early: {exc}") from exc
    except (ValueError, KeyError, TypeError, NotImplementedError, OverflowError) as exc:
        raise HeaderError(ErrorKind.BAD_HEADER, f"header cannot be parsed: {exc}") from exc
    if not ds._dict and not getattr(ds, "file_meta", None):
        raise HeaderError(ErrorKind.NOT_DICOM, "no DICOM elements found")

    file_meta = getattr(ds, "file_meta", None)
    tsuid = str(file_meta.get("TransferSyntaxUID", "")) if file_meta is not None else ""
    media_class = (str(file_meta.get("MediaStorageSOPClassUID", "")) or None
                   if file_meta is not None else None)
    little = ds.original_encoding[1] is not False

    pixel_representation = 0
    raw_pr = ds._dict.get(BaseTag(0x00280103))
    pr_bytes = raw_pr.value if isinstance(raw_pr, RawDataElement) else None
    if pr_bytes is not None and len(pr_bytes) == 2:
        pixel_representation = struct.unpack("<H" if little else ">H", pr_bytes)[0]
    ctx = _Context(uri=uri, pixel_representation=pixel_representation)
    meta = _dataset_to_json(ds, ctx)

    if tsuid == DEFLATED_EXPLICIT_VR:
        # pydicom inflated the dataset into its own buffer: positions in ``fp`` mean nothing.
        return Header(meta, tsuid, None, None, ctx.warnings, media_class)
    offset = fp.tell()
    head = fp.read(12)
    pixel = _pixel_element_header(head, 0, little) if len(head) == 12 else None
    if pixel is None and size is not None and _end_of_last_element(ds) not in (None, size):
        raise HeaderError(ErrorKind.TRUNCATED,
                          f"file ends inside a data element after byte "
                          f"{_end_of_last_element(ds)} of {size} (file truncated)")
    return _with_pixel_data(meta, tsuid, ctx, size, offset, pixel, media_class)


def _end_of_last_element(ds: Dataset) -> int | None:
    """Where the last top-level element ends, when that is known from its raw form.

    pydicom stops quietly when a file ends inside an element header; bytes left over after
    the last complete element are the trace of that truncation.
    """
    if not ds._dict:
        return None
    last = ds._dict[max(ds._dict)]
    if not isinstance(last, RawDataElement) or last.length == 0xFFFFFFFF:
        return None
    return int(last.value_tell) + int(last.length)


def parse_da(value: str | None) -> dt.date | None:
    """DICOM DA (YYYYMMDD) to a date; empty or all-zero dates are unknown, not errors.

    Raises:
        ValueError: the text is not a date (the caller keeps it as text and warns).
    """
    if not value or value.strip("0") == "":
        return None
    text = value.replace(".", "")  # ACR-NEMA style YYYY.MM.DD
    if len(text) != 8 or not text.isdigit():
        raise ValueError(f"{value!r} is not a valid DA date (YYYYMMDD)")
    return dt.date(int(text[0:4]), int(text[4:6]), int(text[6:8]))


# --- The fast path -------------------------------------------------------------------------
# pydicom builds a RawDataElement and a Dataset entry per element and is the bulk of the cost
# of a header read (measured: ~0.6-1.6 ms of ~1.2-2.9 ms per CT header). The common case,
# little-endian files with the DICM preamble, is parsed here in one pass straight into DICOM
# JSON from an in-memory prefix of the file; anything unusual (big endian, deflated
# datasets, no preamble, malformed structure) goes to pydicom, which stays the reference
# for odd files and for error messages.

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT",
                       "SV", "UV"})
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_FIRST_READ = 8 << 10
_HEAD = struct.Struct("<HHI").unpack_from
_U32 = struct.Struct("<I").unpack_from
_VR_NAMES = {code: code.decode("ascii") for code in VR_CODES}


class _NeedMore(Exception):
    """The in-memory prefix ends before the header does; read more and parse again.

    ``end`` is the byte the parser needed: the next read covers at least that much.
    """

    def __init__(self, end: int) -> None:
        super().__init__(end)
        self.end = end


class _HeaderSize:
    """How much of a file to read before the first parse: about the size of the last header
    parsed in this process.

    The parser works on an in-memory prefix and starts over when the prefix ends inside the
    header, so a short first read costs a whole extra parse (measured on seed-shaped CT/MR
    members, 8-116 KB headers: 2.8 ms per file with a fixed 8 KiB first read, 1.2 ms when
    the prefix holds the header). Files of one series, one scanner, one archive have headers
    of about the same size, so the last one, plus a margin for longer values, is a good
    guess; over-reading costs only inflating a few more KB. Only how much is read first
    depends on it, never what the parse yields.
    """

    def __init__(self) -> None:
        self.last = _FIRST_READ

    def first_read(self) -> int:
        return max(_FIRST_READ, self.last + self.last // 4 + 1024)

    def saw(self, end: int) -> None:
        self.last = end


_LAST_HEADER = _HeaderSize()


class _UsePydicom(Exception):
    """An encoding or structure the fast path leaves to pydicom."""


class _Parser:
    def __init__(self, buf: bytes, complete: bool, size: int | None, ctx: _Context) -> None:
        self.buf = buf
        self.n = len(buf)
        self.complete = complete
        self.size = self.n if complete else size
        self.ctx = ctx

    def need(self, end: int, tag: int | None = None) -> None:
        if end <= self.n:
            return
        if self.size is None or end <= self.size:
            raise _NeedMore(end)
        # Known file size: a length pointing past the end is truncation (or a hostile value);
        # no need to inflate the rest of the member to find out.
        where = f"{_tag_label(tag)}: " if tag is not None else ""
        raise HeaderError(ErrorKind.TRUNCATED,
                          f"{where}file ends at byte {self.size} inside a data element that "
                          f"needs {end} bytes (file truncated)")

    def element_head(self, pos: int, implicit: bool) -> tuple[int, str | None, int, int]:
        """(tag, VR or None, value length, value position) of the element at ``pos``."""
        if pos + 8 > self.n:
            self.need(pos + 8)
        group, elem, length = _HEAD(self.buf, pos)
        tag = group << 16 | elem
        if implicit or group == 0xFFFE:
            return tag, None, length, pos + 8
        vr_bytes = self.buf[pos + 4:pos + 6]
        vr = _VR_NAMES.get(vr_bytes)
        if vr is None:  # not a PS3.5 VR: two capitals are kept as written, else pydicom
            if not (vr_bytes.isalpha() and vr_bytes.isupper()):
                raise _UsePydicom
            vr = vr_bytes.decode("ascii")
        if vr in _LONG_VRS:
            if pos + 12 > self.n:
                self.need(pos + 12)
            return tag, vr, _U32(self.buf, pos + 8)[0], pos + 12
        return tag, vr, length >> 16, pos + 8

    def dataset(self, pos: int, end: int | None, implicit: bool, encodings: tuple[str, ...],
                top: bool) -> tuple[dict[str, Any], int, bool]:
        """Elements from ``pos`` to ``end`` (None: to the item delimiter).

        Returns the JSON dataset, the position after it, and whether it stopped at pixel data.
        """
        out: dict[str, Any] = {}
        ctx, buf, n = self.ctx, self.buf, self.n
        whole = top and self.complete
        while end is None or pos < end:
            if whole and pos == n:
                return out, pos, False
            tag, vr, length, vpos = self.element_head(pos, implicit)
            if tag == _ITEM_END:
                return out, vpos, False
            if top and tag in PIXEL_DATA_TAGS:
                return out, pos, True
            value_implicit = implicit
            if vr == "UN" and _dictionary_vr(tag) != "UN":
                vr, value_implicit = None, True  # UN hides a known element, implicit LE inside
            if vr is None:
                vr = _resolve_vr(tag, vr, ctx)
            key = f"{tag:08X}"
            if vr == "SQ" or (length == _UNDEFINED and vr == "UN"):
                items, pos = self.sequence(tag, vpos, length, value_implicit or vr == "UN",
                                           encodings, sniff_items=vr == "UN")
                out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
                continue
            if length == _UNDEFINED:  # encapsulated pixels nested in a dataset (icon image)
                out[key] = {"vr": vr, "BulkDataURI": f"{ctx.uri}#offset={vpos}"}
                pos = self.skip_fragments(tag, vpos)
                continue
            if vpos + length > n:
                self.need(vpos + length, tag)
            value = buf[vpos:vpos + length]
            element = _decode(tag, vr, value, length, vpos, True, encodings, ctx)
            if tag == 0x00080005:
                encodings = tuple(convert_encodings([v for v in element.get("Value", []) if v]
                                                    or ["ISO_IR 6"]))
            elif tag == 0x00280103 and length == 2:
                ctx.pixel_representation = element["Value"][0]
            out[key] = element
            pos = vpos + length
        return out, pos, False

    def sequence(self, tag: int, pos: int, length: int, implicit: bool,
                 encodings: tuple[str, ...], sniff_items: bool = False,
                 ) -> tuple[list[dict[str, Any]], int]:
        """Items of a sequence. ``sniff_items``: the sequence was written as UN, which the
        standard says is implicit VR inside, but vendors (seen in mammography files) write
        explicit VR items there; each item's encoding is read off its first element, as
        pydicom does."""
        end = None if length == _UNDEFINED else pos + length
        items: list[dict[str, Any]] = []
        while end is None or pos < end:
            self.need(pos + 8, tag)
            group, elem, item_len = struct.unpack_from("<HHI", self.buf, pos)
            item_tag = group << 16 | elem
            if item_tag == _SEQ_END:
                return items, pos + 8
            if item_tag != _ITEM:
                raise HeaderError(ErrorKind.BAD_HEADER,
                                  f"{_tag_label(tag)}: expected an item at byte {pos}, found "
                                  f"({group:04X},{elem:04X})")
            pos += 8
            item_implicit = implicit
            if sniff_items:
                self.need(pos + 6, tag)
                item_implicit = self.buf[pos + 4:pos + 6] not in VR_CODES
            if item_len == _UNDEFINED:
                item, pos, _ = self.dataset(pos, None, item_implicit, encodings, top=False)
            else:
                self.need(pos + item_len, tag)
                item, _, _ = self.dataset(pos, pos + item_len, item_implicit, encodings,
                                          top=False)
                pos += item_len
            items.append(item)
        return items, pos

    def skip_fragments(self, tag: int, pos: int) -> int:
        while True:
            self.need(pos + 8, tag)
            group, elem, length = struct.unpack_from("<HHI", self.buf, pos)
            if group << 16 | elem == _SEQ_END:
                return pos + 8
            if group << 16 | elem != _ITEM:
                raise HeaderError(ErrorKind.BAD_HEADER,
                                  f"{_tag_label(tag)}: bad encapsulated fragment at byte {pos}")
            pos += 8 + length

    def file_meta(self) -> tuple[str, str | None, int]:
        """Transfer syntax UID, media storage SOP class UID and the position after the
        (always explicit LE) file meta."""
        pos = 132
        tsuid = ""
        media_class = None
        while True:
            if self.complete and pos == self.n:  # file meta and no data set: pydicom reads it
                return tsuid, media_class, pos
            self.need(pos + 8)
            if struct.unpack_from("<H", self.buf, pos)[0] != 0x0002:
                return tsuid, media_class, pos
            tag, _, length, vpos = self.element_head(pos, implicit=False)
            self.need(vpos + length, tag)
            if tag == 0x00020010:
                tsuid = self.buf[vpos:vpos + length].decode("latin-1").strip("\0 ")
            elif tag == 0x00020002:
                media_class = self.buf[vpos:vpos + length].decode("latin-1").strip("\0 ")
            pos = vpos + length


def _parse_prefix(buf: bytes, complete: bool, uri: str, size: int | None,
                  ) -> tuple[Header, int]:
    """The header in ``buf``, and how many bytes of it the parse needed."""
    ctx = _Context(uri=uri)
    parser = _Parser(buf, complete, size, ctx)
    tsuid, media_class, pos = parser.file_meta()
    if tsuid in (EXPLICIT_VR_BE, DEFLATED_EXPLICIT_VR):
        raise _UsePydicom
    if complete and pos == len(buf):
        return _with_pixel_data({}, tsuid, ctx, size, pos, None, media_class), pos
    parser.need(pos + 6)
    # Trust the bytes over the declared syntax: some writers label implicit data explicit.
    implicit = tsuid == IMPLICIT_VR_LE or not (buf[pos + 4:pos + 6].isalpha()
                                                and buf[pos + 4:pos + 6].isupper())
    meta, pos, at_pixels = parser.dataset(pos, None if not complete else parser.n, implicit,
                                          _DEFAULT_ENCODINGS, top=True)
    pixel = None
    end = pos
    if at_pixels:
        end = pos + 12
        parser.need(end)
        pixel = _pixel_element_header(buf, pos, True)
    return _with_pixel_data(meta, tsuid, ctx, size, pos, pixel, media_class), end


def _fast_header(fp: IO[bytes], uri: str, size: int | None, max_bytes: int,
                 first_read: int | None = None) -> Header:
    """The one-pass parse over a growing prefix (``first_read`` bytes first; by default
    what :class:`_HeaderSize` guesses)."""
    want = min(first_read or _LAST_HEADER.first_read(), max_bytes, *(
        () if size is None else (size,)))
    buf = fp.read(want)
    complete = len(buf) < want or (size is not None and len(buf) >= size)
    while True:
        try:
            header, end = _parse_prefix(buf, complete, uri, size)
            _LAST_HEADER.saw(end)
            return header
        except _NeedMore as short:
            if len(buf) >= max_bytes:
                raise HeaderError(
                    ErrorKind.TOO_LARGE,
                    f"header is larger than maxHeaderBytes={max_bytes}; raise the option if "
                    "this file is legitimate") from None
            # at least what the parser needed plus a margin, and never less than a tripling
            # (a header of many small elements runs out again and again otherwise)
            target = max(len(buf) * 4, short.end + short.end // 4)
            want = min(target - len(buf), max_bytes - len(buf))
            more = fp.read(want)
            buf += more
            complete = len(more) < want or (size is not None and len(buf) >= size)
