"""DICOM attribute matching (PS3.4 C.2.2.2) over Arrow columns: one engine for QIDO and C-FIND.

A query value is a DICOM matching string; how it matches depends on the attribute's kind:

* empty, or only ``*``: universal matching (every row, NULL included);
* ``u1\\u2``: list of UID matching (UIDs only);
* ``*`` and ``?`` anywhere: wild card matching (``%``/``_`` are literal);
* dates/times ``a-b``, ``a-``, ``-b``: range matching, bounds included;
* person names: case-insensitive, and with fuzzy matching any name component (family,
  given, ...) that starts with the value matches, as Orthanc and dcm4chee do;
* anything else: single value matching (exact).

Each value becomes one boolean mask over a table's column, computed by ``pyarrow.compute``
(vectorized: a search over thousands of rows costs well under a millisecond), and the masks
of all attributes are combined with AND. A value the attribute cannot hold (a date that is
no date) raises :class:`MatchError` naming the attribute, so a client is told what was wrong.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from dicomlake.errors import DicomlakeError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["Kind", "MatchError", "Matcher", "mask"]


class MatchError(DicomlakeError, ValueError):
    """A query value that cannot be matched; the message names the attribute."""

    def __init__(self, keyword: str, message: str) -> None:
        super().__init__(f"{keyword}: {message}")
        self.keyword = keyword


class Kind(StrEnum):
    """How values of one attribute are matched."""

    TEXT = "text"
    """Single value or wild card, case-sensitive (CS, LO, SH)."""
    UID = "uid"
    """Single value or a backslash-separated list of UIDs."""
    NAME = "name"
    """Person name: case-insensitive, fuzzy on request."""
    DATE = "date"
    """A date32 column; ``YYYYMMDD`` values and ranges."""
    TIME = "time"
    """A TM string column (``HHMMSS.ffffff``, any prefix); values and ranges."""
    INT = "int"
    """An integer column (IS, US); single values."""
    LIST = "list"
    """A list<string> column (ModalitiesInStudy): a row matches when any element does."""


_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


@dataclass(frozen=True)
class Matcher:
    """One attribute's query value, parsed once, applied to a column by :meth:`mask`."""

    keyword: str
    kind: Kind
    value: str
    fuzzy: bool = False

    @property
    def universal(self) -> bool:
        """Whether every row matches (zero-length value or a lone ``*``)."""
        return self.value.strip().strip("*") == ""

    def mask(self, column: pa.Array | pa.ChunkedArray | None, length: int) -> pa.Array:
        """The rows of ``column`` (``length`` rows; None: the table lacks the attribute, so
        only universal matching matches) that match."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.universal:
            return pa.array([True] * length, pa.bool_())
        if column is None:
            return pa.array([False] * length, pa.bool_())
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        hit = _KIND_MASKS[self.kind](self, column)
        return pc.fill_null(hit, False)


def _like(value: str) -> str:
    """A DICOM wild card pattern as a SQL LIKE pattern (``%``/``_``/``\\`` escaped)."""
    out = []
    for ch in value:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def _text(m: Matcher, column: pa.Array) -> pa.Array:
    import pyarrow as pa
    import pyarrow.compute as pc

    if "*" in m.value or "?" in m.value:
        return pc.match_like(column, _like(m.value))
    return pc.equal(column, pa.scalar(m.value, column.type))


def _uid(m: Matcher, column: pa.Array) -> pa.Array:
    import pyarrow as pa
    import pyarrow.compute as pc

    uids = [u.strip() for u in m.value.split("\\") if u.strip()]
    if len(uids) == 1 and ("*" in uids[0] or "?" in uids[0]):
        return pc.match_like(column, _like(uids[0]))
    return pc.is_in(column, value_set=pa.array(uids, pa.string()))


def _name(m: Matcher, column: pa.Array) -> pa.Array:
    import pyarrow.compute as pc

    value = m.value.strip()
    lower = pc.utf8_lower(column)
    if m.fuzzy:
        # any component (family, given, middle ...; any of the =-groups) starting with the
        # value, wild cards honoured inside it
        body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                       for c in value.lower().rstrip("*"))
        return pc.match_substring_regex(lower, f"(^|[\\^= ,]){body}")
    if "*" in value or "?" in value:
        return pc.match_like(lower, _like(value.lower()))
    return pc.equal(lower, value.lower())


def _date_bound(m: Matcher, text: str) -> dt.date:
    if not _DATE.match(text):
        raise MatchError(m.keyword, f"{text!r} is not a date; use YYYYMMDD, or a range "
                                    "YYYYMMDD-YYYYMMDD (either side may be left out)")
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError as exc:
        raise MatchError(m.keyword, f"{text!r} is not a date ({exc})") from None


def _range(m: Matcher) -> tuple[str, str | None, bool]:
    """(low, high, is_range) of a date/time matching value (separators removed)."""
    # old ACR-NEMA forms: 2020.01.31 dates, 12:30:00 times
    value = m.value.replace(":", "") if m.kind is Kind.TIME else m.value.replace(".", "")
    if "-" not in value:
        return value.strip(), None, False
    if value.count("-") != 1:
        raise MatchError(m.keyword, f"{m.value!r} has more than one '-'; a range is low-high")
    low, high = (p.strip() for p in value.split("-"))
    return low, high, True


def _date(m: Matcher, column: pa.Array) -> pa.Array:
    import pyarrow as pa
    import pyarrow.compute as pc

    low, high, is_range = _range(m)
    if not is_range:
        return pc.equal(column, pa.scalar(_date_bound(m, low), pa.date32()))
    if not low and not high:
        raise MatchError(m.keyword, "'-' alone is no range; give a low and/or high date")
    hit = None
    if low:
        hit = pc.greater_equal(column, pa.scalar(_date_bound(m, low), pa.date32()))
    if high:
        upper = pc.less_equal(column, pa.scalar(_date_bound(m, high), pa.date32()))
        hit = upper if hit is None else pc.and_(hit, upper)
    assert hit is not None
    return hit


def _time_bound(m: Matcher, text: str) -> str:
    if not _TIME.match(text):
        raise MatchError(m.keyword, f"{text!r} is not a time; use HHMMSS (or HH, HHMM, "
                                    "HHMMSS.ffffff), or a range a-b")
    return text


def _time(m: Matcher, column: pa.Array) -> pa.Array:
    import pyarrow.compute as pc

    low, high, is_range = _range(m)
    # TM values compare as text once colons are gone: a prefix sorts before its extensions
    text = pc.replace_substring(column, ":", "")
    if not is_range:
        return pc.starts_with(text, _time_bound(m, low))
    if not low and not high:
        raise MatchError(m.keyword, "'-' alone is no range; give a low and/or high time")
    hit = None
    if low:
        hit = pc.greater_equal(text, _time_bound(m, low))
    if high:
        # the high bound includes everything it is a prefix of (120000 < 12000030)
        upper = pc.or_(pc.less_equal(text, _time_bound(m, high)), pc.starts_with(text, high))
        hit = upper if hit is None else pc.and_(hit, upper)
    assert hit is not None
    return hit


def _int(m: Matcher, column: pa.Array) -> pa.Array:
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        number = int(m.value.strip())
    except ValueError:
        raise MatchError(m.keyword, f"{m.value!r} is not an integer") from None
    return pc.equal(column, pa.scalar(number, column.type))


def _list(m: Matcher, column: pa.Array) -> pa.Array:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    flat = pc.list_flatten(column)
    parents = pc.list_parent_indices(column)
    values = [v for v in m.value.split("\\") if v]
    element = Matcher(m.keyword, Kind.TEXT, values[0]) if len(values) == 1 else None
    hit = _text(element, flat) if element is not None else \
        pc.is_in(flat, value_set=pa.array(values, pa.string()))
    rows = np.zeros(len(column), dtype=bool)
    rows[parents.to_numpy()[hit.to_numpy(zero_copy_only=False)]] = True
    return pa.array(rows)


_KIND_MASKS = {Kind.TEXT: _text, Kind.UID: _uid, Kind.NAME: _name, Kind.DATE: _date,
               Kind.TIME: _time, Kind.INT: _int, Kind.LIST: _list}


def mask(table: pa.Table, matchers: list[tuple[Matcher, str]]) -> pa.Array:
    """Rows of ``table`` matching every (matcher, column name) pair (AND); a column the table
    lacks matches only universally."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = pa.array([True] * table.num_rows, pa.bool_())
    for matcher, name in matchers:
        column = table.column(name) if name in table.column_names else None
        out = pc.and_(out, matcher.mask(column, table.num_rows))
    return out
