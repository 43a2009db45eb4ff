"""The embedding models. Default: EfficientNet-Lite0 (ImageNet weights) in ONNX Runtime.

The network ships inside the package as an ONNX file (features pooled to 1280 values, the
classifier dropped; :mod:`dicomlake.udfs.export_model` says how it was made from the published
PyTorch weights), so embedding needs ONNX Runtime only: no torch, no download, no export step.
Every worker loads that file into one ONNX Runtime session per process and runs whole batches.
The model id and a version derived from the file's hash are stored with every embedding, so
vectors from different models (or from another build of this one) are never mixed: a lake
embedded with another version is embedded again by the next ``dicomlake embed``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol

import numpy as np

from dicomlake.udfs.errors import EmbeddingError
from dicomlake.udfs.settings import ModelBackend

MODEL_ID = "efficientnet-lite0-imagenet"
"""Identity recorded in ``dicom.embeddings.model_id``."""
DIM = 1280
"""Embedding size: the pooled output of the last convolution."""
SHIPPED_ONNX = Path(__file__).resolve().parent / "models" / "efficientnet-lite0.onnx"
"""The model file installed with the package."""


def onnx_path() -> Path:
    """The shipped model file; a clear error when the installation lacks it."""
    if not SHIPPED_ONNX.is_file():
        raise EmbeddingError(f"the embedding model {SHIPPED_ONNX} is missing from this "
                             "installation; reinstall dicomlake (`pip install --force-reinstall "
                             "dicomlake[similarity]`)")
    return SHIPPED_ONNX


@cache
def model_version() -> str:
    """Version string of the default model: the first 12 hex digits of the file's SHA-256."""
    return f"onnx-{hashlib.sha256(onnx_path().read_bytes()).hexdigest()[:12]}"


@dataclass
class Embedder:
    """One ONNX Runtime session; ``embed`` takes (n, 224, 224, 3) uint8 images."""

    path: Path
    threads: int = 1

    def __post_init__(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(self.path), opts,
                                             providers=["CPUExecutionProvider"])

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Features for a batch; raises if the model returns non-finite values."""
        if images.ndim != 4 or images.shape[1:] != (224, 224, 3):
            raise EmbeddingError(f"{MODEL_ID} takes (n, 224, 224, 3) images, got "
                                 f"{images.shape}")
        out = self._session.run(None, {"images": images.astype(np.float32)})[0]
        if not np.isfinite(out).all():
            raise EmbeddingError(f"{MODEL_ID} returned NaN/inf features; the model file "
                                 f"{self.path} may be corrupt: reinstall dicomlake")
        return out.astype(np.float32)


_EMBEDDERS: dict[int, Embedder] = {}


def get_embedder(threads: int = 1) -> Embedder:
    """The process-wide embedder (loaded once per Python worker and thread count)."""
    if threads not in _EMBEDDERS:
        _EMBEDDERS[threads] = Embedder(onnx_path(), threads)
    return _EMBEDDERS[threads]


class ImageEmbedder(Protocol):
    """What the embedding UDF and ``image_knn`` need from either backend."""

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(n, 224, 224, 3) uint8 RGB images -> (n, dim) float32 features."""
        ...


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a backend's model, as recorded in ``dicom.embeddings`` and codebooks."""

    backend: ModelBackend
    model_id: str
    dim: int
    version: str


def model_info(backend: ModelBackend | str = ModelBackend.ONNX) -> ModelInfo:
    """Model id, embedding size and version of a backend (no model is loaded)."""
    kind = ModelBackend(backend)
    if kind is ModelBackend.TENSORFLOW:
        from dicomlake.udfs import vgg16

        return ModelInfo(kind, vgg16.MODEL_ID, vgg16.DIM, vgg16.model_version())
    return ModelInfo(kind, MODEL_ID, DIM, model_version())


def prepare(backend: ModelBackend | str) -> None:
    """Driver-side check before workers embed: the model file or the VGG-16 weights exist
    (one clear error on the driver instead of one per task)."""
    if ModelBackend(backend) is ModelBackend.TENSORFLOW:
        from dicomlake.udfs import vgg16

        vgg16.weights()
    else:
        onnx_path()


def embedder_for(backend: ModelBackend | str, threads: int = 1) -> ImageEmbedder:
    """The process-wide embedder of a backend (loaded once per Python worker)."""
    if ModelBackend(backend) is ModelBackend.TENSORFLOW:
        from dicomlake.udfs import vgg16

        return vgg16.get_embedder(threads)
    return get_embedder(threads)


def backend_of(model_id: str) -> ModelBackend:
    """The backend that made vectors of ``model_id`` (to embed a query the same way)."""
    from dicomlake.udfs import vgg16

    known = {MODEL_ID: ModelBackend.ONNX, vgg16.MODEL_ID: ModelBackend.TENSORFLOW}
    if model_id not in known:
        raise EmbeddingError(f"no embedding backend makes model {model_id!r}; known models: "
                             f"{', '.join(sorted(known))}")
    return known[model_id]
