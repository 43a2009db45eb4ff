"""Asymmetric distance search (ADC) over PQ codes held in memory.

Hand-written in numpy rather than faiss because the search has to do things faiss's
IndexPQ/IVFPQ cannot do on codes loaded from our stores: skip rows failing a metadata filter
while scanning further lists until ``k`` rows pass, carry string ids and frames, and re-rank
with exact vectors read from ``dicom.embeddings``. faiss stays the speed/recall reference
(``dicomlake bench knn``).

Speed tricks (each measured against faiss IndexPQ, single thread):

* codes are stored transposed, one contiguous byte row per sub-space;
* pairs of sub-spaces are fused: a (ksub*ksub) table of summed distances (256 KB for ksub=256,
  fits in L2) is gathered once per pair, halving the number of gathers;
* top candidates are chosen by a sampled distance threshold and a partial sort of the few rows
  under it, instead of an ``argpartition`` over every code (which costs more than the scan).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dicomlake.udfs.pq import Codebook


@dataclass
class CodeIndex:
    """Codes of one codebook version, sorted by IVF list, ready to scan.

    ``pairs`` holds fused sub-space pairs (``code[2j] * ksub + code[2j+1]``, uint16), plus the
    last single sub-space when ``m`` is odd (``tail``).
    """

    book: Codebook
    ids: np.ndarray
    frames: np.ndarray
    pairs: np.ndarray
    tail: np.ndarray | None
    offsets: np.ndarray
    id_rows: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, book: Codebook, ids: np.ndarray, frames: np.ndarray, codes: np.ndarray,
              lists: np.ndarray) -> CodeIndex:
        order = np.argsort(lists, kind="stable")
        ids, frames, codes, lists = ids[order], frames[order], codes[order], lists[order]
        codes_t = np.ascontiguousarray(codes.T).astype(np.uint16)
        half = book.m // 2
        pairs = np.ascontiguousarray(codes_t[0:2 * half:2] * book.ksub + codes_t[1:2 * half:2])
        tail = np.ascontiguousarray(codes_t[-1].astype(np.uint8)) if book.m % 2 else None
        nlist = max(book.nlist, 1)
        offsets = np.searchsorted(lists, np.arange(nlist + 1)).astype(np.int64)
        return cls(book, ids, frames, pairs, tail, offsets)

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    def rows_of(self, sop_instance_uid: str) -> list[int]:
        """Index rows of one instance (one per frame)."""
        if not self.id_rows:
            for i, uid in enumerate(self.ids.tolist()):
                self.id_rows.setdefault(uid, []).append(i)
        return self.id_rows.get(sop_instance_uid, [])

    def _pair_tables(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        lut = self.book.lookup_table(query)
        half, k = self.book.m // 2, self.book.ksub
        fused = (lut[0:2 * half:2, :, None] + lut[1:2 * half:2, None, :]).reshape(half, k * k)
        return fused, (lut[-1] if self.book.m % 2 else None)

    def distances(self, query: np.ndarray, start: int = 0, stop: int | None = None
                  ) -> np.ndarray:
        """Approximate squared distances from ``query`` to codes ``[start, stop)``."""
        fused, last = self._pair_tables(query)
        return self._scan(fused, last, start, self.size if stop is None else stop)

    def _scan(self, fused: np.ndarray, last: np.ndarray | None, start: int, stop: int
              ) -> np.ndarray:
        out = np.take(fused[0], self.pairs[0, start:stop]) if len(fused) else np.zeros(
            stop - start, np.float32)
        for j in range(1, len(fused)):
            out += np.take(fused[j], self.pairs[j, start:stop])
        if last is not None and self.tail is not None:
            out += np.take(last, self.tail[start:stop])
        return out

    def probe_order(self, query: np.ndarray) -> np.ndarray:
        """IVF lists nearest first (just [0] without IVF)."""
        if self.book.coarse is None:
            return np.zeros(1, dtype=np.int64)
        d = ((self.book.coarse - query[np.newaxis]) ** 2).sum(axis=1)
        return np.argsort(d)

    def search(self, query: np.ndarray, count: int, *, nprobe: int = 8,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``count`` nearest rows by ADC: (rows, squared distances), nearest first.

        With IVF, ``nprobe`` nearest lists are scanned; when a filter (``allowed``, a bool
        per row) leaves fewer than ``count`` rows, the next lists are scanned too, until
        ``count`` rows pass or every list was scanned.
        """
        fused, last = self._pair_tables(query)
        order = self.probe_order(query)
        step = max(1, nprobe)
        rows_acc: list[np.ndarray] = []
        dist_acc: list[np.ndarray] = []
        passed = 0
        for first in range(0, len(order), step):
            for lst in order[first:first + step]:
                lo, hi = int(self.offsets[lst]), int(self.offsets[lst + 1])
                if hi <= lo:
                    continue
                d = self._scan(fused, last, lo, hi)
                rows = np.arange(lo, hi)
                if allowed is not None:
                    ok = allowed[lo:hi]
                    d, rows = d[ok], rows[ok]
                rows, d = _smallest(rows, d, count)
                rows_acc.append(rows)
                dist_acc.append(d)
                passed += len(rows)
            if passed >= count:
                break
        if not rows_acc:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        rows, d = _smallest(np.concatenate(rows_acc), np.concatenate(dist_acc), count)
        return rows, d


def _smallest(rows: np.ndarray, dist: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` smallest distances, sorted; a sampled threshold avoids a full partition."""
    n = len(dist)
    if n > count * 64 and n > 4096:
        sample = dist[:: max(1, n // 4096)]
        q = min(1.0, 4.0 * count / n + 8.0 / len(sample))
        threshold = np.quantile(sample, q)
        keep = np.flatnonzero(dist <= threshold)
        if len(keep) >= count:
            rows, dist = rows[keep], dist[keep]
            n = len(dist)
    if n > count:
        part = np.argpartition(dist, count - 1)[:count]
        rows, dist = rows[part], dist[part]
    order = np.argsort(dist, kind="stable")
    return rows[order], dist[order]


def refine(rows: np.ndarray, dist: np.ndarray, query: np.ndarray, exact: np.ndarray | None,
           exact_rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank candidates by exact squared distance (rows without a vector keep ADC's)."""
    if exact is None or exact_rows is None or not len(rows):
        return rows, dist
    ex = exact_rows[rows]
    have = ex >= 0
    dist = dist.astype(np.float64)
    dist[have] = ((exact[ex[have]] - query[np.newaxis]) ** 2).sum(axis=1)
    order = np.argsort(dist, kind="stable")
    return rows[order], dist[order]
