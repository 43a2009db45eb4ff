"""De-identified copies of the lake's tables (``dicom_deid.*``): what analysts query.

Every table of the ``dicom`` schema that may hold protected health information has a twin in
``dicom_deid`` with the same name, written from the raw table's files, never computed at query
time. So an analyst's SQL, ``image_knn`` filters (read by Python workers straight from the
Delta files) and anything else built later read data that simply does not contain the
identifiers; no masking function, salt or key is reachable from SQL, plans or errors.

How values change (DICOM PS3.15 Annex E basic profile, with its Retain Patient
Characteristics and Retain Longitudinal Temporal Information with Modified Dates options):

* Pseudonyms are keyed HMAC-SHA-256 of the value under the lake's key
  (``<home>/sql/deid.key``, mode 0600, readable only by the server): text identifiers become
  ``anon-<16 hex>``, UIDs become ``2.25.<decimal>`` UIDs, file paths ``file-<20 hex>``. The
  mapping is consistent, so joins, ``count(DISTINCT ...)`` and ``image_knn`` work inside the
  de-identified tables, and irreversible without the key. Well-known DICOM UIDs
  (``1.2.840.10008.*``: SOP classes, transfer syntaxes) are kept.
* Birth dates keep only the year (``YYYY-01-01``); every other date is moved back by a
  per-patient number of days (1-365, from the key), so intervals within a patient survive.
* Inside ``meta`` (DICOM JSON), recursively through sequences: tags the basic profile removes
  are removed, identifiers are pseudonymised, person names (VR PN) anywhere are pseudonymised,
  UIDs remapped, dates shifted, free text (LT/ST/UT), application entity titles (AE),
  unknown-VR (UN) and private tags dropped, and ``BulkDataURI`` file references removed.
* Columns are kept by an allow-list per table (:data:`TABLES`): a column the list does not
  name (a new raw column, say) is left out until someone decides what it may show.
* Error and warning messages, which quote paths and values, become the error kind and the
  DICOM tags they name.

The twin is kept file by file: each active Parquet file of a raw table has exactly one
de-identified file, named after it, the key's id and the rules' version. :func:`refresh`
transforms the raw files that have no twin yet, removes twins whose raw file is gone, and
commits both in one Delta transaction per table, so it is incremental (an append costs only
the new files), idempotent, safe to run from several processes, and a new key or new rules
rebuild everything. It uses only delta-rs, pyarrow, orjson and pydicom's data dictionary, so
the stream job (which has no Spark) runs it too.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomlake.catalog import tables
from dicomlake.catalog.errors import DicomlakeError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "DEID_SCHEMA",
    "RAW_SCHEMA",
    "TABLES",
    "Action",
    "DeidError",
    "DeidResult",
    "Pseudonymizer",
    "deidentify_meta",
    "deidentify_table",
    "load_key",
    "refresh",
    "rotate_key",
]

RAW_SCHEMA = tables.SCHEMA
"""Schema of the tables as ingested."""
DEID_SCHEMA = tables.DEID_SCHEMA
"""Schema of their de-identified twins (same table names)."""
KEY_FILE = Path("sql") / "deid.key"
"""The pseudonymisation key, relative to the lake home."""
RULES_VERSION = 1
"""Bumped whenever a rule below changes what a value becomes: every twin is then rebuilt."""
STANDARD_UID_ROOT = "1.2.840.10008."
"""DICOM's own UIDs (SOP classes, transfer syntaxes, coding schemes): public, kept."""


class DeidError(DicomlakeError):
    """The key cannot be used, or a table cannot be de-identified."""


class Action(StrEnum):
    """What happens to one column of a raw table in its twin."""

    KEEP = "keep"
    """Copied unchanged (not identifying)."""
    TEXT = "text"
    """Identifying text: ``anon-`` plus a keyed hash."""
    UID = "uid"
    """A DICOM UID: mapped to a ``2.25.`` UID unless it is one of DICOM's own."""
    FILE = "file"
    """A file path (archives name folders after patients): an opaque ``file-`` id."""
    BIRTH_YEAR = "birth_year"
    """A birth date: January 1st of its year."""
    SHIFT_DATE = "shift_date"
    """A date of care: moved back by the patient's keyed offset."""
    META = "meta"
    """The DICOM JSON header: de-identified tag by tag (:func:`deidentify_meta`)."""
    MESSAGE = "message"
    """An error message: reduced to the error kind and the DICOM tags it names."""


