"""The stream's writer follows the configured backend, as batch ``embed`` does."""

from __future__ import annotations

import numpy as np
import pytest

from dicomlake.catalog import tables
from dicomlake.config import Settings
from dicomlake.streaming.processor import LakeWriter
from dicomlake.streaming.settings import StreamSettings
from dicomlake.streaming.tables import ensure_tables
from dicomlake.udfs import pq
from dicomlake.udfs.errors import CodebookError
from dicomlake.udfs.model import model_info


def _writer(home, backend: str) -> LakeWriter:
    settings = Settings(home=home)
    home.mkdir(parents=True, exist_ok=True)
    (home / "dicomlake.toml").write_text(f'[similarity]\nbackend = "{backend}"\n')
    ensure_tables(settings)
    return LakeWriter(str(home), str(settings.warehouse_path), StreamSettings(), epoch="t")


@pytest.mark.parametrize("backend", ["onnx", pytest.param("tensorflow",
                                                           marks=pytest.mark.extra("tensorflow"))])
def test_the_writer_embeds_with_the_configured_backend(tmp_path, backend):
    writer = _writer(tmp_path / "home", backend)
    assert writer.model.info == model_info(backend)


@pytest.mark.extra("tensorflow")
def test_a_codebook_of_another_backend_stops_the_stream_with_what_to_run(tmp_path):
    writer = _writer(tmp_path / "home", "tensorflow")
    onnx = model_info("onnx")
    vectors = np.random.default_rng(0).normal(size=(64, onnx.dim)).astype(np.float32)
    pq.save(tables.CODEBOOKS.path(writer.warehouse),
            pq.train(vectors, m=8, model_id=onnx.model_id, model_version=onnx.version))
    with pytest.raises(CodebookError, match="run `dicomlake embed`"):
        writer.codebook()
