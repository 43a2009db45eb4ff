"""Inputs inside sources (Spark-free): nothing aborts, nothing vanishes, paths are unique."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from dicom_files import make_dicom, shipped, write_zip

from dicomlake.catalog.archives import read_input, read_source
from dicomlake.catalog.inputs import plan_sources


def _found(*paths: Path | str):
    return [f for s in plan_sources([str(p) for p in paths]) for f in read_source(s)]


def _by_name(found, root: Path):
    return {f.path.replace(str(root) + "/", ""): f for f in found}


def _kind(f) -> str | None:
    return f.error[0].value if f.error else None


def _corrupt_member(archive: Path, name: str, method: int) -> None:
    """Overwrite the middle of one member's compressed stream with garbage."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(name)
    assert info.compress_type == method
    data = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + len(name.encode()) + len(info.extra)
    data[start + 10:start + 10 + min(300, info.compress_size - 20)] = b"\xa5" * min(
        300, info.compress_size - 20)
    archive.write_bytes(bytes(data))


class TestNothingAborts:
    @pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                                        zipfile.ZIP_LZMA], ids=["deflate", "bzip2", "lzma"])
    def test_corrupt_compressed_member_is_a_bad_archive_row(self, tmp_path, method):
        archive = tmp_path / "a.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("bad.dcm", shipped("CT_small.dcm"), compress_type=method)
            zf.writestr("good.dcm", shipped("MR_small.dcm"), compress_type=method)
        _corrupt_member(archive, "bad.dcm", method)
        found = _by_name(_found(archive), tmp_path)
        assert _kind(found["a.zip!/good.dcm"]) is None
        bad = found["a.zip!/bad.dcm"]
        assert _kind(bad) == "bad_archive"
        assert "compressed data of member bad.dcm is corrupt" in bad.error[1]

    def test_unsupported_compression_method_in_the_central_directory(self, tmp_path):
        archive = write_zip(tmp_path / "m.zip", {"x.dcm": shipped("CT_small.dcm"),
                                                 "y.dcm": shipped("MR_small.dcm")},
                            compression=zipfile.ZIP_STORED)
        data = bytearray(archive.read_bytes())
        cd = data.find(b"PK\x01\x02")
        data[cd + 10:cd + 12] = (99).to_bytes(2, "little")  # AES / unknown method
        archive.write_bytes(bytes(data))
        found = _by_name(_found(archive), tmp_path)
        assert _kind(found["m.zip!/x.dcm"]) == "bad_archive"
        assert "cannot be opened" in found["m.zip!/x.dcm"].error[1]
        assert _kind(found["m.zip!/y.dcm"]) is None

    def test_damaged_tar_ends_with_one_error_for_the_rest(self, tmp_path):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for name in ("a.dcm", "b.dcm", "c.dcm"):
                data = shipped("CT_small.dcm")
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        data = bytearray(buf.getvalue())
        second = data.find(b"b.dcm")
        data[second + 148:second + 156] = b"garbage!"  # checksum of the second header
        (tmp_path / "t.tar").write_bytes(bytes(data))
        found = _found(tmp_path / "t.tar")
        assert _kind(found[0]) is None
        assert [_kind(f) for f in found[1:]] == ["bad_archive"]
        assert "damaged" in found[1].error[1]


