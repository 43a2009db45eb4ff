"""Which image a SQL argument names: images by identifier, never by an arbitrary file path.

``dicom_thumbnail(x)`` (and ``image_knn`` for non-admins) take what the caller's own
``instances`` table holds: a ``sop_instance_uid`` or a ``path`` of it. The argument is looked
up in that table, never in the file system, so a path outside the lake gets the same answer
whether or not the file exists, and nothing outside the lake is ever opened.

An :class:`ImageScope` says which tables a role's functions read: admins and clinicians the
``dicom`` tables, analysts the de-identified ``dicom_deid`` twins, whose identifiers are
pseudonyms. For those the index maps pseudonyms back to the raw file with the lake's key,
inside the Python worker (the server's own process tree): the mapping is never a table, and
neither key nor raw path reaches SQL, results or error messages.

Pixels follow one rule on every path (SQL thumbnails, the browser, DICOMweb):
:func:`pixels_allowed`. An image whose BurnedInAnnotation (0028,0301) is YES carries
identifying text in its pixels (names, dates, ids stamped into ultrasound and screenshot
frames) that no header de-identification removes, so de-identified views get none of its
pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dicomlake.catalog.deid import DEID_SCHEMA, RAW_SCHEMA
from dicomlake.catalog.snapshots import TableRows
from dicomlake.udfs.errors import UnknownImageError

if TYPE_CHECKING:
    import pyarrow as pa


def burned_in_annotation(meta: str | None) -> str | None:
    """BurnedInAnnotation (0028,0301) of a stored header (DICOM JSON), upper-cased; None
    when absent."""
    if not meta or '"00280301"' not in meta:
        return None
    import orjson

    values = orjson.loads(meta).get("00280301", {}).get("Value") or [None]
    return None if values[0] is None else str(values[0]).strip().upper()


def pixels_allowed(burned_in: str | None, *, deidentified: bool) -> bool:
    """Whether a view may receive an image's pixels: always, unless the view must not show
    identifiers (the ``dicom_deid`` scope) and the image's BurnedInAnnotation is YES."""
    return not deidentified or (burned_in or "").strip().upper() != "YES"


def withheld_reason(sop_instance_uid: str) -> str:
    """What a refused client is told (the same words on every path)."""
    return (f"pixel data of instance {sop_instance_uid} is withheld: its BurnedInAnnotation "
            "(0028,0301) is YES, so its pixels may show identifiers, which this role must "
            "not see")


@dataclass(frozen=True)
class ImageScope:
    """The tables a session's image functions read, and whether file paths are accepted."""

    schema: str = RAW_SCHEMA
    """``dicom`` or ``dicom_deid``: where image_knn searches and filters, and what ids mean."""
    paths: bool = True
    """Whether ``image_knn(query => ...)`` may embed an image file given by path (admins)."""

    @property
    def deidentified(self) -> bool:
        return self.schema == DEID_SCHEMA


ADMIN_SCOPE = ImageScope()
CLINICIAN_SCOPE = ImageScope(paths=False)
ANALYST_SCOPE = ImageScope(DEID_SCHEMA, paths=False)


@dataclass
class ImageIndex:
    """Identifier (SOP Instance UID or path, as the scope's ``instances`` holds them) -> the
    raw path of the lake's file; follows ``dicom.instances`` (kept open: a check costs an
    ``update_incremental``, and rows the stream appended are added without a re-read)."""

    home: Path
    warehouse: Path
    scope: ImageScope
    _paths: dict[str, str] = field(default_factory=dict)
    _withheld: set[str] = field(default_factory=set)
    """Raw paths whose pixels this scope may not see (:func:`pixels_allowed`)."""
    _rows: TableRows = field(init=False)

    def __post_init__(self) -> None:
        columns = ["sop_instance_uid", "path"] + (["meta"] if self.scope.deidentified else [])
        self._rows = TableRows(self.warehouse / RAW_SCHEMA / "instances", columns)

    def refresh(self) -> None:
        if not self._rows.refresh():
            return
        added = self._rows.added
        data = self._rows.rows if added is None else added
        if added is None:
            self._withheld = set()
        try:
            found = self._entries(data) if data is not None else {}
        except BaseException:
            self.__post_init__()  # the rows moved on, the index did not: read all next time
            raise
        if added is None:
            self._paths = found
        else:
            self._paths.update(found)

    def _entries(self, data: pa.Table) -> dict[str, str]:
        """Identifier -> raw path for these rows of ``dicom.instances``."""
        uids = data.column("sop_instance_uid").to_pylist()
        raw = data.column("path").to_pylist()
        found: dict[str, str] = {}
        if self.scope.deidentified:
            from dicomlake.catalog.deid import Pseudonymizer, load_key

            pseudo = Pseudonymizer(load_key(self.home, create=False))
            for uid, path in zip(uids, raw, strict=True):
                if uid:
                    found[pseudo.uid(uid)] = path
                found[pseudo.file(path)] = path
            for path, meta in zip(raw, data.column("meta").to_pylist(), strict=True):
                if not pixels_allowed(burned_in_annotation(meta), deidentified=True):
                    self._withheld.add(path)
        else:
            for uid, path in zip(uids, raw, strict=True):
                if uid:
                    found[uid] = path
                found[path] = path
        return found

    def path_of(self, ref: str) -> str:
        """The raw path of the image ``ref`` names.

        Raises:
            UnknownImageError: no instance of the scope's table has that id or path.
        """
        found = self._paths.get(ref.strip())
        if found is None:
            raise UnknownImageError(
                f"no image of {self.scope.schema}.instances has the id or path {ref!r}; "
                "pass its sop_instance_uid (or path) from that table")
        return found


    def pixels_allowed(self, path: str) -> bool:
        """Whether this scope may see the pixels of the lake's file ``path`` (a raw path
        :meth:`path_of` returned)."""
        return path not in self._withheld


_INDEXES: dict[tuple[str, str, ImageScope], ImageIndex] = {}


def image_index(home: str, warehouse: str, scope: ImageScope) -> ImageIndex:
    """The worker's index for this lake and scope, brought up to date."""
    key = (home, warehouse, scope)
    if key not in _INDEXES:
        _INDEXES[key] = ImageIndex(Path(home), Path(warehouse), scope)
    index = _INDEXES[key]
    index.refresh()
    return index
