"""A small real-world DICOM corpus, and variants derived from it with pydicom.

Why this exists: pydicom's own test files are what every DICOM library is already tested
against, so code that only ever meets them keeps assumptions that real archives break. The
files in ``tests/data/realworld/`` ship inside *other* PyPI and Debian packages (nibabel,
heudiconv, pynetdicom, dicognito, dicomweb-client, dicompyler-core, deid, DICOMscope,
dicom3tools) and are committed byte-identical to the shipped copies; ``SOURCES.md`` beside
them names the package, version, path, licence and what each file is.

Several encodings seen in the wild are missing from that corpus (no preamble, private UN
sequences of undefined length, RLE, JPEG-LS, non-Latin character sets). ``make_variants``
derives them from the shipped files at test time instead of committing more bytes: the
output depends only on the shipped files and the installed pydicom/encoder versions, so the
same environment writes the same bytes on every run.
"""

from __future__ import annotations

import array
import io
import os
import struct
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import data_element_generator
from pydicom.pixels import get_encoder
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

REALWORLD_DIR: Path = Path(os.environ.get(
    "DICOMLAKE_REALWORLD_CORPUS",
    Path(__file__).resolve().parents[1] / "tests" / "data" / "realworld"))
"""Folder of the committed real-world files (plus ``SOURCES.md``): ``tests/data/realworld``
of a source checkout (the corpus is test data, not part of the wheel), or the folder named
by ``DICOMLAKE_REALWORLD_CORPUS``."""

# Shipped files the variants are derived from. Chosen because they are small, uncompressed
# and cover the shapes a reader meets: a 16-bit single-frame image read as implicit VR, an
# explicit-VR Siemens image with a large private CSA block, a multi-frame enhanced image,
# a pixel-less SR document and a tiny 8-bit secondary capture.
MR_IMPLICIT = "dicognito__mr-implicit-le-mitra-private__global_patient_id_implicit_vr.dcm"
MR_SIEMENS_EXPLICIT = (
    "heudiconv__siemens-mr-fieldmap-phase__"
    "1.3.12.2.1107.5.2.43.66112.2016101409263663466202201.dcm"
)
MR_ENHANCED = (
    "heudiconv__siemens-xa30-enhanced-mr-multiframe__"
    "MRI_102TD_PHA_S.MR.Chen_Matthews_1.3.1.2022.11.16.15.50.20.357.31204541.dcm"
)
SR_TEXT = "dicomscope__basic-text-sr-key-image-note__reportki.dcm"
SC_TINY = "dicomweb-client__sm-sc-meta-without-group-length__file.dcm"

# (Specific Character Set, Patient Name, Study Description) per character-set variant. The
# names follow the examples of PS3.5 Annex H-K where one exists, so a reader's decoding can
# be compared with the standard's own text.
CHARSETS: dict[str, tuple[str | list[str], str, str]] = {
    "latin1-iso-ir-100": ("ISO_IR 100", "Müller^Jürgen", "Schädel Übersicht"),
    "utf8-iso-ir-192": ("ISO_IR 192", "Wang^XiaoDong=王^小東", "Tête / 頭部 / 머리"),
    "cyrillic-iso-ir-144": ("ISO_IR 144", "Люксембург^Гуля", "Голова"),
    "greek-iso-ir-126": ("ISO_IR 126", "Διονυσιος", "Κεφαλή"),
    "japanese-iso-2022-ir-87": (
        ["", "ISO 2022 IR 87"],
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "Head",
    ),
    "korean-iso-2022-ir-149": (
        ["", "ISO 2022 IR 149"],
        "Hong^Gildong=洪^吉洞=홍^길동",
        "Head",
    ),
    "chinese-gb18030": ("GB18030", "Wang^XiaoDong=王^小东", "头部"),
}

_UNDEFINED = 0xFFFFFFFF
_Builder = Callable[[Path], tuple[Path, str] | None]


