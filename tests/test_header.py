"""Header parsing and DICOM JSON encoding, without Spark."""

from __future__ import annotations

import io
import json

import orjson
import pydicom
import pytest
from dicom_files import shipped

from dicomlake.catalog.columns import promoted_values
from dicomlake.catalog.errors import ErrorKind, HeaderError
from dicomlake.catalog.header import INLINE_BINARY_MAX, read_header
from dicomlake.catalog.preflight import parse_instance


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

    def test_a_value_that_does_not_parse_is_a_warning_not_a_rejection(self):
        """pydicom reads badVR.dcm; its NumberOfFrames stays as text in meta, the typed
        column is NULL, and the warning names the tag and keeps the value."""
        header = _read(shipped("badVR.dcm"))
        (warning,) = header.warnings
        assert (warning.tag, warning.keyword) == ("(0028,0008)", "NumberOfFrames")
        assert "not a number" in warning.reason
        assert header.meta["00280008"] == {"vr": "IS", "Value": [warning.value]}
        assert promoted_values(header)["number_of_frames"] is None

    def test_truncated_header_names_the_element(self):
        with pytest.raises(HeaderError, match=r"\(300A,00B0\) BeamSequence.*truncated"):
            _read(shipped("rtplan_truncated.dcm"))

    @pytest.mark.parametrize("data", [b"hello world" * 40, b"\x89PNG\r\n\x1a\n" + bytes(600)],
                             ids=["text", "png"])
    def test_text_or_png_named_dcm_is_not_dicom(self, data):
        """Decided by content before parsing: not 'header larger than maxHeaderBytes'."""
        with pytest.raises(HeaderError, match="not DICOM: no DICM marker") as info:
            parse_instance(io.BytesIO(data), uri="x.dcm", size=len(data), head=data[:512])
        assert info.value.kind is ErrorKind.NOT_DICOM

    def test_cut_in_the_middle_of_the_header(self):
        data = shipped("CT_small.dcm")[:700]
        with pytest.raises(HeaderError) as info:
            _read(data)
        assert info.value.kind in (ErrorKind.TRUNCATED, ErrorKind.BAD_HEADER)


class TestFastPath:
    """The one-pass parser must say what pydicom says; where they differ, pydicom is wrong."""

    # pydicom gives sequence-relative BulkData offsets inside these; the fast path absolute.
    NESTED_BULK = frozenset({"examples_overlay.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm"})
    # Files that end inside an element: pydicom reads on quietly, the fast path says so.
    CUT_SHORT = frozenset({"DICOMDIR-nooffset", "meta_missing_tsyntax.dcm",
                           "nested_priv_SQ.dcm"})

    def test_agrees_with_pydicom_on_every_shipped_file(self):
        import warnings

        from dicomlake.catalog import header as h
        from dicomlake.catalog.sample import template_dirs

        warnings.simplefilter("ignore")
        compared, mismatched = 0, set()
        for path in sorted(p for d in template_dirs() for p in d.rglob("*") if p.is_file()):
            data = path.read_bytes()
            if data[128:132] != b"DICM":
                continue
            outcomes = []
            for fast in (False, True):
                try:
                    if fast:
                        found = h._fast_header(io.BytesIO(data), "u", len(data), 1 << 26)
                    else:
                        found = h._read_header(io.BytesIO(data), uri="u", size=len(data),
                                               has_preamble=True)
                    outcomes.append((found.meta, found.pixel_data_offset))
                except h._UsePydicom:
                    outcomes.append("pydicom")
                except HeaderError as exc:
                    outcomes.append(exc.kind)
            if outcomes[1] == "pydicom":
                continue
            compared += 1
            if outcomes[0] != outcomes[1]:
                mismatched.add(path.name)
        assert compared > 150
        assert mismatched == self.NESTED_BULK | self.CUT_SHORT

    def test_what_is_read_first_never_changes_the_result(self):
        """The parser restarts on a longer prefix when its first read stops short, and that
        first read follows the last header's size: so every file must parse the same
        whatever came before it, with too little, exactly enough or the whole file read
        first, with its size known or not (a stream)."""
        import warnings

        from dicomlake.bench.realworld import REALWORLD_DIR
        from dicomlake.catalog import header as h
        from dicomlake.catalog.sample import template_dirs

        warnings.simplefilter("ignore")
        paths = sorted(p for d in [*template_dirs(), REALWORLD_DIR] for p in d.rglob("*")
                       if p.is_file())
        compared = 0
        for path in paths:
            data = path.read_bytes()
            if data[128:132] != b"DICM":
                continue
            for size in (len(data), None):
                outcomes = set()
                for first in (140, 1000, 8 << 10, len(data) // 2, len(data), None):
                    try:
                        got = h._fast_header(io.BytesIO(data), "u", size, 1 << 26, first)
                        outcomes.add((orjson.dumps(got.meta), got.pixel_data_offset,
                                      got.pixel_data_length, repr(got.warnings),
                                      got.transfer_syntax_uid))
                    except h._UsePydicom:
                        outcomes.add("pydicom")
                    except HeaderError as exc:
                        outcomes.add(exc.kind)
                assert len(outcomes) == 1, (path.name, size, outcomes)
            compared += 1
        assert compared > 200

    def test_prefix_grows_until_the_header_fits(self):
        """A header longer than the first read (16 KiB) is still parsed whole."""
        data = shipped("examples_overlay.dcm")
        header = _read(data)
        assert header.pixel_data_offset > 16 << 10
        assert header.meta["00880200"]["vr"] == "SQ"

    def test_hostile_length_stops_at_the_limit(self):
        data = shipped("CT_small.dcm")
        with pytest.raises(HeaderError, match="maxHeaderBytes=1024") as info:
            read_header(io.BytesIO(data), uri="u", size=None, has_preamble=True,
                        max_header_bytes=1024)
        assert info.value.kind is ErrorKind.TOO_LARGE


def test_deflated_dataset_is_read_through_pydicom():
    """Deflated transfer syntax: the fast path steps aside; pydicom inflates and we encode."""
    header = _read(shipped("image_dfl.dcm"))
    assert header.transfer_syntax_uid == "1.2.840.10008.1.2.1.99"
    assert header.meta["00280010"]["Value"]
    assert header.pixel_data_offset is None  # offsets inside an inflated stream mean nothing
