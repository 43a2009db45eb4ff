"""The one duplicate rule for SOPInstanceUIDs, applied by batch ingest and by the stream.

A UID names one instance, so a second file with the same UID becomes an ``errors`` row of
kind ``duplicate``. Which copy stays must not depend on task order or arrival timing:

* the instance already committed wins (a row with the same path and source is the same
  input seen again, such as a replayed record, not a duplicate; a re-ingest that replaces a
  source leaves that source's rows out of ``stored``);
* among the rows of one commit, the smallest ``path`` wins (then the smallest ``source``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def find_duplicates(stored: Mapping[str, tuple[str, str]],
                    new: Sequence[tuple[str, str | None, str]]) -> dict[int, str]:
    """Rows of ``new`` that lose, by index, with the message for their ``errors`` row.

    Args:
        stored: committed UIDs -> (path, source) of the instance holding them.
        new: (path, sop_instance_uid, source) of the rows about to be committed; rows
            without a UID never collide.
    """
    holders = dict(stored)
    losers: dict[int, str] = {}
    order = sorted((i for i, row in enumerate(new) if row[1] is not None),
                   key=lambda i: (new[i][0], new[i][2]))
    for i in order:
        path, uid, source = new[i]
        assert uid is not None
        held = holders.get(uid)
        if held is None or held == (path, source):  # new, or the same input seen again
            holders[uid] = (path, source)
            continue
        losers[i] = (f"{path}: duplicate SOPInstanceUID {uid}; the same UID is already "
                     f"stored for {held[0]}")
    return losers
