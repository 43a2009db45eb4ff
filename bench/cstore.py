"""C-STORE throughput: dcmtk's ``storescu`` pushing files to a running DIMSE SCP.

The figure PACS administrators compare (Orthanc 1.10 on this kind of machine: 265 files/s).
One ``storescu`` process sends every file over one association, as a modality or PACS
forwarding a study does; the clock covers the whole run (association, stores, release), so
what is measured is what the sender waits for. ``TCP_NODELAY=1`` is set for ``storescu``
(Debian's dcmtk leaves Nagle's algorithm on without it: 21 files/s instead of 265 in the same
trial) and the SCP sets it on its side too; without both, the figure measures Nagle's delays,
not the server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def cstore_files_per_second(files: Sequence[Path], *, host: str = "127.0.0.1",
                            port: int = 11112, ae_title: str = "DICOMLAKE",
                            calling_ae: str = "BENCHSCU", timeout_s: float = 600.0) -> float:
    """Files per second ``storescu`` stores at ``host:port`` (one association, every file).

    Raises:
        RuntimeError: ``storescu`` is not installed (Debian package ``dcmtk``), or it failed
            or reported an unsuccessful store (the rate would not be of stored files).
    """
    if not files:
        raise ValueError("cstore_files_per_second needs at least one file to send")
    storescu = shutil.which("storescu")
    if storescu is None:
        raise RuntimeError("storescu is not installed; install dcmtk (apt-get install dcmtk)")
    command = [storescu, "-aec", ae_title, "-aet", calling_ae, host, str(port),
               *(str(f) for f in files)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"storescu exited with {done.returncode} sending {len(files)} files "
                           f"to {ae_title}@{host}:{port}: {done.stderr.strip()[-2000:]}")
    return len(files) / elapsed
