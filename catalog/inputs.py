"""Find sources and describe them without reading a member.

A *source* is one ZIP archive or one plain file (which may turn out, by content, to be a tar,
a compressed file or a ZIP without the suffix: :mod:`dicomlake.catalog.archives` reads it).
Its identity for change detection comes from metadata only: a ZIP's central directory (member
names, sizes, CRC-32s) or a file's size and modification time.
"""

from __future__ import annotations

import glob
import hashlib
import os
import stat
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from dicomlake.catalog.errors import ErrorKind
from dicomlake.catalog.preflight import skip_reason

ZIP_SUFFIX = ".zip"
"""Files with this suffix are listed on the driver (central directory) so that big archives
split into several tasks; every other file is read by content in its task (where a ZIP
without the suffix, a tar, a compressed file or a DICOM file is recognised)."""


@dataclass(frozen=True)
class Member:
    """One ZIP member as the central directory describes it (``index``: its position)."""

    index: int
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
        """How many inputs (rows or error records) this source yields at least; archives
        found inside it by content add their members."""
        if self.error is not None or not self.is_zip:
            return 1
        return len(self.members)


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
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (FIFO, " \
            "socket or device)"
        return Source(path, False, "unreadable", error=(
            ErrorKind.UNREADABLE, f"cannot read {path}: {kind}"))
    if not path.lower().endswith(ZIP_SUFFIX):
        if not os.access(path, os.R_OK):
            return Source(path, False, "unreadable", st.st_size, st.st_mtime_ns,
                          error=(ErrorKind.UNREADABLE, f"cannot open {path}: permission denied"))
        return Source(path, False, _fingerprint(st.st_size, st.st_mtime_ns), st.st_size,
                      st.st_mtime_ns)
    try:
        with zipfile.ZipFile(path) as zf:
            members = tuple(
                Member(i, info.filename, info.file_size, info.compress_size, info.CRC)
                for i, info in enumerate(zf.infolist()) if not info.is_dir()
            )
    except OSError as exc:
        return Source(path, True, "unreadable", st.st_size, st.st_mtime_ns,
                      error=(ErrorKind.UNREADABLE, f"cannot open {path}: {exc}"))
    except Exception as exc:  # BadZipFile, ValueError, struct.error, ...
        return Source(path, True, _fingerprint(st.st_size, st.st_mtime_ns), st.st_size,
                      st.st_mtime_ns, error=(
                          ErrorKind.BAD_ARCHIVE,
                          f"archive {path} is not a readable ZIP ({type(exc).__name__}: "
                          f"{exc}); re-copy it or repair it with `zip -FF`",
                      ))
    print_ = _fingerprint(st.st_size, [(m.name, m.file_size, m.crc32) for m in members])
    return Source(path, True, print_, st.st_size, st.st_mtime_ns, members)


def _skipped(path: str, reason: str) -> Source:
    try:
        st = os.lstat(path)
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        size = mtime = 0
    return Source(path, False, _fingerprint(size, mtime), size, mtime,
                  error=(ErrorKind.SKIPPED, f"skipped by rule: {reason}"))


def _walk(folder: str) -> Iterator[Source]:
    """Every regular file under ``folder``, as a source to read, a documented skip, or an
    ``unreadable`` error (a folder that cannot be listed, a broken link, a FIFO)."""
    problems: list[OSError] = []
    for root, dirs, files in os.walk(folder, onerror=problems.append):
        while problems:
            exc = problems.pop()
            where = exc.filename or root
            yield Source(where, False, "unreadable", error=(
                ErrorKind.UNREADABLE, f"cannot list folder {where}: {exc.strerror or exc}"))
        dirs.sort()
        for name in dirs:
            full = os.path.join(root, name)
            if os.path.islink(full):  # not followed (loops); said so, not silently dropped
                yield Source(full, False, "unreadable", error=(
                    ErrorKind.UNREADABLE, f"{full} is a link to a folder; links to folders "
                                          "are not followed: name the target to ingest it"))
        for name in sorted(files):
            full = os.path.join(root, name)
            reason = skip_reason(os.path.relpath(full, folder))
            yield _skipped(full, reason) if reason is not None else describe(full)
    while problems:
        exc = problems.pop()
        yield Source(exc.filename or folder, False, "unreadable", error=(
            ErrorKind.UNREADABLE, f"cannot list folder {exc.filename or folder}: "
                                  f"{exc.strerror or exc}"))


def _describe_named(path: str) -> Source:
    reason = skip_reason(os.path.basename(path))
    return _skipped(path, reason) if reason is not None else describe(path)


def plan_sources(paths: Iterable[str]) -> list[Source]:
    """Files, folders (walked recursively) and globs to sources, sorted and de-duplicated.

    A folder contributes every regular file in it (what each is, is decided by content when
    it is read); operating-system litter (``preflight.SKIP_RULES``) becomes a counted skip,
    and what cannot be read becomes an ``unreadable`` error. A named path that matches
    nothing is kept so that it becomes an ``unreadable`` error rather than vanishing.
    """
    found: dict[str, Source] = {}
    for raw in paths:
        path = os.path.abspath(os.path.expanduser(raw))
        hits = sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else [path]
        for hit in hits:
            sources = _walk(hit) if os.path.isdir(hit) else [_describe_named(hit)]
            for source in sources:
                found.setdefault(source.path, source)
    return [found[p] for p in sorted(found)]
