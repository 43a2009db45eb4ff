"""Find DICOM inputs and describe them without reading pixel data.

A *source* is one ZIP archive or one plain file. Its identity for change detection comes from
metadata only: a ZIP's central directory (member names, sizes, CRC-32s) or a file's size and
modification time. Nothing here decompresses a member.
"""

from __future__ import annotations

import glob
import hashlib
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from dicomlake.catalog.errors import ErrorKind

ZIP_SUFFIX = ".zip"
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
"""Plain files with these suffixes (any case) are DICOM candidates when walking folders."""


@dataclass(frozen=True)
class Member:
    """One ZIP member as the central directory describes it."""

    name: str
    file_size: int
    compress_size: int
    crc32: int


@dataclass(frozen=True)
class Source:
    """One archive or plain file to read.

    ``members`` is empty for plain files. ``error`` is set when the source itself cannot be
    read (missing path, corrupt archive); it then becomes exactly one error record.
    """

    path: str
    is_zip: bool
    fingerprint: str
    size: int = 0
    mtime_ns: int = 0
    members: tuple[Member, ...] = field(default=(), repr=False)
    error: tuple[ErrorKind, str] | None = None

    @property
    def input_count(self) -> int:
        """How many inputs (rows or error records) this source yields."""
        if self.error is not None or not self.is_zip:
            return 1
        return len(self.members)


def is_member_candidate(info: zipfile.ZipInfo) -> bool:
    """Every regular member is an input; folders and macOS resource forks are not."""
    if info.is_dir():
        return False
    name = info.filename
    return not (name.startswith("__MACOSX/") or os.path.basename(name).startswith("._"))


def _fingerprint(*parts: object) -> str:
    digest = hashlib.sha1(usedforsecurity=False)
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def describe(path: str) -> Source:
    """Describe one concrete path (no globbing); never raises for bad inputs."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return Source(path, path.lower().endswith(ZIP_SUFFIX), "unreadable",
                      error=(ErrorKind.UNREADABLE, f"cannot open {path}: {exc.strerror}"))
    if not path.lower().endswith(ZIP_SUFFIX):
        if not os.access(path, os.R_OK):
            return Source(path, False, "unreadable", st.st_size, st.st_mtime_ns,
                          error=(ErrorKind.UNREADABLE, f"cannot open {path}: permission denied"))
        return Source(path, False, _fingerprint(st.st_size, st.st_mtime_ns), st.st_size,
                      st.st_mtime_ns)
    try:
        with zipfile.ZipFile(path) as zf:
            members = tuple(
                Member(i.filename, i.file_size, i.compress_size, i.CRC)
                for i in zf.infolist() if is_member_candidate(i)
            )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        return Source(path, True, _fingerprint(st.st_size, st.st_mtime_ns), st.st_size,
                      st.st_mtime_ns, error=(
                          ErrorKind.BAD_ARCHIVE,
                          f"archive {path} is not a readable ZIP ({exc}); re-copy it or repair "
                          "it with `zip -FF`",
                      ))
    except OSError as exc:
        return Source(path, True, "unreadable", st.st_size, st.st_mtime_ns,
                      error=(ErrorKind.UNREADABLE, f"cannot open {path}: {exc}"))
    print_ = _fingerprint(st.st_size, [(m.name, m.file_size, m.crc32) for m in members])
    return Source(path, True, print_, st.st_size, st.st_mtime_ns, members)


def _walk(folder: str) -> Iterator[str]:
    for root, dirs, files in os.walk(folder, onerror=None):
        dirs.sort()
        for name in sorted(files):
            lower = name.lower()
            if lower.endswith(ZIP_SUFFIX) or lower.endswith(DICOM_SUFFIXES) or "." not in name:
                yield os.path.join(root, name)


def expand_paths(paths: Iterable[str]) -> list[str]:
    """Files, folders (walked recursively) and globs to a sorted, de-duplicated path list.

    A folder contributes ``.zip`` archives, files with a DICOM suffix and extensionless files
    (common for DICOM); other files in a folder are not inputs. A named path that matches
    nothing is kept so that it becomes an ``unreadable`` error record rather than vanishing.
    """
    found: list[str] = []
    for raw in paths:
        path = os.path.abspath(os.path.expanduser(raw))
        if glob.has_magic(path):
            for hit in sorted(glob.glob(path, recursive=True)):
                found.extend(_walk(hit) if os.path.isdir(hit) else [hit])
        elif os.path.isdir(path):
            found.extend(_walk(path))
        else:
            found.append(path)
    return sorted(dict.fromkeys(found))


def plan_sources(paths: Iterable[str]) -> list[Source]:
    """Expand ``paths`` and describe every source found."""
    return [describe(p) for p in expand_paths(paths)]
