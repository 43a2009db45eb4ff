"""What an ``analyst`` sees: patient-identifying values hashed, truncated or removed.

Masking is done by *views*, not by rewriting result rows: an analyst's query is rewritten to
read ``__dl_masked__<schema>__<table>`` instead of the table, and that view applies the
masks before anything else runs. So derived expressions (``upper(patient_name)``,
``json_extract_scalar(meta, ...)``, ``CAST(patient_id AS INT)`` error messages) can only ever
see masked values.

* Identifying text (PatientName, PatientID, AccessionNumber, ...) becomes ``anon-`` plus 16
  hex digits of a salted SHA-256: stable, so joins and ``count(DISTINCT patient_id)`` still
  work, but not reversible without the lake's salt (``<home>/sql/mask.salt``, mode 0600).
* Birth dates keep only the year (HIPAA Safe Harbor keeps years).
* File paths (``path``, ``member``, ``source``, ``archive``) are pseudonymised too, because
  archives name folders after patients; error messages (which quote paths) are removed, and
  ``BulkDataURI`` values in ``meta`` (which are file paths) are pseudonymised the same way.
* Inside ``meta`` (DICOM JSON) the same tags are masked, recursively through sequences, and
  private tags (odd groups) lose their values: vendors put names there too.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

HASH_PREFIX = "anon-"

IDENTIFYING_TAGS: dict[str, str] = {
    # tag -> how: "hash" (text), "year" (DA), "drop" (anything else)
    "00100010": "hash",  # PatientName
    "00100020": "hash",  # PatientID
    "00100021": "hash",  # IssuerOfPatientID
    "00100030": "year",  # PatientBirthDate
    "00100032": "drop",  # PatientBirthTime
    "00100050": "drop",  # PatientInsurancePlanCodeSequence
    "00101000": "hash",  # OtherPatientIDs
    "00101001": "hash",  # OtherPatientNames
    "00101002": "drop",  # OtherPatientIDsSequence
    "00101005": "hash",  # PatientBirthName
    "00101040": "drop",  # PatientAddress
    "00101060": "drop",  # PatientMotherBirthName
    "00101090": "drop",  # MedicalRecordLocator
    "00102154": "drop",  # PatientTelephoneNumbers
    "00102155": "drop",  # PatientTelecomInformation
    "00104000": "drop",  # PatientComments
    "00080050": "hash",  # AccessionNumber
    "00080090": "hash",  # ReferringPhysicianName
    "00080092": "drop",  # ReferringPhysicianAddress
    "00080094": "drop",  # ReferringPhysicianTelephoneNumbers
    "00081048": "hash",  # PhysiciansOfRecord
    "00081050": "hash",  # PerformingPhysicianName
    "00081060": "hash",  # NameOfPhysiciansReadingStudy
    "00081070": "hash",  # OperatorsName
    "00321032": "hash",  # RequestingPhysician
    "00380010": "hash",  # AdmissionID
    "00380300": "drop",  # CurrentPatientLocation
}
"""DICOM tags (8 hex digits, as keys of DICOM JSON) an analyst must not see in clear."""

META_COLUMN = "meta"


def _identifying_columns() -> dict[str, str]:
    """Promoted columns whose tag is identifying (same names in instances/series/studies)."""
    from dicomlake.catalog.columns import PROMOTED

    return {name: IDENTIFYING_TAGS[f"{tag:08X}"] for name, tag, _ in PROMOTED
            if f"{tag:08X}" in IDENTIFYING_TAGS}


FILE_COLUMNS: dict[str, str] = {"path": "hash", "member": "hash", "source": "hash",
                                "archive": "hash", "error": "drop"}
"""File names and messages that quote them: exports name folders after patients
(``PAT0300000/STUDY01/...``), so analysts see pseudonyms (joins on ``path`` still work)."""

IDENTIFYING_COLUMNS: dict[str, str] = {**_identifying_columns(), **FILE_COLUMNS}
"""Column name -> mask kind, for any table of the lake that has such a column."""


def load_salt(home: Path) -> str:
    """The lake's masking salt, created on first use."""
    path = Path(home) / "sql" / "mask.salt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text().strip()


def mask_text(value: str, salt: str) -> str:
    """The stable pseudonym of an identifying string (same as the SQL mask)."""
    return HASH_PREFIX + hashlib.sha256((salt + value).encode("utf-8")).hexdigest()[:16]


def _sql_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def column_mask_sql(column: str, kind: str, salt: str) -> str:
    """Spark SQL that masks one column (keeps its name and, for dates, its type)."""
    ident = f"`{column}`"
    if kind == "year":
        return f"make_date(year({ident}), 1, 1) AS {ident}"
    if kind == "hash":
        return (f"CASE WHEN {ident} IS NULL THEN NULL ELSE concat('{HASH_PREFIX}', "
                f"substr(sha2(concat({_sql_quote(salt)}, CAST({ident} AS STRING)), 256), 1, 16))"
                f" END AS {ident}")
    return f"CAST(NULL AS STRING) AS {ident}"


def needs_mask(columns: list[str]) -> bool:
    """True if a table with these columns must be read through a masked view."""
    return META_COLUMN in columns or any(c in IDENTIFYING_COLUMNS for c in columns)


def masked_view_sql(schema: str, table: str, columns: list[str], salt: str) -> str:
    """The ``SELECT`` behind a table's masked view."""
    parts = []
    for column in columns:
        if column in IDENTIFYING_COLUMNS:
            parts.append(column_mask_sql(column, IDENTIFYING_COLUMNS[column], salt))
        elif column == META_COLUMN:
            parts.append(f"{MASK_META_FUNCTION}(`{column}`) AS `{column}`")
        else:
            parts.append(f"`{column}`")
    return f"SELECT {', '.join(parts)} FROM `{schema}`.`{table}`"


MASK_META_FUNCTION = "dicomlake_mask_meta"


def _mask_element(tag: str, element: dict[str, Any], salt: str) -> dict[str, Any]:
    how = IDENTIFYING_TAGS.get(tag)
    private = int(tag[:4], 16) % 2 == 1
    if how is None and not private:
        if element.get("vr") == "SQ" and isinstance(element.get("Value"), list):
            element = dict(element)
            element["Value"] = [mask_dataset(item, salt) if isinstance(item, dict) else item
                                for item in element["Value"]]
        if "BulkDataURI" in element:  # a file path, and exports name folders after patients
            element = {**element, "BulkDataURI": mask_text(str(element["BulkDataURI"]), salt)}
        return element
    masked = {"vr": element.get("vr", "UN")}
    values = element.get("Value")
    if how == "hash" and isinstance(values, list):
        out: list[Any] = []
        for value in values:
            if isinstance(value, dict):  # PN: {"Alphabetic": ..., "Ideographic": ...}
                text = value.get("Alphabetic") or next(iter(value.values()), "")
                out.append({"Alphabetic": mask_text(str(text), salt)})
            elif value is None:
                out.append(None)
            else:
                out.append(mask_text(str(value), salt))
        masked["Value"] = out
    elif how == "year" and isinstance(values, list):
        masked["Value"] = [f"{str(v)[:4]}0101" if v else v for v in values]
    return masked


def mask_dataset(dataset: dict[str, Any], salt: str) -> dict[str, Any]:
    """A DICOM JSON dataset with identifying and private tags masked."""
    return {tag: _mask_element(tag, element, salt) if isinstance(element, dict) else element
            for tag, element in dataset.items()}


def mask_meta(meta: str | None, salt: str) -> str | None:
    """Mask a ``meta`` string; unparseable text is dropped rather than leaked."""
    if meta is None:
        return None
    try:
        data = json.loads(meta)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    return json.dumps(mask_dataset(data, salt), separators=(",", ":"))
