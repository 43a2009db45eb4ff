"""Start and stop Google's Bigtable emulator: a real wide-column server with the HBase data
model, reached through ``google-cloud-happybase``, for the HBase code-store tests.

It lives with the tests, not in the package: a user points ``[similarity.hbase]`` at a real
HBase or Bigtable, and the emulator binary only exists on machines with the Debian package.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/bigtable-emulator/cbtemulator")


def emulator_binary() -> Path | None:
    """The ``cbtemulator`` binary, or None when the machine has none."""
    if EMULATOR.is_file():
        return EMULATOR
    found = shutil.which("cbtemulator")
    return Path(found) if found else None


def free_port() -> int:
    """A port free on 127.0.0.1 now (also used to name an address where nothing listens)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class BigtableEmulator:
    """A running emulator; use as a context manager so it is always stopped."""

    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> BigtableEmulator:
        binary = emulator_binary()
        if binary is None:
            raise FileNotFoundError(
                "Bigtable emulator not found (cbtemulator, Debian package "
                "google-cloud-cli-bigtable-emulator); install it or use a real HBase")
        self.port = self.port or free_port()
        self.process = subprocess.Popen([str(binary), "-host", "127.0.0.1", "-port",
                                         str(self.port)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Bigtable emulator did not listen on {self.address} within 10 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> BigtableEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