def shipped_files() -> list[Path]:
    """The committed real-world files, sorted by name, without ``SOURCES.md``.

    Not every one ends in ``.dcm`` (DICOMscope's LUT is ``.lut``): real archives name DICOM
    files freely, so callers should not filter on the suffix.
    """
    if not REALWORLD_DIR.is_dir():
        raise FileNotFoundError(
            f"the real-world corpus is not at {REALWORLD_DIR}: run from a source checkout of "
            "dicomlake or set DICOMLAKE_REALWORLD_CORPUS to its tests/data/realworld folder")
    return sorted(
        p
        for p in REALWORLD_DIR.iterdir()
        if p.is_file() and p.name != "SOURCES.md" and not p.name.startswith(".")
    )


def make_variants(out: Path, *, new_uids: bool = True) -> list[Path]:
    """Write derived variants of a few shipped files into ``out``; return those kept, sorted.

    Kinds: ``implicit-vr-le``, ``explicit-vr-le``, ``explicit-vr-be``,
    ``raw-no-preamble-implicit`` / ``raw-no-preamble-explicit`` (no preamble, no file meta:
    the first bytes are a group 0008 element),
    ``deflated``, ``rle-lossless``, ``j2k-lossless`` / ``jpegls-lossless`` (only when an
    encoder for them is installed), ``charset-*`` (one Patient Name per Specific Character
    Set in ``CHARSETS``) and ``private-un-undefined-length`` (a private sequence written as
    VR UN with undefined length, as archives that did not know the private tag store it).

    A variant that cannot be made (pydicom refuses the conversion, no encoder) is skipped,
    never raised. Every file written is read back with
    ``pydicom.dcmread(path, stop_before_pixels=True, force=True)``; one that fails, or whose
    SOP Instance UID (or, for charset variants, decoded Patient Name) differs from what was
    written, is deleted and left out. ``force=True`` reads almost any bytes, so the value
    check is what tells a real round trip from a garbage parse.

    ``new_uids`` (default) gives each variant its own SOP Instance UID, derived
    deterministically from the original UID and the variant kind, so a catalog keyed on the
    UID sees distinct instances; pass ``False`` to keep the original UIDs.
    """
    out.mkdir(parents=True, exist_ok=True)
    builders: list[tuple[str, str, _Builder]] = []

    def add(kind: str, source: str, build: Callable[[Dataset, Path], bool]) -> None:
        name = f"variant-{kind}__{Path(source).stem}.dcm"

        def run(path: Path) -> tuple[Path, str] | None:
            ds = _load(source)
            if ds is None or "SOPInstanceUID" not in ds:
                return None
            if new_uids:
                _renew_uids(ds, kind)
            return (path, str(ds.SOPInstanceUID)) if build(ds, path) else None

        builders.append((name, kind, run))

    for source in (MR_SIEMENS_EXPLICIT, SR_TEXT):
        add("implicit-vr-le", source, _write_as(ImplicitVRLittleEndian))
    add("explicit-vr-le", MR_IMPLICIT, _write_as(ExplicitVRLittleEndian))
    for source in (MR_IMPLICIT, MR_SIEMENS_EXPLICIT, SR_TEXT):
        add("explicit-vr-be", source, _write_big_endian)
    add("raw-no-preamble-implicit", MR_SIEMENS_EXPLICIT, _write_raw(implicit_vr=True))
    add("raw-no-preamble-explicit", SR_TEXT, _write_raw(implicit_vr=False))
    for source in (MR_IMPLICIT, SR_TEXT, MR_ENHANCED):
        add("deflated", source, _write_as(DeflatedExplicitVRLittleEndian))
    for source in (MR_IMPLICIT, MR_ENHANCED, SC_TINY):
        add("rle-lossless", source, _write_compressed(RLELossless))
    add("j2k-lossless", MR_IMPLICIT, _write_compressed(JPEG2000Lossless))
    add("jpegls-lossless", MR_IMPLICIT, _write_compressed(JPEGLSLossless))
    for kind, (charset, name, description) in CHARSETS.items():
        add(f"charset-{kind}", SC_TINY, _write_charset(charset, name, description))
    add("private-un-undefined-length", SC_TINY, _write_private_un_sequence)

    kept: list[Path] = []
    for name, kind, run in builders:
        path = out / name
        with _quiet():
            try:
                written = run(path)
            except Exception:  # a conversion pydicom or an encoder refuses: skip it
                written = None
        if written is not None and _reads_back(*written, kind):
            kept.append(written[0])
        else:
            path.unlink(missing_ok=True)
    return sorted(kept)