_PROVENANCE: dict[str, Action] = {
    "path": Action.FILE, "source": Action.FILE, "archive": Action.FILE, "member": Action.FILE,
    "source_members": Action.KEEP, "member_index": Action.KEEP, "file_size": Action.KEEP,
    "compressed_size": Action.KEEP,
    # source_fingerprint (from member names), crc32 (confirms a known file) and modified (a
    # file date) are left out.
}

TABLES: dict[str, dict[str, Action]] = {
    "instances": {
        **_PROVENANCE,
        "sop_instance_uid": Action.UID, "sop_class_uid": Action.UID,
        "study_instance_uid": Action.UID, "series_instance_uid": Action.UID,
        "patient_id": Action.TEXT, "patient_name": Action.TEXT, "patient_sex": Action.KEEP,
        "patient_birth_date": Action.BIRTH_YEAR, "study_date": Action.SHIFT_DATE,
        "study_time": Action.KEEP, "study_id": Action.TEXT,
        "accession_number": Action.TEXT, "series_number": Action.KEEP,
        "instance_number": Action.KEEP, "modality": Action.KEEP,
        "body_part_examined": Action.KEEP, "manufacturer": Action.KEEP,
        "manufacturer_model_name": Action.KEEP, "institution_name": Action.TEXT,
        "rows": Action.KEEP, "columns": Action.KEEP, "number_of_frames": Action.KEEP,
        "samples_per_pixel": Action.KEEP, "bits_allocated": Action.KEEP,
        "photometric_interpretation": Action.KEEP, "pixel_spacing": Action.KEEP,
        "slice_thickness": Action.KEEP, "image_position_patient": Action.KEEP,
        "image_orientation_patient": Action.KEEP, "window_center": Action.KEEP,
        "window_width": Action.KEEP, "rescale_intercept": Action.KEEP,
        "rescale_slope": Action.KEEP, "transfer_syntax_uid": Action.UID,
        "pixel_data_offset": Action.KEEP, "pixel_data_length": Action.KEEP,
        "meta": Action.META, "ingested_at": Action.KEEP,
        # study_description and series_description: free text the basic profile removes.
    },
    "errors": {**_PROVENANCE, "error_kind": Action.KEEP, "error": Action.MESSAGE,
               "ingested_at": Action.KEEP},
    "warnings": {"path": Action.FILE, "source": Action.FILE, "member_index": Action.KEEP,
                 "sop_instance_uid": Action.UID, "tag": Action.KEEP, "keyword": Action.KEEP,
                 "ingested_at": Action.KEEP},
    # (warnings.value holds the offending value and reason may quote it: both left out)
    "series": {
        "series_instance_uid": Action.UID, "study_instance_uid": Action.UID,
        "patient_id": Action.TEXT, "modality": Action.KEEP, "body_part_examined": Action.KEEP,
        "series_number": Action.KEEP, "manufacturer": Action.KEEP,
        "study_date": Action.SHIFT_DATE, "instances": Action.KEEP, "bytes": Action.KEEP,
        "rows": Action.KEEP, "columns": Action.KEEP,
    },
    "studies": {
        "study_instance_uid": Action.UID, "patient_id": Action.TEXT,
        "patient_name": Action.TEXT, "study_date": Action.SHIFT_DATE,
        "accession_number": Action.TEXT, "modalities": Action.KEEP, "series": Action.KEEP,
        "instances": Action.KEEP, "bytes": Action.KEEP,
    },
    "embeddings": {"sop_instance_uid": Action.UID, "frame": Action.KEEP,
                   "embedding": Action.KEEP, "model_id": Action.KEEP,
                   "model_version": Action.KEEP, "embedded_at": Action.KEEP},
    # (embeddings.thumbnail, a picture of the image, is left out)
    "codes": {"sop_instance_uid": Action.UID, "frame": Action.KEEP,
              "codebook_version": Action.KEEP, "list_id": Action.KEEP, "code": Action.KEEP},
    "pixel_errors": {"sop_instance_uid": Action.UID, "path": Action.FILE,
                     "error_kind": Action.KEEP, "error": Action.MESSAGE,
                     "model_id": Action.KEEP, "model_version": Action.KEEP,
                     "embedded_at": Action.KEEP},
}
"""Table -> column -> action. Only these tables get twins and only these columns are kept."""

