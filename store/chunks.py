"""Chunk bookkeeping shared by the stores, the log replay and `dmfs check`.

Pure code, no I/O: exception runs (`append_run`, `remove_run`), the
kernel's chunk numbering (header chunk, metadata "area" chunks) and
`ChunkAllocator`, which hands out COW chunks like dm-snap-persistent.c
and keeps a free list of holes below `next_free`.
"""

from __future__ import annotations

import bisect
from typing import Iterable

from dmfs.errors import StoreFull

from .base import ExceptionRun


def append_run(runs: list[ExceptionRun], r: ExceptionRun) -> None:
    """Append `r`, merging it into the last run when both old and new continue it."""
    if runs:
        last = runs[-1]
        if last.old + last.count == r.old and last.new + last.count == r.new:
            runs[-1] = ExceptionRun(last.old, last.new, last.count + r.count)
            return
    runs.append(r)


def remove_run(runs: list[ExceptionRun], r: ExceptionRun) -> None:
    """Take `r` out of `runs` (it must lie inside one run; merges take
    runs off the end, so search from there).

    Raises:
      ValueError: `r` is not exactly mapped by one of `runs`.
    """
    for i in range(len(runs) - 1, -1, -1):
        cur = runs[i]
        if cur.old <= r.old and r.old + r.count <= cur.old + cur.count \
                and cur.new + (r.old - cur.old) == r.new:
            pieces = []
            if cur.old < r.old:
                pieces.append(ExceptionRun(cur.old, cur.new, r.old - cur.old))
            tail = cur.old + cur.count - (r.old + r.count)
            if tail:
                pieces.append(ExceptionRun(r.old + r.count, r.new + r.count, tail))
            runs[i:i + 1] = pieces
            return
    raise ValueError(f"{r} is not a committed exception")