# --- building blocks -------------------------------------------------------------------


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom's validation warnings: the shipped files are odd on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _load(name: str) -> FileDataset | None:
    """The shipped file ``name`` with its pixel data, or None when it is not there."""
    path = REALWORLD_DIR / name
    if not path.is_file():
        return None
    with _quiet():
        return pydicom.dcmread(path, force=True)


def _renew_uids(ds: Dataset, kind: str) -> None:
    """Give ``ds`` a SOP Instance UID derived from its old one and ``kind`` (deterministic)."""
    old = str(ds.get("SOPInstanceUID", "") or "")
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[old, kind])


def _set_meta(ds: Dataset, transfer_syntax: str) -> None:
    """A fresh, complete file meta: some shipped files lack elements pydicom insists on."""
    old = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta = FileMetaDataset()
    sop_class = ds.get("SOPClassUID") or old.get("MediaStorageSOPClassUID")
    meta.MediaStorageSOPClassUID = UID(sop_class or "1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or generate_uid(
        entropy_srcs=["dicomlake-realworld"]
    )
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta = meta


def _write_as(transfer_syntax: str) -> Callable[[Dataset, Path], bool]:
    """A writer that re-encodes the (uncompressed) dataset in ``transfer_syntax``."""

    def build(ds: Dataset, path: Path) -> bool:
        if not _is_uncompressed(ds):
            return False
        _set_meta(ds, transfer_syntax)
        ds.save_as(path, enforce_file_format=True)
        return True

    return build


def _write_big_endian(ds: Dataset, path: Path) -> bool:
    """Explicit VR Big Endian (retired, still met in old archives).

    pydicom swaps parsed numbers itself but writes OB/OW-style bytes as they are, so pixel
    data is byte-swapped here; a file with any other word-sized byte blob (OW LUTs, or UN
    private elements from an implicit-VR source, whose byte order nobody can know) is skipped.
    """
    if not _is_uncompressed(ds):
        return False
    for elem in ds.iterall():
        if elem.tag == 0x7FE00010:
            continue
        if elem.VR in ("OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW"):
            return False
    if "PixelData" in ds:
        bits = int(ds.get("BitsAllocated", 8))
        code = {16: "H", 32: "I" if array.array("I").itemsize == 4 else "L", 64: "Q"}.get(bits)
        if bits not in (1, 8) and code is None:
            return False
        if code is not None:
            words = array.array(code)
            words.frombytes(ds.PixelData)
            words.byteswap()
            ds.PixelData = words.tobytes()
            ds["PixelData"].VR = "OW"
        else:
            ds["PixelData"].VR = "OB"
    _set_meta(ds, ExplicitVRBigEndian)
    # save_as() refuses to change endianness; dcmwrite() does it when told by the file meta.
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return True


def _write_raw(*, implicit_vr: bool) -> Callable[[Dataset, Path], bool]:
    """A writer of the bare dataset: no preamble, no 'DICM', no file meta (ACR-NEMA style)."""

    def build(ds: Dataset, path: Path) -> bool:
        if not _is_uncompressed(ds):
            return False
        for tag in [t for t in ds.keys() if Tag(t).group < 0x0008]:
            del ds[tag]
        ds.preamble = None
        ds.file_meta = FileMetaDataset()
        pydicom.dcmwrite(
            path, ds, implicit_vr=implicit_vr, little_endian=True, enforce_file_format=False
        )
        return path.read_bytes()[:2] == b"\x08\x00"

    return build


def _write_compressed(transfer_syntax: str) -> Callable[[Dataset, Path], bool]:
    """A writer that encodes the pixel data natively (RLE) or with an installed plugin."""
    encoder = get_encoder(transfer_syntax)

    def build(ds: Dataset, path: Path) -> bool:
        if not encoder.is_available or "PixelData" not in ds or not _is_uncompressed(ds):
            return False
        ds.compress(transfer_syntax, generate_instance_uid=False)
        _set_meta(ds, transfer_syntax)
        ds.save_as(path, enforce_file_format=True)
        return True

    return build