_SHIFT_KEYS = ("patient_id", "study_instance_uid", "path")
"""Columns naming the patient whose date offset a row uses, first non-null wins."""

# -- the header profile ------------------------------------------------------------------------

# PS3.15 Table E.1-1, basic profile: X = remove, Z = keep the element empty,
# D = pseudonymise (identifiers analysts count and join on). UIDs, person names, dates and
# free text are handled by VR (see _deidentify_element), whatever their tag.
_PROFILE_KEYWORDS: dict[str, str] = {
    "PatientID": "D", "AccessionNumber": "D", "StudyID": "D", "InstitutionName": "D",
    "OtherPatientIDs": "X", "OtherPatientIDsSequence": "X", "OtherPatientNames": "X",
    "IssuerOfPatientID": "X", "PatientBirthName": "X", "PatientBirthTime": "X",
    "PatientMotherBirthName": "X", "PatientAddress": "X", "PatientTelephoneNumbers": "X",
    "PatientTelecomInformation": "X", "PatientComments": "X", "PatientInsurancePlanCodeSequence":
    "X", "PatientPrimaryLanguageCodeSequence": "X", "PatientPrimaryLanguageModifierCodeSequence":
    "X", "PatientReligiousPreference": "X", "PatientState": "X", "PatientTransportArrangements":
    "X", "PatientInstitutionResidence": "X", "MedicalRecordLocator": "X", "MilitaryRank": "X",
    "BranchOfService": "X", "Occupation": "X", "EthnicGroup": "X", "CountryOfResidence": "X",
    "RegionOfResidence": "X", "MedicalAlerts": "X", "Allergies": "X", "SmokingStatus": "X",
    "PregnancyStatus": "X", "LastMenstrualDate": "X", "AdditionalPatientHistory": "X",
    "ResponsiblePerson": "X", "ResponsibleOrganization": "X", "InsurancePlanIdentification":
    "X", "ReferencedPatientSequence": "X", "ReferencedPatientAliasSequence": "X",
    "InstitutionAddress": "X", "InstitutionCodeSequence": "X", "InstitutionalDepartmentName":
    "X", "InstitutionalDepartmentTypeCodeSequence": "X", "StationName": "X",
    "DeviceSerialNumber": "X", "DeviceUID": "X", "DetectorID": "X", "GantryID": "X",
    "GeneratorID": "X", "CassetteID": "X", "PlateID": "X", "ModifyingDeviceID": "X",
    "DeviceDescription": "X", "LongDeviceDescription": "X", "DeviceLabel": "X",
    "ReferringPhysicianName": "Z", "ReferringPhysicianAddress": "X",
    "ReferringPhysicianTelephoneNumbers": "X", "ReferringPhysicianIdentificationSequence": "X",
    "PhysiciansOfRecord": "X", "PhysiciansOfRecordIdentificationSequence": "X",
    "PerformingPhysicianName": "X", "PerformingPhysicianIdentificationSequence": "X",
    "NameOfPhysiciansReadingStudy": "X", "PhysiciansReadingStudyIdentificationSequence": "X",
    "OperatorsName": "X", "OperatorIdentificationSequence": "X", "RequestingPhysician": "X",
    "RequestingService": "X", "ScheduledPerformingPhysicianName": "X",
    "ScheduledPerformingPhysicianIdentificationSequence": "X", "HumanPerformerName": "X",
    "HumanPerformerOrganization": "X", "ActualHumanPerformersSequence": "X",
    "ScheduledHumanPerformersSequence": "X", "PersonAddress": "X", "PersonTelephoneNumbers":
    "X", "PersonTelecomInformation": "X", "OrderEnteredBy": "X", "OrderEntererLocation": "X",
    "OrderCallbackPhoneNumber": "X", "OrderCallbackTelecomInformation": "X",
    "NamesOfIntendedRecipientsOfResults": "X",
    "IntendedRecipientsOfResultsIdentificationSequence": "X", "ContentCreatorName": "Z",
    "AdmissionID": "X", "IssuerOfAdmissionID": "X", "AdmittingDiagnosesDescription": "X",
    "AdmittingDiagnosesCodeSequence": "X", "DischargeDiagnosisDescription": "X",
    "ServiceEpisodeID": "X", "ServiceEpisodeDescription": "X", "IssuerOfServiceEpisodeID": "X",
    "CurrentPatientLocation": "X", "SpecialNeeds": "X", "VisitComments": "X",
    "StudyDescription": "X", "SeriesDescription": "X", "StudyComments": "X",
    "StudyIDIssuer": "X", "ImageComments": "X", "FrameComments": "X", "IdentifyingComments":
    "X", "DerivationDescription": "X", "AcquisitionComments": "X",
    "AcquisitionDeviceProcessingDescription": "X", "AcquisitionProtocolDescription": "X",
    "ProtocolName": "X", "ContributionDescription": "X", "ImagePresentationComments": "X",
    "ModifiedImageDescription": "X", "ReasonForStudy": "X", "ReasonForTheImagingServiceRequest":
    "X", "RequestedProcedureDescription": "X", "RequestedProcedureComments": "X",
    "RequestedProcedureID": "X", "RequestedProcedureLocation": "X", "RequestedContrastAgent":
    "X", "ImagingServiceRequestComments": "X", "RequestAttributesSequence": "X",
    "PerformedProcedureStepDescription": "X", "PerformedProcedureStepID": "X",
    "PerformedLocation": "X", "PerformedStationName": "X", "PerformedStationAETitle": "X",
    "PerformedStationNameCodeSequence": "X",
    "PerformedStationGeographicLocationCodeSequence": "X",
    "CommentsOnThePerformedProcedureStep": "X", "ScheduledProcedureStepDescription": "X",
    "ScheduledProcedureStepLocation": "X", "ScheduledStationName": "X",
    "ScheduledStationAETitle": "X", "ScheduledStationNameCodeSequence": "X",
    "ScheduledStationGeographicLocationCodeSequence": "X", "ScheduledStudyLocation": "X",
    "ScheduledStudyLocationAETitle": "X", "ScheduledPatientInstitutionResidence": "X",
    "PlacerOrderNumberImagingServiceRequest": "Z", "FillerOrderNumberImagingServiceRequest":
    "Z", "ReferencedStudySequence": "X", "ReferencedPerformedProcedureStepSequence": "X",
    "ReferencedDigitalSignatureSequence": "X", "ReferencedSOPInstanceMACSequence": "X",
    "DigitalSignaturesSequence": "X", "MACParametersSequence": "X", "OriginalAttributesSequence":
    "X", "ModifiedAttributesSequence": "X", "ContentSequence": "X", "AuthorObserverSequence":
    "X", "ParticipantSequence": "X", "CustodialOrganizationSequence": "X",
    "VerifyingOrganization": "X", "VerifyingObserverIdentificationCodeSequence": "Z",
    "ContentCreatorIdentificationCodeSequence": "X", "AcquisitionContextSequence": "X",
    "IconImageSequence": "X", "GraphicAnnotationSequence": "X", "TextString": "X",
    "TextComments": "X", "ResultsComments": "X", "ResultsIDIssuer": "X",
    "InterpretationText": "X", "InterpretationAuthor": "X", "InterpretationRecorder": "X",
    "InterpretationTranscriber": "X", "InterpretationDiagnosisDescription": "X",
    "InterpretationApproverSequence": "X", "PhysicianApprovingInterpretation": "X",
    "InterpretationIDIssuer": "X", "Impressions": "X", "DistributionName": "X",
    "DistributionAddress": "X", "ResultsDistributionListSequence": "X", "TopicTitle": "X",
    "TopicSubject": "X", "TopicAuthor": "X", "TopicKeywords": "X", "ReviewerName": "X",
    "ConfidentialityConstraintOnPatientDataDescription": "X", "TimezoneOffsetFromUTC": "X",
    "ContrastBolusAgent": "Z", "PreMedication": "X", "SourceApplicationEntityTitle": "X",
    "DataSetTrailingPadding": "X", "Arbitrary": "X", "PatientSexNeutered": "X",
}

