"""The Spark-free decode pipeline (udfs/decode.py): worker processes decode with pixels.py's
own functions, in input order, failures as error entries; featurize through it writes the
same rows as inline decoding. Needs no torch (unlike tests/test_embed_devices.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dicomlake.catalog.sample import find_template
from dicomlake.udfs.decode import DecodePool, StageTimes, decode_stream, model_batches
from dicomlake.udfs.errors import PixelErrorKind
from dicomlake.udfs.features import FeatureModel, ImageInput, featurize
from dicomlake.udfs.pixels import frame_inputs, model_inputs, read_bytes


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[str]:
    """Real files in mixed syntaxes, a truncated file and one without pixels, the failures
    in the middle so the pipeline must go on after them."""
    whole = find_template("CT_small.dcm").read_bytes()
    broken = tmp_path_factory.mktemp("decode") / "broken.dcm"
    broken.write_bytes(whole[:len(whole) * 2 // 3])  # cut inside its pixel data
    names = ("CT_small.dcm", "emri_small.dcm", "US1_J2KR.dcm", "rtplan.dcm",
             "MR_small_RLE.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small.dcm")
    paths = [str(find_template(n)) for n in names]
    return [*paths[:3], str(broken), *paths[3:]]


@pytest.fixture(scope="module")
def pooled(sources) -> tuple[list, StageTimes]:
    stats = StageTimes()
    out = list(decode_stream(((p, None) for p in sources), workers=2, chunk=2, in_flight=2,
                             stats=stats))
    return out, stats


def test_pool_gives_the_model_inputs_of_pixels_in_order(sources, pooled):
    decoded, stats = pooled
    assert [d.index for d in decoded] == list(range(len(sources)))
    assert [d.path for d in decoded] == sources
    failed = {d.path: d.error for d in decoded if d.error is not None}
    assert [os.path.basename(p) for p in failed] == ["broken.dcm", "rtplan.dcm"]
    assert failed[sources[3]].kind is PixelErrorKind.UNDECODABLE
    assert failed[sources[4]].kind is PixelErrorKind.NO_PIXELS
    for d in decoded:
        if d.error is None:
            assert np.array_equal(d.images, model_inputs(d.path)), d.path
        else:
            assert d.images.shape == (0, 224, 224, 3)
    assert (stats.inputs, stats.errors, stats.frames) == (len(sources), 2, 10 + 5)
    assert stats.decode_seconds > 0 and stats.wait_seconds > 0


def test_thumbnails_and_batches_match_frame_inputs(sources):
    decoded = list(decode_stream(((p, read_bytes(p)) for p in sources[:3]), thumbnails=True))
    for d in decoded:
        pairs = frame_inputs(read_bytes(d.path), d.path)
        assert np.array_equal(d.images, np.stack([p[0] for p in pairs]))
        assert d.thumbnails == tuple(p[1] for p in pairs)
    batches = list(model_batches(decoded, batch_size=4))
    # CT (1 frame) + emri (10: never split) fill the first batch; US the second
    assert [(len(images), [d.index for d in held]) for images, held in batches] == [
        (11, [0, 1]), (1, [2])]


def test_featurize_with_decode_workers_writes_the_same_rows(sources):
    inputs = [ImageInput(f"uid{i}", p) for i, p in enumerate(sources)]
    model = FeatureModel("onnx", threads=2)
    stats = StageTimes()
    inline = list(featurize(inputs, model, batch_size=8))
    with DecodePool(2) as pool:  # one started pool serves several streams
        pooled = list(featurize(iter(inputs), model, batch_size=8, workers=pool, stats=stats))
        again = list(featurize(inputs[:2], model, batch_size=8, workers=pool))
    assert again[0].embeddings.column("embedding").equals(
        pooled[0].embeddings.slice(0, 11).column("embedding"))
    assert len(pooled) == len(inline)
    for a, b in zip(inline, pooled, strict=True):
        assert a.embedding_inputs == b.embedding_inputs and a.error_inputs == b.error_inputs
        for column in ("sop_instance_uid", "frame", "embedding", "thumbnail", "model_version"):
            assert a.embeddings.column(column).equals(b.embeddings.column(column)), column
        assert a.pixel_errors.column("error").equals(b.pixel_errors.column("error"))
    uids = [u for f in pooled for u in f.pixel_errors.column("sop_instance_uid").to_pylist()]
    assert uids == ["uid3", "uid4"]
    assert stats.frames == 15 and stats.model_seconds > 0
