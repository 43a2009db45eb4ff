"""The device and precision choice (the decode pipeline that feeds a GPU: test_decode.py).

Parity is proved on real sample images against the shipped ONNX model: torch fp32 (on torch's
CPU here, on CUDA where a GPU is) must give the same vectors, since both share one model
version; bf16 is measured, and allowed only if it stays within cosine 0.9999.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from dicomlake.catalog.sample import find_template
from dicomlake.config import Settings
from dicomlake.errors import ConfigError
from dicomlake.udfs import model as model_mod
from dicomlake.udfs.errors import EmbeddingError
from dicomlake.udfs.features import FeatureModel
from dicomlake.udfs.pixels import model_inputs
from dicomlake.udfs.settings import (
    REFUSED_PRECISIONS,
    Device,
    ModelBackend,
    Precision,
    SimilaritySettings,
    load_similarity,
)

torch = pytest.importorskip("torch", reason="the [gpu]/[export] extra (torch) is not installed")
from dicomlake.udfs.torch_model import (  # noqa: E402  (needs torch)
    BF16_MIN_COSINE,
    FP32_MIN_COSINE,
    TorchEmbedder,
)

CUDA = torch.cuda.is_available()
NO_CUDA = (f"no CUDA device: torch {torch.__version__} sees none (torch.cuda.is_available() "
           "is False); the CUDA parity test runs on GPU machines only")
# single-frame CT, MR, RGB, JPEG 2000, RLE and JPEG-baseline files, and a 10-frame MR
PARITY = ("CT_small.dcm", "MR_small.dcm", "SC_rgb.dcm", "US1_J2KR.dcm", "MR_small_RLE.dcm",
          "SC_rgb_jpeg_gdcm.dcm", "emri_small.dcm")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """The first two frames of each parity file (12 images)."""
    return np.concatenate([model_inputs(str(find_template(n)))[:2] for n in PARITY])


@pytest.fixture(scope="module")
def onnx_vectors(images) -> np.ndarray:
    return model_mod.get_embedder(threads=2).embed(images)


def test_torch_fp32_gives_the_onnx_vectors(images, onnx_vectors):
    """Why fp32 torch vectors may share the ONNX model version."""
    vectors = TorchEmbedder("cpu", Precision.FP32, threads=2).embed(images)
    assert vectors.shape == onnx_vectors.shape == (len(images), model_mod.DIM)
    assert _cosines(vectors, onnx_vectors).min() >= FP32_MIN_COSINE


def test_bf16_is_allowed_only_if_its_measured_cosine_reaches_the_bar(images, onnx_vectors):
    """bf16 autocast on torch's CPU, on the two images that drift most; the refusal in the
    settings must match what is measured here."""
    pair = images[[0, 2]]  # CT_small, MR_small
    vectors = TorchEmbedder("cpu", Precision.BF16, threads=2, batch_size=2).embed(pair)
    worst = float(_cosines(vectors, onnx_vectors[[0, 2]]).min())
    assert worst > 0.95  # bf16 of the same network, not another model
    assert (worst >= BF16_MIN_COSINE) == (Precision.BF16 not in REFUSED_PRECISIONS), worst
    if Precision.BF16 in REFUSED_PRECISIONS:
        with pytest.raises(ConfigError, match=r"'similarity.precision' = \"bf16\" is refused"
                                              r".*0\.9999"):
            SimilaritySettings(device=Device.CUDA, precision=Precision.BF16)


def test_other_precisions_are_other_model_versions():
    fp32, bf16 = model_mod.model_info("onnx"), model_mod.model_info("onnx", "bf16")
    assert fp32.version == model_mod.model_version()
    assert bf16.version == f"{fp32.version}-bf16" and bf16.model_id == fp32.model_id
    assert FeatureModel("onnx", device="cpu").info == fp32
    assert FeatureModel("onnx", device="cuda", precision="bf16").info == bf16  # nothing loads
    assert [model_mod.precision_of(i.version) for i in (fp32, bf16)] == [Precision.FP32,
                                                                         Precision.BF16]


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_cuda_gives_the_onnx_vectors(images, onnx_vectors):
    """The GPU path: the configured embedder on CUDA, fp32 parity, and bf16 on the GPU held
    to the same rule as on the CPU."""
    assert model_mod.resolve_device("auto") is Device.CUDA
    vectors = FeatureModel("onnx", device="cuda").embed(images)
    assert _cosines(vectors, onnx_vectors).min() >= FP32_MIN_COSINE
    bf16 = float(_cosines(TorchEmbedder("cuda", Precision.BF16).embed(images),
                          onnx_vectors).min())
    assert (bf16 >= BF16_MIN_COSINE) == (Precision.BF16 not in REFUSED_PRECISIONS), bf16


# -- device choice and settings -------------------------------------------------------------

@pytest.fixture
def home(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("DICOMLAKE_"):
            monkeypatch.delenv(name)
    return tmp_path


def test_device_settings_from_file_and_environment(home, monkeypatch):
    settings = Settings(home=home)
    assert (load_similarity(settings).device, load_similarity(settings).precision) == (
        Device.CPU, Precision.FP32)  # the default: ONNX Runtime, unchanged
    (home / "dicomlake.toml").write_text('[similarity]\ndevice = "auto"\nprecision = "fp32"\n')
    assert load_similarity(settings).device is Device.AUTO
    monkeypatch.setenv("DICOMLAKE_EMBED_DEVICE", "CUDA")
    assert load_similarity(settings).device is Device.CUDA


@pytest.mark.parametrize(("text", "key", "allowed"), [
    ('device = "tpu"', "similarity.device", "cpu, cuda, auto"),
    ('precision = "fp16"', "similarity.precision", "fp32, bf16"),
])
def test_unknown_device_or_precision_names_the_key(home, text, key, allowed):
    (home / "dicomlake.toml").write_text(f"[similarity]\n{text}\n")
    with pytest.raises(ConfigError) as caught:
        load_similarity(Settings(home=home))
    message = str(caught.value)
    assert f"'{key}'" in message and allowed in message and "dicomlake.toml" in message


def test_cuda_is_refused_for_the_tensorflow_backend():
    with pytest.raises(ConfigError, match=r"'similarity.device' = \"cuda\".*onnx backend"):
        SimilaritySettings(backend=ModelBackend.TENSORFLOW, device=Device.CUDA)
    assert model_mod.resolve_device("auto", "tensorflow") is Device.CPU


def test_auto_picks_what_the_machine_has():
    assert model_mod.resolve_device("auto") is (Device.CUDA if CUDA else Device.CPU)
    assert model_mod.resolve_device("cpu") is Device.CPU


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA device: cuda is usable here")
def test_cuda_without_a_device_says_what_to_do():
    for attempt in (lambda: model_mod.resolve_device("cuda"),
                    lambda: model_mod.prepare("onnx", "cuda"),
                    lambda: FeatureModel("onnx", device="cuda").embed(
                        np.zeros((1, 224, 224, 3), np.uint8))):
        with pytest.raises(EmbeddingError) as caught:
            attempt()
        message = str(caught.value)
        assert "pip install dicomlake[gpu]" in message and 'device = "cpu"' in message
        assert f"torch {torch.__version__}" in message


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA device: cuda is usable here")
def test_embed_tasks_run_on_the_configured_device():
    """`dicomlake embed`'s tasks get the device setting: asked for cuda where there is none,
    they say so instead of quietly using the CPU."""
    import pyarrow as pa

    from dicomlake.udfs.embeddings import embed_batches

    ct = str(find_template("CT_small.dcm"))
    rows = pa.RecordBatch.from_pydict({"sop_instance_uid": ["1.2.3"], "path": [ct]})
    with pytest.raises(EmbeddingError, match=r"dicomlake\[gpu\]"):
        list(embed_batches(2, "onnx", "cuda")(iter([rows])))
    assert next(embed_batches(2, "onnx", "cpu")(iter([rows]))).num_rows == 1


def test_without_torch_auto_is_cpu_and_cuda_says_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert model_mod.resolve_device("auto") is Device.CPU
    with pytest.raises(EmbeddingError, match=r"not installed.*pip install dicomlake\[gpu\]"):
        model_mod.resolve_device("cuda")
