"""``dicomlake demo``: the README's one command for a first look on embedded defaults.

Makes sample archives (once), ingests them (a re-run skips unchanged archives), prints the
tables and a few queries. From a terminal it then embeds the images and starts the SQL service
and JupyterLab with the dicomlake sidebar and dataset browser (``--no-lab``: the SQL shell).
"""

from __future__ import annotations

import sys

import click
from tqdm import tqdm

from dicomlake.catalog.commands import run_ingest
from dicomlake.catalog.sample import Profile, make_sample
from dicomlake.config import load_settings
from dicomlake.console import run_sql, sql_shell, start_session

DEMO_QUERIES = (
    "SHOW TABLES IN dicom",
    "SELECT modality, count(*) AS images, count(DISTINCT series_instance_uid) AS series "
    "FROM dicom.instances GROUP BY modality ORDER BY images DESC",
    "SELECT patient_name, study_date, study_description, modalities, instances "
    "FROM dicom.studies ORDER BY study_date DESC LIMIT 5",
    "SELECT error_kind, archive, member, error FROM dicom.errors LIMIT 5",
)


@click.command()
@click.option("--archives", default=8, show_default=True)
@click.option("--files", default=50, show_default=True, help="DICOM files per archive.")
@click.option("--no-shell", is_flag=True, help="Do not open the SQL shell at the end.")
@click.option("--lab/--no-lab", default=True, show_default=True,
              help="From a terminal, end by embedding the images and starting the SQL service "
                   "and JupyterLab with the dicomlake sidebar (`dicomlake lab`); --no-lab opens "
                   "the SQL shell instead.")
def demo(archives: int, files: int, no_shell: bool, lab: bool) -> None:
    """Sample archives -> ingest -> tables -> JupyterLab (or SQL shell), on embedded defaults."""
    settings = load_settings()
    samples = settings.home / "samples" / f"demo-{archives}x{files}"
    if len(list(samples.glob("*.zip"))) != archives:
        with tqdm(total=archives * files, unit="file", desc="sample") as bar:
            make_sample(samples, archives=archives, files=files, seed=0, profile=Profile.MIXED,
                        progress=bar.update)
    settings, spark = start_session(settings)
    run_ingest(spark, settings.warehouse_path, (str(samples),), False)
    for query in DEMO_QUERIES:
        click.echo(f"\n{query}")
        click.echo(run_sql(spark, query, limit=10))
    if lab and sys.stdin.isatty():
        from dicomlake.extension.lab import embed_new_images, run_lab

        embed_new_images(spark, settings)
        spark.stop()  # the SQL service starts its own session on the same lake
        sys.exit(run_lab(settings))
    if not no_shell and sys.stdin.isatty():
        sql_shell(spark)


COMMANDS = [demo]
