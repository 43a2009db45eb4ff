"""dcmtk's clients against a running `dicomlake dimse` (tests/test_dimse*.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any


def run_dcmtk(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """A dcmtk command with Nagle off (as the README tells users to push)."""
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "TCP_NODELAY": "1"}, check=False)


def findscu(server: Any, calling: str, keys: list[str], out: Path) -> list:
    """findscu (Study Root) with ``keys`` as AE ``calling``; the responses it extracted into
    ``out`` (emptied first), read by pydicom."""
    from pydicom import dcmread

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    host, port = server.address
    args = [a for k in keys for a in ("-k", k)]
    done = run_dcmtk("findscu", "-S", "-aec", server.config.ae_title, "-aet", calling, "-X",
                     "-od", str(out), *args, host, str(port))
    assert done.returncode == 0, done.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
