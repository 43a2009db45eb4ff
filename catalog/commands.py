"""``dicomlake sample | ingest | tables | sql``: the catalog's commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from tqdm import tqdm

from dicomlake.console import StageBars, error_summary, run_sql, sql_shell, start_session

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from dicomlake.catalog.dicom_source import DicomDataSourceReader
    from dicomlake.catalog.ingest import IngestResult


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write the archives into.")
@click.option("--archives", default=8, show_default=True, help="Number of ZIP archives.")
@click.option("--files", default=50, show_default=True, help="DICOM files per archive.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same archives.")
@click.option("--profile", type=click.Choice(["ctmr", "mixed"]), default="mixed",
              show_default=True, help="ctmr: only 512x512 CT/MR; mixed: also compressed, "
              "multi-frame and small images.")
def sample(out: Path, archives: int, files: int, seed: int, profile: str) -> None:
    """Write realistic DICOM-in-ZIP sample archives (from pydicom's shipped images)."""
    # imported here: pydicom costs ~0.8 s, which every other command (ingest too) would pay
    from dicomlake.catalog.sample import Profile, make_sample

    with tqdm(total=archives * files, unit="file", desc="sample") as bar:
        paths = make_sample(out, archives=archives, files=files, seed=seed,
                            profile=Profile(profile), progress=bar.update)
    click.echo(f"wrote {len(paths)} archives ({archives * files} files) to {out}")


def print_ingest_summary(result: object) -> None:
    """The one-paragraph summary every ingest ends with, and where the time went."""
    from dicomlake.catalog.ingest import IngestResult

    assert isinstance(result, IngestResult)
    rate = result.files_seen / result.seconds if result.seconds else 0.0
    nested = result.files_seen - result.files_planned
    stages = ", ".join(f"{name} {seconds:.1f} s"
                       for name, seconds in result.stage_seconds.items())
    click.echo(
        f"sources: {result.sources} ({result.sources_skipped} unchanged, skipped)\n"
        f"files seen: {result.files_seen} = rows written: {result.rows_written} "
        f"+ errors recorded: {result.errors_recorded} "
        f"(of which skipped by rule: {result.skipped})"
        f"{f'; {nested} found inside nested archives' if nested > 0 else ''}\n"
        f"values kept as text: {result.warnings} (see: SELECT * FROM dicom.warnings)\n"
        f"time: {result.seconds:.1f} s ({rate:.0f} files/s){f': {stages}' if stages else ''}"
    )
    for problem in result.unaccounted:
        click.echo(f"MISMATCH: {problem} (the source changed during ingest?); run the ingest "
                   "again", err=True)
    if result.error_kinds:
        kinds = ", ".join(f"{k}: {v}" for k, v in result.error_kinds.items())
        click.echo(f"errors by kind: {kinds}  (see: SELECT * FROM dicom.errors)")


def run_ingest(spark: SparkSession, warehouse_path: Path, paths: tuple[str, ...],
               force: bool, *, register: bool = True,
               reader: type[DicomDataSourceReader] | None = None) -> IngestResult:
    """Ingest with a progress bar per stage (files/s, time left) and print the summary
    (``reader``: see :func:`dicomlake.catalog.ingest.ingest`; None: the ``dicom`` source's)."""
    from dicomlake.catalog.dicom_source import DicomDataSourceReader
    from dicomlake.catalog.ingest import ingest
    from dicomlake.catalog.warehouse import Warehouse

    bars = StageBars()
    try:
        result = ingest(spark, Warehouse(warehouse_path), paths, force=force, progress=bars,
                        register=register, reader=reader or DicomDataSourceReader)
    finally:
        bars.close()
    print_ingest_summary(result)
    return result


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Re-read sources even if already ingested.")
def ingest(paths: tuple[str, ...], force: bool) -> None:
    """Ingest ZIP archives, DICOM files, folders or globs into the dicom.* tables."""
    from dicomlake.catalog.ingest import WORKER_MODULES

    # the process ends after the ingest: nothing is queried by name in its session
    settings, spark = start_session(warm=WORKER_MODULES, jobs_only=True)
    result = run_ingest(spark, settings.warehouse_path, paths, force, register=False)
    if not result.balanced:
        sys.exit(1)


@click.command()
def tables() -> None:
    """List the lake's tables with their row counts."""
    from dicomlake.catalog.warehouse import Warehouse

    settings, spark = start_session()
    found = Warehouse(settings.warehouse_path).tables()
    if not found:
        click.echo(f"no tables yet in {settings.warehouse_path}; run `dicomlake ingest PATH`")
        return
    for schema, table in found:
        n = spark.table(f"{schema}.{table}").count()
        click.echo(f"{schema}.{table:<12} {n:>10} rows")


@click.command()
@click.option("-e", "--execute", "statements", multiple=True,
              help="Run this statement and exit (repeatable); without it, open a shell.")
@click.option("--limit", default=50, show_default=True, help="Rows to print per statement.")
def sql(statements: tuple[str, ...], limit: int) -> None:
    """Run Spark SQL against the lake, or open an interactive SQL shell."""
    _, spark = start_session()
    if not statements:
        sql_shell(spark)
        return
    from pyspark.errors import PySparkException

    for statement in statements:
        try:
            click.echo(run_sql(spark, statement, limit=limit))
        except PySparkException as exc:
            raise click.ClickException(error_summary(exc)) from exc


COMMANDS = [sample, ingest, tables, sql]