class ChunkAllocator:
    """`next_free` plus a free list of chunk runs below it.

    Invariants:
      * `next_free` is never a metadata chunk;
      * free runs are sorted, disjoint (touching runs are merged), lie below
        `next_free` and never contain a metadata chunk;
      * a chunk is either below `next_free` and (in use xor free), or not
        handed out yet.

    Args:
      first: the first data chunk (2 persistent, 0 transient).
      stride: epa + 1 for the persistent layout (metadata chunk when
        `chunk % stride == 1`), or 0 for no metadata chunks.
    """

    def __init__(self, chunk_size: int, first: int, stride: int = 0):
        self.chunk_size = chunk_size
        self.first = first
        self.stride = stride
        self.next_free = first
        self.free: list[tuple[int, int]] = []   # (start, count), sorted

    def is_metadata(self, chunk: int) -> bool:
        return chunk < self.first or (self.stride > 0 and chunk % self.stride == 1)

    def _skip_metadata(self) -> None:
        # kernel skip_metadata(): the next area's chunk is never handed out
        if self.stride and self.next_free % self.stride == 1:
            self.next_free += 1

    def free_chunks(self) -> int:
        return sum(c for _, c in self.free)

    def allocate(self, count: int, cow_size: int) -> tuple[int, int]:
        """Hand out up to `count` consecutive chunks; return (first, n).

        Raises:
          StoreFull: no chunk is free and chunk `next_free` does not fit.
        """
        if count < 1:
            raise ValueError("count must be >= 1")
        if self.free:
            start, c = self.free[0]
            n = min(count, c)
            if n == c:
                del self.free[0]
            else:
                self.free[0] = (start + n, c - n)
            return start, n
        nf, cs = self.next_free, self.chunk_size
        # kernel rule: the whole chunk must fit in the device
        if cow_size < (nf + 1) * cs:
            raise StoreFull()
        # stop before the next metadata chunk and at the end of capacity
        n = min(count, cow_size // cs - nf)
        if self.stride:
            n = min(n, (1 - nf) % self.stride)
        self.next_free = nf + n
        self._skip_metadata()
        return nf, n

    def release(self, start: int, count: int) -> None:
        """Put chunks back on the free list.

        Raises:
          ValueError: the chunks were never handed out or are already free.
        """
        end = start + count
        if count < 1 or start < self.first or end > self.next_free:
            raise ValueError(f"chunks {start}+{count} were not handed out")
        if any(True for _ in self._metadata_in(start, end)):
            raise ValueError(f"chunks {start}+{count} include a metadata chunk")
        i = bisect.bisect_left(self.free, (start, 0))
        if i > 0 and sum(self.free[i - 1]) > start or \
                i < len(self.free) and self.free[i][0] < end:
            raise ValueError(f"chunks {start}+{count} are already free")
        if i < len(self.free) and self.free[i][0] == end:
            end += self.free[i][1]
            del self.free[i]
        if i > 0 and sum(self.free[i - 1]) == start:
            i -= 1
            start = self.free[i][0]
            del self.free[i]
        self.free.insert(i, (start, end - start))
        self._trim()

    def _trim(self) -> None:
        """Lower next_free over free runs at the top (a merge gives chunks
        back from the end), so usage reads as if never allocated."""
        while self.free:
            start, count = self.free[-1]
            end, nf = start + count, self.next_free
            # next_free may sit just past a skipped metadata chunk
            if end == nf or (self.stride and end == nf - 1 and self.is_metadata(end)):
                del self.free[-1]
                self.next_free = start
            else:
                break

    def _metadata_in(self, start: int, end: int) -> Iterable[int]:
        """The metadata chunks in [start, end)."""
        if not self.stride:
            return ()
        first = start + (1 - start) % self.stride
        return range(first, end, self.stride)

    def rebuild(self, used: list[tuple[int, int]]) -> None:
        """Recompute next_free and the free list from the chunks in use.

        `next_free` becomes 1 + the highest used chunk (at least `first`,
        never on a metadata chunk); every other data chunk below it is free.

        Args:
          used: (start, count) of every committed run, in any order.

        Raises:
          ValueError: runs overlap or cover a metadata chunk.
        """
        used = sorted(used)
        self.free = []
        pos = self.first
        for start, count in used:
            if start < pos:
                raise ValueError(f"COW chunk {start} is used twice or is reserved")
            if any(True for _ in self._metadata_in(start, start + count)):
                raise ValueError(f"run {start}+{count} covers a metadata chunk")
            self._add_free_range(pos, start)
            pos = start + count
        self.next_free = pos
        self._skip_metadata()

    def _add_free_range(self, start: int, end: int) -> None:
        # split around metadata chunks; appends, so callers go in order
        pos = start
        for m in self._metadata_in(start, end):
            if m > pos:
                self.free.append((pos, m - pos))
            pos = m + 1
        if end > pos:
            self.free.append((pos, end - pos))


def persistent_allocator(chunk_size: int) -> ChunkAllocator:
    """The allocator of the persistent layout: data from chunk 2, a
    metadata chunk every `chunk_size // 16 + 1` chunks."""
    return ChunkAllocator(chunk_size, 2, chunk_size // 16 + 1)


def layout_problems(runs: Iterable[ExceptionRun], chunk_size: int, cow_size: int,
                    limit: int = 5) -> list[str]:
    """What is wrong with a set of committed runs of the persistent layout.

    Checks: no origin chunk mapped twice, no COW chunk used twice, no run
    on the header or a metadata chunk, no run past `cow_size`.  At most
    `limit` messages per kind (then one "... and N more").

    Returns:
      One line per problem; empty when the runs are consistent.
    """
    runs = list(runs)
    alloc = persistent_allocator(chunk_size)
    capacity = cow_size // chunk_size
    out: list[str] = []

    twice_old: list[str] = []
    prev = None
    for r in sorted(runs, key=lambda r: r.old):
        if prev is not None and r.old < prev.old + prev.count:
            twice_old.append(f"origin chunk {r.old} is mapped twice "
                   f"(to COW chunks {prev.new + r.old - prev.old} and {r.new})")
        if prev is None or r.old + r.count > prev.old + prev.count:
            prev = r
    twice_new: list[str] = []
    reserved: list[str] = []
    beyond: list[str] = []
    prev = None
    for r in sorted(runs, key=lambda r: r.new):
        if r.new < alloc.first:
            reserved.append(f"run {r.old}+{r.count} starts on reserved COW chunk {r.new}")
        else:
            meta = next(iter(alloc._metadata_in(r.new, r.new + r.count)), None)
            if meta is not None:
                reserved.append(f"run {r.old}+{r.count} -> {r.new} covers metadata chunk {meta}")
        if r.new + r.count > capacity:
            beyond.append(f"run {r.old}+{r.count} -> {r.new} reaches past cow_size "
                   f"({capacity} chunks)")
        if prev is not None and r.new < prev.new + prev.count:
            twice_new.append(f"COW chunk {r.new} is used twice "
                   f"(origin chunks {prev.old + r.new - prev.new} and {r.old})")
        if prev is None or r.new + r.count > prev.new + prev.count:
            prev = r
    for kind in (twice_old, twice_new, reserved, beyond):
        out.extend(kind[:limit])
        if len(kind) > limit:
            out.append(f"... and {len(kind) - limit} more like that")
    return out
