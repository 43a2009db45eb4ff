"""The one pre-check (Spark-free): what an input is, decided by content, and what it yields."""

from __future__ import annotations

import io

import pytest
from dicom_files import make_dicom, shipped, un_sequence_with_explicit_items

from dicomlake.catalog.columns import promoted_values
from dicomlake.catalog.errors import ErrorKind, HeaderError
from dicomlake.catalog.preflight import SNIFF_BYTES, Content, parse_instance, skip_reason, sniff


def _parse(data: bytes, uri: str = "mem://x"):
    return parse_instance(io.BytesIO(data), uri=uri, size=len(data), head=data[:SNIFF_BYTES])


class TestSniff:
    def test_part10_file(self):
        assert sniff(shipped("CT_small.dcm")[:SNIFF_BYTES]) is Content.DICOM

    def test_raw_dataset_without_preamble(self):
        assert sniff(make_dicom(preamble=False)[:SNIFF_BYTES]) is Content.DICOM_RAW

    def test_raw_implicit_vr_dataset(self):
        """ACR-NEMA style: implicit VR, first element (0008,xxxx) with a small length."""
        data = shipped("CT_small.dcm")[132:]
        implicit = b"\x08\x00\x05\x00\x0a\x00\x00\x00ISO_IR 100" + data[:100]
        assert sniff(implicit) is Content.DICOM_RAW

    @pytest.mark.parametrize("head, content", [
        (b"PK\x03\x04" + bytes(40), Content.ZIP),
        (b"\x1f\x8b\x08" + bytes(40), Content.GZIP),
        (b"BZh91AY&SY" + bytes(40), Content.BZIP2),
        (b"\xfd7zXZ\x00" + bytes(40), Content.XZ),
        (bytes(257) + b"ustar\x0000" + bytes(200), Content.TAR),
        (b"", Content.EMPTY),
        (b"\x89PNG\r\n\x1a\n" + bytes(600), Content.OTHER),
        (b"hello world, this is a README" * 20, Content.OTHER),
    ])
    def test_archives_and_other_content(self, head, content):
        assert sniff(head) is content


class TestSkipRules:
    @pytest.mark.parametrize("name", ["__MACOSX/a/._IM1", "a/.DS_Store", "._IM1.dcm",
                                      "scans/Thumbs.db", "desktop.ini"])
    def test_operating_system_litter_is_a_documented_skip(self, name):
        assert skip_reason(name) is not None

    @pytest.mark.parametrize("name", ["1.3.6.1.4.1.5962.99.4", "DICOM/IM0001", "a.dcm",
                                      "MACOSX/IM1", "x._y"])
    def test_everything_else_is_read(self, name):
        assert skip_reason(name) is None


class TestParse:
    def test_header_only_object_is_an_instance(self):
        """Rows/Columns but no Pixel Data, complete file (dose screenshots, CSA files)."""
        header = _parse(make_dicom(pixels=False))
        assert header.pixel_data_offset is None
        assert promoted_values(header)["rows"] == 4

    def test_raw_dataset_is_read(self):
        header = _parse(make_dicom(preamble=False, Modality="MR"))
        assert promoted_values(header)["modality"] == "MR"

    def test_un_sequence_with_explicit_items_matches_pydicom(self):
        import pydicom

        data = un_sequence_with_explicit_items()
        header = _parse(data)
        item = header.meta["00291010"]["Value"][0]
        assert item["00080100"] == {"vr": "SH", "Value": ["ABC"]}
        assert header.meta["00400254"]["Value"] == ["after"]
        theirs = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        assert theirs[0x00400254].value == "after"

    def test_malformed_ds_deep_in_a_sequence_is_a_warning(self):
        data = make_dicom(sequence=True, NumericValue="12345.678901",
                          raw={"12345.678901": b"10.50/ 15.00"})
        header = _parse(data)
        (warning,) = header.warnings
        assert (warning.tag, warning.keyword, warning.value) == (
            "(0040,A30A)", "NumericValue", "10.50/ 15.00")
        measured = header.meta["0040A730"]["Value"][0]["0040A300"]["Value"][0]
        assert measured["0040A30A"] == {"vr": "DS", "Value": ["10.50/ 15.00"]}

    def test_malformed_date_is_null_with_a_warning(self):
        data = make_dicom(StudyDate="19770707", PatientBirthDate="19660216",
                          raw={"19770707": b"1990/01/"})
        header = _parse(data)
        values = promoted_values(header)
        assert values["study_date"] is None
        assert values["patient_birth_date"].year == 1966
        (warning,) = values["warnings"]
        assert warning["tag"] == "(0008,0020)" and warning["value"] == "1990/01/"
        assert "study_date is NULL" in warning["reason"]
        assert header.meta["00080020"]["Value"] == ["1990/01/"]

    def test_dicomdir_is_its_own_kind(self):
        with pytest.raises(HeaderError, match="DICOMDIR") as info:
            _parse(shipped("DICOMDIR"))
        assert info.value.kind is ErrorKind.DICOMDIR

    def test_damaged_deflated_file_is_a_header_fault_not_an_archive_fault(self):
        data = bytearray(shipped("image_dfl.dcm"))
        data[400:600] = bytes(range(200))
        with pytest.raises(HeaderError, match=r"deflated dataset .* is corrupt") as info:
            _parse(bytes(data))
        assert info.value.kind is ErrorKind.BAD_HEADER

    @pytest.mark.parametrize("data", [b"hello world" * 40, b"\x89PNG\r\n\x1a\n" + bytes(600)],
                             ids=["text", "png"])
    def test_text_or_png_is_not_dicom(self, data):
        with pytest.raises(HeaderError, match="not DICOM") as info:
            _parse(data)
        assert info.value.kind is ErrorKind.NOT_DICOM

    def test_any_library_exception_becomes_an_error_of_this_input(self, monkeypatch):
        """Whatever a parser raises (here: a MemoryError-like surprise), never escapes."""
        from dicomlake.catalog import header as header_mod

        def explode(*args, **kwargs):
            raise LookupError("surprise from a library")

        monkeypatch.setattr(header_mod, "_fast_header", explode)
        with pytest.raises(HeaderError, match="LookupError: surprise") as info:
            _parse(shipped("CT_small.dcm"))
        assert info.value.kind is ErrorKind.BAD_HEADER
