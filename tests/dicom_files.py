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
