"""The PyFlink job: ``imageupload`` -> Delta tables and PQ codes, run by ``dicomlake stream``.

Runs in ``.venv-flink`` (``python -m dicomlake.streaming.job --args-file ...``), never in the
Spark venv (apache-flink pins pyarrow<17; pyspark 4.3 needs >=18).

Source: no Kafka connector jar can be installed here and a Python source cannot be written,
so a checkpointed tick source drives the job (FACTS.md): a Table API ``datagen`` table emits
ticks keyed by shard; on each tick a :class:`KeyedProcessFunction` polls its shard's Kafka
partitions with kafka-python for a moment and keeps the next offset of every partition in
Flink ``ValueState``, which checkpoints snapshot. On restart from a checkpoint the offsets
come back from state; the Delta transaction ids in :mod:`~dicomlake.streaming.processor`
drop anything the lake already has, so replays add no duplicates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pyflink.common import Configuration, Types
from pyflink.datastream import KeyedProcessFunction, RuntimeContext, StreamExecutionEnvironment
from pyflink.datastream.state import ValueStateDescriptor
from pyflink.table import StreamTableEnvironment

from dicomlake.streaming.settings import StreamSettings


class UploadFunction(KeyedProcessFunction):
    """Per shard: poll Kafka, hand the records to the lake writer, remember offsets."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args

    def open(self, runtime_context: RuntimeContext) -> None:
        from kafka import KafkaConsumer, KafkaProducer

        from dicomlake.streaming.processor import LakeWriter

        a = self.args
        self.stream = StreamSettings.from_json(a["stream"])
        self.state_dir = Path(a["state_dir"])
        self.offsets = runtime_context.get_state(
            ValueStateDescriptor("offsets", Types.PICKLED_BYTE_ARRAY()))
        fetch = self.stream.inline_max_bytes + (1 << 20)
        # A fetch finding nothing new waits at the broker up to fetch_max_wait_ms, and Tansu
        # answers only when that wait ends, not when a record arrives (measured: 500 ms
        # default -> p50 177 ms / max 409 ms from send to poll; 50 ms -> 19 / 37 ms). A record
        # arriving during the wait is therefore late by up to the wait: keep it within a tick.
        self.consumer = KafkaConsumer(
            bootstrap_servers=a["bootstrap"], enable_auto_commit=False, group_id=None,
            auto_offset_reset="earliest", max_partition_fetch_bytes=fetch,
            fetch_max_bytes=max(fetch, 52428800), client_id="dicomlake-stream",
            fetch_max_wait_ms=max(10, min(self.stream.tick_ms // 2, 100)))
        dead = KafkaProducer(bootstrap_servers=a["bootstrap"], acks="all",
                             max_request_size=fetch, client_id="dicomlake-dead-letter")
        self.writer = LakeWriter(a["home"], a["warehouse"], self.stream, a["epoch"], dead)
        self.writer.codebook()
        self.shards = self.stream.parallelism
        self.epoch = a["epoch"]
        self.ticks = 0

    def close(self) -> None:
        self.consumer.close()

    def _partitions(self, shard: int) -> list[int]:
        return [p for p in range(self.stream.partitions) if p % self.shards == shard]

    def process_element(self, value: Any, ctx: KeyedProcessFunction.Context) -> Any:
        from kafka import TopicPartition

        from dicomlake.streaming.processor import Record

        shard = int(value[0])
        parts = self._partitions(shard)
        saved = self.offsets.value()
        # offsets of another broker life (the embedded broker restarted empty) mean nothing
        offsets: dict[int, int] = (saved["offsets"] if saved and saved["epoch"] == self.epoch
                                   else self.writer.start_offsets(parts))
        tps = {p: TopicPartition(self.stream.topic, p) for p in parts}
        if set(self.consumer.assignment()) != set(tps.values()):
            self.consumer.assign(list(tps.values()))
        for p, tp in tps.items():
            if self.consumer.position(tp) != offsets.get(p, 0):
                self.consumer.seek(tp, offsets.get(p, 0))
        polled = self.consumer.poll(timeout_ms=50,
                                    max_records=self.stream.max_records * len(parts))
        records = [Record(m.partition, m.offset, m.value, list(m.headers or []), m.timestamp)
                   for batch in polled.values() for m in batch]
        records.sort(key=lambda r: (r.partition, r.offset))
        if records:
            offsets = {**offsets, **self.writer.process(records)}
        self.offsets.update({"epoch": self.epoch, "offsets": offsets})
        self.ticks += 1
        if records or self.ticks % 25 == 1:
            self.writer.write_status(self.state_dir, offsets, {"shard": shard,
                                                               "last_batch": len(records)})
        if records:
            yield f"shard {shard}: {len(records)} record(s), next offsets {offsets}"


def build(args: dict[str, Any]) -> StreamExecutionEnvironment:
    """The job graph (not yet executed)."""
    stream = StreamSettings.from_json(args["stream"])
    config = Configuration()
    checkpoints = Path(args["state_dir"]) / "checkpoints"
    config.set_string("execution.checkpointing.interval", f"{stream.checkpoint_interval_ms}ms")
    config.set_string("execution.checkpointing.dir", checkpoints.as_uri())
    config.set_string("execution.checkpointing.externalized-checkpoint-retention",
                      "RETAIN_ON_CANCELLATION")
    config.set_string("execution.checkpointing.num-retained", "2")
    # a tick waits in the bundle up to this long before the Python function sees it
    config.set_string("python.fn-execution.bundle.time", "50")
    if args.get("restore"):
        config.set_string("execution.state-recovery.path", args["restore"])
    if stream.jobmanager:
        host, _, port = stream.jobmanager.rpartition(":")
        config.set_string("execution.target", "remote")
        config.set_string("rest.address", host)
        config.set_string("rest.port", port)
    env = StreamExecutionEnvironment.get_execution_environment(config)
    env.set_python_executable(sys.executable)
    env.set_parallelism(stream.parallelism)
    t_env = StreamTableEnvironment.create(env)
    rate = max(1, round(stream.parallelism * 1000 / stream.tick_ms))
    t_env.execute_sql(
        "CREATE TEMPORARY TABLE ticks (shard INT) WITH ("
        f"'connector' = 'datagen', 'rows-per-second' = '{rate}', "
        f"'fields.shard.min' = '0', 'fields.shard.max' = '{stream.parallelism - 1}')")
    ticks = t_env.to_data_stream(t_env.from_path("ticks"))
    (ticks.key_by(lambda row: row[0], key_type=Types.INT())
          .process(UploadFunction(args), output_type=Types.STRING())
          .name("dicomlake-upload").print())
    return env


def latest_checkpoint(state_dir: str | os.PathLike[str]) -> str | None:
    """The newest completed checkpoint (a ``chk-N`` folder with ``_metadata``), if any."""
    root = Path(state_dir) / "checkpoints"
    done = sorted(root.glob("*/chk-*/_metadata"), key=lambda p: p.stat().st_mtime)
    return str(done[-1].parent) if done else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--args-file", required=True,
                        help="JSON written by `dicomlake stream start`")
    ns = parser.parse_args(argv)
    args = json.loads(Path(ns.args_file).read_text())
    args["restore"] = latest_checkpoint(args["state_dir"])
    print(f"dicomlake stream job starting at {time.strftime('%H:%M:%S')}; restore from "
          f"{args['restore'] or 'nothing (offsets from the Delta log)'}", flush=True)
    build(args).execute("dicomlake-stream")


if __name__ == "__main__":
    main()
