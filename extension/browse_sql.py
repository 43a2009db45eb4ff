"""The SQL behind every dataset-browser action, built from validated inputs.

The browser shows the user each statement it runs (to read, copy and reuse in the sidebar or
a notebook), so the statements are written in the endpoint's dialect (Trino SQL), in the
shape a person would write them. Inputs are checked here, before any text reaches SQL: UIDs
must be DICOM UIDs, codes (modality, body part) short tokens, dates ISO dates; free text is
quoted and its LIKE wildcards escaped.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from dicomlake.errors import DicomlakeError

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CODE = re.compile(r"^[A-Za-z0-9 _^-]{1,64}$")
MAX_PAGE = 200
"""Largest page the browser may ask for (thumbnails are decoded per row)."""
MAX_NEIGHBOURS = 100


class BrowseInputError(DicomlakeError, ValueError):
    """A browser request carried a value that cannot be used in SQL (says which and why)."""


def check_uid(value: object, what: str) -> str:
    """A DICOM UID (digits and dots), or an error naming the parameter."""
    text = str(value or "")
    if len(text) > 64 or not _UID.match(text):
        raise BrowseInputError(f"{what} must be a DICOM UID (digits and dots, at most 64 "
                               f"characters), got {text[:80]!r}")
    return text


def _code(value: object, what: str) -> str | None:
    if value in (None, ""):
        return None
    text = str(value)
    if not _CODE.match(text):
        raise BrowseInputError(f"{what} must be a short code such as 'CT' (letters, digits, "
                               f"' ', '_', '-', '^'), got {text[:80]!r}")
    return text


def _date(value: object, what: str) -> dt.date | None:
    if value in (None, ""):
        return None
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise BrowseInputError(f"{what} must be a date as YYYY-MM-DD, got "
                               f"{str(value)[:40]!r}") from None


def _int(value: object, what: str, *, default: int, low: int, high: int) -> int:
    if value in (None, ""):
        return default
    try:
        number = int(str(value))
    except ValueError:
        raise BrowseInputError(f"{what} must be an integer, got {str(value)[:40]!r}") from None
    if not low <= number <= high:
        raise BrowseInputError(f"{what} must be between {low} and {high}, got {number}")
    return number


def literal(text: str) -> str:
    """A Trino string literal."""
    return "'" + text.replace("'", "''") + "'"


def _like_pattern(text: str) -> str:
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return literal(f"%{escaped}%")


@dataclass(frozen=True)
class Filters:
    """What the browser's filter bar holds."""

    modality: str | None = None
    body_part: str | None = None
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    text: str | None = None

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> Filters:
        text = str(doc.get("text") or "").strip()
        if len(text) > 200:
            raise BrowseInputError("free text filter is longer than 200 characters")
        if any(ord(ch) < 32 for ch in text):
            raise BrowseInputError("free text filter contains control characters")
        filters = cls(modality=_code(doc.get("modality"), "modality"),
                      body_part=_code(doc.get("bodyPart"), "bodyPart"),
                      date_from=_date(doc.get("dateFrom"), "dateFrom"),
                      date_to=_date(doc.get("dateTo"), "dateTo"),
                      text=text or None)
        if filters.date_from and filters.date_to and filters.date_from > filters.date_to:
            raise BrowseInputError(f"dateFrom {filters.date_from} is after dateTo "
                                   f"{filters.date_to}")
        return filters

    def series_conditions(self, alias: str) -> list[str]:
        """Conditions on ``dicom.series`` rows (modality and body part live per series)."""
        out = []
        if self.modality:
            out.append(f"{alias}.modality = {literal(self.modality)}")
        if self.body_part:
            out.append(f"{alias}.body_part_examined = {literal(self.body_part)}")
        return out


def page_args(doc: dict[str, object], *, default: int = 50) -> tuple[int, int]:
    """``(offset, limit)`` from a request."""
    return (_int(doc.get("offset"), "offset", default=0, low=0, high=10_000_000),
            _int(doc.get("limit"), "limit", default=default, low=1, high=MAX_PAGE))


def facets_sql(column: str) -> str:
    """Values of a filter (with how many series have each), for the filter bar's choices."""
    assert column in ("modality", "body_part_examined")
    return (f"SELECT {column} AS value, count(*) AS series\nFROM dicom.series\n"
            f"WHERE {column} IS NOT NULL\nGROUP BY {column}\nORDER BY series DESC, value")


