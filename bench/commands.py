"""``dicomlake bench <name> [--json]``: benchmarks that compare against a baseline in the
same run and print one JSON object (ratios matter more than absolute times)."""

from __future__ import annotations

import json

import click

from dicomlake.bench import ingest as ingest_bench


def emit(result: dict[str, object], as_json: bool) -> None:
    """Print a benchmark result: one JSON object, or aligned ``key: value`` lines."""
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    width = max(len(k) for k in result)
    for key, value in result.items():
        shown = f"{value:.3f}" if isinstance(value, float) else value
        click.echo(f"{key:<{width}}  {shown}")


@click.group()
def bench() -> None:
    """Run a benchmark (each compares with a baseline in the same run)."""


@bench.command("ingest")
@click.option("--files", default=2000, show_default=True, help="DICOM files in the sample.")
@click.option("--files-per-archive", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def ingest_cmd(files: int, files_per_archive: int, as_json: bool) -> None:
    """Header reading through Spark vs the zipdcm and unzip-to-temp methods."""
    emit(ingest_bench.run(files=files, files_per_archive=files_per_archive), as_json)


COMMANDS = [bench]
