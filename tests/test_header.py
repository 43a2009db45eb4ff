"""Header parsing and DICOM JSON encoding, without Spark."""

from __future__ import annotations

import io
import json

import pydicom
import pytest
from dicom_files import shipped

from dicomlake.catalog.errors import ErrorKind, HeaderError
from dicomlake.catalog.header import INLINE_BINARY_MAX, read_header


def _read(data: bytes, uri: str = "mem://x.dcm"):
    return read_header(io.BytesIO(data), uri=uri, size=len(data),
                       has_preamble=data[128:132] == b"DICM")


class TestJson:
    def test_values_match_pydicom_for_a_ct_header(self):
        """Our fast encoder gives the same DICOM JSON as pydicom (modulo insignificant
        padding), so downstream DICOMweb tools read it."""
        data = shipped("693_UNCI.dcm")
        ours = json.loads(_read(data).meta_json())
        theirs = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).to_json_dict(
            bulk_data_threshold=INLINE_BINARY_MAX, bulk_data_element_handler=lambda e: "x")
        assert set(theirs) <= set(ours)
        for tag, element in theirs.items():
            mine = ours[tag]
            assert mine["vr"] == element["vr"], tag
            if "Value" in element and element["vr"] not in ("SQ",):
                strip = [v.strip() if isinstance(v, str) else v for v in element["Value"]]
                assert mine["Value"] == strip, tag

    def test_person_name_and_numbers_are_typed(self):
        header = _read(shipped("CT_small.dcm"))
        meta = header.meta
        assert meta["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "CompressedSamples^CT1"}]}
        assert meta["00280010"]["Value"] == [128]  # Rows, US -> number
        assert all(isinstance(v, float) for v in meta["00280030"]["Value"])  # DS -> number

    def test_large_binary_is_a_bulk_reference_not_base64(self):
        header = _read(shipped("693_UNCI.dcm"), uri="/a.zip!/b.dcm")
        pixel = header.meta["7FE00010"]
        assert "InlineBinary" not in pixel
        assert pixel["BulkDataURI"] == f"/a.zip!/b.dcm#offset={header.pixel_data_offset}"
        assert header.pixel_data_length == 512 * 512 * 2

    def test_sequences_are_nested_datasets(self):
        meta = _read(shipped("rtplan.dcm")).meta
        sequences = [e for e in meta.values() if e["vr"] == "SQ" and "Value" in e]
        assert sequences and all(isinstance(item, dict) for e in sequences for item in e["Value"])


class TestBadHeaders:
    def test_truncated_pixel_data_is_detected_without_reading_it(self):
        with pytest.raises(HeaderError, match=r"\(7FE0,0010\) PixelData.*truncated") as info:
            _read(shipped("MR_truncated.dcm"))
        assert info.value.kind is ErrorKind.TRUNCATED

    def test_wrong_value_for_vr_names_the_tag(self):
        with pytest.raises(HeaderError, match=r"\(0028,0008\) NumberOfFrames: IS value") as info:
            _read(shipped("badVR.dcm"))
        assert info.value.kind is ErrorKind.BAD_VALUE

    def test_truncated_header_names_the_element(self):
        with pytest.raises(HeaderError, match=r"\(300A,012C\) IsocenterPosition.*truncated"):
            _read(shipped("rtplan_truncated.dcm"))

    def test_text_file_is_not_dicom(self):
        with pytest.raises(HeaderError) as info:
            read_header(io.BytesIO(b"hello world" * 40), uri="x.dcm", size=440,
                        has_preamble=False)
        assert info.value.kind is ErrorKind.NOT_DICOM

    def test_cut_in_the_middle_of_the_header(self):
        data = shipped("CT_small.dcm")[:700]
        with pytest.raises(HeaderError) as info:
            _read(data)
        assert info.value.kind in (ErrorKind.TRUNCATED, ErrorKind.BAD_HEADER)
