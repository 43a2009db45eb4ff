"""An Orthanc server of our own for baseline measurements: the peer DICOMweb server.

Orthanc 1.10 with its DICOMweb plugin (Debian ``orthanc`` and ``orthanc-dicomweb``) is what
the PACS world compares against, so ``dicomlake bench dicomweb`` loads the same instances into
one and measures it with the same client. :func:`find_orthanc` says why not when either
package is missing (the bench then reports null figures with that reason, never estimates).

:class:`OrthancServer` never touches the system service or ``/etc/orthanc``: it writes its
own configuration into a temporary folder that also holds the storage and the SQLite index,
and removes it on exit. What the configuration chooses, and why:

* Loopback only, as far as 1.10 allows: its HTTP server has no bind-address option (it
  listens on every interface), so ``RemoteAccessAllowed`` is false (Orthanc answers only
  clients on the loopback address) and the port is a free one picked on 127.0.0.1. The DICOM
  server is disabled (``DicomServerEnabled`` false): nothing here speaks DIMSE to it, and a
  listener that cannot be bound to loopback is better not opened at all. WebDAV and Orthanc
  Explorer are off for the same reason. Authentication is off, as on our side the client's
  credentials cost one header.
* Fair to Orthanc: only the DICOMweb plugin is loaded; ``StorageCompression`` and
  ``HttpCompressionEnabled`` are off (our server compresses nothing, and gzip on pixel data
  costs viewers most of their frame rate); keep-alive and ``TcpNoDelay`` are on, as they are
  by default; everything else that governs search and retrieval (``StorageAccessOnFind``,
  the storage cache) keeps Orthanc's own default, the configuration its published figures
  come from. ``SyncStorageArea`` is off: it only slows the loading, which is not measured.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["OrthancInstall", "OrthancServer", "find_orthanc"]

_BINARY_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")
"""Debian installs ``Orthanc`` in /usr/sbin, which is not on every user's PATH."""
_PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                 "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                 "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so")
"""Where Debian's ``orthanc-dicomweb`` (and a ``make install`` from source) put the plugin."""
DICOMWEB_ROOT = "/dicom-web"


@dataclass(frozen=True)
class OrthancInstall:
    """The two files a DICOMweb-serving Orthanc needs."""

    binary: Path
    dicomweb_plugin: Path


def find_orthanc() -> OrthancInstall | str:
    """The installed Orthanc and DICOMweb plugin, or the reason they cannot be used (a
    sentence naming the missing package), so callers can report it instead of a figure."""
    binary = shutil.which("Orthanc") or next(
        (str(Path(d) / "Orthanc") for d in _BINARY_DIRS
         if os.access(Path(d) / "Orthanc", os.X_OK)), None)
    if binary is None:
        return ("Orthanc is not installed (no Orthanc binary on PATH or in /usr/sbin); "
                "install it with `apt-get install orthanc orthanc-dicomweb`")
    plugin = next((p for pattern in _PLUGIN_GLOBS for p in sorted(glob.glob(pattern))), None)
    if plugin is None:
        return ("Orthanc's DICOMweb plugin is not installed (no libOrthancDicomWeb.so under "
                "/usr/share/orthanc/plugins or /usr/lib/orthanc); install it with "
                "`apt-get install orthanc-dicomweb`")
    return OrthancInstall(Path(binary), Path(plugin))


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OrthancServer:
    """A private Orthanc process on a free loopback port; a context manager that stops it
    and deletes its storage whatever happens inside the block.

    ``url`` is the server's base URL; its DICOMweb root is ``url + DICOMWEB_ROOT``.
    """

    def __init__(self, install: OrthancInstall, *, startup_timeout_s: float = 60.0) -> None:
        self.install = install
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def folder(self) -> Path | None:
        """The private folder (configuration, storage, index, log) while running; it is
        deleted on stop, so nothing of a run outlives it."""
        return None if self._tmp is None else Path(self._tmp.name)

    def _config(self, folder: Path) -> dict[str, object]:
        storage = folder / "storage"
        return {
            "Name": "dicomlake-bench",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [str(self.install.dicomweb_plugin)],
            "HttpServerEnabled": True,
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpCompressionEnabled": False,
            "KeepAlive": True,
            "TcpNoDelay": True,
            "DicomServerEnabled": False,
            "WebDavEnabled": False,
            "OrthancExplorerEnabled": False,
            "SyncStorageArea": False,
            "SaveJobs": False,
            "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT + "/", "EnableWado": False,
                         "Host": f"127.0.0.1:{self.port}", "Ssl": False},
        }

    def start(self) -> OrthancServer:
        """Start Orthanc and wait until ``/system`` answers with the DICOMweb plugin loaded.

        Raises:
            RuntimeError: Orthanc exited, did not answer in ``startup_timeout_s``, or came up
                without its DICOMweb plugin (the message holds the end of its log).
        """
        self._tmp = tempfile.TemporaryDirectory(prefix="dicomlake-orthanc-")
        try:
            self._start(Path(self._tmp.name))
        except BaseException:
            self.stop()  # a context manager's exit never runs when its entry fails
            raise
        return self

    def _start(self, folder: Path) -> None:
        self.port = _free_loopback_port()
        config = folder / "orthanc.json"
        config.write_text(json.dumps(self._config(folder), indent=2))
        self._log = folder / "orthanc.log"
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(
                [str(self.install.binary), str(config)],
                stdout=log, stderr=subprocess.STDOUT, cwd=folder)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._process.returncode} at start: "
                                   f"{self._log_tail()}")
            try:
                self.get_json("/system")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not answer /system on port {self.port} "
                                       f"within {self.startup_timeout_s:.0f} s: "
                                       f"{self._log_tail()}") from None
                time.sleep(0.1)
        plugins = self.get_json("/plugins")
        if "dicom-web" not in plugins:
            raise RuntimeError(f"Orthanc started without its DICOMweb plugin "
                               f"({self.install.dicomweb_plugin}); loaded: {plugins}; "
                               f"{self._log_tail()}")

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 30 s) and delete its storage."""
        process, self._process = self._process, None
        try:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=30)
        finally:
            tmp, self._tmp = self._tmp, None
            if tmp is not None:
                tmp.cleanup()

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _log_tail(self) -> str:
        if self._log is None or not self._log.exists():
            return "(no log)"
        return self._log.read_text(errors="replace")[-2000:]

    def _connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def get_json(self, path: str) -> Any:
        """GET ``path`` (an Orthanc REST path) and return its JSON body.

        Raises:
            OSError: the server cannot be reached.
            RuntimeError: it answered with another status than 200.
        """
        conn = self._connection()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(f"Orthanc GET {path}: {response.status} {body[:300]!r}")
        return json.loads(body)

    def load(self, files: Iterable[bytes]) -> int:
        """Store each DICOM file's bytes (REST ``POST /instances``, one keep-alive
        connection) and return how many distinct instances Orthanc now holds.

        Raises:
            RuntimeError: Orthanc refused a file (the message says which, by position).
        """
        conn = self._connection()
        try:
            for n, data in enumerate(files):
                conn.request("POST", "/instances", body=data,
                             headers={"Content-Type": "application/dicom"})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"Orthanc refused file {n} ({len(data)} bytes): "
                                       f"{response.status} {body[:300]!r}")
        finally:
            conn.close()
        return int(self.get_json("/statistics")["CountInstances"])
