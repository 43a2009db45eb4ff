"""How instances received over DIMSE enter the lake: the browser upload's way in, kept.

A C-STORE may only be acknowledged once the instance cannot be lost, so the way in is chosen
per association (the stream job can start or stop between two associations, never inside
one):

* ``stream`` when the stream job runs (the test ``dicomlake stream status`` makes): each
  instance is sent through :class:`~dicomlake.streaming.producer.Uploader`, one record named
  ``dimse/<job>/<SOPInstanceUID>.dcm``, and the C-STORE succeeds only once the broker has
  confirmed that record; the job adds rows, embeddings and codes as for every upload.
* ``batch`` otherwise: each instance is written to a temporary file in
  ``<home>/uploads/dimse/<job>/``, fsync'd, and renamed to its name before the C-STORE
  succeeds. The folder itself is fsync'd (its new entries made durable) once, when the
  association ends, not after every instance (a second journal flush per instance, in the
  modality's wait). The data of every acknowledged instance is on disk before its Success;
  what a crash before the association ends can lose is a new name not yet durable (ext4
  and XFS commit renames within seconds anyway). Then the folder becomes an upload of
  :class:`~dicomlake.extension.upload.UploadManager`, which ingests and embeds it in a
  child process exactly as a browser upload (or sends it through the stream, if one runs
  by then). Uploads run one after another: each child holds a Spark session, and two at
  once on a small machine would only slow both.

A ``<job>.pending`` file beside each batch folder lives from its first instance until its
upload finished; folders still pending when the service starts (it stopped before ingesting
them) are ingested then, so an acknowledged instance is never left out of the lake.

The bytes are the ones received: file meta, then the dataset exactly as the peer encoded it
(pynetdicom's ``encoded_dataset``), never decoded and written again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import io
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dicomlake.catalog.errors import HeaderError
from dicomlake.catalog.preflight import SNIFF_BYTES, parse_instance
from dicomlake.errors import DicomlakeError

if TYPE_CHECKING:
    from dicomlake.config import Settings
    from dicomlake.extension.upload import UploadJob
    from dicomlake.streaming.producer import Uploader

log = logging.getLogger(__name__)

OWNER = "dimse"
"""The uploader name DIMSE instances carry (``uploads/dimse/``, records ``dimse/<job>/...``)."""

PENDING_SUFFIX = ".pending"

# DIMSE C-STORE statuses (PS3.4 Annex B.2.3 and PS3.7 Annex C).
STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
"""General failure: the lake could not make the instance durable (the peer may retry)."""
STATUS_OUT_OF_RESOURCES = 0xA700
"""Refused: out of resources (the disk is full)."""
STATUS_DATASET_MISMATCH = 0xA900
"""Error: the data set does not match the SOP class (identifying UIDs missing or wrong)."""
STATUS_CANNOT_UNDERSTAND = 0xC000
"""Error: cannot understand (the lake's pre-check refuses the data set)."""


class StoreError(DicomlakeError):
    """An instance is refused; ``status`` is the DIMSE failure status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Intake:
    """One association's instances and where they go (``path``: ``stream`` or ``batch``)."""

    job_id: str
    path: str
    reason: str
    folder: Path | None = None
    uploader: Uploader | None = None
    names: list[str] = field(default_factory=list)
    """Files written (batch) or records confirmed (stream), in order."""
    taken: set[str] = field(default_factory=set)
    """The file names in ``names`` (batch), to tell a second copy apart without a stat."""


def check_instance(data: bytes, sop_class_uid: str, sop_instance_uid: str) -> None:
    """Refuse what cannot become an instance row, before it is acknowledged.

    The lake's one pre-check decides what is DICOM (the same call every batch task, the
    stream and browser uploads make); DIMSE adds that the data set carries the UIDs the
    command announced and the study and series it belongs to (Type 1 in every IOD: without
    them C-FIND and DICOMweb could never reach it).

    Raises:
        StoreError: with the DIMSE status and a message naming the fault.
    """
    try:
        header = parse_instance(io.BytesIO(data), uri=f"C-STORE {sop_instance_uid}",
                                size=len(data), head=data[:SNIFF_BYTES])
    except HeaderError as exc:
        raise StoreError(STATUS_CANNOT_UNDERSTAND, f"{exc.kind.value}: {exc}") from exc

    def first(key: str) -> str | None:
        values = header.values(key)
        return str(values[0]) if values else None

    found = {"SOPClassUID": first("00080016"), "SOPInstanceUID": first("00080018")}
    announced = {"SOPClassUID": sop_class_uid, "SOPInstanceUID": sop_instance_uid}
    for keyword, value in found.items():
        if value != announced[keyword]:
            raise StoreError(STATUS_DATASET_MISMATCH,
                             f"{keyword} in the data set is {value!r}, the C-STORE request "
                             f"announced {announced[keyword]!r}")
    for key, keyword in (("0020000D", "StudyInstanceUID"), ("0020000E", "SeriesInstanceUID")):
        if not first(key):
            raise StoreError(STATUS_DATASET_MISMATCH,
                             f"{keyword} ({key[:4]},{key[4:]}) is missing: the instance "
                             "could not be found by study or series")


def _write_durably(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target``: fsync'd under a temporary name, then renamed (a crash
    never leaves a partial file under an instance's name). The caller fsyncs the folder."""
    tmp = target.with_name(f".{target.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _holds_instances(folder: Path) -> bool:
    """True when ``folder`` holds a written instance (not only a temporary file)."""
    return folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir())


class DimseIntake:
    """Takes received instances into the lake; one per DIMSE service.

    Args:
        settings: the lake's settings (its home holds ``uploads/`` and the stream's state).
        on_upload_done: called with each finished upload (in the uploads thread), so the
            service can report and audit what the batch ingest did with an association.
    """

    def __init__(self, settings: Settings, *,
                 on_upload_done: Callable[[UploadJob], None] | None = None,
                 confirm_timeout_s: float = 30.0) -> None:
        from dicomlake.extension.upload import UploadManager

        self.settings = settings
        self.folder = settings.home / "uploads" / OWNER
        self.confirm_timeout_s = confirm_timeout_s
        self._manager = UploadManager(settings.home, settings)
        self._on_upload_done = on_upload_done
        self._uploaders: dict[str, Uploader] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run_uploads, name="dimse-uploads",
                                        daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> list[Path]:
        """Start the uploads thread; queue folders a previous run left pending (returned)."""
        pending = sorted(self.folder.glob(f"*{PENDING_SUFFIX}")) if self.folder.is_dir() else []
        folders = []
        for marker in pending:
            folder = marker.with_suffix("")
            if _holds_instances(folder):
                folders.append(folder)
            else:  # stopped before its first instance was durable: nothing was acknowledged
                shutil.rmtree(folder, ignore_errors=True)
                marker.unlink(missing_ok=True)
        self._thread.start()
        for folder in folders:
            log.info("DIMSE: %s was received but not yet ingested; ingesting it now", folder)
            self._queue.put(folder)
        return folders

    def stop(self, *, wait: bool = True) -> None:
        """Finish the queued uploads (``wait``) and close the stream producers."""
        self._queue.put(None)
        if wait and self._thread.is_alive():
            self._thread.join()
        with self._lock:
            uploaders, self._uploaders = list(self._uploaders.values()), {}
        for up in uploaders:
            try:
                up.close()
            except Exception as exc:  # records the broker never confirmed were refused
                log.warning("DIMSE: the upload stream producer did not close cleanly "
                            "(%s: %s); its unconfirmed records were never acknowledged",
                            type(exc).__name__, exc)

    def idle(self) -> bool:
        """True when no upload is queued or running."""
        return self._queue.unfinished_tasks == 0

    # -- per association ---------------------------------------------------------------------

    def open(self, calling_ae: str) -> Intake:
        """Choose the way in for one association (the stream if its job runs, else batch)."""
        from dicomlake.extension.upload import safe_name

        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        job_id = f"{stamp}-{safe_name(calling_ae.strip() or 'peer')}-{uuid.uuid4().hex[:8]}"
        bootstrap, reason = self._stream_bootstrap()
        if bootstrap is None:
            return Intake(job_id, "batch", reason, folder=self.folder / job_id)
        try:
            uploader = self._uploader(bootstrap)
        except Exception as exc:  # the broker vanished since the check: batch keeps it safe
            return Intake(job_id, "batch", f"the upload stream at {bootstrap} cannot be "
                          f"reached ({type(exc).__name__}: {exc}); batch fallback",
                          folder=self.folder / job_id)
        return Intake(job_id, "stream", reason, uploader=uploader)

    def _stream_bootstrap(self) -> tuple[str | None, str]:
        """The broker to send to (None: no stream job runs) and why, in words."""
        from dicomlake.streaming.producer import stream_bootstrap
        from dicomlake.streaming.settings import load_stream

        try:
            stream = load_stream(self.settings)
            bootstrap = stream_bootstrap(self.settings, stream)
        except Exception as exc:  # a bad [stream] setting or a missing extra: batch is safe
            return None, (f"the stream's state cannot be read ({type(exc).__name__}: {exc}); "
                          "batch: written to disk, ingested after the association")
        if bootstrap is None:
            return None, ("no stream job runs; batch: written to disk, ingested + embedded "
                          "after the association")
        return bootstrap, f"the stream job runs: records to {stream.topic!r} at {bootstrap}"

    def _uploader(self, bootstrap: str) -> Uploader:
        from dicomlake.streaming.producer import Uploader

        with self._lock:
            if bootstrap not in self._uploaders:
                self._uploaders[bootstrap] = Uploader(self.settings, bootstrap=bootstrap,
                                                      timeout_s=self.confirm_timeout_s)
            return self._uploaders[bootstrap]

    def store(self, intake: Intake, sop_instance_uid: str, data: bytes) -> str:
        """Make one checked instance durable; returns its name (file or record).

        Raises:
            StoreError: it could not be made durable (nothing was acknowledged).
        """
        from dicomlake.extension.upload import safe_name

        name = f"{safe_name(sop_instance_uid)}.dcm"
        if intake.path == "stream":
            assert intake.uploader is not None
            record = f"{OWNER}/{intake.job_id}/{name}"
            try:
                future = intake.uploader.send(record, data)
                future.get(timeout=self.confirm_timeout_s)  # type: ignore[attr-defined]
            except Exception as exc:  # kafka-python raises many types; each is this instance's
                raise StoreError(STATUS_PROCESSING_FAILURE,
                                 f"the upload stream did not confirm the instance "
                                 f"({type(exc).__name__}: {exc})") from exc
            intake.names.append(record)
            return record
        assert intake.folder is not None
        try:
            if not intake.names:
                self.folder.mkdir(parents=True, exist_ok=True)
                marker = intake.folder.with_name(intake.folder.name + PENDING_SUFFIX)
                marker.touch()
                intake.folder.mkdir()
                _fsync_folder(self.folder)
            target = intake.folder / name
            if name in intake.taken:  # the same instance twice in one association: keep both
                target = target.with_name(f"{target.stem}_{uuid.uuid4().hex[:4]}.dcm")
            _write_durably(target, data)
        except OSError as exc:
            status = (STATUS_OUT_OF_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                      else STATUS_PROCESSING_FAILURE)
            raise StoreError(status, f"the instance cannot be written to {intake.folder}: "
                             f"{exc.strerror or exc}") from exc
        intake.names.append(target.name)
        intake.taken.add(target.name)
        return target.name

    def close(self, intake: Intake) -> None:
        """The association ended: make its folder's entries durable and queue the folder
        for ingest (if it holds anything)."""
        if intake.path == "batch" and intake.names:
            assert intake.folder is not None
            try:
                _fsync_folder(intake.folder)
            except OSError:  # the files are fsync'd; the ingest reads the folder either way
                log.exception("DIMSE: the folder %s cannot be fsync'd", intake.folder)
            self._queue.put(intake.folder)

    # -- uploads thread ----------------------------------------------------------------------

    def _run_uploads(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            while (folder := self._queue.get()) is not None:
                try:
                    job = loop.run_until_complete(self._upload(folder))
                except Exception:  # keep the marker: the next start retries this folder
                    log.exception("DIMSE: the upload of %s failed to run", folder)
                else:
                    if job.state == "FINISHED":
                        folder.with_name(folder.name + PENDING_SUFFIX).unlink(missing_ok=True)
                    if self._on_upload_done is not None:
                        self._on_upload_done(job)
                finally:
                    self._queue.task_done()
        finally:
            self._queue.task_done()  # the None that ended the loop
            loop.close()

    async def _upload(self, folder: Path) -> UploadJob:
        """The folder as a browser upload would be sent in; returns the finished job."""
        job = self._manager.adopt(OWNER, folder)
        await self._manager.start(job)
        started = time.monotonic()
        while job.state == "RUNNING":
            await asyncio.sleep(0.2)
        log.info("DIMSE: upload %s (%d files, %s path) %s in %.1f s: %s", job.id, len(job.files),
                 job.path, job.state, time.monotonic() - started, job.summary)
        return job
