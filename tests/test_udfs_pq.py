"""PQ codebooks (faiss-trained, Delta-versioned), hand-written ADC vs faiss, filters."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from dicomlake.udfs import pq
from dicomlake.udfs.codestore import check_versions
from dicomlake.udfs.errors import CodebookError, KnnError
from dicomlake.udfs.filters import parse_filter
from dicomlake.udfs.search import CodeIndex


def _clustered(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(50, d)).astype(np.float32)
    return (centers[rng.integers(0, 50, n)] + 0.2 * rng.normal(size=(n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = _clustered(3000)
    book = pq.train(x, m=8, nlist=0)
    return x, book


def _index(book, x):
    codes, lists = book.encode(x)
    ids = np.array([f"1.2.{i}" for i in range(len(x))], dtype=object)
    return CodeIndex.build(book, ids, np.zeros(len(x), np.int32), codes, lists)


def test_adc_matches_faiss_indexpq_exactly(data):
    import faiss

    x, book = data
    index = _index(book, x)
    flat = faiss.IndexPQ(x.shape[1], book.m, 8)
    flat.pq.centroids.resize(0)
    faiss.copy_array_to_vector(book.centroids.ravel(), flat.pq.centroids)
    flat.is_trained = True
    flat.add(x)
    q = x[:5] + 0.05
    for i in range(5):
        _, expected = flat.search(q[i:i + 1], 10)
        rows, dist = index.search(q[i], 10)
        assert sorted(rows.tolist()) == sorted(expected[0].tolist())
        assert np.all(np.diff(dist) >= 0)


def test_codes_round_trip_close_to_vectors(data):
    x, book = data
    codes, _ = book.encode(x[:100])
    assert codes.dtype == np.uint8 and codes.shape == (100, 8)
    err = np.linalg.norm(book.decode(codes) - x[:100], axis=1).mean()
    assert err < 0.5 * np.linalg.norm(x[:100] - x[:100].mean(0), axis=1).mean()


def test_small_training_sets_use_fewer_centroids():
    book = pq.train(_clustered(70), m=4)
    assert book.ksub == 64  # 2**floor(log2(70)); faiss cannot learn 256 from 70 points


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_vectors_are_refused(data, bad):
    x, book = data
    y = x[:10].copy()
    y[3, 1] = bad
    with pytest.raises(CodebookError, match=r"NaN or inf.*row 3"):
        book.encode(y)
    with pytest.raises(CodebookError, match="NaN or inf"):
        pq.train(y, m=8)


def test_dimension_mismatch_names_both_sizes(data):
    _, book = data
    with pytest.raises(CodebookError, match=r"16 dimensions.*32-d.*--retrain"):
        book.encode(np.zeros((2, 16), np.float32))


def test_m_must_divide_dimensions():
    with pytest.raises(CodebookError, match="m=5"):
        pq.train(_clustered(300), m=5)


def test_codebooks_are_versioned_in_delta(tmp_path, data):
    x, book = data
    path = tmp_path / "codebooks"
    assert pq.latest(path) is None
    pq.save(path, book)
    book2 = pq.train(x, m=8, version=2, model_id="m", model_version="v")
    pq.save(path, book2)
    loaded = pq.latest(path)
    assert loaded.version == 2 and loaded.model_id == "m"
    np.testing.assert_array_equal(loaded.centroids, book2.centroids)
    from deltalake import DeltaTable

    assert DeltaTable(str(path)).to_pyarrow_table().num_rows == 2


def test_codes_from_an_old_codebook_are_refused():
    codes = pa.table({"codebook_version": pa.array([2, 1, 2], pa.int32())})
    check_versions(codes.slice(0, 1), 2, "delta")
    with pytest.raises(CodebookError, match=r"1 code\(s\).*\[1\].*v2.*dicomlake embed"):
        check_versions(codes, 2, "delta")


def test_ivf_filter_keeps_scanning_lists_until_k_pass():
    x = _clustered(2000)
    book = pq.train(x, m=8, nlist=16)
    index = _index(book, x)
    allowed = np.zeros(index.size, bool)
    allowed[::97] = True  # ~21 rows spread over all lists
    rows, _ = index.search(x[0], 10, nprobe=1, allowed=allowed)
    assert len(rows) == 10
    assert allowed[rows].all()
    # without the filter, nprobe=1 scans only the nearest list
    rows_all, _ = index.search(x[0], 10, nprobe=1)
    first = index.probe_order(x[0])[0]
    assert set(rows_all.tolist()) <= set(range(index.offsets[first], index.offsets[first + 1]))


def test_filter_translation():
    cols = {"modality", "rows", "sop_instance_uid"}
    t = pa.table({"modality": ["CT", "MR", None], "rows": [512, 64, 8],
                  "sop_instance_uid": ["a", "b", "c"]})
    for text, expected in [("modality = 'CT'", ["a"]), ("rows < 100 AND modality <> 'CT'", ["b"]),
                           ("modality IN ('CT', 'MR')", ["a", "b"]), ("modality IS NULL", ["c"]),
                           ("NOT (rows BETWEEN 10 AND 600)", ["c"])]:
        expr, _ = parse_filter(text, cols)
        assert t.filter(expr).column("sop_instance_uid").to_pylist() == expected, text
    with pytest.raises(KnnError, match="unknown column 'colour'"):
        parse_filter("colour = 'red'", cols)
    with pytest.raises(KnnError, match="not a valid SQL predicate"):
        parse_filter("modality = ", cols)


def test_a_code_depends_on_its_vector_alone():
    """Batch embed, the stream and pq_encode in SQL encode different batches: the same vector
    must get the same bytes in each (ties included: the lowest centroid wins)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 64)).astype(np.float32)
    book = pq.train(x[:200], m=8, nlist=4)
    codes, lists = book.encode(x)
    for i in range(0, 300, 37):
        one_codes, one_lists = book.encode(x[i:i + 1])
        np.testing.assert_array_equal(one_codes[0], codes[i])
        assert one_lists[0] == lists[i]
    tie = book.centroids[:, :2, :].mean(axis=1).reshape(1, -1)  # halfway between two
    assert (book.encode(tie)[0] == book.encode(np.repeat(tie, 5, axis=0))[0]).all()
