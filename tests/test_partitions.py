"""Planning the ``dicom`` source's tasks: packing by members and bytes, splitting big archives.

Pure planning (no Spark, no files): sources are described as the planner sees them.
"""

from __future__ import annotations

import pytest

from dicomlake.catalog.dicom_source import DicomOptions, plan_partitions
from dicomlake.catalog.errors import ErrorKind
from dicomlake.catalog.inputs import Member, Source

MIB = 1 << 20


def _zip(name: str, members: int, member_bytes: int = 1000) -> Source:
    listing = tuple(Member(i, f"IM{i:06d}.dcm", member_bytes, member_bytes, i)
                    for i in range(members))
    return Source(f"/data/{name}.zip", True, f"fp-{name}", members * member_bytes, 1, listing)


def _file(name: str, size: int) -> Source:
    return Source(f"/data/{name}.dcm", False, f"fp-{name}", size, 1)


def _options(**overrides: int) -> DicomOptions:
    return DicomOptions(paths=("/data",), **overrides)


def _planned(parts) -> list[tuple[str, int]]:
    """(source path, member index) of every input the plan reads, in plan order."""
    return [(piece.source.path, m.index) if piece.source.members else (piece.source.path, -1)
            for part in parts for piece in part.slices
            for m in (piece.source.members or (None,))]


def _members(part) -> int:
    return sum(max(len(piece.source.members), 1) for piece in part.slices)


def test_many_small_archives_are_packed_into_few_tasks_by_members():
    sources = [_zip(f"a{i:03d}", 10) for i in range(100)]
    parts = plan_partitions(sources, _options(members_per_partition=200, min_partitions=1))
    assert len(parts) == 5
    assert all(_members(p) == 200 and len(p.slices) == 20 for p in parts)
    assert sorted(_planned(parts)) == sorted((s.path, i) for s in sources for i in range(10))


def test_big_files_are_packed_by_bytes_with_the_open_cost():
    sources = [_file(f"f{i}", 300 * MIB) for i in range(10)]
    parts = plan_partitions(sources, _options(max_partition_bytes=1024 * MIB,
                                              open_cost_in_bytes=MIB, min_partitions=1))
    assert [len(p.slices) for p in parts] == [3, 3, 3, 1]


def test_the_open_cost_keeps_tiny_files_from_making_one_huge_task():
    sources = [_file(f"f{i:04d}", 100) for i in range(1000)]
    parts = plan_partitions(sources, _options(max_partition_bytes=64 * MIB,
                                              open_cost_in_bytes=MIB, min_partitions=1))
    assert max(len(p.slices) for p in parts) == 64  # 64 x (1 MiB + 100 bytes) > 64 MiB
    assert sum(len(p.slices) for p in parts) == 1000
    assert len(parts) == 16


def test_one_huge_archive_becomes_member_ranges():
    huge = _zip("huge", 10_000)
    parts = plan_partitions([huge], _options(members_per_partition=2048, min_partitions=1))
    # five tasks are needed at 2048; the members are spread evenly over them (a last task
    # of 1808 would leave the other cores idle while it ends)
    assert [_members(p) for p in parts] == [2000] * 5
    pieces = [piece for p in parts for piece in p.slices]
    # each task carries only its own members, in order, and the whole source's count
    assert [m.index for piece in pieces for m in piece.source.members] == list(range(10_000))
    assert {piece.inputs for piece in pieces} == {10_000}
    assert {piece.source.fingerprint for piece in pieces} == {huge.fingerprint}


def test_zip_members_count_by_number_and_streamed_files_by_bytes():
    """A ZIP member is read up to its pixel data whatever its size; a plain file may be a
    tar or a compressed file read through, so its bytes count."""
    big_members = _zip("big", 100, member_bytes=30 * MIB)
    targz = _file("scan.tar.gz", 3 << 30)
    parts = plan_partitions([big_members, targz],
                            _options(max_partition_bytes=256 * MIB, min_partitions=1))
    assert sorted(_members(p) for p in parts) == [1, 100]  # neither split nor packed together
    assert [s.source.path for p in parts for s in p.slices if len(s.source.members) == 100] \
        == [big_members.path]


def test_more_work_than_min_partitions_tasks_hold_comes_in_even_waves():
    """10,032 members (132 seed-shaped archives) on 4 task slots at 2048: Spark's rule
    makes 5 tasks of 1976 and one of 152, three waves on 2 cores for 2.5 of work; spread
    over 8 tasks (the next multiple of the slots), the waves are even."""
    sources = [_zip(f"a{i:03d}", 76) for i in range(132)]
    parts = plan_partitions(sources, _options(members_per_partition=2048, min_partitions=4))
    sizes = sorted((_members(p) for p in parts), reverse=True)
    assert sizes[:8] == [1216] * 8 and sum(sizes[8:]) == 10_032 - 8 * 1216
    assert max(sizes) <= 2048


def test_work_spreads_over_min_partitions_when_there_is_enough():
    parts = plan_partitions([_zip("one", 600)], _options(min_partitions=6))
    assert [_members(p) for p in parts] == [100] * 6
    tiny = plan_partitions([_zip("two", 3)], _options(min_partitions=6))
    assert [_members(p) for p in tiny] == [1, 1, 1]


def test_a_mix_splits_the_big_packs_the_small_and_plans_every_input_once():
    huge = _zip("huge", 5000)
    small = [_zip(f"s{i:02d}", 76) for i in range(30)]
    loose = [_file(f"f{i:02d}", 500_000) for i in range(40)]
    broken = Source("/data/broken.zip", True, "unreadable", 10, 1,
                    error=(ErrorKind.BAD_ARCHIVE, "not a readable ZIP"))
    options = _options(members_per_partition=1000, min_partitions=4)
    parts = plan_partitions([huge, *small, *loose, broken], options)
    assert all(_members(p) <= 1000 for p in parts)
    planned = _planned(parts)
    assert len(planned) == len(set(planned)) == 5000 + 30 * 76 + 40 + 1
    def tasks_with(paths: set[str]) -> list:
        return [p for p in parts if any(s.source.path in paths for s in p.slices)]

    # 7,321 inputs need 8 tasks of at most 1000, so each aims at 916: the huge archive is
    # 5 full ranges alone and a remainder packed with small archives
    huge_tasks = tasks_with({huge.path})
    assert sorted(len(p.slices) for p in huge_tasks)[:5] == [1] * 5 and len(huge_tasks) == 6
    assert all(_members(p) <= 916 for p in parts)
    assert len(tasks_with({s.path for s in small})) <= 4  # 12 archives of 76 fit 916
    assert len(tasks_with({s.path for s in loose})) <= 5  # by bytes (open cost included)
    assert len(parts) <= 13


def test_nothing_to_read_plans_no_task():
    assert plan_partitions([], _options()) == []


@pytest.mark.parametrize(("raw", "expected"), [("134217728", 128 * MIB), ("128m", 128 * MIB),
                                               ("1g", 1 << 30), ("64MiB", 64 * MIB),
                                               ("512k", 512 << 10)])
def test_sizes_are_written_as_spark_writes_them(raw, expected):
    options = DicomOptions.parse({"path": "/x", "maxPartitionBytes": raw})
    assert options.max_partition_bytes == expected


def test_a_bad_size_names_the_option_and_the_form():
    with pytest.raises(ValueError, match=r"'openCostInBytes' must be a positive size in bytes"):
        DicomOptions.parse({"path": "/x", "opencostinbytes": "lots"})
    with pytest.raises(ValueError, match=r"'minPartitions' must be a positive integer"):
        DicomOptions.parse({"path": "/x", "minPartitions": "0"})
