"""Scale benchmark: does ingest cost grow with the new work, and not with the lake?

The seed's job is 107,000 files in 1,412 ZIPs, and lakes only grow, so two things must hold
beyond raw speed: time per file stays flat as the job grows, and an ingest into a big lake
costs what the same ingest costs into an empty one. Every figure comes from ``dicomlake
ingest`` run as the CLI runs it, in a fresh process (see :func:`dicomlake.bench.ingest.cli_ingest`:
wall time minus the Spark start the CLI reports), on archives shaped like the seed's (76
members per ZIP, real scanners' header mix) with small pixel matrices: the header work is
what counts, and small images keep a 100k pool on a laptop's disk.

Keys:

* ``fixed_seconds``: a fresh ingest of one archive, i.e. the per-run start-up plus 76 files
  (slightly more than the start-up alone, so the exponent below errs towards growth).
* ``files``, ``seconds``, ``files_per_core_second``: one fresh lake per size (files over time
  beyond Spark start, per core).
* ``growth_exponent``: least-squares slope of log(seconds - fixed_seconds) against
  log(files); 1 is linear (target <= 1.05).
* ``noop_reingest_seconds``: the largest ingest again, unchanged; ``noop_files_read`` must be
  0 (every source skipped by its fingerprint, no member opened).
* ``append_1k_seconds`` into the largest lake vs ``append_1k_empty_seconds`` into an empty
  one (the same archives, ``append_files`` files), and ``append_ratio`` (target <= 1.5).
* ``spark_ready_seconds``: the start-up the CLI reported for each step; lake registration
  happens inside it, so growth there shows here rather than in the figures above.
* ``time_lines``: each step's own ``time:`` line (where the CLI prints its stages: plan,
  read+write, commit, summaries), a profile of where each step's time went.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicomlake.bench.ingest import (
    SEED_FILES_PER_ARCHIVE,
    CliRun,
    cli_ingest,
    fit,
    fresh_ingest,
    load_average,
    seed_archives,
    spark_cores,
)


def _checked(run: CliRun, files: int, what: str) -> CliRun:
    if run.files_seen != files:
        raise RuntimeError(f"bench scale: {what} saw {run.files_seen} files, not {files}")
    return run


def growth_exponent(points: Sequence[tuple[int, float]], fixed: float) -> float | None:
    """Slope of log(seconds - fixed) against log(files); None when a size took no longer
    than the fixed cost (noise larger than the work: use larger sizes)."""
    logs = [(math.log(n), math.log(t - fixed)) for n, t in points if t > fixed]
    if len(logs) < 2 or len(logs) < len(points):
        return None
    return round(fit(logs)[1], 3)


def run(*, sizes: Sequence[int] = (1000, 10_000), append_files: int = 1000,
        files_per_archive: int = SEED_FILES_PER_ARCHIVE, pixels: int = 64) -> dict[str, Any]:
    """Fresh lakes at each size, then a no-op re-ingest and an append on the largest, and
    the same append into an empty lake. A size becomes whole archives (at least one)."""
    load_start = load_average()
    counts = sorted({max(1, round(n / files_per_archive)) for n in sizes})
    if len(counts) < 2:
        raise ValueError("bench scale needs two sizes that differ by whole archives")
    extra = max(1, round(append_files / files_per_archive))
    pool = seed_archives(counts[-1] + extra, files_per_archive=files_per_archive,
                         pixels=pixels)
    appended = pool[counts[-1]:]
    cores = spark_cores()
    ready: dict[str, float] = {}
    lines: dict[str, str] = {}

    def record(step: str, got: CliRun) -> CliRun:
        ready[step], lines[step] = got.spark_ready_seconds, got.time_line
        return got

    one = record("fixed", _checked(fresh_ingest(pool[:1]), files_per_archive, "one archive"))
    seconds: list[float] = []
    for count in counts[:-1]:
        got = _checked(fresh_ingest(pool[:count]), count * files_per_archive, "ingest")
        seconds.append(record(str(count * files_per_archive), got).seconds)
    largest = counts[-1] * files_per_archive
    with tempfile.TemporaryDirectory(prefix="dicomlake-bench-home-") as tmp:
        home = Path(tmp)
        big = _checked(cli_ingest(pool[:counts[-1]], home), largest, "ingest")
        seconds.append(record(str(largest), big).seconds)
        noop = record("noop", cli_ingest(pool[:counts[-1]], home))
        append = record("append", _checked(cli_ingest(appended, home),
                                           extra * files_per_archive, "append"))
    empty = record("append_empty", _checked(fresh_ingest(appended),
                                            extra * files_per_archive, "append (empty)"))

    files = [c * files_per_archive for c in counts]
    return {
        "cores": cores,
        "files_per_archive": files_per_archive,
        "pixels": pixels,
        "fixed_seconds": round(one.seconds, 2),
        "files": files,
        "seconds": [round(s, 2) for s in seconds],
        "files_per_core_second": [round(n / s / cores, 1) if s > 0 else None
                                  for n, s in zip(files, seconds, strict=True)],
        "growth_exponent": growth_exponent(list(zip(files, seconds, strict=True)),
                                           one.seconds),
        "noop_reingest_seconds": round(noop.seconds, 2),
        "noop_files_read": noop.files_seen,
        "noop_sources_skipped": noop.sources_skipped,
        "append_files": extra * files_per_archive,
        "append_1k_seconds": round(append.seconds, 2),
        "append_1k_empty_seconds": round(empty.seconds, 2),
        "append_ratio": round(append.seconds / empty.seconds, 2) if empty.seconds > 0 else None,
        "spark_ready_seconds": ready,
        "time_lines": lines,
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }
