"""The embedding models. Default: EfficientNet-Lite0 (ImageNet weights) in ONNX Runtime.

The network ships inside the package as an ONNX file (features pooled to 1280 values, the
classifier dropped; :mod:`dicomlake.udfs.export_model` says how it was made from the published
PyTorch weights), so embedding needs ONNX Runtime only: no torch, no download, no export step.
Every worker loads that file into one ONNX Runtime session per process and runs whole batches.
The model id and a version derived from the file's hash are stored with every embedding, so
vectors from different models (or from another build of this one) are never mixed: a lake
embedded with another version is embedded again by the next ``dicomlake embed``.

``[similarity] device = "cuda"`` runs the same network in PyTorch on a GPU
(:mod:`dicomlake.udfs.torch_model`, one definition with the ONNX export). Its fp32 vectors
share the ONNX version because a test proves them equal (cosine >= 0.99999); any other
precision gets its own version (``onnx-<hash>-bf16``), so vectors of different precisions are
never mixed silently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol

import numpy as np

from dicomlake.udfs.errors import EmbeddingError
from dicomlake.udfs.settings import Device, ModelBackend, Precision

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
    precision: Precision = Precision.FP32


def model_info(backend: ModelBackend | str = ModelBackend.ONNX,
               precision: Precision | str = Precision.FP32) -> ModelInfo:
    """Model id, embedding size and version of a backend (no model is loaded); a precision
    other than fp32 is part of the version."""
    kind, arithmetic = ModelBackend(backend), Precision(precision)
    if kind is ModelBackend.TENSORFLOW:
        from dicomlake.udfs import vgg16

        if arithmetic is not Precision.FP32:
            raise EmbeddingError(f"the tensorflow backend runs fp32 only, not "
                                 f"{arithmetic.value}")
        return ModelInfo(kind, vgg16.MODEL_ID, vgg16.DIM, vgg16.model_version())
    suffix = "" if arithmetic is Precision.FP32 else f"-{arithmetic.value}"
    return ModelInfo(kind, MODEL_ID, DIM, model_version() + suffix, arithmetic)


def precision_of(version: str) -> Precision:
    """The precision a stored ``model_version`` was embedded in (to embed a query alike)."""
    for arithmetic in Precision:
        if version.endswith(f"-{arithmetic.value}"):
            return arithmetic
    return Precision.FP32


def resolve_device(device: Device | str, backend: ModelBackend | str = ModelBackend.ONNX,
                   ) -> Device:
    """``cpu`` or ``cuda``: what ``device`` means on this machine for ``backend``.

    ``auto`` is ``cuda`` when torch imports and sees a CUDA device (and the backend is
    EfficientNet-Lite0), else ``cpu``. An explicit ``cuda`` that cannot run is an error saying
    what to install, never a silent fall back to the CPU.
    """
    asked = Device(device)
    if asked is Device.CPU or ModelBackend(backend) is ModelBackend.TENSORFLOW:
        return Device.CPU
    try:
        import torch
    except ImportError:
        if asked is Device.AUTO:
            return Device.CPU
        from dicomlake.udfs.torch_model import INSTALL_HINT

        raise EmbeddingError(f"[similarity] device = \"cuda\" needs PyTorch, which is not "
                             f"installed: {INSTALL_HINT}, or set device = \"cpu\"") from None
    if torch.cuda.is_available():
        return Device.CUDA
    if asked is Device.AUTO:
        return Device.CPU
    from dicomlake.udfs.torch_model import INSTALL_HINT

    build = ("a CPU-only build" if torch.version.cuda is None
             else f"built for CUDA {torch.version.cuda}, but no CUDA device is visible")
    raise EmbeddingError(f"[similarity] device = \"cuda\", but torch {torch.__version__} is "
                         f"{build}: {INSTALL_HINT}, check the NVIDIA driver (nvidia-smi), or "
                         "set device = \"cpu\"")


def prepare(backend: ModelBackend | str, device: Device | str = Device.CPU) -> None:
    """Driver-side check before workers embed: the model file or the VGG-16 weights exist,
    and a CUDA device asked for is usable (one clear error on the driver instead of one per
    task)."""
    if ModelBackend(backend) is ModelBackend.TENSORFLOW:
        from dicomlake.udfs import vgg16

        vgg16.weights()
    elif resolve_device(device, backend) is Device.CUDA:
        from dicomlake.udfs.torch_model import require_installed

        require_installed()
    else:
        onnx_path()


def embedder_for(backend: ModelBackend | str, threads: int = 1, *,
                 device: Device | str = Device.CPU,
                 precision: Precision | str = Precision.FP32) -> ImageEmbedder:
    """The process-wide embedder of a backend on a device (loaded once per process)."""
    if ModelBackend(backend) is ModelBackend.TENSORFLOW:
        from dicomlake.udfs import vgg16

        return vgg16.get_embedder(threads)
    if resolve_device(device, backend) is Device.CUDA:
        from dicomlake.udfs.torch_model import get_torch_embedder

        return get_torch_embedder("cuda", precision)
    if Precision(precision) is not Precision.FP32:
        raise EmbeddingError(f"ONNX Runtime on the CPU runs fp32 only, not "
                             f"{Precision(precision).value}")
    return get_embedder(threads)


def backend_of(model_id: str) -> ModelBackend:
    """The backend that made vectors of ``model_id`` (to embed a query the same way)."""
    from dicomlake.udfs import vgg16

    known = {MODEL_ID: ModelBackend.ONNX, vgg16.MODEL_ID: ModelBackend.TENSORFLOW}
    if model_id not in known:
        raise EmbeddingError(f"no embedding backend makes model {model_id!r}; known models: "
                             f"{', '.join(sorted(known))}")
    return known[model_id]
