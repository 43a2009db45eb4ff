"""Every input inside a source, and one input's bytes read back by its ``path``.

A source (a plain file or a ZIP the planner listed) holds one or more inputs. Which reader
applies is decided by content (:func:`dicomlake.catalog.preflight.sniff`), at every level:
a ZIP member that is itself a ZIP, a ``.tar``/``.tar.gz``/``.tgz``, a gzip/bzip2/xz-compressed
file, or a DICOM file without preamble or extension. Archives are read in memory, headers
only where the format allows: ZIP and plain tar members are read up to their pixel data; a
compressed tar is one sequential stream, so each member is streamed past.

Paths: ``<file>`` for a plain file, ``<file>!/<member>`` for a member, and
``<file>!/<inner archive>!/<member>`` for members of nested archives. The first member with a
given name keeps it; later members with the same name are told apart by their index in the
archive listing, ``<member>[<index>]``, so ``path`` identifies one input.

Nothing raised while reading one member escapes: it becomes that input's error (the kind
says whose fault: ``bad_archive`` for the archive's structure or compressed stream, the
header's kinds for the content). A fault in an archive's structure that stops the listing
(a corrupt tar header half-way) ends that archive with one ``bad_archive`` input for the rest.
"""

from __future__ import annotations

import bz2
import datetime as dt
import gzip
import io
import lzma
import re
import tarfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import IO, TYPE_CHECKING, cast

from dicomlake.catalog.errors import ErrorKind, HeaderError
from dicomlake.catalog.preflight import (
    ARCHIVES,
    SNIFF_BYTES,
    Content,
    parse_instance,
    skip_reason,
    sniff,
)

if TYPE_CHECKING:
    from dicomlake.catalog.header import Header
    from dicomlake.catalog.inputs import Source

MEMBER_SEPARATOR = "!/"
"""Separates an archive and a member in ``path``."""

_INDEXED = re.compile(r"^(?P<name>.*)\[(?P<index>\d+)\]$")


@dataclass(frozen=True)
class Limits:
    """Guards against hostile archives; the ``dicom`` source's options set them."""

    max_member_bytes: int = 16 << 30
    """Declared member size limit."""
    max_ratio: int = 1000
    """Declared/compressed ratio limit for members over 1 MiB (zip bombs)."""
    max_header_bytes: int = 64 << 20
    """A header larger than this is an error."""
    max_nested_bytes: int = 1 << 30
    """A nested archive is read into memory; one larger than this is an error."""
    max_depth: int = 4
    """Archives nested deeper than this are an error (zip quines)."""


@dataclass(frozen=True)
class Found:
    """One input: where it is, and either its header or why it is not a row."""

    path: str
    archive: str | None = None
    member: str | None = None
    member_index: int | None = None
    file_size: int | None = None
    compressed_size: int | None = None
    crc32: int | None = None
    modified: dt.datetime | None = None
    header: Header | None = None
    error: tuple[ErrorKind, str] | None = None

    def failed(self, kind: ErrorKind, message: str) -> Found:
        return replace(self, error=(kind, message))


def member_label(name: str, index: int, seen: set[str]) -> str:
    """The member part of ``path``: the name, or ``name[index]`` for a repeated name."""
    if name in seen:
        return f"{name}[{index}]"
    seen.add(name)
    return name


