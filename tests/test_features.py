"""The Spark-free rules batch and stream share: duplicates, features, PQ training, fit."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from dicomlake.catalog import tables
from dicomlake.catalog.duplicates import find_duplicates
from dicomlake.catalog.sample import find_template
from dicomlake.udfs import features, pq
from dicomlake.udfs.errors import CodebookError
from dicomlake.udfs.model import model_info
from dicomlake.udfs.settings import SimilaritySettings


def test_committed_uid_wins_then_the_smallest_path_whatever_the_order():
    stored = {"1.1": ("/lake/a.dcm", "src-a")}
    new = [("/in/z.dcm", "1.2", "s1"), ("/in/b.dcm", "1.2", "s2"), ("/in/c.dcm", "1.1", "s3"),
           ("/in/d.dcm", None, "s4"), ("/in/e.dcm", None, "s5")]
    for perm in itertools.permutations(range(len(new))):
        rows = [new[i] for i in perm]
        losers = {rows[i][0] for i in find_duplicates(stored, rows)}
        assert losers == {"/in/z.dcm", "/in/c.dcm"}
    msg = find_duplicates(stored, new)
    assert msg[2] == ("/in/c.dcm: duplicate SOPInstanceUID 1.1; the same UID is already "
                      "stored for /lake/a.dcm")
    assert "stored for /in/b.dcm" in msg[0]


def test_the_same_input_seen_again_is_not_a_duplicate():
    stored = {"1.1": ("/lake/up/x.dcm", "kafka://t/0/4")}
    assert find_duplicates(stored, [("/lake/up/x.dcm", "1.1", "kafka://t/0/4")]) == {}
    # the same bytes uploaded twice: one content path, two records
    assert list(find_duplicates(stored, [("/lake/up/x.dcm", "1.1", "kafka://t/0/9")])) == [0]


def test_featurize_gives_a_row_per_frame_and_an_error_row_per_undecodable_image():
    model = features.FeatureModel("onnx")
    inputs = [features.ImageInput("u-mf", str(find_template("emri_small.dcm"))),
              features.ImageInput("u-rt", str(find_template("rtplan.dcm"))),
              features.ImageInput("u-gone", "/nonexistent/file.dcm")]

    class Counting:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def embed(self, images: np.ndarray) -> np.ndarray:
            self.calls.append(len(images))
            return np.arange(len(images) * model.info.dim, dtype=np.float32).reshape(
                len(images), -1)

    counting = Counting()
    model._embedder = counting  # the network is tested elsewhere; this is the plumbing
    out = list(features.featurize(inputs, model, batch_size=4))
    emb = pa.concat_tables([o.embeddings for o in out])
    errors = pa.concat_tables([o.pixel_errors for o in out])
    frames = emb.column("frame").to_pylist()
    assert frames == list(range(len(frames))) and len(frames) > 1  # emri_small is multi-frame
    assert sum(counting.calls) == len(frames)  # every frame went through the model, once
    assert set(emb.column("sop_instance_uid").to_pylist()) == {"u-mf"}
    assert sorted(errors.column("error_kind").to_pylist()) == ["no_pixels", "unreadable"]
    assert [i for o in out for i in o.error_inputs] == [1, 2]
    assert emb.schema.equals(tables.EMBEDDINGS.schema)
    assert set(emb.column("model_version").to_pylist()) == {model.info.version}
    np.testing.assert_array_equal(features.vectors_of(emb)[1],
                                  np.arange(model.info.dim, 2 * model.info.dim))


def _embeddings(n: int, dim: int, version: str, order: list[int]) -> pa.Table:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    rows = {"sop_instance_uid": [f"1.2.{i // 2}" for i in order],
            "frame": pa.array([i % 2 for i in order], pa.int32()),
            "embedding": [vectors[i].tolist() for i in order],
            "model_id": ["m"] * n, "model_version": [version] * n,
            "thumbnail": pa.nulls(n, pa.binary()),
            "embedded_at": pa.nulls(n, pa.timestamp("us", tz="UTC"))}
    return pa.Table.from_pydict(rows, schema=tables.EMBEDDINGS.schema)


def test_training_sample_does_not_depend_on_arrival_order(tmp_path):
    info = model_info("onnx")
    n, sample = 60, 25
    got = []
    for name, order in (("a", list(range(n))), ("b", list(reversed(range(n))))):
        warehouse = tmp_path / name
        path = tables.EMBEDDINGS.path(warehouse)
        path.mkdir(parents=True)
        data = _embeddings(n, 16, info.version, order)
        for chunk in (data.slice(0, 20), data.slice(20)):  # several commits
            write_deltalake(str(path), chunk, mode="append")
        write_deltalake(str(path), _embeddings(10, 16, "another-model", list(range(10))),
                        mode="append")
        got.append(features.training_vectors(warehouse, info, sample))
    assert got[0].shape == (sample, 16)
    np.testing.assert_array_equal(got[0], got[1])


def test_a_codebook_of_another_model_is_refused_with_what_to_run(tmp_path):
    info = model_info("onnx")
    book = pq.train(np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32), m=4,
                    model_id="vgg16-hed-bsds500-block5-avg", model_version="other")
    assert not features.fits(book, info)
    with pytest.raises(CodebookError, match="dicomlake embed"):
        features.require_fitting(book, info)
    assert features.train(tmp_path, SimilaritySettings(m=4), info) is None  # nothing to train on
