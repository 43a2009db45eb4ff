"""The Orthanc baseline of ``dicomlake bench dicomweb``.

The bench's Orthanc keys are a contract: always present, null with a reason when Orthanc is
not installed, and ratios that read "above 1: we are faster". Where Debian's ``orthanc`` and
``orthanc-dicomweb`` are installed, a private Orthanc started by
:mod:`dicomlake.bench.orthanc` must find what was loaded and serve frames byte for byte as
pydicom reads them (else the bench would time a broken peer), and the whole bench must fill
the keys from the same run.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicomlake.bench.dicomweb import ORTHANC_KEYS, OrthancFigures, compare_with_orthanc
from dicomlake.bench.orthanc import DICOMWEB_ROOT, OrthancServer, find_orthanc
from dicomlake.catalog.sample import Profile, make_sample

INSTALL = find_orthanc()
needs_orthanc = pytest.mark.skipif(isinstance(INSTALL, str), reason=str(INSTALL))


def test_without_orthanc_every_key_is_null_and_the_reason_is_given() -> None:
    reason = "Orthanc is not installed (no Orthanc binary on PATH or in /usr/sbin)"

    keys = compare_with_orthanc(qido_p50_ms=4.0, frames_per_second=900.0, theirs=reason)

    assert keys == {**dict.fromkeys(ORTHANC_KEYS), "orthanc": reason}
    assert {"orthanc_qido_p50_ms", "orthanc_frames_per_second", "qido_vs_orthanc",
            "frames_vs_orthanc"} <= set(keys)


def test_ratios_are_ours_over_theirs_as_speed() -> None:
    theirs = OrthancFigures(qido_p50_ms=16.0, frames_per_second=525.0,
                            version="Orthanc 1.10.1, DICOMweb plugin 1.7")

    faster = compare_with_orthanc(qido_p50_ms=8.0, frames_per_second=1050.0, theirs=theirs)
    slower = compare_with_orthanc(qido_p50_ms=32.0, frames_per_second=262.5, theirs=theirs)

    assert faster == {"orthanc_qido_p50_ms": 16.0, "orthanc_frames_per_second": 525.0,
                      "qido_vs_orthanc": 2.0, "frames_vs_orthanc": 2.0,
                      "orthanc_version": "Orthanc 1.10.1, DICOMweb plugin 1.7"}
    assert (slower["qido_vs_orthanc"], slower["frames_vs_orthanc"]) == (0.5, 0.5)
    assert "orthanc" not in faster


def _frame(url: str, session: requests.Session) -> bytes:
    """The one part of a WADO-RS frame response (stored syntax)."""
    r = session.get(url, headers={
        "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})
    assert r.status_code == 200, r.text[:300]
    boundary = next(p.split("=", 1)[1].strip().strip('"')
                    for p in r.headers["Content-Type"].split(";")
                    if p.strip().lower().startswith("boundary="))
    parts = [p for p in r.content.split(b"--" + boundary.encode())[1:] if not p.startswith(b"--")]
    assert len(parts) == 1
    data = parts[0].split(b"\r\n\r\n", 1)[1]
    return data[:-2] if data.endswith(b"\r\n") else data


@pytest.mark.slow
@needs_orthanc
def test_orthanc_serves_what_was_loaded_byte_for_byte(tmp_path: Path) -> None:
    assert not isinstance(INSTALL, str)
    archive, = make_sample(tmp_path, archives=1, files=4, seed=5, profile=Profile.CTMR,
                           workers=1)
    with zipfile.ZipFile(archive) as zf:
        blobs = [zf.read(name) for name in zf.namelist()]
    blobs.append(Path(get_testdata_file("emri_small.dcm")).read_bytes())  # 10 64x64 frames
    datasets = [dcmread(io.BytesIO(blob)) for blob in blobs]
    studies = {str(ds.StudyInstanceUID) for ds in datasets}

    server = OrthancServer(INSTALL)
    with server, requests.Session() as http:
        assert server.load(blobs) == len(blobs)
        root = server.url + DICOMWEB_ROOT

        found = http.get(root + "/studies", headers={"Accept": "application/dicom+json"}).json()
        assert {s["0020000D"]["Value"][0] for s in found} == studies

        ds = datasets[0]
        got = _frame(f"{root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/"
                     f"instances/{ds.SOPInstanceUID}/frames/1", http)
        assert len(got) == 512 * 512 * 2 and got == ds.PixelData

        mf = datasets[-1]
        size = mf.Rows * mf.Columns * mf.BitsAllocated // 8
        got = _frame(f"{root}/studies/{mf.StudyInstanceUID}/series/{mf.SeriesInstanceUID}/"
                     f"instances/{mf.SOPInstanceUID}/frames/3", http)
        assert got == mf.PixelData[2 * size:3 * size]
        folder = server.folder
        assert folder is not None and (folder / "orthanc.json").exists()
    assert not folder.exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/system", timeout=5)


@pytest.mark.slow
def test_bench_dicomweb_reports_the_orthanc_keys_from_the_same_run(tmp_path: Path) -> None:
    """The whole bench, small: Orthanc's figures where it is installed, else the reason."""
    code = ("import json; from dicomlake.bench import dicomweb; print(json.dumps("
            "dicomweb.run(instances=100, qido_queries=10, min_frames=30, cstore_files=10)))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("DICOMLAKE_WAREHOUSE", "DICOMLAKE_CONFIG")}
    env["DICOMLAKE_HOME"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert set(ORTHANC_KEYS) <= set(result)
    if isinstance(INSTALL, str):
        assert all(result[k] is None for k in ORTHANC_KEYS) and result["orthanc"] == INSTALL
        return
    assert "orthanc" not in result
    for key in ("orthanc_qido_p50_ms", "orthanc_frames_per_second"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["qido_vs_orthanc"] == pytest.approx(
        result["orthanc_qido_p50_ms"] / result["qido_p50_ms"], rel=1e-2)
    assert result["frames_vs_orthanc"] == pytest.approx(
        result["frames_per_second"] / result["orthanc_frames_per_second"], rel=1e-2)
    assert result["orthanc_version"].startswith("Orthanc 1.")