class _MemberStream(io.RawIOBase):
    """A member's byte stream that blames the archive for its own failures, and can rewind.

    Any exception while *reading* (a corrupt deflate/bzip2/LZMA stream, a CRC mismatch) is
    the archive's fault: it becomes ``HeaderError(bad_archive)`` here, so header parsing
    above can tell it from a fault of the DICOM content. A stream that cannot seek (a member
    of a compressed tar, a gzip file) keeps what was read so far in memory, which is all the
    header parser ever goes back to.
    """

    def __init__(self, raw: IO[bytes], what: str) -> None:
        super().__init__()
        self._raw = raw
        self._what = what
        self._seekable = _can_seek(raw)
        self._buffer = bytearray()
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _pull(self, size: int) -> bytes:
        try:
            return self._raw.read(size)
        except HeaderError:
            raise
        except Exception as exc:  # every decompressor has its own errors
            raise HeaderError(ErrorKind.BAD_ARCHIVE,
                              f"the compressed data of {self._what} is corrupt "
                              f"({type(exc).__name__}: {exc})") from exc

    def read(self, size: int | None = -1) -> bytes:
        if self._seekable:
            return self._pull(-1 if size is None else size)
        want = None if size is None or size < 0 else self._pos + size
        while want is None or len(self._buffer) < want:
            chunk = self._pull(1 << 16 if want is None else max(want - len(self._buffer),
                                                                  1 << 12))
            if not chunk:
                break
            self._buffer += chunk
        end = len(self._buffer) if want is None else min(want, len(self._buffer))
        data = bytes(self._buffer[self._pos:end])
        self._pos = end
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if self._seekable:
            try:
                return self._raw.seek(offset, whence)
            except Exception as exc:  # seeking re-inflates from the start
                raise HeaderError(ErrorKind.BAD_ARCHIVE,
                                  f"the compressed data of {self._what} is corrupt "
                                  f"({type(exc).__name__}: {exc})") from exc
        if whence == 2:
            self.read()
            target = len(self._buffer) + offset
        else:
            target = offset if whence == 0 else self._pos + offset
        if target > len(self._buffer):
            self._pos = len(self._buffer)
            self.read(target - len(self._buffer))
        self._pos = max(0, min(target, len(self._buffer)))
        return self._pos

    def tell(self) -> int:
        return self._raw.tell() if self._seekable else self._pos


def _can_seek(raw: IO[bytes]) -> bool:
    try:
        return bool(raw.seekable())
    except Exception:  # a stream that cannot say cannot seek
        return False


def _zip_time(info: zipfile.ZipInfo) -> dt.datetime | None:
    try:
        return dt.datetime(*info.date_time, tzinfo=dt.UTC)
    except (TypeError, ValueError):  # month 0 and friends, from damaged directories
        return None


def _read_bounded(fp: IO[bytes], limit: int, what: str) -> bytes:
    data = fp.read(limit + 1)
    if len(data) > limit:
        raise HeaderError(ErrorKind.TOO_LARGE,
                          f"{what} is larger than {limit} bytes, the limit for an archive "
                          "read into memory (maxNestedArchiveBytes)")
    return data


