"""Upload DICOM files, folders and archives to the ``imageupload`` topic.

Archives (ZIP, tar, compressed, nested) are expanded here with the batch ingest's own
readers, so "what is an image" is decided in one place: each DICOM file or member is one
record (see :mod:`dicomlake.streaming.messages`); members that are no image (not DICOM,
skipped litter, damaged, a DICOMDIR) are not sent but reported with their error kind. The
producer waits for the broker's acknowledgement of every record (``acks=all``) and returns
one :class:`Delivery` per input, so nothing is silently dropped.
Files over ``inline_max_bytes`` are first written to the lake (content-addressed) and the
record carries a reference: the job then reads them from there.
"""

from __future__ import annotations

import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from dicomlake.catalog.archives import MEMBER_SEPARATOR, member_label, read_input, read_source
from dicomlake.catalog.errors import ErrorKind
from dicomlake.catalog.inputs import plan_sources
from dicomlake.catalog.preflight import ARCHIVES, SNIFF_BYTES, Content, sniff
from dicomlake.config import Settings, load_settings
from dicomlake.streaming import messages
from dicomlake.streaming.broker import bootstrap_servers
from dicomlake.streaming.settings import StreamSettings, load_stream, state_dir, uploads_dir


@dataclass(frozen=True)
class Delivery:
    """What happened to one input (a file, or a member of an archive).

    Three outcomes: sent and confirmed by the broker (``ok``); not sent because it is no
    DICOM image (``kind`` is its ``dicom.errors`` kind: ``not_dicom``, ``skipped``,
    ``bad_archive``, ``dicomdir``...; ``rejected``); or sent but not confirmed (``error``
    without ``kind``; ``failed``).
    """

    name: str
    size: int
    sha256: str
    partition: int | None = None
    offset: int | None = None
    error: str | None = None
    kind: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def rejected(self) -> bool:
        return self.kind is not None

    @property
    def failed(self) -> bool:
        return self.error is not None and self.kind is None


@dataclass(frozen=True)
class Input:
    """One input found in the uploaded paths: an image to send (``data``) or why not."""

    name: str
    data: bytes | None
    size: int
    kind: str | None = None
    error: str | None = None


class _InputBytes:
    """Reads back the bytes of the images :func:`read_source` found, by their ``path``.

    Plain files and ZIP members go through :func:`read_input` (it keeps ZIPs open). Members
    of a top-level tar are indexed once per tar instead: ``read_input`` lists the tar again
    for every member, which decompresses a ``.tar.gz`` once per member.
    """

    def __init__(self) -> None:
        self._tar_path: str | None = None
        self._tar: tarfile.TarFile | None = None
        self._index: dict[str, tarfile.TarInfo] = {}

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._tar, self._tar_path, self._index = None, None, {}

    def _open_tar(self, path: str) -> bool:
        """Index ``path`` if it is a tar (plain or compressed); False for anything else."""
        if self._tar_path == path:
            return self._tar is not None
        self.close()
        self._tar_path = path
        with open(path, "rb") as fh:
            content = sniff(fh.read(SNIFF_BYTES))
        if content not in ARCHIVES or content is Content.ZIP:
            return False
        try:
            tf = tarfile.open(path, "r:*")
        except Exception:  # a compressed single file (x.dcm.gz) is no tar: read_input
            return False
        seen: set[str] = set()
        try:
            for index, info in enumerate(tf):  # the labels archives.read_source gave them
                if info.isfile():
                    self._index[member_label(info.name, index, seen)] = info
        except Exception:  # a damaged tail: members not indexed go through read_input
            pass
        self._tar = tf
        return True

    def read(self, path: str) -> bytes:
        outer, *labels = path.split(MEMBER_SEPARATOR)
        if len(labels) == 1 and self._open_tar(outer) and labels[0] in self._index:
            assert self._tar is not None
            fp = self._tar.extractfile(self._index[labels[0]])
            if fp is not None:
                data = fp.read()
                if sniff(data[:SNIFF_BYTES]) not in ARCHIVES:
                    return data
        # nested archives and compressed members (x.dcm.gz in a tar) are read_input's job
        return read_input(path)


def iter_inputs(paths: Iterable[str | os.PathLike[str]], *,
                relative_to: str | os.PathLike[str] | None = None) -> Iterator[Input]:
    """Every input in ``paths``, decided by the batch ingest's own readers.

    Files, folders (walked) and archives (ZIP, tar, compressed, nested) are expanded by
    :func:`~dicomlake.catalog.inputs.plan_sources` and
    :func:`~dicomlake.catalog.archives.read_source`: one input per DICOM member, named
    ``archive!/member``. What is not an image (not DICOM, a documented skip, a damaged
    member, a DICOMDIR) comes with its error kind and message instead of bytes, so a caller
    counts it rather than losing it. ``relative_to`` shortens names to paths below it.
    """
    base = os.path.abspath(relative_to) if relative_to is not None else None

    def label(path: str) -> str:
        if base is None:
            return path
        outer, sep, rest = path.partition(MEMBER_SEPARATOR)
        return os.path.relpath(outer, base) + sep + rest

    reader = _InputBytes()
    try:
        for source in plan_sources([os.fspath(p) for p in paths]):
            for found in read_source(source):
                size = found.file_size or 0
                if found.error is not None:
                    kind, message = found.error
                    yield Input(label(found.path), None, size, kind.value, message)
                    continue
                try:
                    data = reader.read(found.path)
                except Exception as exc:  # the file changed or vanished since it was listed
                    yield Input(label(found.path), None, size, ErrorKind.UNREADABLE.value,
                                f"{found.path} cannot be read back ({type(exc).__name__}: "
                                f"{exc})")
                    continue
                yield Input(label(found.path), data, len(data))
    finally:
        reader.close()


def summarize(deliveries: Iterable[Delivery]) -> dict[str, Any]:
    """Counts for a report: sent, failed, and inputs not sent by error kind."""
    done = list(deliveries)
    kinds = Counter(d.kind for d in done if d.kind is not None)
    return {"inputs": len(done), "sent": sum(d.ok for d in done),
            "failed": sum(d.failed for d in done), "not_sent": sum(kinds.values()),
            "not_sent_kinds": dict(sorted(kinds.items()))}


class Uploader:
    """A kafka-python producer bound to the lake's upload topic.

    Example:
        >>> with Uploader() as up:
        ...     results = up.upload(["/data/new_ct.zip"])
        >>> [r.error for r in results if not r.ok]
        []
    """

    def __init__(self, settings: Settings | None = None, stream: StreamSettings | None = None,
                 *, bootstrap: str | None = None, timeout_s: float = 30.0) -> None:
        from kafka import KafkaProducer

        self.settings = settings or load_settings()
        self.stream = stream or load_stream(self.settings)
        self.bootstrap = bootstrap or bootstrap_servers(self.stream, state_dir(self.settings))
        self.timeout_s = timeout_s
        self._producer = KafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", linger_ms=5,
            max_request_size=self.stream.inline_max_bytes + (1 << 20),
            request_timeout_ms=int(timeout_s * 1000), retries=5, client_id="dicomlake-upload")

    def __enter__(self) -> Uploader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._producer.close(timeout=self.timeout_s)

    def _stage(self, data: bytes, sha: str) -> str:
        """Store a large file in the lake (atomic rename) and return its path."""
        target = uploads_dir(self.settings) / sha[:2] / f"{sha}.dcm"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return str(target)

    def send(self, name: str, data: bytes) -> object:
        """Queue one file; returns the kafka-python future (see :meth:`upload`)."""
        sha = messages.sha256_of(data)
        ref = None
        if len(data) > self.stream.inline_max_bytes:
            ref = self._stage(data, sha)
        key, value, headers = messages.encode(name, None if ref else data, size=len(data),
                                              sha256=sha, ref=ref)
        return self._producer.send(self.stream.topic, key=key, value=value, headers=headers)

    def upload(self, paths: Iterable[str | os.PathLike[str]], *,
               relative_to: str | os.PathLike[str] | None = None) -> list[Delivery]:
        """Send every image found in ``paths`` and wait for each acknowledgement.

        One record per DICOM file or archive member (:func:`iter_inputs`); inputs that are
        no image and records the broker did not confirm are in the result, never dropped.
        """
        pending: list[tuple[str, int, str, object]] = []
        results: list[Delivery] = []
        for item in iter_inputs(paths, relative_to=relative_to):
            if item.data is None:
                results.append(Delivery(item.name, item.size, "", error=item.error,
                                        kind=item.kind))
                continue
            sha = messages.sha256_of(item.data)
            try:
                pending.append((item.name, item.size, sha, self.send(item.name, item.data)))
            except Exception as exc:  # kafka-python raises many types; each is a failed file
                results.append(Delivery(item.name, item.size, sha,
                                        error=f"{type(exc).__name__}: {exc}"))
        self._producer.flush(timeout=self.timeout_s)
        for name, size, sha, future in pending:
            try:
                meta = future.get(timeout=self.timeout_s)  # type: ignore[attr-defined]
                results.append(Delivery(name, size, sha, meta.partition, meta.offset))
            except Exception as exc:
                results.append(Delivery(name, size, sha,
                                        error=f"not delivered: {type(exc).__name__}: {exc}"))
        return results


def upload(paths: Iterable[str | os.PathLike[str]], settings: Settings | None = None, *,
           relative_to: str | os.PathLike[str] | None = None) -> list[Delivery]:
    """Upload files, folders and archives to the configured topic (one call, one producer)."""
    with Uploader(settings) as up:
        return up.upload(paths, relative_to=relative_to)


def stream_bootstrap(settings: Settings, stream: StreamSettings | None = None) -> str | None:
    """The broker's address when the stream job runs, else None.

    The same test as ``dicomlake stream status`` (:func:`dicomlake.streaming.runner.status`):
    a live job process recorded in the stream's state folder and a broker (the embedded
    one alive, or the configured Kafka). Uploaders ask this to choose the stream over the
    batch fallback.
    """
    from dicomlake.streaming.runner import status

    info = status(settings, stream)
    if info["job_running"] and info["broker_running"] and info["bootstrap"]:
        return str(info["bootstrap"])
    return None
