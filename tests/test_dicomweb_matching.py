"""The attribute-matching engine QIDO-RS and C-FIND share, and the burned-in pixel rule."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from dicomlake.dicomnet.index import tag_of
from dicomlake.dicomnet.matching import Kind, Matcher, MatchError, mask
from dicomlake.udfs.images import pixels_allowed

ROWS = pa.table({
    "uid": ["1.2.3", "1.2.4", "1.3.1", None],
    "name": ["Garcia^Ana", "garcia^ben", "Okafor^Ana Maria", None],
    "date": pa.array([dt.date(2020, 1, 31), dt.date(2021, 6, 1), dt.date(2022, 12, 1), None]),
    "time": ["0930", "120000.5", "18:45:00", None],
    "mods": pa.array([["CT", "SR"], ["MR"], [], ["CT"]]),
    "number": pa.array([1, 2, 3, None], pa.int32()),
    "text": ["ACC_1", "ACC%2", "B?", None],
})


def rows(keyword: str, kind: Kind, column: str, value: str, fuzzy: bool = False) -> list[int]:
    hit = mask(ROWS, [(Matcher(keyword, kind, value, fuzzy), column)]).to_pylist()
    return [i for i, h in enumerate(hit) if h]


def test_universal_single_and_wildcards():
    assert rows("X", Kind.TEXT, "text", "") == [0, 1, 2, 3]
    assert rows("X", Kind.TEXT, "text", "*") == [0, 1, 2, 3]
    assert rows("X", Kind.TEXT, "text", "ACC_1") == [0]
    assert rows("X", Kind.TEXT, "text", "ACC%*") == [1]  # % and _ are literal
    assert rows("X", Kind.TEXT, "text", "ACC?2") == [1]
    assert rows("X", Kind.TEXT, "absent", "x") == []
    assert rows("X", Kind.TEXT, "absent", "*") == [0, 1, 2, 3]


def test_uid_lists_dates_and_times():
    assert rows("U", Kind.UID, "uid", "1.2.3\\1.3.1") == [0, 2]
    assert rows("D", Kind.DATE, "date", "20200131") == [0]
    assert rows("D", Kind.DATE, "date", "20210101-") == [1, 2]
    assert rows("D", Kind.DATE, "date", "-20210601") == [0, 1]
    assert rows("D", Kind.DATE, "date", "20200201-20221130") == [1]
    assert rows("T", Kind.TIME, "time", "1200-1845") == [1, 2]
    assert rows("T", Kind.TIME, "time", "09") == [0]
    with pytest.raises(MatchError, match=r"^D: '2020' is not a date"):
        rows("D", Kind.DATE, "date", "2020")
    with pytest.raises(MatchError, match=r"^N: 'x' is not an integer"):
        rows("N", Kind.INT, "number", "x")


def test_names_lists_and_numbers():
    assert rows("P", Kind.NAME, "name", "garcia^ana") == [0]  # case-insensitive
    assert rows("P", Kind.NAME, "name", "GARCIA*") == [0, 1]
    assert rows("P", Kind.NAME, "name", "ana", fuzzy=True) == [0, 2]  # any component
    assert rows("P", Kind.NAME, "name", "mar", fuzzy=True) == [2]
    assert rows("P", Kind.NAME, "name", "ana") == []
    assert rows("M", Kind.LIST, "mods", "CT") == [0, 3]
    assert rows("M", Kind.LIST, "mods", "MR\\SR") == [0, 1]
    assert rows("N", Kind.INT, "number", "2") == [1]


def test_keywords_and_tags():
    assert tag_of("PatientID") == "00100020"
    assert tag_of("0020000d") == "0020000D"
    with pytest.raises(MatchError, match="Nonsense"):
        tag_of("Nonsense")


def test_burned_in_rule():
    assert pixels_allowed("YES", deidentified=False)
    assert not pixels_allowed("YES", deidentified=True)
    assert not pixels_allowed(" yes", deidentified=True)
    assert pixels_allowed("NO", deidentified=True)
    assert pixels_allowed(None, deidentified=True)


@pytest.mark.parametrize("path", ["/studies/../series", "/studies/./series", "/..",
                                  "/studies/1.2/series/../metadata", "/v1/statement",
                                  "/studies/" + "1" * 65 + "/series",
                                  "/studies/1.2/series/3.4/instances/5.6/frames/"])
def test_paths_outside_the_dicomweb_grammar_name_no_resource(path):
    from dicomlake.dicomnet.web import route_of

    assert route_of(path) is None


def test_dicomweb_paths_name_their_resource_and_uids():
    from dicomlake.dicomnet.web import route_of

    assert route_of("/studies/1.2.3/series") == ("qido_series", ("1.2.3",))
    # a real file's malformed UID (trailing dot) stays reachable
    assert route_of("/studies/1.2./metadata") == ("metadata", ("1.2.",))
    assert route_of("/studies/1/series/2/instances/3/frames/1,2") == (
        "frames", ("1", "2", "3", "1,2"))