def studies_sql(filters: Filters, offset: int, limit: int) -> str:
    """Studies matching the filters, newest first, one page."""
    where: list[str] = []
    series = filters.series_conditions("se")
    if series:
        where.append("s.study_instance_uid IN (\n    SELECT se.study_instance_uid FROM "
                     "dicom.series se\n    WHERE " + " AND ".join(series) + ")")
    if filters.date_from:
        where.append(f"s.study_date >= DATE '{filters.date_from.isoformat()}'")
    if filters.date_to:
        where.append(f"s.study_date <= DATE '{filters.date_to.isoformat()}'")
    if filters.text:
        pattern = _like_pattern(filters.text)
        fields = ("s.patient_name", "s.patient_id", "s.study_description",
                  "s.accession_number")
        parts = [f"lower({f}) LIKE {pattern} ESCAPE '\\'" for f in fields]
        parts.append("s.study_instance_uid IN (SELECT study_instance_uid FROM dicom.series "
                     f"WHERE lower(series_description) LIKE {pattern} ESCAPE '\\')")
        where.append("(" + "\n     OR ".join(parts) + ")")
    clause = ("\nWHERE " + "\n  AND ".join(where)) if where else ""
    return ("SELECT s.study_instance_uid, s.study_date, s.patient_name, s.patient_id,\n"
            "       s.study_description, s.modalities, s.series, s.instances\n"
            f"FROM dicom.studies s{clause}\n"
            "ORDER BY s.study_date DESC NULLS LAST, s.study_instance_uid\n"
            f"OFFSET {offset} LIMIT {limit}")


def series_sql(study_uid: str, filters: Filters) -> str:
    """The series of one study (those the filters allow), each with a thumbnail."""
    conditions = [f"se.study_instance_uid = {literal(study_uid)}",
                  *filters.series_conditions("se")]
    return ("WITH firsts AS (\n"
            "  SELECT series_instance_uid, min_by(path, coalesce(instance_number, 0)) AS path\n"
            "  FROM dicom.instances\n"
            f"  WHERE study_instance_uid = {literal(study_uid)}\n"
            "  GROUP BY series_instance_uid)\n"
            "SELECT se.series_instance_uid, se.series_number, se.series_description,\n"
            "       se.modality, se.body_part_examined, se.instances, se.rows, se.columns,\n"
            "       dicom_thumbnail(f.path) AS thumbnail\n"
            "FROM dicom.series se JOIN firsts f\n"
            "  ON f.series_instance_uid = se.series_instance_uid\n"
            "WHERE " + "\n  AND ".join(conditions) + "\n"
            "ORDER BY se.series_number NULLS LAST, se.series_instance_uid")


def instances_sql(series_uid: str, offset: int, limit: int) -> str:
    """One page of a series' instances, in instance order, each with a thumbnail."""
    return ("SELECT sop_instance_uid, instance_number, modality, body_part_examined,\n"
            "       rows, columns, number_of_frames, dicom_thumbnail(path) AS thumbnail\n"
            "FROM dicom.instances\n"
            f"WHERE series_instance_uid = {literal(series_uid)}\n"
            "ORDER BY instance_number NULLS LAST, sop_instance_uid\n"
            f"OFFSET {offset} LIMIT {limit}")


def instance_sql(sop_uid: str) -> str:
    """Everything the lake knows about one instance (``meta`` is the whole header)."""
    return ("SELECT i.*, dicom_thumbnail(i.path) AS thumbnail\n"
            "FROM dicom.instances i\n"
            f"WHERE i.sop_instance_uid = {literal(sop_uid)}")


def similar_sql(sop_uid: str, k: int) -> str:
    """The ``k`` images nearest to one image, nearest first (``image_knn``)."""
    return _neighbours_select(f"image_knn(query => {literal(sop_uid)}, k => {k})")


def _neighbours_select(source: str) -> str:
    """Neighbours from ``source`` (an ``image_knn`` call) with what the grid shows."""
    return ("SELECT n.rank, n.distance, i.sop_instance_uid, i.modality,\n"
            "       i.body_part_examined, i.series_description, i.instance_number,\n"
            "       dicom_thumbnail(i.path) AS thumbnail\n"
            f"FROM {source} n\n"
            "JOIN dicom.instances i ON i.sop_instance_uid = n.sop_instance_uid\n"
            "ORDER BY n.distance, n.rank")


@dataclass(frozen=True)
class ImageSearch:
    """A search by an image that is not in the lake: the statement sent to the endpoint
    (the image inline as an ``X'...'`` literal) and the same statement as the browser shows
    and logs it, with the literal cut to its first bytes and labelled with size and SHA-256
    (the image is the user's, and may be large; it is never stored)."""

    sql: str
    shown: str
    size: int
    sha256: str


def image_search_sql(data: bytes, k: int, label: str) -> ImageSearch:
    """The ``k`` lake images nearest to the image ``data`` (``label`` says what it is)."""
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    call = "image_knn(query_image => X'{}', k => " + str(k) + ")"
    shown = _neighbours_select(call.format(data[:8].hex().upper() + "...")) + (
        f"\n-- query_image: {label}, {len(data)} bytes, sha256 {digest}")
    return ImageSearch(sql=_neighbours_select(call.format(data.hex().upper())), shown=shown,
                       size=len(data), sha256=digest)


def neighbours_arg(doc: dict[str, object]) -> int:
    """``k`` for find-similar requests."""
    return _int(doc.get("k"), "k", default=12, low=1, high=MAX_NEIGHBOURS)


def count_source_sql(folder: str) -> str:
    """How many instances came from an uploaded folder (what the upload shows afterwards)."""
    return ("SELECT count(*) AS instances, count(DISTINCT series_instance_uid) AS series\n"
            "FROM dicom.instances\n"
            f"WHERE starts_with(path, {literal(folder)})")
