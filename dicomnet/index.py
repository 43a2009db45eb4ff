"""The catalog as DICOM sees it: one role's studies, series and instances held in memory.

API (used by QIDO-RS here and by DIMSE C-FIND in :mod:`dicomlake.dicomnet.dimse`)::

    index = catalog_index(settings, role)        # one per (lake, role), shared, thread-safe
    index.studies(query, limit=None, offset=0, fuzzy=False, include=())
    index.series(query, study=None, ...)         # same keyword arguments
    index.instances(query, study=None, series=None, ...)
    index.instance(sop_instance_uid) -> InstanceRef | None    # what WADO-RS reads
    index.instance_refs(study, series=None) -> list[InstanceRef]

``query`` maps DICOM keywords (``PatientID``, ``StudyDate``, ``ModalitiesInStudy``,
``SeriesInstanceUID`` ...) or 8-hex-digit tags (``00100020``) to DICOM matching strings
(:mod:`dicomlake.dicomnet.matching`: wild cards, date/time ranges, UID lists, fuzzy person
names). Each method returns DICOM JSON datasets (PS3.18 F.2: ``{"0020000D": {"vr": "UI",
"Value": [...]}}``) with the level's default attributes, the matched ones, and those named
in ``include`` (keywords or tags; ``"all"`` adds every attribute the level holds); an
attribute the catalog has no column for is taken from the stored header (``meta``) of the
study's or series' first instance. An attribute that cannot be matched raises
:class:`~dicomlake.dicomnet.matching.MatchError` (a ValueError naming it).

Which tables: admins and clinicians see ``dicom.instances``; analysts see the de-identified
twin ``dicom_deid.instances`` (pseudonymous UIDs, shifted dates, pseudonymised names and
ids), exactly what SQL gives them. Study and series rows are aggregated here from the
instances (the ``studies``/``series`` tables hold the same aggregates but fewer attributes).

Why in memory and not Spark: a Spark query costs ~100 ms, a QIDO search should cost a few.
Rows are read by delta-rs (:class:`~dicomlake.catalog.snapshots.TableRows`: appended files
only, when the stream appends) and the index is rebuilt when the table's Delta version
changes, checked at most every :attr:`CatalogIndex.check_seconds`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from typing import TYPE_CHECKING, Any

from dicomlake.catalog.deid import DEID_SCHEMA, RAW_SCHEMA
from dicomlake.dicomnet.matching import Kind, Matcher, MatchError, mask

if TYPE_CHECKING:
    from pathlib import Path

    import pyarrow as pa

    from dicomlake.config import Settings
    from dicomlake.sql.users import Role

__all__ = ["ATTRIBUTES", "Attribute", "CatalogIndex", "InstanceRef", "Level", "catalog_index",
           "element", "schema_for", "tag_of"]


class Level(StrEnum):
    """The query/retrieve levels of the information model."""

    STUDY = "STUDY"
    SERIES = "SERIES"
    INSTANCE = "IMAGE"


@dataclass(frozen=True)
class Attribute:
    """A DICOM attribute the index holds as a column."""

    keyword: str
    vr: str
    column: str
    kind: Kind
    level: Level
    default: bool = True
    """Returned at its level without being asked for (PS3.18 Table 10.6.3-3..5)."""

    @property
    def tag(self) -> str:
        return tag_of(self.keyword)


_S, _E, _I = Level.STUDY, Level.SERIES, Level.INSTANCE
ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("StudyInstanceUID", "UI", "study_instance_uid", Kind.UID, _S),
    Attribute("StudyDate", "DA", "study_date", Kind.DATE, _S),
    Attribute("StudyTime", "TM", "study_time", Kind.TIME, _S),
    Attribute("AccessionNumber", "SH", "accession_number", Kind.TEXT, _S),
    Attribute("PatientName", "PN", "patient_name", Kind.NAME, _S),
    Attribute("PatientID", "LO", "patient_id", Kind.TEXT, _S),
    Attribute("PatientBirthDate", "DA", "patient_birth_date", Kind.DATE, _S),
    Attribute("PatientSex", "CS", "patient_sex", Kind.TEXT, _S),
    Attribute("StudyID", "SH", "study_id", Kind.TEXT, _S),
    Attribute("StudyDescription", "LO", "study_description", Kind.TEXT, _S),
    Attribute("ModalitiesInStudy", "CS", "modalities", Kind.LIST, _S),
    Attribute("NumberOfStudyRelatedSeries", "IS", "study_series", Kind.INT, _S),
    Attribute("NumberOfStudyRelatedInstances", "IS", "study_instances", Kind.INT, _S),
    Attribute("SeriesInstanceUID", "UI", "series_instance_uid", Kind.UID, _E),
    Attribute("Modality", "CS", "modality", Kind.TEXT, _E),
    Attribute("SeriesNumber", "IS", "series_number", Kind.INT, _E),
    Attribute("SeriesDescription", "LO", "series_description", Kind.TEXT, _E),
    Attribute("BodyPartExamined", "CS", "body_part_examined", Kind.TEXT, _E, default=False),
    Attribute("Manufacturer", "LO", "manufacturer", Kind.TEXT, _E, default=False),
    Attribute("NumberOfSeriesRelatedInstances", "IS", "series_instances", Kind.INT, _E),
    Attribute("SOPInstanceUID", "UI", "sop_instance_uid", Kind.UID, _I),
    Attribute("SOPClassUID", "UI", "sop_class_uid", Kind.UID, _I),
    Attribute("InstanceNumber", "IS", "instance_number", Kind.INT, _I),
    Attribute("Rows", "US", "rows", Kind.INT, _I),
    Attribute("Columns", "US", "columns", Kind.INT, _I),
    Attribute("BitsAllocated", "US", "bits_allocated", Kind.INT, _I),
    Attribute("NumberOfFrames", "IS", "number_of_frames", Kind.INT, _I),
)
"""Every attribute held as a column, by level."""

_BY_KEYWORD = {a.keyword: a for a in ATTRIBUTES}
_LEVELS = (Level.STUDY, Level.SERIES, Level.INSTANCE)

_COLUMNS = ("sop_instance_uid", "sop_class_uid", "study_instance_uid", "series_instance_uid",
            "patient_id", "patient_name", "patient_sex", "patient_birth_date", "study_date",
            "study_time", "study_id", "study_description", "accession_number",
            "series_number", "series_description", "instance_number", "modality",
            "body_part_examined", "manufacturer", "rows", "columns", "number_of_frames",
            "samples_per_pixel", "bits_allocated", "transfer_syntax_uid",
            "pixel_data_offset", "pixel_data_length", "path", "meta")
"""What is read from ``instances`` (those the role's table has)."""


@cache
def tag_of(keyword: str) -> str:
    """The 8-hex-digit tag of a keyword, or the tag itself when given one.

    Raises:
        MatchError: neither a keyword of the data dictionary nor a tag.
    """
    from pydicom.datadict import tag_for_keyword

    text = keyword.strip()
    if len(text) == 8 and all(c in "0123456789abcdefABCDEF" for c in text):
        return text.upper()
    tag = tag_for_keyword(text)
    if tag is None:
        raise MatchError(keyword, "is neither a DICOM keyword nor an 8-hex-digit tag")
    return f"{tag:08X}"


@cache
def _keyword_of(tag: str) -> str:
    from pydicom.datadict import keyword_for_tag

    return keyword_for_tag(int(tag, 16)) or tag


def schema_for(role: Role) -> str:
    """The database whose tables a role is answered from (analysts: the de-identified)."""
    from dicomlake.sql.users import Role

    return DEID_SCHEMA if role is Role.ANALYST else RAW_SCHEMA


def element(vr: str, value: Any) -> dict[str, Any]:
    """One DICOM JSON element from a column value (None: the element without a value)."""
    import datetime as dt

    if value is None or (isinstance(value, list) and not value):
        return {"vr": vr}
    values = value if isinstance(value, list) else [value]
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": str(v)} for v in values]}
    if vr == "DA":
        return {"vr": vr, "Value": [v.strftime("%Y%m%d") if isinstance(v, dt.date) else str(v)
                                    for v in values]}
    if vr in ("IS", "US", "UL", "SS", "SL"):
        return {"vr": vr, "Value": [int(v) for v in values]}
    return {"vr": vr, "Value": [str(v) for v in values]}


@dataclass(frozen=True)
class InstanceRef:
    """What WADO-RS needs of one instance (identifiers as the role sees them)."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str | None
    path: str
    """The ``path`` column: the raw path for admins and clinicians, a pseudonym for
    analysts (resolve it with :mod:`dicomlake.udfs.images`)."""
    transfer_syntax_uid: str | None
    pixel_data_offset: int | None
    pixel_data_length: int | None
    frames: int
    rows: int | None
    columns: int | None
    samples_per_pixel: int
    bits_allocated: int | None
    meta: str
    """The stored header, DICOM JSON text (de-identified for analysts)."""

    @property
    def burned_in_annotation(self) -> str | None:
        """BurnedInAnnotation (0028,0301) as stored (YES/NO), None when absent."""
        from dicomlake.udfs.images import burned_in_annotation

        return burned_in_annotation(self.meta)


@dataclass(frozen=True)
class _Snapshot:
    """The index at one Delta version: a table per level and lookups by UID."""

    version: int
    levels: dict[Level, pa.Table]
    by_sop: dict[str, int]
    by_series: dict[str, list[int]]
    by_study: dict[str, list[int]]
    refs: dict[int, InstanceRef] = field(default_factory=dict, compare=False)
    """Instance rows already turned into :class:`InstanceRef` (a viewer asks for every
    frame of a series, each a request; building one from Arrow costs ~0.4 ms)."""

    def ref(self, row: int) -> InstanceRef:
        """The instance at ``row`` of the instance level."""
        found = self.refs.get(row)
        if found is None:
            found = self.refs[row] = _ref(self.levels[Level.INSTANCE], row)
        return found


def _empty() -> _Snapshot:
    import pyarrow as pa

    table = pa.table({c: pa.array([], pa.string()) for c in ("study_instance_uid",)})
    return _Snapshot(-1, {level: table for level in _LEVELS}, {}, {}, {})


class CatalogIndex:
    """One role's view of the lake, held as Arrow and matched in memory (see module doc)."""

    check_seconds = 0.5
    """How stale a search may be: the Delta version is checked at most this often."""

    def __init__(self, warehouse: Path, schema: str) -> None:
        self.warehouse = warehouse
        self.schema = schema
        self._lock = threading.Lock()
        self._rows: Any = None
        self._snapshot = _empty()
        self._checked = 0.0

    @property
    def deidentified(self) -> bool:
        return self.schema == DEID_SCHEMA

    # -- refresh ---------------------------------------------------------------------------

    def refresh(self, *, force: bool = False) -> _Snapshot:
        """The newest snapshot (re-read when the table's version changed)."""
        now = time.monotonic()
        if not force and now - self._checked < self.check_seconds:
            return self._snapshot
        with self._lock:
            if not force and now - self._checked < self.check_seconds:
                return self._snapshot
            rows = self._table_rows()
            if rows is not None and rows.refresh() and rows.rows is not None:
                self._snapshot = _build(rows.version, rows.rows)
            elif rows is None or rows.rows is None:
                self._snapshot = _empty()
            self._checked = time.monotonic()
            return self._snapshot

    def _table_rows(self) -> Any:
        """The followed ``instances`` table (None while it does not exist)."""
        if self._rows is not None:
            return self._rows
        from dicomlake.catalog.snapshots import FollowedTable, TableRows, schema_of

        location = self.warehouse / self.schema / "instances"
        table = FollowedTable(location).table()
        if table is None:
            return None
        names = set(schema_of(table).names)
        self._rows = TableRows(location, [c for c in _COLUMNS if c in names])
        return self._rows

    # -- searches --------------------------------------------------------------------------

    def studies(self, query: Mapping[str, str], limit: int | None = None, offset: int = 0,
                fuzzy: bool = False, include: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Studies matching ``query`` as DICOM JSON (see module doc)."""
        return self._search(Level.STUDY, query, {}, limit, offset, fuzzy, include)

    def series(self, query: Mapping[str, str], study: str | None = None,
               limit: int | None = None, offset: int = 0, fuzzy: bool = False,
               include: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Series matching ``query`` (within ``study`` when given) as DICOM JSON."""
        scope = {"StudyInstanceUID": study} if study else {}
        return self._search(Level.SERIES, query, scope, limit, offset, fuzzy, include)

    def instances(self, query: Mapping[str, str], study: str | None = None,
                  series: str | None = None, limit: int | None = None, offset: int = 0,
                  fuzzy: bool = False, include: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Instances matching ``query`` (within ``study``/``series``) as DICOM JSON."""
        scope = {k: v for k, v in (("StudyInstanceUID", study),
                                   ("SeriesInstanceUID", series)) if v}
        return self._search(Level.INSTANCE, query, scope, limit, offset, fuzzy, include)

    def _search(self, level: Level, query: Mapping[str, str], scope: Mapping[str, str],
                limit: int | None, offset: int, fuzzy: bool,
                include: Iterable[str]) -> list[dict[str, Any]]:
        snapshot = self.refresh()
        table = snapshot.levels[level]
        rank = _LEVELS.index(level)
        matchers: list[tuple[Matcher, str]] = []
        wanted: dict[str, Attribute | None] = {}
        for key, value in [*query.items(), *scope.items()]:
            tag = tag_of(key)
            attribute = _BY_KEYWORD.get(_keyword_of(tag))
            if attribute is None or _LEVELS.index(attribute.level) > rank:
                raise MatchError(key, f"cannot be matched at the {level.value} level; "
                                      f"matchable: {', '.join(_matchable(level))}")
            matchers.append((Matcher(attribute.keyword, attribute.kind, str(value), fuzzy),
                             attribute.column))
            wanted[tag] = attribute
        if offset < 0 or (limit is not None and limit < 0):
            raise MatchError("limit" if offset >= 0 else "offset", "must not be negative")
        hits = table.filter(mask(table, matchers)) if matchers else table
        end = None if limit is None else offset + limit
        hits = hits.slice(offset, None if end is None else max(0, end - offset))
        for attribute in ATTRIBUTES:
            if attribute.default and _LEVELS.index(attribute.level) <= rank and (
                    attribute.level is level or level is not Level.INSTANCE
                    or attribute.keyword in ("StudyInstanceUID", "SeriesInstanceUID")):
                wanted.setdefault(attribute.tag, attribute)
        for name in include:
            if name.strip().lower() == "all":
                for attribute in ATTRIBUTES:
                    if _LEVELS.index(attribute.level) <= rank:
                        wanted.setdefault(attribute.tag, attribute)
                continue
            tag = tag_of(name)
            found = _BY_KEYWORD.get(_keyword_of(tag))
            wanted.setdefault(tag, found if found is not None
                              and _LEVELS.index(found.level) <= rank else None)
        return _datasets(hits, wanted)

    # -- retrieval -------------------------------------------------------------------------

    def instance(self, sop_instance_uid: str) -> InstanceRef | None:
        """One instance by its SOP Instance UID (as the role sees it)."""
        snapshot = self.refresh()
        row = snapshot.by_sop.get(sop_instance_uid)
        return None if row is None else snapshot.ref(row)

    def instance_refs(self, study: str, series: str | None = None) -> list[InstanceRef]:
        """The instances of a study (or of one series of it), in series and instance order."""
        snapshot = self.refresh()
        rows = snapshot.by_series.get(series, []) if series else snapshot.by_study.get(study, [])
        refs = [snapshot.ref(r) for r in rows]
        return [r for r in refs if r.study_instance_uid == study]


def _matchable(level: Level) -> list[str]:
    rank = _LEVELS.index(level)
    return [a.keyword for a in ATTRIBUTES if _LEVELS.index(a.level) <= rank]


def _build(version: int, rows: pa.Table) -> _Snapshot:
    """Sorted instance, series and study tables, and the UID lookups, from instance rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for name in _COLUMNS:  # a column the role's table lacks (free text for analysts): NULL
        if name not in rows.column_names:
            rows = rows.append_column(name, pa.nulls(rows.num_rows, pa.string()))
    rows = rows.filter(pc.is_valid(rows.column("sop_instance_uid")))
    rows = rows.sort_by([("study_date", "descending"), ("study_instance_uid", "ascending"),
                         ("series_number", "ascending"), ("series_instance_uid", "ascending"),
                         ("instance_number", "ascending"), ("sop_instance_uid", "ascending")])
    rows = rows.append_column("_row", pa.array(range(rows.num_rows), pa.int64()))
    study_counts = rows.group_by("study_instance_uid", use_threads=False).aggregate([
        ("series_instance_uid", "count_distinct"), ("sop_instance_uid", "count"),
        ("modality", "distinct"), ("_row", "min")]).rename_columns({
            "series_instance_uid_count_distinct": "study_series",
            "sop_instance_uid_count": "study_instances", "modality_distinct": "modalities",
            "_row_min": "_first"})
    series_counts = rows.group_by("series_instance_uid", use_threads=False).aggregate([
        ("sop_instance_uid", "count"), ("_row", "min")]).rename_columns({
            "sop_instance_uid_count": "series_instances", "_row_min": "_first"})
    study_of = {k: i for i, k in enumerate(
        study_counts.column("study_instance_uid").to_pylist())}
    first_study = rows.take(study_counts.column("_first")).drop_columns(["_row"])
    studies = _attach(first_study, study_counts, ["study_series", "study_instances",
                                                  "modalities"])
    first_series = rows.take(series_counts.column("_first")).drop_columns(["_row"])
    series = _attach(first_series, series_counts, ["series_instances"])
    index = pa.array([study_of[u] for u in series.column("study_instance_uid").to_pylist()],
                     pa.int64())
    for name in ("study_series", "study_instances", "modalities"):
        series = series.append_column(name, study_counts.column(name).take(index))
    studies = studies.sort_by([("study_date", "descending"), ("study_instance_uid",
                                                              "ascending")])
    series = series.sort_by([("study_date", "descending"), ("study_instance_uid", "ascending"),
                             ("series_number", "ascending"),
                             ("series_instance_uid", "ascending")])
    instances = rows.drop_columns(["_row"])
    by_sop: dict[str, int] = {}
    by_series: dict[str, list[int]] = {}
    by_study: dict[str, list[int]] = {}
    for i, (sop, ser, stu) in enumerate(zip(
            instances.column("sop_instance_uid").to_pylist(),
            instances.column("series_instance_uid").to_pylist(),
            instances.column("study_instance_uid").to_pylist(), strict=True)):
        by_sop.setdefault(sop, i)  # a duplicate SOP Instance UID: the first row answers
        by_series.setdefault(ser, []).append(i)
        by_study.setdefault(stu, []).append(i)
    return _Snapshot(version, {Level.STUDY: studies, Level.SERIES: series,
                               Level.INSTANCE: instances}, by_sop, by_series, by_study)


def _attach(first: pa.Table, counts: pa.Table, names: list[str]) -> pa.Table:
    for name in names:
        first = first.append_column(name, counts.column(name))
    return first


def _datasets(hits: pa.Table, wanted: Mapping[str, Attribute | None]) -> list[dict[str, Any]]:
    """DICOM JSON for each row: columns for attributes the index holds, else the element of
    the stored header (``meta``) of the row."""
    import orjson

    if hits.num_rows == 0:
        return []
    columns = {tag: hits.column(a.column).to_pylist() for tag, a in wanted.items()
               if a is not None}
    from_meta = sorted(tag for tag, a in wanted.items() if a is None)
    metas = hits.column("meta").to_pylist() if from_meta else []
    out: list[dict[str, Any]] = []
    for i in range(hits.num_rows):
        dataset: dict[str, Any] = {}
        header = orjson.loads(metas[i]) if from_meta and metas[i] else {}
        for tag in sorted(wanted):
            attribute = wanted[tag]
            if attribute is not None:
                dataset[tag] = element(attribute.vr, columns[tag][i])
            elif tag in header and "BulkDataURI" not in header[tag]:
                dataset[tag] = header[tag]
        out.append(dataset)
    return out


def _ref(table: pa.Table, row: int) -> InstanceRef:
    data = {name: table.column(name)[row].as_py() for name in (
        "sop_instance_uid", "series_instance_uid", "study_instance_uid", "sop_class_uid",
        "path", "transfer_syntax_uid", "pixel_data_offset", "pixel_data_length",
        "number_of_frames", "rows", "columns", "samples_per_pixel", "bits_allocated", "meta")}
    frames = data.pop("number_of_frames")
    spp = data.pop("samples_per_pixel")
    return InstanceRef(frames=int(frames or 1), samples_per_pixel=int(spp or 1), **data)


_INDEXES: dict[tuple[str, str], CatalogIndex] = {}
_INDEXES_LOCK = threading.Lock()


def catalog_index(settings: Settings, role: Role) -> CatalogIndex:
    """The shared index of this lake for ``role`` (one per lake and schema per process)."""
    schema = schema_for(role)
    key = (str(settings.warehouse_path), schema)
    with _INDEXES_LOCK:
        if key not in _INDEXES:
            _INDEXES[key] = CatalogIndex(settings.warehouse_path, schema)
        return _INDEXES[key]
