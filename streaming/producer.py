"""Upload DICOM files (or every member of ZIP archives) to the ``imageupload`` topic.

Each file is one record (see :mod:`dicomlake.streaming.messages`); the producer waits for
the broker's acknowledgement of every record (``acks=all``) and returns one
:class:`Delivery` per file, so a failure is reported per file and never silently dropped.
Files over ``inline_max_bytes`` are first written to the lake (content-addressed) and the
record carries a reference: the job then reads them from there.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dicomlake.config import Settings, load_settings
from dicomlake.streaming import messages
from dicomlake.streaming.broker import bootstrap_servers
from dicomlake.streaming.settings import StreamSettings, load_stream, state_dir, uploads_dir


@dataclass(frozen=True)
class Delivery:
    """What happened to one uploaded file."""

    name: str
    size: int
    sha256: str
    partition: int | None = None
    offset: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def iter_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) per file; a ZIP yields its members (``archive!/member``)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                yield from iter_files([child])
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.is_dir() and not info.filename.startswith("__MACOSX/"):
                        yield f"{path}!/{info.filename}", zf.read(info)
        else:
            yield str(path), path.read_bytes()


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

    def upload(self, paths: Iterable[str | os.PathLike[str]]) -> list[Delivery]:
        """Send every file and wait for each acknowledgement; failures are in the result."""
        pending: list[tuple[str, int, str, object]] = []
        results: list[Delivery] = []
        for name, data in iter_files(paths):
            try:
                pending.append((name, len(data), messages.sha256_of(data),
                                self.send(name, data)))
            except Exception as exc:  # kafka-python raises many types; each is a failed file
                results.append(Delivery(name, len(data), messages.sha256_of(data),
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


def upload(paths: Iterable[str | os.PathLike[str]], settings: Settings | None = None
           ) -> list[Delivery]:
    """Upload files and archives to the configured topic (one call, one producer)."""
    with Uploader(settings) as up:
        return up.upload(paths)
