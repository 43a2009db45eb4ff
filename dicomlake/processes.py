"""Stopping the child processes a command (or a test) started."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from typing import Any


def stop_processes(procs: Sequence[subprocess.Popen[Any]], timeout: float) -> None:
    """SIGTERM every process still running (last started first), wait up to ``timeout``
    seconds for each, SIGKILL the ones that did not stop.

    All are signalled before any is waited for, so their clean shutdowns (audit flush,
    stream stop) overlap instead of queueing up.
    """
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
