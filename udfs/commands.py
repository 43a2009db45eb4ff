"""``dicomlake embed``: pixels -> embeddings -> PQ codes for rows not embedded yet."""

from __future__ import annotations

import sys

import click
from tqdm import tqdm

from dicomlake.console import start_session


@click.command()
@click.option("--retrain", is_flag=True,
              help="Train a new PQ codebook version and re-encode every embedding.")
@click.option("--backend", type=click.Choice(["onnx", "tensorflow"]), default=None,
              help="Embedding model: onnx (EfficientNet-Lite0, 1280-d) or tensorflow (VGG-16, "
                   "512-d; ~20x slower). Default: similarity.backend, or onnx. Switching "
                   "embeds every image again and trains a codebook for the new model.")
@click.option("--store", type=click.Choice(["delta", "hbase"]), default=None,
              help="Code store (default: similarity.code_store in dicomlake.toml, or delta).")
@click.option("--m", "m", type=int, default=None,
              help="PQ sub-spaces (must divide the embedding size: 1280 onnx, 512 tensorflow).")
@click.option("--nlist", type=int, default=None, help="IVF lists (0: no coarse quantizer).")
def embed(retrain: bool, backend: str | None, store: str | None, m: int | None,
          nlist: int | None) -> None:
    """Embed new images (EfficientNet-Lite0 in ONNX Runtime, or VGG-16 in TensorFlow) and
    write their PQ codes."""
    from dataclasses import replace

    from dicomlake.udfs import register_functions
    from dicomlake.udfs.errors import DicomlakeError
    from dicomlake.udfs.pipeline import embed as run_embed
    from dicomlake.udfs.settings import ModelBackend, load_similarity

    settings, spark = start_session()
    similarity = load_similarity(settings)
    if store:
        similarity = similarity.with_store(store)
    if backend:
        similarity = replace(similarity, backend=ModelBackend(backend))
    if m is not None or nlist is not None:
        similarity = replace(similarity, m=m or similarity.m,
                             nlist=similarity.nlist if nlist is None else nlist)
    register_functions(spark, settings, similarity)
    bar = tqdm(unit="image", desc="embed", disable=None)

    def planned(total: int) -> None:
        bar.total = total
        bar.refresh()

    def changed(old: str, new: str) -> None:
        tqdm.write(f"the lake was embedded with {old}; this dicomlake embeds with {new}: "
                   "every image is embedded again and a new PQ codebook is trained", sys.stderr)

    try:
        result = run_embed(spark, settings, similarity, retrain=retrain, progress=bar.update,
                           on_plan=planned, on_model_change=changed)
        bar.update(max(0, (bar.total or 0) - bar.n))
    except DicomlakeError as exc:
        bar.close()
        click.echo(click.style(f"error: {exc}", fg="red"), err=True)
        sys.exit(1)
    bar.close()
    rate = result.instances / result.seconds if result.seconds else 0.0
    click.echo(
        f"instances embedded: {result.instances} -> {result.embeddings} embeddings "
        f"(frames), {result.pixel_errors} pixel errors"
        f"{'  (see: SELECT * FROM dicom.pixel_errors)' if result.pixel_errors else ''}\n"
        f"codebook: v{result.codebook_version}{' (newly trained)' if result.trained else ''}; "
        f"codes written: {result.codes_written} to the {result.store} store\n"
        f"time: {result.seconds:.1f} s ({rate:.1f} images/s)")


COMMANDS = [embed]