def _write_charset(
    charset: str | list[str], name: str, description: str
) -> Callable[[Dataset, Path], bool]:
    """A writer that sets Specific Character Set and text that needs it (PN and LO)."""

    def build(ds: Dataset, path: Path) -> bool:
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.StudyDescription = description
        _set_meta(ds, ExplicitVRLittleEndian)
        ds.save_as(path, enforce_file_format=True)
        return True

    return build


def _write_private_un_sequence(ds: Dataset, path: Path) -> bool:
    """Insert a private sequence encoded as VR UN, undefined length (PS3.5 6.2.2).

    An archive that does not know a private tag stores it as UN; if the element was a
    sequence of undefined length, its items stay implicit VR little endian inside. pydicom
    never writes that itself, so the element is spliced into pydicom's explicit-VR LE output
    just before group 0010.
    """
    if any(Tag(t).group == 0x0009 for t in ds.keys()):
        return False
    _set_meta(ds, ExplicitVRLittleEndian)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    start = 132 + 12 + struct.unpack_from("<I", data, 132 + 8)[0]
    insert_at = _offset_of_first_tag_at_least(data, start, 0x00090000)
    creator = _even(b"DICOMLAKE TEST")
    implicit_item = (
        _implicit(0x0008, 0x0100, b"T-12345")  # Code Value
        + _implicit(0x0008, 0x0102, b"99TEST")  # Coding Scheme Designator
        + _implicit(0x0008, 0x0104, b"private item one")  # Code Meaning
    )
    defined_item = _implicit(0x0008, 0x0104, b"private item two")
    element = (
        struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", len(creator))
        + creator
        + struct.pack("<HH2sHI", 0x0009, 0x1010, b"UN", 0, _UNDEFINED)
        + struct.pack("<HHI", 0xFFFE, 0xE000, _UNDEFINED)  # item, undefined length
        + implicit_item
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)  # item delimiter
        + struct.pack("<HHI", 0xFFFE, 0xE000, len(defined_item))  # item, defined length
        + defined_item
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)  # sequence delimiter
    )
    path.write_bytes(data[:insert_at] + element + data[insert_at:])
    return True


def _even(value: bytes) -> bytes:
    """``value`` padded with a space to the even length every DICOM value must have."""
    return value + b" " if len(value) % 2 else value


def _implicit(group: int, elem: int, value: bytes) -> bytes:
    """One implicit-VR little-endian element (value padded to even length)."""
    value = _even(value)
    return struct.pack("<HHI", group, elem, len(value)) + value


def _offset_of_first_tag_at_least(data: bytes, start: int, tag: int) -> int:
    """Byte offset of the first top-level explicit-VR LE element whose tag is >= ``tag``."""
    fp = io.BytesIO(data)
    fp.seek(start)
    elements = data_element_generator(fp, False, True, defer_size=1)
    while True:
        here = fp.tell()
        elem = next(elements, None)
        if elem is None or elem.tag >= tag:
            return here


def _is_uncompressed(ds: Dataset) -> bool:
    """Whether ``ds`` holds no encapsulated pixel data, so it can be re-encoded freely."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return syntax is None or not UID(syntax).is_compressed


def _reads_back(path: Path, sop_instance_uid: str, kind: str) -> bool:
    """Whether pydicom (forced) reads ``path`` back with the values that were written."""
    try:
        with _quiet():
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if str(ds.get("SOPInstanceUID", "")) != sop_instance_uid:
                return False
            if kind.startswith("charset-"):
                _, name, description = CHARSETS[kind.removeprefix("charset-")]
                return str(ds.PatientName) == name and ds.StudyDescription == description
            if kind == "private-un-undefined-length":
                seq = ds[0x00091010].value
                return len(seq) == 2
            return True
    except Exception:
        return False


if __name__ == "__main__":  # pragma: no cover - manual inspection aid
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("realworld-variants")
    for made in make_variants(target):
        print(made.stat().st_size, made.name)
    print(f"{len(shipped_files())} shipped files in {REALWORLD_DIR}")
