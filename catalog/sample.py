"""Make realistic DICOM-in-ZIP archives from the DICOM files that ship with pydicom.

Real archives are what users have; the network is not. The templates are the CT and MR
images in ``pydicom`` and ``pydicom-data`` (512x512 CT; 1024x1024 MR resampled to 512x512),
plus, in the ``mixed`` profile, compressed, multi-frame and small images. Every instance gets
fresh patient, study, series and instance identities; UIDs derive from the seed, so the same
seed gives the same archives.
"""

from __future__ import annotations

import copy
import io
import os
import random
import zipfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid


class Profile(StrEnum):
    """Which templates a sample draws from."""

    CTMR = "ctmr"
    """Only 512x512 uncompressed CT and MR (what the ingest benchmark uses)."""
    MIXED = "mixed"
    """Mostly 512x512 CT/MR plus JPEG 2000, RLE, multi-frame and small images; the first
    archive also holds a README.txt, as exported archives often do."""


_LARGE = ("693_UNCI.dcm", "693_UNCR.dcm", "MR2_UNCR.dcm")
_EXTRA = ("693_J2KR.dcm", "emri_small.dcm", "MR_small_RLE.dcm", "CT_small.dcm", "MR_small.dcm")
_FAMILY = ("Garcia", "Okafor", "Nguyen", "Schmidt", "Rossi", "Tanaka", "Haddad", "Novak",
           "Silva", "Kowalski", "Dubois", "Larsen", "Mensah", "Ivanova", "Chen", "Murphy")
_GIVEN = ("Ana", "Ben", "Chloe", "Dario", "Eun", "Farah", "Goran", "Hana", "Ines", "Jonas",
          "Kemi", "Luca", "Mira", "Noah", "Olga", "Pavel")
_BODY = {"CT": ("CHEST", "ABDOMEN", "HEAD", "PELVIS"), "MR": ("BRAIN", "KNEE", "SPINE")}


def template_dirs() -> list[Path]:
    """Folders holding the shipped DICOM test files (pydicom's own and pydicom-data's)."""
    import data_store  # from pydicom-data
    import pydicom

    return [Path(pydicom.__file__).parent / "data" / "test_files",
            Path(data_store.__file__).parent / "data"]


def find_template(name: str) -> Path:
    """Locate a shipped test file by name without pydicom's (network) data manager."""
    for folder in template_dirs():
        hits = sorted(folder.rglob(name))
        if hits:
            return hits[0]
    raise FileNotFoundError(
        f"DICOM template {name} not found; install the pinned pydicom-data package"
    )


@cache
def _template(name: str) -> Dataset:
    ds = dcmread(find_template(name))
    if name.startswith("MR2_"):  # 1024x1024 MR -> 512x512, as acquired on many scanners
        pixels = ds.pixel_array.reshape(512, 2, 512, 2).mean(axis=(1, 3)).astype(
            ds.pixel_array.dtype)
        ds.PixelData = pixels.tobytes()
        ds.Rows, ds.Columns = 512, 512
        if "PixelSpacing" in ds:
            ds.PixelSpacing = [float(v) * 2 for v in ds.PixelSpacing]
    return ds


@dataclass(frozen=True)
class _ArchiveJob:
    out: Path
    index: int
    files: int
    seed: int
    profile: Profile


def _member_name(patient: str, study: int, series: int, n: int) -> str:
    base = f"{patient}/STUDY{study:02d}/SERIES{series:02d}/IM{n:05d}"
    if n % 5 == 4:
        return base  # extensionless, found by its DICM marker
    return base + (".DCM" if n % 7 == 6 else ".dcm")


def _make_archive(job: _ArchiveJob) -> int:
    rng = random.Random(job.seed * 1_000_003 + job.index)
    patient = f"PAT{job.seed:02d}{job.index:05d}"
    name = f"{rng.choice(_FAMILY)}^{rng.choice(_GIVEN)}"
    birth = f"{rng.randint(1935, 2010)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    sex = rng.choice("MF")
    names = _LARGE if job.profile is Profile.CTMR else _LARGE * 6 + _EXTRA
    path = job.out / f"archive_{job.seed:02d}_{job.index:05d}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        if job.profile is Profile.MIXED and job.index == 0:
            # Real archives carry notes next to the images; they become error records.
            zf.writestr("README.txt", "Exported by dicomlake sample. Not for clinical use.\n")
        n = 0
        study = 0
        while n < job.files:
            study += 1
            study_uid = generate_uid(entropy_srcs=[str(job.seed), patient, str(study)])
            tpl_name = rng.choice(names)  # one modality per study, as acquired
            date = f"{rng.randint(2015, 2025)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
            accession = f"ACC{rng.randint(10**6, 10**7 - 1)}"
            for series in range(1, rng.randint(1, 3) + 1):
                series_uid = generate_uid(entropy_srcs=[study_uid, str(series)])
                count = min(job.files - n, rng.randint(8, 40))
                for k in range(count):
                    ds = copy.deepcopy(_template(tpl_name))
                    modality = str(ds.get("Modality", "OT"))
                    ds.PatientID, ds.PatientName = patient, name
                    ds.PatientBirthDate, ds.PatientSex = birth, sex
                    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
                    ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k)])
                    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                    ds.StudyDate = ds.SeriesDate = date
                    ds.StudyTime = f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00"
                    ds.AccessionNumber, ds.StudyID = accession, str(study)
                    ds.StudyDescription = f"{modality} {rng.choice(_BODY.get(modality, ('WB',)))}"
                    ds.BodyPartExamined = ds.StudyDescription.split()[-1]
                    ds.SeriesNumber, ds.InstanceNumber = series, k + 1
                    ds.SeriesDescription = f"{modality} series {series}"
                    ds.InstitutionName = "dicomlake Sample Hospital"
                    if "ImagePositionPatient" in ds:
                        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
                        ds.ImagePositionPatient = [x, y, -200.0 + 2.5 * k]
                    if not ds.file_meta.TransferSyntaxUID.is_compressed and "PixelData" in ds:
                        # Neighbouring slices differ a little, as in a real series.
                        arr = np.frombuffer(ds.PixelData, dtype=np.uint8)
                        ds.PixelData = np.roll(arr, 2 * k * int(ds.Columns)).tobytes()
                    buf = io.BytesIO()
                    ds.save_as(buf, enforce_file_format=True)
                    zf.writestr(_member_name(patient, study, series, n), buf.getvalue())
                    n += 1
                if n >= job.files:
                    break
    return job.files


def make_sample(out: str | os.PathLike[str], *, archives: int, files: int, seed: int = 0,
                profile: Profile = Profile.MIXED, workers: int | None = None,
                progress: Callable[[int], None] | None = None) -> list[Path]:
    """Write ``archives`` ZIPs of ``files`` DICOM files each into ``out``.

    Existing archives with the same name are overwritten. ``progress`` is called with the
    number of files written after each archive.
    """
    if archives <= 0 or files <= 0:
        raise ValueError("sample needs archives > 0 and files > 0")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [_ArchiveJob(out_dir, i, files, seed, profile) for i in range(archives)]
    workers = workers or min(os.cpu_count() or 1, archives)
    if workers == 1:
        for job in jobs:
            done = _make_archive(job)
            if progress:
                progress(done)
    else:
        with ProcessPoolExecutor(workers) as pool:
            for done in pool.map(_make_archive, jobs):
                if progress:
                    progress(done)
    return [out_dir / f"archive_{seed:02d}_{i:05d}.zip" for i in range(archives)]