class TestEveryInputCounted:
    def test_uid_named_files_in_a_folder_are_inputs(self, tmp_path):
        """The most common naming on CDs and PACS exports: no extension, dots in the name."""
        folder = tmp_path / "export" / "1.3.6.1.4.1.5962.99"
        folder.mkdir(parents=True)
        (folder / "1.3.6.1.4.1.5962.99.4").write_bytes(make_dicom())
        (folder / "1.3.6.1.4.1.5962.99.5").write_bytes(make_dicom(preamble=False))
        (folder / "notes.txt").write_text("reading notes")
        (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        found = _by_name(_found(tmp_path / "export"), tmp_path / "export" / folder.name)
        assert {k: _kind(v) for k, v in found.items()} == {
            "1.3.6.1.4.1.5962.99.4": None, "1.3.6.1.4.1.5962.99.5": None,
            "notes.txt": "not_dicom", ".DS_Store": "skipped"}

    def test_raw_member_without_preamble_or_extension_in_a_zip(self, tmp_path):
        archive = write_zip(tmp_path / "r.zip", {"DICOM/IM0001": make_dicom(preamble=False)})
        (found,) = _found(archive)
        assert found.error is None and found.header is not None

    def test_repeated_member_names_get_unique_paths_that_read_back(self, tmp_path):
        ct, mr = shipped("CT_small.dcm"), shipped("MR_small.dcm")
        archive = tmp_path / "d.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("IM1.dcm", ct)
            zf.writestr("IM1.dcm", mr)
        found = _found(archive)
        paths = [f.path for f in found]
        assert len(set(paths)) == 2
        assert [f.member_index for f in found] == [0, 1]
        assert read_input(paths[0]) == ct and read_input(paths[1]) == mr

    def test_unreadable_subfolder_is_an_error(self, tmp_path, monkeypatch):
        """A folder that cannot be listed (permissions; root reads everything, so the
        refusal is simulated where os.walk lists folders) becomes an error, not a gap."""
        root = tmp_path / "in"
        (root / "locked").mkdir(parents=True)
        (root / "locked" / "IM1").write_bytes(make_dicom())
        (root / "IM0").write_bytes(make_dicom())
        real_scandir = os.scandir

        def refuse(path):
            if str(path).endswith("locked"):
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", refuse)
        found = _by_name(_found(root), root)
        assert {k: _kind(v) for k, v in found.items()} == {"IM0": None, "locked": "unreadable"}
        assert "cannot list folder" in found["locked"].error[1]

    def test_broken_link_is_an_unreadable_error(self, tmp_path):
        root = tmp_path / "in"
        root.mkdir()
        (root / "IM1").symlink_to(tmp_path / "gone")
        (found,) = _found(root)
        assert _kind(found) == "unreadable" and found.path == str(root / "IM1")

    def test_dicomdir_is_recorded_as_its_own_kind(self, tmp_path):
        (tmp_path / "DICOMDIR").write_bytes(shipped("DICOMDIR"))
        (found,) = _found(tmp_path)
        assert _kind(found) == "dicomdir"


class TestArchivesAsTheyArrive:
    def test_zip_inside_zip(self, tmp_path):
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w") as zf:
            zf.writestr("s/IM1.dcm", shipped("CT_small.dcm"))
            zf.writestr("s/IM2", make_dicom(preamble=False))
        archive = write_zip(tmp_path / "o.zip", {"inner.zip": inner.getvalue(),
                                                 "IM0.dcm": shipped("MR_small.dcm")})
        found = _by_name(_found(archive), tmp_path)
        assert sorted(found) == ["o.zip!/IM0.dcm", "o.zip!/inner.zip!/s/IM1.dcm",
                                 "o.zip!/inner.zip!/s/IM2"]
        nested = found["o.zip!/inner.zip!/s/IM1.dcm"]
        assert nested.archive == str(archive) and nested.member == "inner.zip!/s/IM1.dcm"
        assert read_input(nested.path) == shipped("CT_small.dcm")

    @pytest.mark.parametrize("mode, name", [("w", "t.tar"), ("w:gz", "t.tar.gz"),
                                            ("w:gz", "t.tgz"), ("w:bz2", "t.tar.bz2"),
                                            ("w:xz", "t.tar.xz")])
    def test_tar_archives(self, tmp_path, mode, name):
        members = {"p/1.2.3.4": shipped("CT_small.dcm"), "p/readme": b"text",
                   "p/__MACOSX/._x": b"junk"}
        with tarfile.open(tmp_path / name, mode) as tf:
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        found = _by_name(_found(tmp_path / name), tmp_path)
        assert {k: _kind(v) for k, v in found.items()} == {
            f"{name}!/p/1.2.3.4": None, f"{name}!/p/readme": "not_dicom",
            f"{name}!/p/__MACOSX/._x": "skipped"}
        assert read_input(f"{tmp_path / name}!/p/1.2.3.4") == shipped("CT_small.dcm")

    def test_gzip_compressed_file(self, tmp_path):
        (tmp_path / "IM1.dcm.gz").write_bytes(gzip.compress(shipped("CT_small.dcm")))
        (found,) = _found(tmp_path)
        assert found.error is None and found.path == str(tmp_path / "IM1.dcm.gz")
        assert read_input(found.path) == shipped("CT_small.dcm")

    def test_zip_without_suffix_is_read_by_content(self, tmp_path):
        write_zip(tmp_path / "export.bin", {"IM1": shipped("CT_small.dcm")})
        (found,) = _found(tmp_path)
        assert found.error is None and found.path.endswith("export.bin!/IM1")

    def test_nesting_depth_is_limited(self, tmp_path):
        data = shipped("CT_small.dcm")
        for level in range(8):
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as zf:
                zf.writestr(f"l{level}.zip" if level else "IM1.dcm", data)
            data = buf.getvalue()
        (tmp_path / "deep.zip").write_bytes(data)
        (found,) = _found(tmp_path / "deep.zip")
        assert _kind(found) == "too_large" and "nested more than" in found.error[1]
