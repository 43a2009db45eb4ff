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



@bench.command("knn")
@click.option("--codes", default=200_000, show_default=True, help="PQ codes to search.")
@click.option("--dim", default=128, show_default=True, help="Synthetic vector size.")
@click.option("--m", "m", default=16, show_default=True, help="PQ sub-spaces.")
@click.option("--queries", default=100, show_default=True)
@click.option("--no-sql", is_flag=True, help="Skip the Spark SQL latency part.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def knn_cmd(codes: int, dim: int, m: int, queries: int, no_sql: bool, as_json: bool) -> None:
    """Our ADC scan vs faiss IndexPQ, recall@10 with refine, image_knn SQL latency."""
    from dicomlake.bench import knn as knn_bench

    emit(knn_bench.run(codes=codes, dim=dim, m=m, queries=queries, sql=not no_sql), as_json)


@bench.command("embed")
@click.option("--files", default=400, show_default=True, help="Images (512x512 CT/MR).")
@click.option("--backend", type=click.Choice(["onnx", "tensorflow"]), default="onnx",
              show_default=True,
              help="Embedding model; VGG-16 (tensorflow) runs ~6 images/s: use --files 100.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def embed_cmd(files: int, backend: str, as_json: bool) -> None:
    """Embeddings through the Spark vectorized UDF vs the bare model."""
    from dicomlake.bench import embed as embed_bench

    emit(embed_bench.run(files=files, backend=backend), as_json)


@bench.command("retrieval")
@click.option("--bases", default=60, show_default=True, help="Distinct shipped images.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def retrieval_cmd(bases: int, as_json: bool) -> None:
    """precision@10 on near-duplicates of the shipped sample images."""
    from dicomlake.bench import retrieval as retrieval_bench

    emit(retrieval_bench.run(bases=bases), as_json)


@bench.command("serve")
@click.option("--queries", default=200, show_default=True, help="Metadata queries to time.")
@click.option("--rows", default=1_000_000, show_default=True, help="Rows in the streamed result.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def serve_cmd(queries: int, rows: int, as_json: bool) -> None:
    """Trino endpoint latency over direct Spark, and rows/s through the Python client."""
    from dicomlake.bench import serve as serve_bench

    emit(serve_bench.run(queries=queries, rows=rows), as_json)


@bench.command("stream")
@click.option("--images", default=100, show_default=True,
              help="Images uploaded one by one for the freshness figures.")
@click.option("--rate", default=4.0, show_default=True, help="Uploads per second.")
@click.option("--burst", default=100, show_default=True,
              help="Images uploaded at once for images_per_second.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def stream_cmd(images: int, rate: float, burst: int, as_json: bool) -> None:
    """Upload -> visible in dicom.instances and image_knn, through broker + Flink job."""
    from dicomlake.bench import stream as stream_bench

    emit(stream_bench.run(images=images, rate=rate, burst=burst), as_json)


COMMANDS = [bench]
