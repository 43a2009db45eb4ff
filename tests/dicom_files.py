"""Builders for test inputs: shipped DICOM files and deliberately broken archives."""

from __future__ import annotations

import zipfile
from pathlib import Path

from dicomlake.catalog.sample import find_template


def shipped(name: str) -> bytes:
    """Bytes of a DICOM file that ships with pydicom / pydicom-data."""
    return find_template(name).read_bytes()


def write_zip(path: Path, members: dict[str, bytes], *,
              compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def set_encrypted_flag(path: Path) -> None:
    """Mark every member encrypted (bit 0 of the general purpose flags), as a password-protected
    ZIP would be; zipfile cannot write real encrypted archives."""
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (at := data.find(signature, start)) >= 0:
            data[at + offset] |= 0x01
            start = at + 4
    path.write_bytes(bytes(data))


def make_dicom(*, preamble: bool = True, pixels: bool = True, sequence: bool = False,
               raw: dict[str, bytes] | None = None, **values: object) -> bytes:
    """A small explicit-VR-LE CT image built with pydicom; keyword arguments set elements.

    ``preamble=False`` writes the raw dataset (no preamble, no file meta): how ACR-NEMA-era
    tools and some PACS exports write files. ``pixels=False`` leaves out Pixel Data while
    keeping Rows/Columns (a header-only object, as dose screenshots are). ``sequence``
    nests an SR-like content item holding ``NumericValue`` (DS) = ``values``'
    ``NumericValue``. ``raw`` swaps written values for bytes pydicom refuses to write
    (``{"12345.678901": b"10.50/ 15.00"}``): the same length, so lengths stay right.
    """
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.8.498.")
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "P-1"
    ds.Modality = "CT"
    ds.Rows = 4
    ds.Columns = 4
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    numeric = values.pop("NumericValue", None)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    if sequence:
        item = Dataset()
        item.ValueType = "NUM"
        measured = Dataset()
        measured.NumericValue = numeric
        item.MeasuredValueSequence = [measured]
        ds.ContentSequence = [item]
    if pixels:
        ds.PixelData = bytes(32)
    out = io.BytesIO()
    if preamble:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out, enforce_file_format=True)
    else:
        ds.save_as(out, implicit_vr=False, little_endian=True)
    data = out.getvalue()
    for placeholder, value in (raw or {}).items():
        assert len(placeholder) == len(value) and data.count(placeholder.encode()) == 1
        data = data.replace(placeholder.encode(), value)
    return data


def un_sequence_with_explicit_items() -> bytes:
    """A file with a private sequence written as UN of undefined length whose item is
    explicit VR inside (the standard says implicit): seen in a vendor mammography file."""
    import struct

    def element(group: int, elem: int, vr: str, value: bytes) -> bytes:
        if vr in ("OB", "UN", "SQ", "UT"):
            return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, len(value)) + value
        return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value

    base = make_dicom(pixels=False, SOPClassUID="1.2.840.10008.5.1.4.1.1.1.2", Modality="MG")
    inner = element(0x0008, 0x0100, "SH", b"ABC ") + element(0x0008, 0x0104, "LO", b"meaning ")
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner + \
        struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sequence = struct.pack("<HH2sHI", 0x0029, 0x1010, b"UN", 0, 0xFFFFFFFF) + item + \
        struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (base + element(0x0029, 0x0010, "LO", b"SIEMENS CSA ") + sequence
            + element(0x0040, 0x0254, "LO", b"after "))
