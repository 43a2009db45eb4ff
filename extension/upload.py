"""Uploads from the dataset browser: files saved on the server, then ingested and embedded.

The streaming upload path does not exist yet, so an upload goes through the batch path the
CLI uses: the files land in ``<home>/uploads/<user>/<job>/`` and a child process
(``python -m dicomlake.extension.upload``) ingests that folder and embeds the new images, so
"find similar" works on them too. A child process, not the Jupyter server, owns the Spark
session: an upload must never stall or crash the notebook server. The SQL endpoint sees the
new rows on its next read (the Delta tables are shared through the warehouse folder).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomlake.catalog.preflight import SNIFF_BYTES, Content, sniff

MAX_UPLOAD_BYTES = 512 * 1024 * 1024
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class UploadError(ValueError):
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
    started: float = field(default_factory=time.monotonic)
    output: list[str] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    returncode: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "folder": str(self.folder),
                "files": self.files, "command": " ".join(self.command),
                "output": self.output[-30:], "summary": self.summary,
                "returncode": self.returncode,
                "elapsedSeconds": round(time.monotonic() - self.started, 1)}


class UploadManager:
    """Saves uploads and runs one ingest child process per upload."""

    def __init__(self, home: Path) -> None:
        self.home = home
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
        command = [sys.executable, "-m", "dicomlake.extension.upload", str(folder)]
        job = UploadJob(id=job_id, owner=owner, folder=folder, files=names, command=command)
        self._jobs[job_id] = job
        return job

    def start(self, job: UploadJob) -> None:
        """Run the ingest child process in the background."""
        task = asyncio.ensure_future(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
