"""The embedding model ships as an ONNX file: embedding needs no torch and no export step, and
the file is what the published weights export to."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dicomlake.catalog.sample import find_template
from dicomlake.udfs.model import SHIPPED_ONNX, Embedder, model_version
from dicomlake.udfs.pixels import model_inputs

IMAGES = ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm")


def _images() -> np.ndarray:
    return np.concatenate([model_inputs(str(find_template(name)))[:1] for name in IMAGES])


def test_embedding_works_where_torch_cannot_be_imported():
    """`import torch` raises in the child, as on a core + [similarity] install."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\n"
            "from dicomlake.udfs.model import get_embedder, model_version\n"
            "out = get_embedder().embed(np.full((2, 224, 224, 3), 100, np.uint8))\n"
            "print(out.shape, model_version())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["(2,", "1280)", model_version()]


def test_the_version_names_the_shipped_file():
    import hashlib

    digest = hashlib.sha256(SHIPPED_ONNX.read_bytes()).hexdigest()
    assert model_version() == f"onnx-{digest[:12]}"


@pytest.mark.slow
def test_the_shipped_file_is_what_the_published_weights_export_to(tmp_path):
    pytest.importorskip("torch", reason="the [export] extra (torch) is not installed here")
    from dicomlake.udfs.export_model import export

    fresh = export(tmp_path / "model.onnx")
    images = _images()
    shipped = Embedder(SHIPPED_ONNX).embed(images)
    np.testing.assert_allclose(Embedder(fresh).embed(images), shipped, rtol=1e-5, atol=1e-5)
