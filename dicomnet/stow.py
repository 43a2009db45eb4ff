"""STOW-RS: instances POSTed as multipart/related application/dicom go into the lake through
the one way in every upload takes (:class:`dicomlake.extension.upload.UploadManager`: the
upload stream when its job runs, a batch ingest otherwise), and the client gets a PS3.18
store response (ReferencedSOPSequence / FailedSOPSequence).

The response is sent once the way in has taken the instances (the broker confirmed them, or
the batch ingest finished), so a stored instance is one a following search can find.
"""

from __future__ import annotations

import asyncio
import io
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicomlake.config import Settings

__all__ = ["Part", "StoreResult", "Stower", "parse_multipart"]

FAILURE_PROCESSING = 0x0110
"""Processing failure (PS3.4 C.4.2.1.4, as PS3.18 uses it)."""
FAILURE_NOT_DICOM = 0xC000
"""Cannot understand: the part is no DICOM instance."""
FAILURE_WRONG_STUDY = 0xA900
"""Data set does not match SOP class / the study named in the URL."""


@dataclass(frozen=True)
class Part:
    """One body part of the request."""

    content_type: str
    body: bytes


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """The parts of a multipart/related body.

    Raises:
        ValueError: no boundary, or a body that does not follow it (the message says which).
    """
    params = {}
    for item in content_type.split(";")[1:]:
        name, _, value = item.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    boundary = params.get("boundary")
    if not content_type.lower().startswith("multipart/related") or not boundary:
        raise ValueError("Content-Type must be multipart/related; type=\"application/dicom\" "
                         f"with a boundary; got {content_type!r}")
    delimiter = b"--" + boundary.encode()
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise ValueError(f"the body has no part delimited by boundary {boundary!r}")
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # the close delimiter
        chunk = chunk.removeprefix(b"\r\n")
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a part has no blank line between its headers and its body")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append(Part(headers.get("content-type", params.get("type", "")),
                          data.removesuffix(b"\r\n")))
    return parts


@dataclass(frozen=True)
class StoreResult:
    """What happened to one part."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    failure: int | None = None
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    reason: str = ""


class Stower:
    """Sends stored instances through the UploadManager, on an event loop of its own (the
    manager is asyncio-based; the HTTP server is threaded)."""

    def __init__(self, settings: Settings, wait_seconds: float = 600.0) -> None:
        from dicomlake.extension.upload import UploadManager

        self.manager = UploadManager(settings.home, settings)
        self.wait_seconds = wait_seconds
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dicomweb-stow",
                                        daemon=True)
        self._thread.start()

    def store(self, owner: str, parts: list[Part], study: str | None,
              ) -> tuple[list[StoreResult], dict[str, Any] | None]:
        """Check each part, send the good ones into the lake and wait for the way in.

        Returns the per-part results and the upload job (None when nothing was sent).
        """
        from pydicom import dcmread

        results: list[StoreResult] = []
        files: list[tuple[str, bytes]] = []
        for n, part in enumerate(parts, 1):
            kind = part.content_type.split(";")[0].strip().lower()
            if kind not in ("application/dicom", ""):
                results.append(StoreResult(None, None, FAILURE_NOT_DICOM,
                                           f"part {n} is {kind}, not application/dicom"))
                continue
            try:
                ds = dcmread(io.BytesIO(part.body), stop_before_pixels=True)
                sop_class, sop = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
                part_study, part_series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
            except Exception as exc:  # pydicom raises many kinds for a bad file
                results.append(StoreResult(None, None, FAILURE_NOT_DICOM,
                                           f"part {n} is not a DICOM instance: {exc}"))
                continue
            if study and part_study != study:
                results.append(StoreResult(sop_class, sop, FAILURE_WRONG_STUDY,
                                           f"part {n} belongs to study {part_study}, not to "
                                           f"{study} named in the URL"))
                continue
            results.append(StoreResult(sop_class, sop, None, "", part_study, part_series))
            files.append((f"{sop}.dcm", part.body))
        if not files:
            return results, None
        job = self.manager.save(owner, files)
        asyncio.run_coroutine_threadsafe(self.manager.start(job), self._loop).result()
        done = asyncio.run_coroutine_threadsafe(self._wait(job.id, owner), self._loop)
        done.result(timeout=self.wait_seconds + 5)
        status = job.to_json()
        if job.state != "FINISHED":
            reason = f"upload {job.id} ({job.path}) {job.state.lower()}: " + \
                "; ".join(job.output[-3:])
            results = [r if r.failure is not None else
                       StoreResult(r.sop_class_uid, r.sop_instance_uid, FAILURE_PROCESSING,
                                   reason[:500], r.study_instance_uid, r.series_instance_uid)
                       for r in results]
        return results, status

    async def _wait(self, job_id: str, owner: str) -> None:
        job = self.manager.get(owner, job_id)
        waited = 0.0
        while job is not None and job.state == "RUNNING" and waited < self.wait_seconds:
            await asyncio.sleep(0.1)
            waited += 0.1

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