class _Reader:
    """Walks one source's inputs with the given limits."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    # -- entry points ---------------------------------------------------------------------
    def source(self, source: Source, start: int, stop: int) -> Iterator[Found]:
        if source.error is not None:
            yield Found(source.path, archive=source.path if source.is_zip else None,
                        file_size=source.size or None, error=source.error)
        elif source.is_zip:
            root = Found(source.path, archive=source.path, file_size=source.size)
            yield from self._guarded(root, "", lambda: self._listed_zip(source, start, stop))
        else:
            yield from self._plain(source)

    def _plain(self, source: Source) -> Iterator[Found]:
        base = Found(source.path, file_size=source.size,
                     modified=dt.datetime.fromtimestamp(source.mtime_ns / 1e9, tz=dt.UTC))
        try:
            raw = open(source.path, "rb")  # closed below, after the generator
        except OSError as exc:
            yield base.failed(ErrorKind.UNREADABLE,
                              f"cannot open {source.path}: {exc.strerror or exc}")
            return
        with raw:
            yield from self._input(base, raw, source.size, depth=0, top_file=source.path)

    # -- one input, whatever it holds -----------------------------------------------------
    def _input(self, base: Found, raw: IO[bytes], size: int | None, depth: int,
               top_file: str | None = None) -> Iterator[Found]:
        what = f"member {base.member}" if base.member else base.path
        stream = cast(IO[bytes], _MemberStream(raw, what))
        try:
            head = stream.read(SNIFF_BYTES)
            stream.seek(0)
            content = sniff(head)
        except HeaderError as exc:
            yield base.failed(exc.kind, str(exc))
            return
        if content in ARCHIVES:
            yield from self._guarded(base, self._prefix(base),
                                     lambda: self._archive(base, stream, content, depth,
                                                           top_file))
            return
        try:
            header = parse_instance(stream, uri=base.path, size=size, head=head,
                                    max_header_bytes=self.limits.max_header_bytes)
        except HeaderError as exc:
            yield base.failed(exc.kind, str(exc))
            return
        yield replace(base, header=header)

    @staticmethod
    def _prefix(base: Found) -> str:
        return f"{base.member}{MEMBER_SEPARATOR}" if base.member else ""

    def _guarded(self, base: Found, prefix: str,
                 walk: Callable[[], Iterator[Found]]) -> Iterator[Found]:
        """Run an archive walk; a structural fault ends it with one ``bad_archive`` input."""
        yielded = 0
        try:
            for found in walk():
                yielded += 1
                yield found
        except Exception as exc:  # any library's failure is this archive's
            where = base.path
            rest = " (the members after the last one read)" if yielded else ""
            kind = exc.kind if isinstance(exc, HeaderError) else ErrorKind.BAD_ARCHIVE
            message = str(exc) if isinstance(exc, HeaderError) else (
                f"archive {where} is damaged{rest}: {type(exc).__name__}: {exc}; re-copy it or "
                "repair it (`zip -FF` for ZIP)")
            label = base.member
            if yielded:
                label = f"{prefix}[damaged after {yielded} members]"
            path = f"{base.archive}{MEMBER_SEPARATOR}{label}" if base.archive and label \
                else base.path
            yield replace(base, path=path, member=label).failed(kind, message)

    def _archive(self, base: Found, stream: IO[bytes], content: Content, depth: int,
                 top_file: str | None) -> Iterator[Found]:
        if depth >= self.limits.max_depth:
            raise HeaderError(ErrorKind.TOO_LARGE,
                              f"archives nested more than {self.limits.max_depth} deep")
        archive = base.archive or base.path
        prefix = self._prefix(base)
        if content is Content.ZIP:
            if top_file is not None:  # a plain file that is a ZIP: read it in place
                zf = zipfile.ZipFile(top_file)
            else:
                data = _read_bounded(stream, self.limits.max_nested_bytes,
                                     f"nested archive {base.member}")
                zf = zipfile.ZipFile(io.BytesIO(data))
            with zf:
                infos = zf.infolist()
                yield from self._zip_members(zf, infos, range(len(infos)), archive, prefix,
                                             depth + 1)
            return
        if content is Content.TAR:
            # a plain tar file seeks past member data; a tar inside something streams
            tf = (tarfile.open(top_file, "r:") if top_file is not None
                  else tarfile.open(fileobj=stream, mode="r|"))
            with tf:
                yield from self._tar_members(tf, archive, prefix, depth + 1)
            return
        opener: Callable[[IO[bytes]], IO[bytes]] = {
            Content.GZIP: lambda f: cast(IO[bytes], gzip.GzipFile(fileobj=f, mode="rb")),
            Content.BZIP2: lambda f: cast(IO[bytes], bz2.BZ2File(f, mode="rb")),
            Content.XZ: lambda f: cast(IO[bytes], lzma.LZMAFile(f, mode="rb")),
        }[content]
        inner = cast(IO[bytes], _MemberStream(opener(stream),
                                              f"compressed {base.member or base.path}"))
        head = inner.read(SNIFF_BYTES)
        inner.seek(0)
        if sniff(head) is Content.TAR:
            with tarfile.open(fileobj=inner, mode="r|") as tf:
                yield from self._tar_members(tf, archive, prefix, depth + 1)
            return
        # One compressed file (x.dcm.gz): its content is the input, under the same path.
        yield from self._input(base, inner, None, depth + 1)

    # -- ZIP ------------------------------------------------------------------------------
    def _listed_zip(self, source: Source, start: int, stop: int) -> Iterator[Found]:
        with zipfile.ZipFile(source.path) as zf:
            infos = zf.infolist()
            wanted = [m.index for m in source.members[start:stop]]
            for member in source.members[start:stop]:
                if member.index >= len(infos) or infos[member.index].filename != member.name:
                    raise HeaderError(ErrorKind.BAD_ARCHIVE,
                                      f"archive {source.path} changed while it was read "
                                      "(central directory differs from the plan); ingest "
                                      "it again")
            yield from self._zip_members(zf, infos, wanted, source.path, "", 1)

    def _zip_members(self, zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo],
                     indexes: range | list[int], archive: str, prefix: str,
                     depth: int) -> Iterator[Found]:
        labels: dict[int, str] = {}
        seen: set[str] = set()
        for i, info in enumerate(infos):
            if not info.is_dir():
                labels[i] = member_label(info.filename, i, seen)
        for index in indexes:
            if index not in labels:
                continue
            info = infos[index]
            member = prefix + labels[index]
            base = Found(f"{archive}{MEMBER_SEPARATOR}{member}", archive, member, index,
                         info.file_size, info.compress_size, info.CRC, _zip_time(info))
            yield from self._zip_member(zf, info, base, depth)

    def _zip_member(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo, base: Found,
                    depth: int) -> Iterator[Found]:
        limits = self.limits
        reason = skip_reason(info.filename)
        ratio = info.file_size / max(info.compress_size, 1)
        if reason is not None:
            yield base.failed(ErrorKind.SKIPPED, f"skipped by rule: {reason}")
        elif info.flag_bits & 0x1:
            yield base.failed(ErrorKind.ENCRYPTED,
                              "member is encrypted; decrypt the archive first")
        elif info.file_size > limits.max_member_bytes or (
                info.file_size > 1 << 20 and ratio > limits.max_ratio):
            yield base.failed(
                ErrorKind.TOO_LARGE,
                f"declared size {info.file_size} bytes (compression ratio {ratio:.0f}:1) "
                f"exceeds maxMemberBytes={limits.max_member_bytes} or "
                f"maxCompressionRatio={limits.max_ratio} (possible zip bomb)")
        else:
            try:
                raw = zf.open(info)
            except Exception as exc:  # unsupported method, bad local header...
                yield base.failed(ErrorKind.BAD_ARCHIVE,
                                  f"member cannot be opened ({type(exc).__name__}: {exc})")
                return
            with raw:
                yield from self._input(base, raw, info.file_size, depth)

    # -- tar ------------------------------------------------------------------------------
    def _tar_members(self, tf: tarfile.TarFile, archive: str, prefix: str,
                     depth: int) -> Iterator[Found]:
        seen: set[str] = set()
        for index, info in enumerate(tf):
            if not info.isfile():
                continue  # folders, links and devices hold no bytes of their own
            member = prefix + member_label(info.name, index, seen)
            base = Found(f"{archive}{MEMBER_SEPARATOR}{member}", archive, member, index,
                         info.size, None, None,
                         dt.datetime.fromtimestamp(info.mtime, tz=dt.UTC)
                         if isinstance(info.mtime, int | float) and 0 <= info.mtime < 2**33
                         else None)
            reason = skip_reason(info.name)
            if reason is not None:
                yield base.failed(ErrorKind.SKIPPED, f"skipped by rule: {reason}")
                continue
            if info.size > self.limits.max_member_bytes:
                yield base.failed(ErrorKind.TOO_LARGE,
                                  f"declared size {info.size} bytes exceeds "
                                  f"maxMemberBytes={self.limits.max_member_bytes}")
                continue
            raw = tf.extractfile(info)
            if raw is None:
                continue
            yield from self._input(base, raw, info.size, depth)
        _check_tar_end(tf)


def _check_tar_end(tf: tarfile.TarFile) -> None:
    """Raise if the listing stopped at a damaged header rather than at the end.

    tarfile ends its iteration quietly at a header with a bad checksum, which would make
    every later member vanish; a real end is followed by nothing but zero padding.
    """
    fileobj = cast(IO[bytes] | None, tf.fileobj)
    if fileobj is None:
        return
    stream_mode = type(fileobj).__name__ == "_Stream"  # tarfile's forward-only reader
    if _can_seek(fileobj) and not stream_mode:
        fileobj.seek(tf.offset)  # the block tarfile refused is still there to check
    while chunk := fileobj.read(1 << 16):
        if chunk.strip(b"\0"):
            raise HeaderError(ErrorKind.BAD_ARCHIVE,
                              f"tar header at byte {tf.offset} is damaged (bad checksum or "
                              "not a header); the members after it cannot be listed")


def read_source(source: Source, start: int = 0, stop: int | None = None,
                limits: Limits | None = None) -> Iterator[Found]:
    """Every input of ``source`` (for a listed ZIP: of members ``[start, stop)``).

    Never raises for bad input: each fault is a :class:`Found` with ``error`` set.
    """
    end = len(source.members) if stop is None else stop
    return _Reader(limits or Limits()).source(source, start, end)


# -- reading one input back by its path ---------------------------------------------------

_OPEN_ZIPS: OrderedDict[str, zipfile.ZipFile] = OrderedDict()
_MAX_OPEN = 8


def _open_zip(path: str) -> zipfile.ZipFile:
    """An open ZipFile, kept per process: re-reading a central directory per member is slow
    (embedding reads every member of an archive in turn)."""
    zf = _OPEN_ZIPS.pop(path, None)
    if zf is None:
        zf = zipfile.ZipFile(path)
        if len(_OPEN_ZIPS) >= _MAX_OPEN:
            _OPEN_ZIPS.popitem(last=False)[1].close()
    _OPEN_ZIPS[path] = zf
    return zf


def _zip_member_bytes(zf: zipfile.ZipFile, label: str) -> bytes:
    infos = zf.infolist()
    for info in infos:  # the first member with the name keeps it
        if info.filename == label and not info.is_dir():
            return zf.read(info)
    match = _INDEXED.match(label)
    if match:
        index = int(match["index"])
        if index < len(infos) and infos[index].filename == match["name"]:
            return zf.read(infos[index])
    raise KeyError(f"no member {label!r}")


def _tar_member_bytes(tf: tarfile.TarFile, label: str) -> bytes:
    match = _INDEXED.match(label)
    for index, info in enumerate(tf):
        hit = info.name == label or (match is not None and index == int(match["index"])
                                     and info.name == match["name"])
        if hit and info.isfile():
            fp = tf.extractfile(info)
            if fp is not None:
                return fp.read()
    raise KeyError(f"no member {label!r}")


def _decompressed(data: bytes) -> bytes:
    content = sniff(data[:SNIFF_BYTES])
    if content is Content.GZIP:
        return gzip.decompress(data)
    if content is Content.BZIP2:
        return bz2.decompress(data)
    if content is Content.XZ:
        return lzma.decompress(data)
    return data


def _member_of(data: bytes, label: str) -> bytes:
    content = sniff(data[:SNIFF_BYTES])
    if content is Content.ZIP:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return _zip_member_bytes(zf, label)
    plain = _decompressed(data) if content in ARCHIVES else data
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as tf:
        return _tar_member_bytes(tf, label)


def read_input(path: str) -> bytes:
    """The bytes of one input, by the ``path`` its row carries (any nesting).

    Raises:
        OSError, KeyError, zipfile.BadZipFile, tarfile.TarError, ...: it cannot be read;
        callers turn that into their own error naming the path.
    """
    outer, *labels = path.split(MEMBER_SEPARATOR)
    if not labels:
        with open(outer, "rb") as fh:
            data = fh.read()
        return data if sniff(data[:SNIFF_BYTES]) is Content.TAR else _decompressed(data)
    with open(outer, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    if sniff(head) is Content.ZIP:
        data = _zip_member_bytes(_open_zip(outer), labels[0])
    else:
        with tarfile.open(outer, "r:*") as tf:
            data = _tar_member_bytes(tf, labels[0])
    for label in labels[1:]:
        data = _member_of(data, label)
    return _decompressed(data) if sniff(data[:SNIFF_BYTES]) in (
        Content.GZIP, Content.BZIP2, Content.XZ) else data
