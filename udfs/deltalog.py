"""Cheap looks at a Delta table's log, for readers that poll a table the stream appends to.

``image_knn`` asks "did this table change?" once per query task, and the stream commits every
few hundred milliseconds. Opening a ``DeltaTable`` to ask replays the whole log (15-25 ms per
table at 40 commits, growing with every commit, and three tables per check); listing
``_delta_log`` answers in about a millisecond. When the table did change, and the new commits
only appended files (what the stream and ``dicomlake embed`` without ``--replace`` do), a
reader that already holds the older version needs to read just those files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import unquote

_LOG_FILE = re.compile(r"^(\d{20})\.(?:json|checkpoint(?:\.\d+\.\d+)?\.parquet)$")


def latest_version(table_path: str | os.PathLike[str]) -> int:
    """The newest committed version (-1 when there is no table).

    A commit is the atomic appearance of ``<version>.json`` (delta-rs writes elsewhere and
    renames), so the largest such name is the newest version; checkpoints count too, in case
    old JSON files were cleaned up.
    """
    try:
        names = os.listdir(Path(table_path) / "_delta_log")
    except (FileNotFoundError, NotADirectoryError):
        return -1
    versions = [int(m.group(1)) for name in names if (m := _LOG_FILE.match(name))]
    return max(versions) if versions else -1


def appended_files(table_path: str | os.PathLike[str], since: int, until: int,
                   ) -> list[str] | None:
    """Relative paths of the files commits ``since+1 .. until`` added, in commit order.

    None when those commits did anything but add files (removed or replaced files, changed
    the schema or protocol) or their JSON is gone: then only a full read is correct.
    """
    log = Path(table_path) / "_delta_log"
    files: list[str] = []
    for version in range(since + 1, until + 1):
        try:
            text = (log / f"{version:020d}.json").read_text()
        except FileNotFoundError:
            return None
        for line in text.splitlines():
            if not line.strip():
                continue
            action = json.loads(line)
            if not action.keys() <= {"add", "commitInfo", "txn"}:
                return None
            if "add" in action:
                path = action["add"]["path"]
                if "://" in path or action["add"].get("deletionVector"):
                    return None
                files.append(unquote(path))
    return files
