"""Terminal helpers shared by the commands: starting Spark visibly, printing result tables."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

import click

from dicomlake.config import Settings, load_settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def start_session(settings: Settings | None = None, *, warm: Sequence[str] = (),
                  jobs_only: bool = False) -> tuple[Settings, SparkSession]:
    """Load settings and start Spark, telling the user why the first seconds are quiet
    (``warm`` and ``jobs_only``: see :func:`dicomlake.session.build_session`)."""
    from dicomlake.session import build_session

    settings = settings or load_settings()
    click.echo(f"Starting Spark ({settings.spark.master}); this takes ~15 s ...", err=True)
    started = time.perf_counter()
    spark = build_session(settings, warm=warm, jobs_only=jobs_only)
    click.echo(f"Spark ready in {time.perf_counter() - started:.1f} s; "
               f"warehouse {settings.warehouse_path}", err=True)
    return settings, spark


class StageBars:
    """Progress of a job in stages (e.g. an ingest's plan, read+write, commit, summaries).

    On a terminal, one bar per stage with files done, files/s and the time left (each bar
    stays when its stage ends, so the run leaves a record of every stage's rate). Elsewhere
    (logs, CI), one line per stage as it ends: a bar redrawn into a file is noise.
    """

    def __init__(self, *, file: IO[str] | None = None, bars: bool | None = None) -> None:
        self._file = file or sys.stderr
        self._bars = self._file.isatty() if bars is None else bars
        self._bar: Any = None
        self._name: str | None = None
        self._done = 0
        self._since = time.perf_counter()

    def stage(self, name: str, files: int) -> None:
        """A new stage starts (``files``: how many it will process; 0 if unknown)."""
        self.close()
        self._name, self._done, self._since = name, 0, time.perf_counter()
        if self._bars:
            from tqdm import tqdm

            self._bar = tqdm(total=files or None, unit="file", desc=f"{name:<10}",
                             file=self._file, leave=True, dynamic_ncols=True)

    def advance(self, files: int) -> None:
        """``files`` more are done in the current stage."""
        self._done += files
        if self._bar is not None:
            self._bar.update(files)

    def close(self) -> None:
        """End the current stage's display (the next stage, or the end of the job)."""
        if self._name is None:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            seconds = time.perf_counter() - self._since
            done = (f"{self._done} files in {seconds:.1f} s "
                    f"({self._done / seconds if seconds else 0.0:.0f} files/s)"
                    if self._done else f"{seconds:.1f} s")
            click.echo(f"{self._name}: {done}", file=self._file)
        self._name = None


def _cell(value: Any, width: int) -> str:
    text = "NULL" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
                 max_width: int = 48) -> str:
    """Rows as an aligned text table (what the SQL shell prints)."""
    cells = [[_cell(v, max_width) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "-+-".join("-" * w for w in widths)
    out = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)), line]
    out += [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(" " + o for o in out)


def error_summary(exc: BaseException) -> str:
    """The first meaningful line of an error (Spark's messages carry plans and stacks)."""
    text = str(exc).strip()
    return text.split("\n", 1)[0] if text else type(exc).__name__


def run_sql(spark: SparkSession, statement: str, *, limit: int = 50) -> str:
    """Run one statement and render up to ``limit`` rows."""
    df = spark.sql(statement)
    rows = df.limit(limit + 1).collect()
    more = len(rows) > limit
    text = format_table(df.columns, [tuple(r) for r in rows[:limit]])
    suffix = f"\n ({limit} rows shown; more exist)" if more else f"\n ({len(rows)} rows)"
    return text + suffix


def sql_shell(spark: SparkSession) -> None:
    """A small interactive SQL prompt: statements end with ``;``, ``exit`` or Ctrl-D quits."""
    try:
        import readline  # noqa: F401 - enables line editing and history for input()
    except ImportError:
        pass
    click.echo("dicomlake SQL (Spark SQL). End statements with ';'. Try: "
               "SELECT modality, count(*) FROM dicom.instances GROUP BY modality;")
    buffer: list[str] = []
    while True:
        try:
            line = input("dicomlake> " if not buffer else "        -> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        if not buffer and line.strip().lower() in ("exit", "quit", "\\q"):
            return
        buffer.append(line)
        text = "\n".join(buffer).strip()
        if not text.endswith(";"):
            continue
        buffer = []
        try:
            click.echo(run_sql(spark, text.rstrip(";")))
        except Exception as exc:  # the shell must survive bad SQL and show why
            click.echo(click.style(f"error: {error_summary(exc)}", fg="red"), err=True)
        sys.stdout.flush()