_DROPPED_VRS = frozenset({"LT", "ST", "UT", "AE", "UN"})
"""Free text, station names and undecodable values: dropped whatever their tag."""


def _profile() -> dict[str, str]:
    from pydicom.datadict import tag_for_keyword

    out = {}
    for keyword, action in _PROFILE_KEYWORDS.items():
        tag = tag_for_keyword(keyword)
        if tag is not None:
            out[f"{tag:08X}"] = action
    return out


PROFILE: dict[str, str] = _profile()
"""DICOM JSON tag (8 hex digits) -> X/Z/D, from :data:`_PROFILE_KEYWORDS`."""
BIRTH_DATE_TAG = "00100030"
_AGE = re.compile(r"^(\d{3})Y$")
_DICOM_TAG = re.compile(r"\(([0-9A-Fa-f]{4}),\s*([0-9A-Fa-f]{4})\)")

# -- the key -----------------------------------------------------------------------------------


def load_key(home: str | os.PathLike[str], *, create: bool = True) -> bytes:
    """The lake's pseudonymisation key (``<home>/sql/deid.key``), made on first use.

    Raises:
        DeidError: the file is missing (and ``create`` is False) or others may read it.
    """
    path = Path(home) / KEY_FILE
    if not path.exists():
        if not create:
            raise DeidError(f"no de-identification key at {path}; the SQL server or "
                            "`dicomlake.catalog.deid.refresh` creates it")
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_key(path, exclusive=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise DeidError(f"the de-identification key {path} is readable by others (mode "
                        f"{mode:o}); run `chmod 600 {path}`")
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise DeidError(f"the de-identification key {path} is not 32+ hex digits; delete it "
                        "and rotate (every de-identified table is rebuilt)")
    return key


def _write_key(path: Path, *, exclusive: bool) -> None:
    """Write a new random key atomically (complete or absent, never half a file); with
    ``exclusive``, keep a key another process wrote first."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    try:
        if exclusive:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class Pseudonymizer:
    """Keyed, consistent pseudonyms (HMAC-SHA-256), memoised per value."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.key_id = hashlib.sha256(b"dicomlake-deid-key-id\0" + key).hexdigest()[:12]
        """Names the key in file names without revealing it."""
        self._memo: dict[tuple[str, str], Any] = {}

    def _mac(self, domain: str, value: str) -> bytes:
        return hmac.new(self._key, f"{domain}\0{value}".encode(), hashlib.sha256).digest()

    def _memoised(self, domain: str, value: str, make: Callable[[bytes], Any]) -> Any:
        found = self._memo.get((domain, value))
        if found is None:
            if len(self._memo) > 1_000_000:
                self._memo.clear()
            found = self._memo[(domain, value)] = make(self._mac(domain, value))
        return found

    def text(self, value: str) -> str:
        """``anon-`` plus 16 hex digits."""
        return self._memoised("text", value, lambda d: "anon-" + d.hex()[:16])

    def uid(self, value: str) -> str:
        """A ``2.25.<n>`` UID (128-bit n, as UUID-derived UIDs are); DICOM's own UIDs as is."""
        if value.startswith(STANDARD_UID_ROOT):
            return value
        return self._memoised("uid", value, lambda d: f"2.25.{int.from_bytes(d[:16], 'big')}")

    def file(self, value: str) -> str:
        """An opaque file id: ``file-`` plus 20 hex digits."""
        return self._memoised("file", value, lambda d: "file-" + d.hex()[:20])

    def shift_days(self, patient: str | None) -> int:
        """Days this patient's dates move back (1-365; 0 with nothing to key on)."""
        if not patient:
            return 0
        return int(self._memoised("shift", patient,
                                  lambda d: 1 + int.from_bytes(d[:4], "big") % 365))


# -- values ------------------------------------------------------------------------------------


def _shift_da(value: str, days: int) -> str | None:
    try:
        day = dt.date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except (ValueError, IndexError):
        return None
    return (day - dt.timedelta(days=days)).strftime("%Y%m%d")


def _person_name(value: Any, pseudo: Pseudonymizer) -> dict[str, str] | None:
    text = value.get("Alphabetic") if isinstance(value, dict) else value
    if not text:
        text = next((v for v in value.values() if v), None) if isinstance(value, dict) else None
    return {"Alphabetic": pseudo.text(str(text))} if text else None


def _deidentify_element(tag: str, element: dict[str, Any], pseudo: Pseudonymizer,
                        days: int) -> dict[str, Any] | None:
    """The de-identified element, or None to drop it."""
    if int(tag[:4], 16) % 2 == 1:  # private: vendors put anything there
        return None
    group = int(tag[:4], 16)
    if 0x6000 <= group <= 0x60FF and tag[4:] == "4000":  # overlay comments
        return None
    vr = str(element.get("vr", "UN"))
    action = PROFILE.get(tag)
    if action == "X" or vr in _DROPPED_VRS:
        return None
    if action == "Z":
        return {"vr": vr}
    values = element.get("Value")
    out: dict[str, Any] = {"vr": vr}
    if not isinstance(values, list):
        # BulkDataURI (a file path) and anything without a Value: the VR only; InlineBinary
        # of a standard tag (palettes, ICC profiles) is image data and stays.
        if "InlineBinary" in element:
            out["InlineBinary"] = element["InlineBinary"]
        return out
    if vr == "SQ":
        out["Value"] = [_deidentify_dataset(item, pseudo, days) if isinstance(item, dict)
                        else None for item in values]
    elif vr == "PN":
        out["Value"] = [_person_name(v, pseudo) for v in values]
    elif vr == "UI":
        out["Value"] = [pseudo.uid(str(v)) if v else v for v in values]
    elif tag == BIRTH_DATE_TAG:
        out["Value"] = [f"{str(v)[:4]}0101" if v and str(v)[:4].isdigit() else None
                        for v in values]
    elif vr == "DA":
        out["Value"] = [_shift_da(str(v), days) if v else v for v in values]
    elif vr == "DT":
        out["Value"] = [(lambda d, v=str(v): d + v[8:] if d else None)(_shift_da(str(v), days))
                        if v else v for v in values]
    elif action == "D":
        out["Value"] = [pseudo.text(str(v)) if v is not None else None for v in values]
    elif vr == "AS":  # ages over 89 are identifying (HIPAA): "090Y" and up become "090Y"
        out["Value"] = [("090Y" if (m := _AGE.match(str(v))) and int(m.group(1)) >= 90
                         else v) for v in values]
    else:
        out["Value"] = values
    return out


def _deidentify_dataset(dataset: dict[str, Any], pseudo: Pseudonymizer,
                        days: int) -> dict[str, Any]:
    out = {}
    for tag, element in dataset.items():
        if not (isinstance(tag, str) and len(tag) == 8 and isinstance(element, dict)):
            continue
        try:
            kept = _deidentify_element(tag, element, pseudo, days)
        except ValueError:  # not hex: not a tag
            continue
        if kept is not None:
            out[tag] = kept
    return out


def deidentify_meta(meta: str | None, pseudo: Pseudonymizer, days: int) -> str | None:
    """A DICOM JSON header with identifying content removed or pseudonymised.

    Text that is not a JSON object is dropped rather than passed on.
    """
    if meta is None:
        return None
    import orjson

    try:
        data = orjson.loads(meta)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    return orjson.dumps(_deidentify_dataset(data, pseudo, days)).decode()


def deidentify_message(kind: str | None, message: str | None) -> str | None:
    """An error message reduced to its kind and the DICOM tags it names."""
    if message is None:
        return None
    tags = sorted({f"({a.upper()},{b.upper()})" for a, b in _DICOM_TAG.findall(message)})
    head = kind or "error"
    return f"{head} at {', '.join(tags)}" if tags else head


# -- tables ------------------------------------------------------------------------------------


def deid_schema(table: str, raw: pa.Schema) -> pa.Schema:
    """The twin's schema: the raw schema's kept columns, in order, with their types."""
    import pyarrow as pa

    spec = TABLES[table]
    return pa.schema([f for f in raw if f.name in spec])


def _row_days(data: pa.Table, pseudo: Pseudonymizer) -> list[int]:
    keys: list[Any] = [None] * data.num_rows
    for name in reversed(_SHIFT_KEYS):  # the first key present and non-null wins
        if name in data.column_names:
            keys = [v if v is not None else k
                    for v, k in zip(data.column(name).to_pylist(), keys, strict=True)]
    return [pseudo.shift_days(k) for k in keys]


def deidentify_table(table: str, data: pa.Table, pseudo: Pseudonymizer,
                     schema: pa.Schema | None = None) -> pa.Table:
    """Rows of raw ``table`` as its twin stores them.

    ``schema`` is the twin's (default: from ``data``); raw columns it names that ``data``
    lacks (files written before the column existed) come out as nulls.
    """
    import pyarrow as pa

    spec = TABLES[table]
    schema = schema if schema is not None else deid_schema(table, data.schema)
    days: list[int] | None = None
    columns = []
    for f in schema:
        if f.name not in data.column_names:
            columns.append(pa.nulls(data.num_rows, f.type))
            continue
        column = data.column(f.name)
        action = spec[f.name]
        if action is Action.KEEP:
            columns.append(column.cast(f.type))
            continue
        values = column.to_pylist()
        if action is Action.TEXT:
            out: list[Any] = [pseudo.text(str(v)) if v is not None else None for v in values]
        elif action is Action.UID:
            out = [pseudo.uid(str(v)) if v else v for v in values]
        elif action is Action.FILE:
            out = [pseudo.file(str(v)) if v is not None else None for v in values]
        elif action is Action.BIRTH_YEAR:
            out = [dt.date(v.year, 1, 1) if v is not None else None for v in values]
        elif action is Action.SHIFT_DATE:
            days = days if days is not None else _row_days(data, pseudo)
            out = [v - dt.timedelta(days=d) if v is not None else None
                   for v, d in zip(values, days, strict=True)]
        elif action is Action.META:
            days = days if days is not None else _row_days(data, pseudo)
            out = [deidentify_meta(v, pseudo, d) for v, d in zip(values, days, strict=True)]
        else:  # MESSAGE
            kinds = (data.column("error_kind").to_pylist() if "error_kind" in data.column_names
                     else [None] * data.num_rows)
            out = [deidentify_message(k, v) for k, v in zip(kinds, values, strict=True)]
        columns.append(pa.array(out, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


@dataclass
class DeidResult:
    """What one :func:`refresh` did."""

    versions: dict[str, int] = field(default_factory=dict)
    """Twin table -> the version committed (tables without changes are absent)."""
    files_added: int = 0
    files_removed: int = 0
    rows_written: int = 0
    seconds: float = 0.0


def _twin_name(rel: str, pseudo: Pseudonymizer) -> str:
    flat = rel.replace("/", "__")
    return f"deid{RULES_VERSION}-{pseudo.key_id}-{flat}"


@contextlib.contextmanager
def _locked(warehouse: Path) -> Iterator[None]:
    """One refresh at a time per lake (several processes may call it)."""
    folder = warehouse / DEID_SCHEMA
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".refresh.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _active(table: Any) -> list[str]:
    """Relative paths of a table's active files."""
    import pyarrow as pa

    return [str(p) for p in pa.table(table.get_add_actions(flatten=True)).column("path")
            .to_pylist()]


def _mirror(name: str, warehouse: Path, pseudo: Pseudonymizer, result: DeidResult) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import CommitProperties, DeltaTable, Schema
    from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions

    raw_path = warehouse / RAW_SCHEMA / name
    twin_path = warehouse / DEID_SCHEMA / name
    if not DeltaTable.is_deltatable(str(raw_path)):
        return
    raw = DeltaTable(str(raw_path))
    raw_schema = pa.schema(raw.schema().to_arrow())
    schema = deid_schema(name, raw_schema)
    wanted = {_twin_name(rel, pseudo): rel for rel in _active(raw)}
    exists = DeltaTable.is_deltatable(str(twin_path))
    twin = DeltaTable(str(twin_path)) if exists else None
    current = set(_active(twin)) if twin is not None else set()
    rebuild = twin is not None and pa.schema(twin.schema().to_arrow()) != schema
    adds_needed = sorted(wanted) if rebuild else sorted(set(wanted) - current)
    removes = [] if rebuild else sorted(current - set(wanted))
    if exists and not adds_needed and not removes:
        return
    twin_path.mkdir(parents=True, exist_ok=True)
    adds = []
    for twin_name in adds_needed:
        data = pq.read_table(raw_path / wanted[twin_name])
        out = deidentify_table(name, data, pseudo, schema)
        tmp = twin_path / f".{twin_name}.{uuid.uuid4().hex}.tmp"
        pq.write_table(out, tmp, compression="zstd")
        os.replace(tmp, twin_path / twin_name)  # readers never see half a file
        st = (twin_path / twin_name).stat()
        adds.append(AddAction(twin_name, st.st_size, {}, int(st.st_mtime * 1000), True,
                              json.dumps({"numRecords": out.num_rows})))
        result.rows_written += out.num_rows
    props = CommitProperties(custom_metadata={"dicomlake.operation": "DEIDENTIFY"})
    if twin is None:
        create_table_with_add_actions(str(twin_path), Schema.from_arrow(schema), adds,
                                      mode="append", commit_properties=props)
    else:
        now = int(time.time() * 1000)
        actions = adds + [RemoveAction(p, True, now) for p in removes]
        twin.create_write_transaction(actions, mode="overwrite" if rebuild else "append",
                                      schema=Schema.from_arrow(schema),
                                      commit_properties=props)
        removes = sorted(current) if rebuild else removes
    result.versions[name] = DeltaTable(str(twin_path)).version()
    result.files_added += len(adds)
    result.files_removed += len(removes)


def refresh(warehouse: str | os.PathLike[str], home: str | os.PathLike[str], *,
            tables: Iterable[str] | None = None) -> DeidResult:
    """Bring the ``dicom_deid`` twins up to date with the raw ``dicom`` tables.

    Call it after every commit to a raw table (ingest, summaries, the stream, ``embed``):
    it costs a listing of each table when nothing changed and the new files' rows otherwise.

    Args:
        warehouse: the warehouse root (``Settings.warehouse_path``).
        home: the lake home holding the key (``Settings.home``).
        tables: raw table names to look at (default: every table of :data:`TABLES`);
            names outside :data:`TABLES` are ignored.

    Raises:
        DeidError: the key file is unusable.
    """
    started = time.perf_counter()
    root = Path(warehouse)
    pseudo = Pseudonymizer(load_key(home))
    names = [t for t in (TABLES if tables is None else tables) if t in TABLES]
    result = DeidResult()
    with _locked(root):
        for name in names:
            _mirror(name, root, pseudo, result)
    result.seconds = time.perf_counter() - started
    return result


def rotate_key(warehouse: str | os.PathLike[str], home: str | os.PathLike[str]) -> DeidResult:
    """Replace the key, rebuild every twin with it and vacuum the old files and history.

    Pseudonyms change (old exports no longer link to new ones); nothing made with the old
    key stays readable in the lake.
    """
    from deltalake import DeltaTable

    root = Path(warehouse)
    path = Path(home) / KEY_FILE
    with _locked(root):
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_key(path, exclusive=False)
    result = refresh(root, home)
    for name in TABLES:
        twin = root / DEID_SCHEMA / name
        if DeltaTable.is_deltatable(str(twin)):
            table = DeltaTable(str(twin))
            table.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    return result
