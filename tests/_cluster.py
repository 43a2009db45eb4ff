"""Real Spark processes for the cluster tests, started from the pyspark package.

The wheel ships ``bin/spark-class`` and ``bin/spark-submit`` but no ``sbin/`` scripts, so the
standalone master, its worker and the Spark Connect server are started here in the
foreground, each in its own process group: stopping a group also ends what it started (the
worker's executors and their Python workers). Master and worker share this machine's disk,
as a cluster shares NFS or object storage, so the lake's paths mean the same files everywhere.

The dicomlake commands themselves run in a separate driver process
(:func:`run_pipeline_process`): one process holds one SparkContext, and a Spark Connect
client switches pyspark into Connect mode for the whole process, so neither may share the
test run's own session.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyspark
from _bigtable import free_port

SPARK_HOME = Path(pyspark.__file__).parent
"""The pip package is a complete Spark distribution (jars, bin/) without sbin/."""

READY_SECONDS = 240.0
"""How long a JVM may take to come up on a loaded two-core machine."""


def spark_env(**extra: str) -> dict[str, str]:
    """The environment for every Spark process here: loopback only, this interpreter for
    Python workers, and small daemons (master and worker need far less than their 1 GiB)."""
    env = dict(os.environ)
    env.update(SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP="127.0.0.1",
               PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               SPARK_DAEMON_MEMORY="512m", **extra)
    return env


@dataclass
class SparkProcess:
    """One JVM started in its own process group, logging to ``log``."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def check_alive(self) -> None:
        """Fail with the end of its log when the process has already exited."""
        if self.process.poll() is not None:
            tail = "\n".join(self.log_text().splitlines()[-30:])
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")

    def stop(self) -> None:
        """Stop the whole process group: TERM, then KILL whatever is left after 20 s."""
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if self.process.poll() is not None and not _group_alive(self.process.pid):
                    return
                time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _start(name: str, argv: list[str], log: Path, env: dict[str, str]) -> SparkProcess:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=log.parent, start_new_session=True)
    return SparkProcess(name, process, log)


def _wait(what: str, ready: Callable[[], bool], processes: list[SparkProcess]) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        for p in processes:
            p.check_alive()
        if ready():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {READY_SECONDS:.0f} s")


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


@dataclass
class StandaloneCluster:
    """A standalone master and one worker; ``url`` is what ``spark.master`` names."""

    url: str
    work_dir: Path
    processes: list[SparkProcess] = field(default_factory=list)

    def stop(self) -> None:
        """Worker first (it kills its executors), then the master."""
        for p in reversed(self.processes):
            p.stop()


def start_standalone(root: Path, *, cores: int = 2, memory: str = "2g") -> StandaloneCluster:
    """Start a master and a worker with ``cores`` and ``memory``; return once the worker is
    registered with the master. The caller must :meth:`StandaloneCluster.stop` it."""
    port = free_port()
    cluster = StandaloneCluster(f"spark://127.0.0.1:{port}", root / "work")
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    try:
        master = _start("spark master", [
            spark_class, "org.apache.spark.deploy.master.Master",
            "--host", "127.0.0.1", "--port", str(port), "--webui-port", "0"],
            root / "master" / "master.log", spark_env())
        cluster.processes.append(master)
        _wait("spark master", lambda: _listening(port), [master])
        worker = _start("spark worker", [
            spark_class, "org.apache.spark.deploy.worker.Worker", cluster.url,
            "--host", "127.0.0.1", "--cores", str(cores), "--memory", memory,
            "--webui-port", "0", "--work-dir", str(cluster.work_dir)],
            root / "worker" / "worker.log", spark_env())
        cluster.processes.append(worker)
        _wait("spark worker registration",
              lambda: "Successfully registered with master" in worker.log_text(),
              [master, worker])
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class ConnectServer:
    """A Spark Connect server; ``url`` is what ``spark.master`` names (``sc://``)."""

    url: str
    process: SparkProcess

    def stop(self) -> None:
        self.process.stop()


