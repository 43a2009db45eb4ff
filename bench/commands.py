"""``dicomlake bench <name> [--json]``: benchmarks that compare against a baseline in the
same run and print one JSON object (ratios matter more than absolute times)."""

from __future__ import annotations

import json

import click


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


def _sizes(raw: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in raw.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) <= 0:
        raise click.BadParameter(f"{raw!r}: give positive file counts, e.g. 1000,10000")
    return sizes


@bench.command("ingest")
@click.option("--sizes", default="1000,10000", show_default=True,
              help="Files per end-to-end run, comma-separated (two or more sizes).")
@click.option("--files-per-archive", default=76, show_default=True,
              help="Members per ZIP (the seed's archives hold ~76).")
@click.option("--pixels", default=512, show_default=True, help="Image rows and columns.")
@click.option("--rounds", default=1, show_default=True,
              help="Fresh runs per size and reader; the best is kept.")
@click.option("--no-read", is_flag=True, help="Skip the read-only (noop sink) comparison.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def ingest_cmd(sizes: str, files_per_archive: int, pixels: int, rounds: int, no_read: bool,
               as_json: bool) -> None:
    """`dicomlake ingest` end to end vs the zipdcm method with the same writer, and the
    header read alone vs the zipdcm and unzip-to-temp methods."""
    from dicomlake.bench import ingest as ingest_bench

    emit(ingest_bench.run(sizes=_sizes(sizes), files_per_archive=files_per_archive,
                          pixels=pixels, rounds=rounds, read=not no_read), as_json)


@bench.command("zipdcm-ingest", hidden=True)
@click.argument("paths", nargs=-1, required=True)
def zipdcm_ingest_cmd(paths: tuple[str, ...]) -> None:
    """Benchmark only: `dicomlake ingest` with the zipdcm method as its reader (used by
    `bench ingest` for the end-to-end comparison; see dicomlake/bench/ingest.py)."""
    from dicomlake.bench import ingest as ingest_bench

    ingest_bench.zipdcm_ingest(paths)


@bench.command("scale")
@click.option("--sizes", default="1000,10000", show_default=True,
              help="Files per fresh-lake run, comma-separated (two or more sizes).")
@click.option("--with-100k", is_flag=True, help="Add a 100,000-file size (long).")
@click.option("--append", "append_files", default=1000, show_default=True,
              help="Files appended to the largest lake and to an empty one.")
@click.option("--files-per-archive", default=76, show_default=True,
              help="Members per ZIP (the seed's archives hold ~76).")
@click.option("--pixels", default=64, show_default=True,
              help="Image rows and columns (small: the header work is what counts).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def scale_cmd(sizes: str, with_100k: bool, append_files: int, files_per_archive: int,
              pixels: int, as_json: bool) -> None:
    """How ingest cost grows with the files and with the lake: growth exponent, no-op
    re-ingest, append into a large lake vs an empty one."""
    from dicomlake.bench import scale as scale_bench

    chosen = _sizes(sizes) + ((100_000,) if with_100k else ())
    emit(scale_bench.run(sizes=chosen, append_files=append_files,
                         files_per_archive=files_per_archive, pixels=pixels), as_json)


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
@click.option("--bases", default=60, show_default=True,
              help="Most distinct pictures (perceptual groups) in the near-duplicate task.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def retrieval_cmd(bases: int, as_json: bool) -> None:
    """precision@10 on near-duplicates of the shipped pictures (lossy copies grouped as one)
    and on frames finding their own multi-frame object."""
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


@bench.command("dicomweb")
@click.option("--instances", default=2000, show_default=True, help="Instances in the lake.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def dicomweb_cmd(instances: int, as_json: bool) -> None:
    """QIDO-RS search p50 and WADO-RS frames/s over pydicom reading the same files."""
    from dicomlake.bench import dicomweb as dicomweb_bench

    emit(dicomweb_bench.run(instances=instances), as_json)


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
