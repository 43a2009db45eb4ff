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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dicomlake.catalog.deid import DEID_SCHEMA, RAW_SCHEMA
from dicomlake.udfs.errors import UnknownImageError


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
    raw path of the lake's file; re-read when ``dicom.instances`` gets a new version."""

    home: Path
    warehouse: Path
    scope: ImageScope
    _version: int = -2
    _paths: dict[str, str] = field(default_factory=dict)

    def refresh(self) -> None:
        from dicomlake.udfs.deltalog import latest_version
        from dicomlake.udfs.knn import _read_snapshot

        table = self.warehouse / RAW_SCHEMA / "instances"
        if latest_version(table) == self._version:
            return
        version, data = _read_snapshot(table, ["sop_instance_uid", "path"])
        paths: dict[str, str] = {}
        if data is not None:
            uids = data.column("sop_instance_uid").to_pylist()
            raw = data.column("path").to_pylist()
            if self.scope.deidentified:
                from dicomlake.catalog.deid import Pseudonymizer, load_key

                pseudo = Pseudonymizer(load_key(self.home, create=False))
                for uid, path in zip(uids, raw, strict=True):
                    if uid:
                        paths[pseudo.uid(uid)] = path
                    paths[pseudo.file(path)] = path
            else:
                for uid, path in zip(uids, raw, strict=True):
                    if uid:
                        paths[uid] = path
                    paths[path] = path
        self._paths, self._version = paths, version

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


_INDEXES: dict[tuple[str, str, ImageScope], ImageIndex] = {}


def image_index(home: str, warehouse: str, scope: ImageScope) -> ImageIndex:
    """The worker's index for this lake and scope, brought up to date."""
    key = (home, warehouse, scope)
    if key not in _INDEXES:
        _INDEXES[key] = ImageIndex(Path(home), Path(warehouse), scope)
    index = _INDEXES[key]
    index.refresh()
    return index
