"""Streaming settings: which Kafka, which topic, how the Flink job runs.

They live in the ``[stream]`` section of the same TOML file as the core settings
(``$DICOMLAKE_CONFIG`` or ``<home>/dicomlake.toml``), plus ``DICOMLAKE_KAFKA_BOOTSTRAP`` and
``DICOMLAKE_FLINK_PYTHON``; read once here and handed to the job as JSON::

    [stream]
    bootstrap_servers = "kafka-1:9092,kafka-2:9092"  # a real Kafka; empty: embedded Tansu
    topic = "imageupload"
    partitions = 9
    inline_max_bytes = 8388608    # larger files are stored in the lake, the message refers
    flink_python = "/opt/dicomlake/.venv-flink/bin/python"
    jobmanager = "flink-jm:8081"  # a Flink cluster (REST address); empty: local mini cluster
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dicomlake.config import Settings, load_section
from dicomlake.errors import ConfigError

BAD_MESSAGE = "bad_message"
"""``dicom.errors.error_kind`` for a message that is not a dicomlake upload (wrong schema)."""


def _default_flink_python(home: Path) -> str:
    """``.venv-flink`` beside a checkout (what ``make`` builds), else the one
    ``dicomlake stream setup`` builds under the lake's home (which may not exist yet: starting
    the stream then says how to build it)."""
    from dicomlake.streaming.flink_env import interpreter

    repo = Path(__file__).resolve().parent.parent
    candidate = repo / ".venv-flink" / "bin" / "python"
    return str(candidate) if candidate.exists() else str(interpreter(home))


@dataclass(frozen=True)
class StreamSettings:
    """Broker, topic and job settings (see the module docstring for the TOML form)."""

    bootstrap_servers: str = ""
    """Kafka bootstrap servers; empty starts the embedded Tansu broker on ``broker_port``."""
    broker_port: int = 0
    """Port of the embedded broker (0: any free port, recorded in the state folder)."""
    topic: str = "imageupload"
    partitions: int = 9
    dead_letter_topic: str = "imageupload.deadletter"
    inline_max_bytes: int = 8 << 20
    """Files up to this size travel inside the message; larger ones are stored in the lake."""
    max_image_bytes: int = 2 << 30
    """Uploads declaring more bytes than this are rejected (dead letter, ``too_large``)."""
    flink_python: str = ""
    """Interpreter with apache-flink (``.venv-flink``); never the Spark venv."""
    jobmanager: str = ""
    """``host:port`` of a Flink cluster's REST endpoint; empty runs a local mini cluster."""
    parallelism: int = 1
    checkpoint_interval_ms: int = 2000
    tick_ms: int = 100
    """How often each shard polls Kafka (the tick source's rate)."""
    max_records: int = 64
    """Messages taken per partition per tick (bounds the work between checkpoints)."""
    min_train: int = 64
    """Embeddings needed before the job trains the first PQ codebook itself."""

    def __post_init__(self) -> None:
        for name in ("partitions", "inline_max_bytes", "max_image_bytes", "parallelism",
                     "checkpoint_interval_ms", "tick_ms", "max_records", "min_train"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"dicomlake setting 'stream.{name}' must be > 0, got "
                                  f"{getattr(self, name)}")
        if not self.topic or self.topic == self.dead_letter_topic:
            raise ConfigError("dicomlake settings 'stream.topic' and 'stream.dead_letter_topic' "
                              "must be set and differ")

    @property
    def embedded(self) -> bool:
        """True when the project runs its own broker."""
        return not self.bootstrap_servers

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StreamSettings:
        return cls(**json.loads(text))


def load_stream(settings: Settings) -> StreamSettings:
    """Read ``[stream]`` from the config file and the environment; unknown keys and wrong
    types are errors naming the file and the key."""
    stream = load_section(settings, "stream", StreamSettings,
                          env={"bootstrap_servers": "DICOMLAKE_KAFKA_BOOTSTRAP",
                               "flink_python": "DICOMLAKE_FLINK_PYTHON"})
    if stream.flink_python:
        return stream
    return replace(stream, flink_python=_default_flink_python(settings.home))


def state_dir(settings: Settings) -> Path:
    """Where the broker address, pids, checkpoints and job status live."""
    return settings.home / "stream"


def uploads_dir(settings: Settings) -> Path:
    """Where uploaded images are stored in the lake (content-addressed, so replays overwrite
    a file with the same bytes)."""
    return settings.warehouse_path / "_uploads"
