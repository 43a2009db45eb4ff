"""Uploads from the dataset browser: files saved on the server, then sent into the lake.

The files land in ``<home>/uploads/<user>/<job>/``. Then one of two ways in, chosen per
upload and named in the response (``path``):

* ``stream`` when the stream job runs (the test ``dicomlake stream status`` makes): the
  folder goes through the producer ``dicomlake upload`` uses, one Kafka record per DICOM file
  or archive member, and the response lists what the broker confirmed per input (inputs that
  are no image are listed with their error kind, not sent). The folder is removed once every
  image is confirmed; the job adds rows, embeddings and codes as it always does.
* ``batch``, the fallback when no stream runs: a child process
  (``python -m dicomlake.extension.upload``) ingests the folder and embeds the new images,
  so "find similar" works on them too. A child process, not the Jupyter server, owns the
  Spark session: an upload must never stall or crash the notebook server.

Either way the SQL endpoint sees the new rows on its next read (the Delta tables are shared
through the warehouse folder).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomlake.catalog.errors import DicomlakeError
from dicomlake.catalog.preflight import SNIFF_BYTES, Content, sniff
from dicomlake.config import Settings, load_settings

MAX_UPLOAD_BYTES = 512 * 1024 * 1024
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class UploadError(DicomlakeError, ValueError):
    """An upload cannot be accepted (names the file and the rule)."""


def safe_name(name: str) -> str:
    """A file name that cannot leave its folder (no separators, no leading dots)."""
    base = _SAFE.sub("_", Path(name.replace("\\", "/")).name).lstrip(".")
    return base[:128] or "upload.dcm"


@dataclass
class UploadJob:
    """One upload and the ingest that follows it."""

    id: str
    owner: str
    folder: Path
    files: list[str]
    command: list[str]
    state: str = "RUNNING"
    path: str = "batch"
    """The way in: ``stream`` (the upload topic) or ``batch`` (child ingest + embed)."""
    path_reason: str = ""
    started: float = field(default_factory=time.monotonic)
    output: list[str] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    returncode: int | None = None
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    """Stream path: one entry per input, with what the broker confirmed."""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "path": self.path,
                "pathReason": self.path_reason, "folder": str(self.folder),
                "files": self.files, "command": " ".join(self.command),
                "output": self.output[-30:], "summary": self.summary,
                "deliveries": self.deliveries, "returncode": self.returncode,
                "elapsedSeconds": round(time.monotonic() - self.started, 1)}

    @property
    def sent_sha256(self) -> list[str]:
        """Content hashes of the images the broker confirmed (the stream's rows carry them
        as ``source_fingerprint``)."""
        return sorted({d["sha256"] for d in self.deliveries if d["status"] == "sent"})


def _lake_settings(home: Path) -> Settings:
    """The settings the batch child loads for ``home`` (``DICOMLAKE_HOME=home``).

    The Jupyter server's own settings when they are for this home (the extension passes
    ``load_settings().home``), else that home with defaults.
    """
    loaded = load_settings()
    return loaded if loaded.home == home else Settings(home=home)


class UploadManager:
    """Saves uploads and sends each into the lake: through the stream when its job runs,
    else through one batch ingest child process per upload."""

    def __init__(self, home: Path, settings: Settings | None = None) -> None:
        self.home = home
        self.settings = settings or _lake_settings(home)
        self._jobs: dict[str, UploadJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, owner: str, job_id: str) -> UploadJob | None:
        job = self._jobs.get(job_id)
        return job if job is not None and job.owner == owner else None

    def save(self, owner: str, files: list[tuple[str, bytes]]) -> UploadJob:
        """Write the files into a new job folder (nothing runs yet)."""
        if not files:
            raise UploadError("upload has no files; choose DICOM files or ZIP archives")
        total = sum(len(body) for _, body in files)
        if total > MAX_UPLOAD_BYTES:
            raise UploadError(f"upload is {total} bytes; at most {MAX_UPLOAD_BYTES} bytes per "
                              "upload (use `dicomlake ingest` for larger sets)")
        # Judged by content, never by name (UID-named files have "suffixes" like ".4"): the
        # ingest's own pre-check says at once what is neither DICOM nor an archive.
        for name, body in files:
            if sniff(body[:SNIFF_BYTES]) in (Content.OTHER, Content.EMPTY):
                raise UploadError(f"{name!r} is neither DICOM nor an archive (ZIP, tar, gzip): "
                                  f"its content starts with {body[:16]!r}")
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        job_id = f"{stamp}-{uuid.uuid4().hex[:8]}"
        folder = self.home / "uploads" / safe_name(owner) / job_id
        folder.mkdir(parents=True)
        names = []
        for name, body in files:
            target = folder / safe_name(name)
            while target.exists():
                target = target.with_name(f"{target.stem}_{uuid.uuid4().hex[:4]}"
                                          f"{target.suffix}")
            target.write_bytes(body)
            names.append(target.name)
        return self._register(owner, folder, names)

    def adopt(self, owner: str, folder: Path) -> UploadJob:
        """A job for a folder already written and made durable by its caller (DIMSE's
        received instances): the job's id is the folder's name, its files the folder's
        (hidden temporary files left out), and nothing runs until :meth:`start`.

        Raises:
            UploadError: the folder does not exist or holds no file.
        """
        if not folder.is_dir():
            raise UploadError(f"upload folder {folder} does not exist")
        names = sorted(p.name for p in folder.iterdir()
                       if p.is_file() and not p.name.startswith("."))
        if not names:
            raise UploadError(f"upload folder {folder} holds no file")
        return self._register(owner, folder, names)

    def _register(self, owner: str, folder: Path, names: list[str]) -> UploadJob:
        """The one place a job is made: its batch command is this module's child process."""
        command = [sys.executable, "-m", "dicomlake.extension.upload", str(folder)]
        job = UploadJob(id=folder.name, owner=owner, folder=folder, files=names,
                        command=command)
        self._jobs[job.id] = job
        return job

    def _stream_bootstrap(self) -> tuple[str | None, str]:
        """The broker to send to (None: no stream runs) and why, in words."""
        from dicomlake.streaming.producer import stream_bootstrap
        from dicomlake.streaming.settings import load_stream

        try:
            stream = load_stream(self.settings)
            bootstrap = stream_bootstrap(self.settings, stream)
        except Exception as exc:  # a bad [stream] setting or a missing extra: say so, use batch
            return None, (f"the stream's state cannot be read ({type(exc).__name__}: {exc}); "
                          "batch fallback: ingest + embed in a child process")
        if bootstrap is None:
            return None, ("no stream job runs (`dicomlake stream start` starts one); batch "
                          "fallback: ingest + embed in a child process")
        return bootstrap, (f"the stream job runs: one record per image to topic "
                           f"{stream.topic!r} at {bootstrap}")

    async def start(self, job: UploadJob) -> None:
        """Choose the way in (the stream when its job runs, else the batch fallback) and
        run it in the background; ``job.path`` says which, before this returns."""
        bootstrap, job.path_reason = await asyncio.to_thread(self._stream_bootstrap)
        if bootstrap is not None:
            job.path = "stream"
            job.command = ["dicomlake", "upload", str(job.folder)]
            work = self._stream(job, bootstrap)
        else:
            job.path = "batch"
            work = self._run(job)
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stream(self, job: UploadJob, bootstrap: str) -> None:
        """Send the folder through the upload producer; record what the broker confirmed."""
        from dicomlake.streaming.producer import Uploader, summarize

        # Records are named <user>/<job>/<file>[!/<member>] (the rows' ``member``: who
        # uploaded what); the response names inputs within the upload, as ``files`` does.
        root, prefix = job.folder.parent.parent, f"{job.folder.parent.name}/{job.id}/"

        def send() -> list[Any]:
            with Uploader(self.settings, bootstrap=bootstrap) as up:
                return up.upload([job.folder], relative_to=root)

        try:
            deliveries = await asyncio.to_thread(send)
        except Exception as exc:  # no producer at all (broker gone since the check)
            job.output.append(f"the upload stream at {bootstrap} cannot be reached: "
                              f"{type(exc).__name__}: {exc}")
            job.returncode, job.state = 1, "FAILED"
            return
        for d in deliveries:
            status = "not_sent" if d.rejected else "failed" if d.failed else "sent"
            name = d.name.removeprefix(prefix)
            job.deliveries.append({"name": name, "status": status, "size": d.size,
                                   "sha256": d.sha256, "partition": d.partition,
                                   "offset": d.offset, "kind": d.kind, "error": d.error})
            if status != "sent":
                job.output.append(f"{status.replace('_', ' ')} {name}: "
                                  f"{d.kind + ': ' if d.kind else ''}{d.error}"[-500:])
        job.summary = {"path": "stream", **summarize(deliveries)}
        failed = job.summary["failed"]
        job.returncode, job.state = (1, "FAILED") if failed else (0, "FINISHED")
        if not failed:  # every image is in the broker (large ones in the lake): no copy kept
            shutil.rmtree(job.folder, ignore_errors=True)

    async def _run(self, job: UploadJob) -> None:
        env = {**os.environ, "DICOMLAKE_HOME": str(self.home)}
        proc = await asyncio.create_subprocess_exec(
            *job.command, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line.startswith("DICOMLAKE_UPLOAD_RESULT "):
                job.summary = json.loads(line.split(" ", 1)[1])
            elif line:
                job.output.append(line[-500:])
        job.returncode = await proc.wait()
        if job.summary is not None:
            job.summary = {"path": "batch", **job.summary}
        job.state = "FINISHED" if job.returncode == 0 and job.summary else "FAILED"


def main(folder: str) -> int:
    """Child process: ingest ``folder`` and embed the new images; print a JSON summary."""
    from dicomlake.catalog.ingest import ingest
    from dicomlake.catalog.warehouse import Warehouse
    from dicomlake.console import start_session

    settings, spark = start_session()
    summary: dict[str, Any] = {}
    try:
        result = ingest(spark, Warehouse(settings.warehouse_path), [folder])
        summary.update(files_seen=result.files_seen, rows_written=result.rows_written,
                       errors_recorded=result.errors_recorded,
                       error_kinds=dict(result.error_kinds))
        try:
            from dicomlake.udfs.pipeline import embed
            from dicomlake.udfs.settings import load_similarity

            embedded = embed(spark, settings, load_similarity(settings))
            summary.update(embedded=embedded.embeddings, pixel_errors=embedded.pixel_errors)
        except ImportError as exc:  # similarity extra not installed: ingest still counts
            summary.update(embedded=0, embed_error=f"similarity search unavailable: {exc}")
        except Exception as exc:
            summary.update(embedded=0, embed_error=str(exc).split("\n", 1)[0])
    finally:
        spark.stop()
    print("DICOMLAKE_UPLOAD_RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
