"""Real-world DICOM from other packages: every file pydicom reads is a row with its values.

The corpus (``tests/data/realworld``, sources in its SOURCES.md) is real files shipped inside
nibabel, heudiconv, pynetdicom, dicognito, dicomweb-client, dicompyler-core, deid, DICOMscope
and dicom3tools, plus variants derived from them (implicit/big endian, no preamble, deflated,
RLE, J2K, seven character sets, a private UN sequence of undefined length).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicomlake.bench.realworld import make_variants, shipped_files
from dicomlake.catalog.archives import read_source
from dicomlake.catalog.columns import PROMOTED, promoted_values
from dicomlake.catalog.inputs import describe


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variants = make_variants(tmp_path_factory.mktemp("variants"))
    return shipped_files() + variants


def _pydicom(path: Path) -> pydicom.Dataset | None:
    """What pydicom reads (raw datasets without preamble need force=True, as ever)."""
    data = path.read_bytes()
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                               force=data[128:132] != b"DICM")
    except Exception:
        return None


def _public(element: dict[str, Any]) -> Any:
    """Comparable form of a DICOM JSON element (text values stripped, binary left out).

    An empty value among several is ``null`` in our JSON (PS3.18 F.2.5) and ``""`` in
    pydicom's; both mean the same empty value.
    """
    if not element.get("Value"):  # an empty sequence: no Value here, [] in pydicom's
        return None
    if element["vr"] == "SQ":
        return [{t: _public(e) for t, e in item.items() if _is_public(t, e)}
                for item in element["Value"]]
    return [(v.strip() or None) if isinstance(v, str) else v for v in element["Value"]]


def _is_public(tag: str, element: dict[str, Any]) -> bool:
    return int(tag[:4], 16) % 2 == 0 and element.get("vr") not in (
        "OB", "OW", "OD", "OF", "OL", "OV", "UN") and tag != "7FE00010"


def _theirs_json(ds: pydicom.Dataset) -> dict[str, Any]:
    return ds.to_json_dict(bulk_data_threshold=1 << 30,
                           bulk_data_element_handler=lambda e: "x")


def test_every_file_pydicom_reads_is_a_row_with_equal_values(corpus):
    compared = mismatches = 0
    problems: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in corpus:
            theirs = _pydicom(path)
            if theirs is None:
                continue
            (found,) = list(read_source(describe(str(path))))
            if found.error is not None:
                problems.append(f"{path.name}: {found.error}")
                continue
            compared += 1
            ours = found.header.meta
            try:
                reference = _theirs_json(theirs)
            except Exception:
                reference = {}
            for tag, element in reference.items():
                if not _is_public(tag, element):
                    continue
                mine = ours.get(tag)
                if mine is None or _public(mine) != _public(element):
                    mismatches += 1
                    problems.append(f"{path.name} {tag}: {mine} != {element}")
            problems += _column_mismatches(path.name, promoted_values(found.header), theirs)
    assert compared >= 40
    assert not problems, "\n".join(problems[:20])
    assert mismatches == 0


def _column_mismatches(name: str, row: dict[str, Any], ds: pydicom.Dataset) -> list[str]:
    """Typed columns equal pydicom's values (NULL where pydicom's value does not parse)."""
    out = []
    for column, tag, kind in PROMOTED:
        element = ds.get(tag)
        value = element.value if element is not None else None
        if value in (None, "", b""):
            expected: Any = None
        elif isinstance(value, pydicom.multival.MultiValue) and kind != "floats":
            value = value[0] if len(value) else None
            expected = value
        else:
            expected = value
        try:
            if expected is None:
                pass
            elif kind == "name":
                expected = str(expected)
            elif kind == "date":
                text = str(expected).replace(".", "")
                expected = (dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
                            if text.strip("0") else None)
            elif kind == "int":
                expected = int(float(expected))
            elif kind == "float":
                expected = float(expected)
            elif kind == "floats":
                values = expected if isinstance(expected, list | pydicom.multival.MultiValue) \
                    else [expected]
                expected = [float(v) for v in values]
            else:
                expected = str(expected).strip()
        except (TypeError, ValueError):
            expected = None  # pydicom keeps it as text; our column is NULL with a warning
        if row[column] != expected:
            out.append(f"{name} {column}: {row[column]!r} != pydicom {expected!r}")
    return out


def test_the_corpus_packed_as_archives_arrive_is_read_through_spark(spark, corpus, tmp_path):
    """Flat and nested folders, UID names without extension, members without preamble: one
    row per file pydicom reads, no error rows."""
    readable = [p for p in corpus if _pydicom(p) is not None]
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, path in enumerate(readable):
            name = f"DICOM/ST{i // 10:03d}/1.2.826.0.1.3680043.8.498.{i}"
            zf.writestr(name, path.read_bytes())
    df = spark.read.format("dicom").load(str(archive))
    errors = df.where("_corrupt_record IS NOT NULL").select("path", "_corrupt_record").collect()
    assert errors == []
    assert df.count() == len(readable)
    meta = json.loads(df.orderBy("path").first()["meta"])
    assert meta  # the whole header as DICOM JSON
