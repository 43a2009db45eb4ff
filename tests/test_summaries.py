"""``update_summaries``: series/studies replaced key by key from one batch's rows, always
equal to a from-scratch aggregation of the instances (written here in plain Python)."""

from __future__ import annotations

import datetime as dt
import threading

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable, write_deltalake

from dicomlake.catalog import summaries, tables
from dicomlake.catalog.summaries import TouchedKeys, update_summaries

SERIES_FIRSTS = ("study_instance_uid", "patient_id", "modality", "body_part_examined",
                 "series_number", "series_description", "manufacturer", "rows", "columns")
STUDY_FIRSTS = ("patient_id", "patient_name", "study_description", "accession_number")


def _row(path: str, series: str | None, study: str | None, *, source: str = "a.zip",
         modality: str | None = "CT", size: int | None = 100, date: dt.date | None = None,
         **extra: object) -> dict[str, object]:
    """One ``dicom.instances`` row; the columns not given are NULL."""
    row: dict[str, object] = dict.fromkeys(tables.INSTANCES.schema.names)
    row.update(path=path, source=source, source_fingerprint="fp", source_members=1,
               series_instance_uid=series, study_instance_uid=study, modality=modality,
               file_size=size, study_date=date, sop_instance_uid=f"uid-{path}",
               ingested_at=dt.datetime(2026, 11, 30, tzinfo=dt.UTC))
    row.update(extra)
    return row


def _append(lake, rows: list[dict[str, object]]) -> pa.Table:
    data = pa.Table.from_pylist(rows, schema=tables.INSTANCES.schema)
    write_deltalake(str(tables.INSTANCES.path(lake)), data, mode="append")
    return data


def _remove_source(lake, source: str) -> pa.Table:
    """Delete one source's rows (as a re-ingest of a replaced source does); the rows gone."""
    table = DeltaTable(str(tables.INSTANCES.path(lake)))
    gone = table.to_pyarrow_table(filters=[("source", "=", source)])
    table.delete(f"source = '{source}'")
    return gone


def _reference(lake) -> dict[str, list[dict[str, object]]]:
    """Series and studies from scratch, row by row: the SQL's meaning, first = smallest path."""
    instances = DeltaTable(str(tables.INSTANCES.path(lake))).to_pyarrow_table().to_pylist()
    out: dict[str, list[dict[str, object]]] = {}
    for name, key, firsts in (("series", "series_instance_uid", SERIES_FIRSTS),
                              ("studies", "study_instance_uid", STUDY_FIRSTS)):
        groups: dict[str, list[dict[str, object]]] = {}
        for row in instances:
            if row[key] is not None:
                groups.setdefault(row[key], []).append(row)
        result = []
        for uid in sorted(groups):
            rows = sorted(groups[uid], key=lambda r: r["path"])
            dates = [r["study_date"] for r in rows if r["study_date"] is not None]
            sizes = [r["file_size"] for r in rows if r["file_size"] is not None]
            summary = {key: uid, **{c: rows[0][c] for c in firsts},
                       "study_date": min(dates) if dates else None, "instances": len(rows),
                       "bytes": sum(sizes) if sizes else None}
            if name == "studies":
                summary["modalities"] = sorted({r["modality"] for r in rows
                                                if r["modality"] is not None})
                summary["series"] = len({r["series_instance_uid"] for r in rows
                                         if r["series_instance_uid"] is not None})
            result.append(summary)
        out[name] = result
    return out


def _stored(lake, name: str) -> pa.Table:
    return DeltaTable(str(tables.TABLES[name].path(lake))).to_pyarrow_table()


def _assert_current(lake) -> None:
    reference = _reference(lake)
    for name, key in (("series", "series_instance_uid"), ("studies", "study_instance_uid")):
        stored = _stored(lake, name)
        assert stored.schema == tables.TABLES[name].schema
        assert stored.sort_by(key).to_pylist() == reference[name]


def _versions(lake) -> dict[str, int]:
    return {n: DeltaTable(str(tables.TABLES[n].path(lake))).version()
            for n in ("series", "studies")}


@pytest.fixture
def lake(tmp_path):
    return tmp_path / "warehouse"


D1, D2 = dt.date(2024, 5, 2), dt.date(2024, 5, 1)


