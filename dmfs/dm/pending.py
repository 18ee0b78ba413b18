"""Pending exceptions and tracked chunks: the short-lived state of a COW.

A pending exception is a chunk run being copied out of the origin into
one snapshot (dm's `struct dm_snap_pending_exception`); tracked chunks
are reads (or, during a merge, writes) still going to a chunk that is
about to change under them (dm's `track_chunk`).  Both live on the trio
thread only, so they need no locks.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:  # pragma: no cover
    from .snapshot import Snapshot


class PendingException:
    """A chunk run being copied out of the origin into one snapshot.

    Invariants:
      * while pending, every chunk of [old, old+count) maps to this object
        in `snapshot.pending`, and to nothing in `snapshot.exceptions`;
      * `finished` turns True exactly once (`finish`), after the exception
        was committed and moved to the completed table (or failed: `error`
        set), and the origin's `cow_progressed` follows for it.

    No trio Event of its own: a random 4 KiB write makes one of these per
    snapshot, and an Event per write was a measurable part of its cost
    (issue 17).  Waiters wait on the origin's progress instead, which
    every completion sets, and the write-back cache is told which
    exceptions finished (`WritebackCache.kick`).
    """

    __slots__ = ("snapshot", "old", "new", "count", "full", "writer", "epoch", "finished", "error")

    def __init__(self, snapshot: Snapshot, old: int, new: int, count: int, full: bool = False,
                 writer: bool = False):
        self.snapshot = snapshot
        self.old = old
        self.new = new
        self.count = count
        # A full-chunk snapshot write fills the COW chunks itself: no copy.
        self.full = full
        # Made for a write to the snapshot itself (not an origin write): if
        # the filesystem has no room, that write fails with ENOSPC and the
        # snapshot stays valid; an origin write's copy is tried again.
        self.writer = writer or full
        # The origin's space_epoch when the copy started (origin.py).
        self.epoch = 0
        self.finished = False
        self.error: int | None = None

    def __repr__(self) -> str:
        return f"<pe {self.snapshot.name} {self.old}+{self.count}->{self.new}>"

    def finish(self, error: int | None) -> None:
        """Committed (`error` None) or failed; the caller then calls
        `Origin.cow_progressed` with it."""
        self.error = error
        self.finished = True

    async def wait(self) -> None:
        origin = self.snapshot.origin
        while not self.finished:
            await origin.wait_progress()


class TrackedChunks:
    """Chunk ranges of snapshot reads that were routed to the origin.

    An origin write must not land on such a chunk until these reads are
    done ("dm snapshot: track snapshot reads", "fix race during exception
    creation").  Few reads are in flight at once, so a list is enough.
    """

    def __init__(self) -> None:
        self._ranges: dict[int, tuple[int, int]] = {}
        self._next = 0
        self._changed = trio.Event()

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def add(self, start: int, count: int) -> int:
        self._next += 1
        self._ranges[self._next] = (start, start + count)
        return self._next

    def remove(self, token: int) -> None:
        del self._ranges[token]
        self._changed.set()
        self._changed = trio.Event()

    def overlaps(self, start: int, count: int) -> bool:
        end = start + count
        return any(s < end and start < e for s, e in self._ranges.values())

    async def wait_clear(self, start: int, count: int) -> None:
        while self.overlaps(start, count):
            await self._changed.wait()


class PendingTable:
    """A snapshot's pending exceptions, by origin chunk, one entry per run.

    dm keeps pending exceptions in a hash with one entry per chunk; here a
    1 MiB copy with 4 KiB chunks would cost 256 dict operations to add and
    as many to remove, per snapshot.  Few runs are pending at once (COW in
    flight is bounded by cow_threshold), so two sorted lists and bisect do.

    Invariants: `_starts[i] == _pes[i].old`, sorted; the runs do not
    overlap; `chunks` is the sum of their counts.
    """

    __slots__ = ("_starts", "_pes", "chunks")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._pes: list[PendingException] = []
        self.chunks = 0

    def __len__(self) -> int:
        return self.chunks

    def add(self, pe: PendingException) -> None:
        i = bisect.bisect_left(self._starts, pe.old)
        self._starts.insert(i, pe.old)
        self._pes.insert(i, pe)
        self.chunks += pe.count

    def discard(self, pe: PendingException) -> None:
        """Remove `pe` if it is still listed."""
        i = bisect.bisect_left(self._starts, pe.old)
        if i < len(self._pes) and self._pes[i] is pe:
            del self._starts[i]
            del self._pes[i]
            self.chunks -= pe.count

    def get(self, chunk: int) -> PendingException | None:
        """The pending exception covering `chunk`, or None."""
        i = bisect.bisect_right(self._starts, chunk) - 1
        if i >= 0:
            pe = self._pes[i]
            if chunk < pe.old + pe.count:
                return pe
        return None

    def next_start(self, chunk: int) -> int | None:
        """The first chunk > `chunk` where a pending run starts, or None."""
        i = bisect.bisect_right(self._starts, chunk)
        return self._starts[i] if i < len(self._starts) else None

    def values(self) -> list[PendingException]:
        return list(self._pes)


def pending_pieces(pending: PendingTable, start: int, end: int):
    """Cover chunks [start, end) with pieces (lo, hi, pe): the pending
    exception covering the piece, or None where nothing is pending."""
    c = start
    while c < end:
        pe = pending.get(c)
        if pe is not None:
            hi = min(end, pe.old + pe.count)
        else:
            nxt = pending.next_start(c)
            hi = end if nxt is None else min(end, nxt)
        yield c, hi, pe
        c = hi

