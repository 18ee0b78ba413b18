"""Completed exceptions of one snapshot, stored as runs.

dm keeps a hash of `dm_exception`s and collapses runs of consecutive
chunks (old and new both advancing by one) into one entry ("dm snapshot:
combine consecutive exceptions in memory").  We do the same, keyed by
bucket = old_chunk >> BUCKET_SHIFT, so a range lookup touches one or two
buckets however many chunks it spans, and a million scattered exceptions
cost three machine words each (plus the bucket's array header).

Each bucket is an `array('q')` of flat triples (old, new, count), sorted
by `old`, non-overlapping.  A run never crosses a bucket boundary (long
runs are stored as one entry per bucket they cover).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from itertools import chain
from typing import Iterable, Iterator

from store.chunks import sort_by_origin

# 16384 chunks a bucket: a million scattered exceptions fill ~60 per bucket,
# so the per-bucket overhead (array header, dict slot) is ~2 bytes each.
BUCKET_SHIFT = 14
BUCKET_CHUNKS = 1 << BUCKET_SHIFT


class ExceptionTable:
    """Map origin chunk -> COW chunk, by runs.

    Invariants:
      * within a bucket, triples are sorted by old chunk and do not overlap;
      * adjacent triples that continue each other (old and new both
        contiguous) are merged, so a sequential stream stays one entry
        per bucket;
      * `len(self)` is the number of mapped chunks.
    """

    def __init__(self) -> None:
        self._buckets: dict[int, array] = {}
        self._chunks = 0

    @classmethod
    def from_runs(cls, runs: Iterable[tuple[int, int, int]]) -> ExceptionTable:
        """Build the table from runs (old, new, count) in any order.

        Raises:
          ValueError: two runs overlap (two exceptions for one chunk).
        """
        return cls.from_sorted(sort_by_origin(array("q", chain.from_iterable(runs))))

    @classmethod
    def from_sorted(cls, runs: array) -> ExceptionTable:
        """Build the table from flat (old, new, count) triples sorted by
        old, disjoint, runs that continue each other merged: what a store
        hands over (`ExceptionStore.exceptions()`, made by
        `store.chunks.sort_by_origin`).  That is not checked again.

        This is the mount path.  A bucket is one slice of `runs` (found by
        bisection), and only a run reaching into the next bucket is cut,
        so a million exceptions load in C loops, not in a Python loop
        per run.
        """
        t = cls()
        # Strided views, not copies: a copy would be freed after the
        # buckets were made around it, a hole in the heap that stays.
        view = memoryview(runs)
        olds = view[0::3]
        n = len(olds)
        i = 0
        carry = None   # the part of the last run that reaches into the next bucket
        while i < n or carry is not None:
            bno = (olds[i] if carry is None else carry[0]) >> BUCKET_SHIFT
            bend = (bno + 1) << BUCKET_SHIFT
            j = bisect_left(olds, bend, i)
            b = runs[3 * i:3 * j]
            if carry is not None:
                b[0:0] = array("q", carry)
                carry = None
            end = b[-3] + b[-1]
            if end > bend:
                cut = bend - b[-3]
                carry = (bend, b[-2] + cut, end - bend)
                b[-1] = cut
            t._buckets[bno] = b
            i = j
        t._chunks = sum(view[2::3])
        return t

    def __len__(self) -> int:
        return self._chunks

    def entries(self) -> int:
        """How many runs are stored (for memory accounting)."""
        return sum(len(b) // 3 for b in self._buckets.values())

    # -- lookup ------------------------------------------------------------

    @staticmethod
    def _find(b: array, chunk: int) -> int:
        """Index (in triples) of the first triple whose end is > chunk.

        Bisects the triples' `old` column through a strided memoryview,
        in C: a Python loop of bisection steps cost 4 µs a lookup at 2000
        runs a bucket, this 1 µs, and random small writes do two lookups
        each (issue 17).  The view is released before the caller may
        resize the array.
        """
        with memoryview(b) as m:
            j = bisect_right(m[0::3], chunk)
        # Runs do not overlap: only the last run starting at or before
        # `chunk` can still contain it.
        if j and b[3 * j - 3] + b[3 * j - 1] > chunk:
            return j - 1
        return j

    def lookup(self, chunk: int) -> int | None:
        """The COW chunk for origin `chunk`, or None."""
        b = self._buckets.get(chunk >> BUCKET_SHIFT)
        if not b:
            return None
        i = self._find(b, chunk)
        if i < len(b) // 3:
            old = b[3 * i]
            if old <= chunk:
                return b[3 * i + 1] + (chunk - old)
        return None

    def lookup_range(self, start: int, count: int) -> Iterator[tuple[int, int | None, int]]:
        """Cover [start, start+count) with pieces (old, new|None, n), in order.

        `new` is None for a piece that has no exception.  Consecutive
        mapped pieces from different buckets are not merged (callers
        remap each piece on its own; they are at most one per bucket).
        """
        end = start + count
        pos = start
        while pos < end:
            bno = pos >> BUCKET_SHIFT
            bend = min(end, (bno + 1) << BUCKET_SHIFT)
            b = self._buckets.get(bno)
            if not b:
                yield (pos, None, bend - pos)
                pos = bend
                continue
            i = self._find(b, pos)
            ntrip = len(b) // 3
            while pos < bend:
                if i >= ntrip:
                    yield (pos, None, bend - pos)
                    pos = bend
                    break
                old, new, n = b[3 * i], b[3 * i + 1], b[3 * i + 2]
                if old > pos:
                    gap_end = min(old, bend)
                    yield (pos, None, gap_end - pos)
                    pos = gap_end
                    continue
                run_end = min(old + n, bend)
                yield (pos, new + (pos - old), run_end - pos)
                pos = run_end
                i += 1

    def missing(self, start: int, count: int) -> Iterator[tuple[int, int]]:
        """The gaps (old, n) in [start, start+count) that have no exception."""
        pend = None
        pstart = 0
        for old, new, n in self.lookup_range(start, count):
            if new is None:
                if pend == old:
                    pend = old + n
                else:
                    if pend is not None:
                        yield (pstart, pend - pstart)
                    pstart, pend = old, old + n
        if pend is not None:
            yield (pstart, pend - pstart)

    # -- update ------------------------------------------------------------

    def insert(self, old: int, new: int, count: int = 1) -> None:
        """Add the run old..old+count -> new..new+count.

        Raises:
          ValueError: some chunk of the run is already mapped (that would
            be two exceptions for one chunk).
        """
        while count > 0:
            bno = old >> BUCKET_SHIFT
            n = min(count, ((bno + 1) << BUCKET_SHIFT) - old)
            self._insert_in_bucket(bno, old, new, n)
            old += n
            new += n
            count -= n

    def _insert_in_bucket(self, bno: int, old: int, new: int, n: int) -> None:
        b = self._buckets.get(bno)
        if b is None:
            self._buckets[bno] = array("q", (old, new, n))
            self._chunks += n
            return
        i = self._find(b, old)
        ntrip = len(b) // 3
        if i < ntrip and b[3 * i] < old + n:
            raise ValueError(f"chunk {max(old, b[3 * i])} already has an exception")
        # Merge with the previous triple and/or the next one when contiguous.
        prev_ok = i > 0 and b[3 * (i - 1)] + b[3 * (i - 1) + 2] == old \
            and b[3 * (i - 1) + 1] + b[3 * (i - 1) + 2] == new
        next_ok = i < ntrip and b[3 * i] == old + n and b[3 * i + 1] == new + n
        if prev_ok and next_ok:
            b[3 * (i - 1) + 2] += n + b[3 * i + 2]
            del b[3 * i:3 * i + 3]
        elif prev_ok:
            b[3 * (i - 1) + 2] += n
        elif next_ok:
            b[3 * i] = old
            b[3 * i + 1] = new
            b[3 * i + 2] += n
        else:
            b[3 * i:3 * i] = array("q", (old, new, n))
        self._chunks += n

    def remove(self, old: int, count: int = 1) -> None:
        """Drop the exceptions of [old, old+count) (merge forgets them).

        Raises:
          KeyError: some chunk in the range has no exception.
        """
        end = old + count
        pos = old
        while pos < end:
            bno = pos >> BUCKET_SHIFT
            bend = min(end, (bno + 1) << BUCKET_SHIFT)
            b = self._buckets.get(bno)
            i = self._find(b, pos) if b else 0
            if not b or i >= len(b) // 3 or b[3 * i] > pos or b[3 * i] + b[3 * i + 2] < bend:
                raise KeyError(f"chunks {pos}..{bend - 1} are not all mapped")
            o, nw, n = b[3 * i], b[3 * i + 1], b[3 * i + 2]
            pieces = []
            if o < pos:
                pieces.extend((o, nw, pos - o))
            if o + n > bend:
                pieces.extend((bend, nw + (bend - o), o + n - bend))
            b[3 * i:3 * i + 3] = array("q", pieces)
            if not b:
                del self._buckets[bno]
            self._chunks -= bend - pos
            pos = bend

    def runs(self) -> Iterator[tuple[int, int, int]]:
        """Every run (old, new, count) in old-chunk order, runs split at buckets merged."""
        cur = None
        for bno in sorted(self._buckets):
            b = self._buckets[bno]
            for i in range(0, len(b), 3):
                old, new, n = b[i], b[i + 1], b[i + 2]
                if cur and cur[0] + cur[2] == old and cur[1] + cur[2] == new:
                    cur[2] += n
                else:
                    if cur:
                        yield tuple(cur)
                    cur = [old, new, n]
        if cur:
            yield tuple(cur)
