"""Property-based fuzzing of the Spark-free reader: ZIP structures and DICOM headers.

Invariant for any bytes: reading finishes (no exception escapes), every input the plan
lists gives at least one record (a row or an error; documented skips are error records of
kind ``skipped``), and ``path`` identifies one record.

Examples per test: 300 (CI's budget); ``HYPOTHESIS_PROFILE=deep`` runs 5,000 (see conftest).
"""

from __future__ import annotations

import io
import tempfile
import warnings
import zipfile
from pathlib import Path

from dicom_files import make_dicom, shipped
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomlake.catalog.archives import Limits, read_source
from dicomlake.catalog.inputs import plan_sources

_CONTENTS = {
    "ct": shipped("CT_small.dcm"),
    "mr_explicit": shipped("MR_small.dcm"),
    "big_endian": shipped("MR_small_bigendian.dcm"),
    "deflated": shipped("image_dfl.dcm"),
    "raw": make_dicom(preamble=False),
    "header_only": make_dicom(pixels=False),
    "text": b"Patient notes, not an image\n" * 10,
    "empty": b"",
}


def _nested_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("in/IM1", _CONTENTS["ct"])
        zf.writestr("in/IM2.dcm", _CONTENTS["raw"])
    return buf.getvalue()


_CONTENTS["nested_zip"] = _nested_zip()
_NAMES = ["IM1.dcm", "IM1.dcm", "1.3.6.1.4.1.5962.99.4", "DICOM/IM0001", "__MACOSX/._IM1",
          "a/.DS_Store", "README.txt", "séries/imagé.dcm", "inner.zip"]
_METHODS = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]

member = st.tuples(st.sampled_from(_NAMES), st.sampled_from(sorted(_CONTENTS)),
                   st.sampled_from(_METHODS), st.booleans())
mutation = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.floats(0.05, 1), st.just(0)),
    st.tuples(st.just("flip_cd"), st.floats(0, 1), st.integers(0, 255)),
)


def _build_zip(members: list[tuple[str, str, int, bool]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # duplicate names are the point
        for name, content, method, zip64 in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = method
            with zf.open(info, "w", force_zip64=zip64) as fh:
                fh.write(_CONTENTS[content])
    return buf.getvalue()


def _mutate(data: bytes, mutations: list[tuple[str, float, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in mutations:
        if not out:
            break
        if kind == "cut":
            out = out[:int(len(out) * where)]
            continue
        if kind == "flip_cd":  # aim at the central directory and end records
            start = out.rfind(b"PK\x01\x02")
            start = start if start >= 0 else 0
            pos = start + int((len(out) - start - 1) * where)
        else:
            pos = int((len(out) - 1) * where)
        out[pos] = value
    return bytes(out)


def _check(path: Path) -> None:
    sources = plan_sources([str(path)])
    limits = Limits(max_nested_bytes=1 << 20, max_header_bytes=1 << 20)
    records = [f for s in sources for f in read_source(s, limits=limits)]
    assert len(records) >= sum(s.input_count for s in sources)
    assert all((f.header is None) != (f.error is None) for f in records)
    paths = [f.path for f in records]
    assert len(paths) == len(set(paths)), paths


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(member, min_size=1, max_size=6), st.lists(mutation, max_size=4),
       st.sampled_from(["a.zip", "export", "a.dcm"]))
def test_damaged_zip_archives_never_abort_and_lose_nothing(members, mutations, name):
    data = _mutate(_build_zip(members), mutations)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / name
        path.write_bytes(data)
        _check(path)


@settings(deadline=None)
@given(st.sampled_from(sorted(_CONTENTS)), st.lists(mutation, max_size=6),
       st.integers(0, 1024))
def test_damaged_dicom_headers_never_abort(content, mutations, head_bytes):
    """Byte flips and cuts inside DICOM headers (the first KiB holds the meta group and
    the first elements), as a plain file: exactly one record, never an exception."""
    data = _CONTENTS[content]
    data = _mutate(data[:head_bytes], mutations) + data[head_bytes:]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "1.2.3.4"
        path.write_bytes(data)
        (source,) = plan_sources([str(path)])
        records = list(read_source(source))
        assert len(records) >= 1
        if data[:4] != b"PK\x03\x04":
            assert len(records) == 1