def test_batches_keep_the_summaries_equal_to_a_full_aggregation(lake):
    # batch 1: a new lake; study S1 spread over CT and MR (and one instance without a
    # modality), a second study, and an instance without series/study UIDs.
    first = _append(lake, [
        _row("a/2", "1.1", "S1", modality="CT", date=D1, patient_id="P1", rows=512),
        _row("a/1", "1.1", "S1", modality="CT", date=None, patient_id=None, size=None),
        _row("a/3", "1.2", "S1", modality="MR", date=D2, series_description="T1"),
        _row("a/4", "1.3", "S1", modality=None, size=None),
        _row("a/5", "2.1", "S2", modality="US", patient_name="Doe^Jane"),
        _row("a/6", None, None),
    ])
    versions = update_summaries(lake, first)
    assert set(versions) == {"series", "studies"}
    _assert_current(lake)
    series = {r["series_instance_uid"]: r for r in _stored(lake, "series").to_pylist()}
    # first() is the smallest path's value, NULL included; sums skip NULL sizes
    assert (series["1.1"]["patient_id"], series["1.1"]["rows"]) == (None, None)
    assert (series["1.1"]["bytes"], series["1.3"]["bytes"]) == (100, None)
    (s1,) = [r for r in _stored(lake, "studies").to_pylist() if r["study_instance_uid"] == "S1"]
    assert (s1["modalities"], s1["series"], s1["instances"], s1["study_date"]) == (
        ["CT", "MR"], 3, 4, D2)

    # batch 2: more instances of an existing series (one with a smaller path, so its
    # first() values change) and a new series in an existing study.
    before = _versions(lake)
    second = _append(lake, [
        _row("a/0", "1.1", "S1", source="b.zip", patient_id="P1", rows=256),
        _row("b/1", "2.2", "S2", source="b.zip", modality="CR", date=D1),
    ])
    update_summaries(lake, second)
    _assert_current(lake)
    assert _versions(lake) == {n: v + 1 for n, v in before.items()}  # one commit each

    # batch 3: b.zip is replaced: its rows go, new ones come. Series 2.2 loses all its
    # instances (its row is deleted); a new study S3 appears.
    gone = _remove_source(lake, "b.zip")
    third = _append(lake, [_row("c/1", "3.1", "S3", source="b.zip", modality="MR")])
    update_summaries(lake, pa.concat_tables([gone, third]))
    _assert_current(lake)
    assert "2.2" not in _stored(lake, "series").column("series_instance_uid").to_pylist()

    # batch 4: every instance of a study goes: its row goes too.
    update_summaries(lake, _remove_source(lake, "b.zip"))
    _assert_current(lake)
    assert "S3" not in _stored(lake, "studies").column("study_instance_uid").to_pylist()


def test_keys_given_directly_and_untouched_keys_commit_nothing(lake):
    _append(lake, [_row("a/1", "1.1", "S1"), _row("a/2", "1.2", "S1")])
    update_summaries(lake, TouchedKeys(frozenset({"1.1", "1.2"}), frozenset({"S1"})))
    _assert_current(lake)
    before = _versions(lake)
    assert update_summaries(lake, TouchedKeys(frozenset({"9.9"}), frozenset())) == {}
    assert update_summaries(lake, None) == {}
    assert _versions(lake) == before


def test_only_the_files_holding_touched_keys_are_rewritten(lake, monkeypatch):
    monkeypatch.setattr(summaries, "FILE_ROWS", 4)
    _append(lake, [_row(f"a/{i:02}", f"1.{i:02}", f"S{i:02}") for i in range(20)])
    update_summaries(lake)  # the tables do not exist: built from all instances
    path = str(tables.SERIES.path(lake))
    files_before = set(DeltaTable(path).file_uris())
    assert len(files_before) == 5

    update_summaries(lake, _append(lake, [_row("b/1", "1.05", "S05", source="b.zip")]))

    _assert_current(lake)
    files_after = set(DeltaTable(path).file_uris())
    assert len(files_before - files_after) == 1  # only the file holding series 1.05
    assert len(files_after - files_before) == 1


def test_everything_rebuilds_tables_of_an_older_lake(lake):
    _append(lake, [_row("a/1", "1.1", "S1"), _row("a/2", "1.2", "S2", modality="MR")])
    stale = pa.Table.from_pylist([{"series_instance_uid": "gone", "instances": 7}],
                                 schema=tables.SERIES.schema)
    write_deltalake(str(tables.SERIES.path(lake)), stale)
    write_deltalake(str(tables.STUDIES.path(lake)), pa.Table.from_pylist(
        [{"study_instance_uid": "gone", "modalities": [], "series": 1, "instances": 7}],
        schema=tables.STUDIES.schema))

    assert update_summaries(lake, everything=True) == {"series": 1, "studies": 1}

    _assert_current(lake)


def test_concurrent_updaters_leave_the_summaries_current(lake):
    """The stream and a batch ingest may update at once: a lost commit race is retried
    from the newer instances, never leaving an older aggregate behind."""
    _append(lake, [_row("seed", "0.1", "S0")])
    update_summaries(lake)
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            for i in range(6):
                # both writers add to series 1.1 and study S1 every time
                rows = _append(lake, [_row(f"{name}/{i}", "1.1", "S1", source=name),
                                      _row(f"{name}/x{i}", f"{name}.{i}", "S1", source=name)])
                update_summaries(lake, rows)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("p", "q")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _assert_current(lake)
    series = _stored(lake, "series")
    assert pc.sum(series.column("instances")).as_py() == 1 + 2 * 12


def test_catch_up_adds_what_a_writer_committed_before_dying(lake):
    """A writer died between its instances commit and its summary commit: the next one to
    start brings the summaries up to the instances it finds (added and removed rows)."""
    from dicomlake.catalog.summaries import catch_up

    update_summaries(lake, _append(lake, [_row("a/1", "1.1", "S1"), _row("b/1", "9.1", "S9",
                                                                           source="b.zip")]))
    _append(lake, [_row("a/2", "1.1", "S1", modality="MR"), _row("c/1", "3.1", "S3")])
    _remove_source(lake, "b.zip")  # no summary update for either: the "crash"
    assert catch_up(lake)
    _assert_current(lake)
    assert catch_up(lake) == {}  # nothing left to see