def start_connect_server(root: Path, *, master: str = "local[2]",
                         driver_memory: str = "1500m") -> ConnectServer:
    """Start the Connect server shipped in the pyspark package (its own driver on ``master``)
    and return once its gRPC port listens. The caller must :meth:`ConnectServer.stop` it."""
    port = free_port()
    server = _start("spark connect server", [
        str(SPARK_HOME / "bin" / "spark-submit"), "--master", master,
        "--driver-memory", driver_memory,
        "--conf", f"spark.connect.grpc.binding.port={port}",
        "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
        "--conf", "spark.ui.enabled=false",
        "--conf", "spark.sql.shuffle.partitions=4",
        "--class", "org.apache.spark.sql.connect.service.SparkConnectServer", "spark-internal"],
        root / "connect" / "connect.log", spark_env())
    try:
        _wait("spark connect server", lambda: _listening(port), [server])
    except BaseException:
        server.stop()
        raise
    return ConnectServer(f"sc://127.0.0.1:{port}", server)


def run_pipeline_process(master: str, home: Path, archives: list[Path],
                         timeout: float = 400.0) -> dict[str, object]:
    """Run :func:`pipeline` in a fresh driver process against ``master`` and return its
    report. The settings come from the environment, as for the CLI."""
    workdir = home / "driver"
    workdir.mkdir(parents=True, exist_ok=True)
    env = spark_env(DICOMLAKE_HOME=str(home), DICOMLAKE_SPARK_MASTER=master,
                    PYTHONPATH=str(Path(__file__).parent))
    env.pop("DICOMLAKE_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-c", "import sys, _cluster; _cluster.pipeline(sys.argv[1:])",
         *map(str, archives)],
        env=env, cwd=workdir, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"driver process failed ({done.returncode}):\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def pipeline(archives: list[str]) -> None:
    """Ingest ``archives``, embed them and search one image with ``image_knn`` in ONE
    session, then print a JSON report (the driver side of :func:`run_pipeline_process`)."""
    from dicomlake.catalog.ingest import ingest
    from dicomlake.catalog.warehouse import Warehouse
    from dicomlake.config import load_settings
    from dicomlake.session import build_session, is_connect
    from dicomlake.udfs import load_similarity
    from dicomlake.udfs.pipeline import embed

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    settings = load_settings()
    spark = build_session(settings)
    seconds["session"] = time.perf_counter() - started
    connect = is_connect(spark)

    mark = time.perf_counter()
    ingested = ingest(spark, Warehouse(settings.warehouse_path), archives)
    seconds["ingest"] = time.perf_counter() - mark

    mark = time.perf_counter()
    embedded = embed(spark, settings, load_similarity(settings))
    seconds["embed"] = time.perf_counter() - mark

    mark = time.perf_counter()
    uid = spark.sql("SELECT min(sop_instance_uid) AS uid FROM dicom.instances").first()["uid"]
    k = spark.table("dicom.instances").count()
    hits = spark.sql(f"SELECT rank, sop_instance_uid, distance FROM image_knn("
                     f"query => '{uid}', k => {k}) ORDER BY rank").collect()
    seconds["knn"] = time.perf_counter() - mark

    report = {
        "connect": connect,
        "master": settings.spark.master,
        "application_id": None if connect else spark.sparkContext.applicationId,
        "ingest": {"planned": ingested.files_planned, "seen": ingested.files_seen,
                   "rows": ingested.rows_written, "errors": ingested.errors_recorded,
                   "balanced": ingested.balanced},
        "embed": {"instances": embedded.instances, "embeddings": embedded.embeddings,
                  "pixel_errors": embedded.pixel_errors, "codes": embedded.codes_written,
                  "trained": embedded.trained},
        "query": uid,
        "hits": [[r["rank"], r["sop_instance_uid"], r["distance"]] for r in hits],
        "seconds": {name: round(value, 1) for name, value in seconds.items()},
    }
    print(json.dumps(report))
    spark.stop()
