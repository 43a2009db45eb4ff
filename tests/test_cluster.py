"""ingest -> embed -> image_knn on a real Spark standalone cluster and over Spark Connect.

Both run the same driver code (:func:`_cluster.pipeline`) in a fresh process whose settings
come from ``DICOMLAKE_HOME`` / ``DICOMLAKE_SPARK_MASTER``, as the CLI's do: once against
``spark://`` (a master and a worker, each its own JVM; tasks run in the worker's executor)
and once against ``sc://`` (the Connect server from the pyspark package; this process has
no SparkContext at all). Inputs are tiny: the point is where the work runs, not how fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _cluster import (
    ConnectServer,
    StandaloneCluster,
    run_pipeline_process,
    start_connect_server,
    start_standalone,
)

from dicomlake.catalog.sample import Profile, make_sample

pytestmark = pytest.mark.slow

ARCHIVES, FILES = 2, 3


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two CT/MR archives of three files each (every file has pixels to embed)."""
    return make_sample(tmp_path_factory.mktemp("cluster-samples"), archives=ARCHIVES,
                       files=FILES, seed=12, profile=Profile.CTMR, workers=1)


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneCluster]:
    """A master and one 2-core worker, stopped (with their executors) after the module."""
    cluster = start_standalone(tmp_path_factory.mktemp("standalone"), cores=2, memory="2g")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def connect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConnectServer]:
    """A Spark Connect server (its own local[2] driver), stopped after the module."""
    server = start_connect_server(tmp_path_factory.mktemp("connect"))
    yield server
    server.stop()


def _check_pipeline(report: dict, files: int) -> None:
    """Every file ingested and embedded, each with a code, and image_knn finds the query
    image itself at the smallest distance among all images."""
    assert report["ingest"] == {"planned": files, "seen": files, "rows": files, "errors": 0,
                                "balanced": True}
    assert report["embed"] == {"instances": files, "embeddings": files, "pixel_errors": 0,
                               "codes": files, "trained": True}
    hits = report["hits"]
    assert [rank for rank, _, _ in hits] == list(range(1, files + 1))
    distances = [d for _, _, d in hits]
    assert distances == sorted(distances)
    own = [d for _, uid, d in hits if uid == report["query"]]
    assert own == [distances[0]]


def test_pipeline_on_standalone_cluster(standalone: StandaloneCluster, archives: list[Path],
                                        tmp_path: Path) -> None:
    report = run_pipeline_process(standalone.url, tmp_path / "home", archives)
    assert report["connect"] is False
    assert report["master"] == standalone.url
    _check_pipeline(report, ARCHIVES * FILES)
    # The tasks ran in an executor the worker launched for this application.
    executor_logs = list((standalone.work_dir / str(report["application_id"])).glob("*/stderr"))
    assert executor_logs, f"no executor of {report['application_id']} on the worker"
    print("standalone seconds:", report["seconds"])


def test_pipeline_over_spark_connect(connect_server: ConnectServer, archives: list[Path],
                                     tmp_path: Path) -> None:
    report = run_pipeline_process(connect_server.url, tmp_path / "home", archives)
    assert report["connect"] is True
    assert report["master"] == connect_server.url
    _check_pipeline(report, ARCHIVES * FILES)
    print("connect seconds:", report["seconds"])
