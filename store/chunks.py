"""Chunk bookkeeping shared by the stores, the log replay and `dmfs check`.

Pure code, no I/O: exception runs, the kernel's chunk numbering (header
chunk, metadata "area" chunks), `ChunkAllocator`, which hands out COW
chunks like dm-snap-persistent.c and keeps a free list of holes below
`next_free`, and `check_layout`, which checks the runs a log replays to and
rebuilds the allocator from them.

Runs in bulk (a log's worth) are kept flat: an `array('q')` of
(old, new, count) triples, 24 bytes a run.  A million runs as Python
objects would cost ten times that, and every pass over them here is a C
loop (map, sorted, array slices): Python bytecode per run would make
opening a store of a million exceptions take many seconds.
"""

from __future__ import annotations

import bisect
import re
from array import array
from collections import deque
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import add, itemgetter, mul, sub
from typing import Iterable

from .base import ExceptionRun
from .errors import StoreFull


def coalesce(runs: Iterable[ExceptionRun]) -> list[ExceptionRun]:
    """`runs` in the same order, each run merged into the one before it
    when both old and new continue it."""
    out: list[ExceptionRun] = []
    for r in runs:
        if out:
            last = out[-1]
            if last.old + last.count == r.old and last.new + last.count == r.new:
                out[-1] = ExceptionRun(last.old, last.new, last.count + r.count)
                continue
        out.append(r)
    return out


def extend_runs(runs: array, more: array) -> None:
    """Append the flat runs `more` to `runs`, merging the first into the
    last of `runs` when it continues it (old and new)."""
    if runs and more and runs[-3] + runs[-1] == more[0] and runs[-2] + runs[-1] == more[1]:
        runs[-1] += more[2]
        more = more[3:]
    runs.extend(more)


def find_run(runs: array, old: int, new: int, count: int,
             last: int | None = None) -> tuple[int, int, array]:
    """Where chunks old..old+count-1, mapped to new.., are in the flat runs.

    They must be exactly mapped by consecutive runs that continue each
    other (one run once coalesced).  Merges take runs off the end, so the
    search starts there, or at the triple at index `last` (where the
    previous run of a merge step was found: a step lists them latest
    first, and searching each from the end would be quadratic).

    Returns:
      (i, j, pieces): `runs[i:j] = pieces` takes the chunks out.

    Raises:
      ValueError: the chunks are not mapped that way.
    """
    end = old + count
    for i in range(len(runs) - 3 if last is None else last, -1, -3):
        o, n, c = runs[i], runs[i + 1], runs[i + 2]
        if o <= old < o + c and n + (old - o) == new:
            j = i
            while runs[j] + runs[j + 2] < end:
                k = j + 3
                if k >= len(runs) or runs[k] != runs[j] + runs[j + 2] \
                        or runs[k + 1] != runs[j + 1] + runs[j + 2]:
                    break
                j = k
            last_end = runs[j] + runs[j + 2]
            if last_end >= end:
                pieces = array("q")
                if o < old:
                    pieces += array("q", (o, n, old - o))
                if last_end > end:
                    pieces += array("q", (end, new + count, last_end - end))
                return i, j + 3, pieces
            break
    raise ValueError(f"run {old}+{count} -> {new} is not a committed exception")


def remove_run(runs: array, old: int, new: int, count: int) -> None:
    """Take chunks old..old+count-1, mapped to new.., out of the flat runs
    (see `find_run`).

    Raises:
      ValueError: they are not mapped that way.
    """
    i, j, pieces = find_run(runs, old, new, count)
    runs[i:j] = pieces


def sort_by_origin(runs: array) -> array:
    """The flat runs sorted by origin chunk, runs that continue each other
    (old and new) merged into one.

    Raises:
      ValueError: two runs overlap (an origin chunk mapped twice).
    """
    n = len(runs) // 3
    olds, news, counts = runs[0::3], runs[1::3], runs[2::3]
    # Runs of one length (random writes of one size) need no gather of
    # their counts and no sum per run.
    same = counts[0] if n and counts.count(counts[0]) == n else 0
    if n > 1:
        # Sort plain ints (list: the keys exist already) and gather with
        # C loops: sorting the triples as tuples costs twice as much.
        pick = itemgetter(*sorted(range(n), key=olds.tolist().__getitem__))
        olds, news = array("q", pick(olds)), array("q", pick(news))
        if not same:
            counts = array("q", pick(counts))
    # span[i] - tight: the unmapped chunks between run i and run i+1
    if same:
        span, tight = array("q", map(sub, olds[1:], olds[:-1])), same
    else:
        span, tight = array("q", map(sub, olds[1:], map(add, olds[:-1], counts))), 0
    if span and min(span) < tight:
        i = next(i for i, g in enumerate(span) if g < tight)
        raise ValueError(f"origin chunk {olds[i + 1]} is mapped twice")
    follow = [i for i in compress(range(n - 1), map(tight.__eq__, span))
              if news[i] + counts[i] == news[i + 1]] if span.count(tight) else []
    if follow:
        for i in reversed(follow):    # backwards: a chain adds up into its first run
            counts[i] += counts[i + 1]
        keep = bytearray(b"\1") * n
        for i in follow:
            keep[i + 1] = 0
        olds, news, counts = (array("q", compress(a, keep)) for a in (olds, news, counts))
    out = array("q", bytes(24 * len(olds)))
    out[0::3], out[1::3], out[2::3] = olds, news, counts
    return out


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

    def rebuild_dense(self, news: array, counts: array, top: int) -> bool:
        """`rebuild` for runs that keep their chunks below `top`, in C loops.

        One byte per chunk below `top` (a million chunks: 1 MB for a
        moment) instead of sorting the runs by COW chunk: reserved and
        metadata chunks are marked 2, every run's chunks 1; then every
        chunk is counted once, and the holes are the runs of 0 bytes.

        Args:
          news, counts: the runs' first COW chunks and lengths.
          top: 1 + the highest chunk any run uses (nothing is checked
            against the store's capacity here).

        Returns:
          True when rebuilt; False when runs overlap or cover a reserved
          or metadata chunk (nothing changed; `rebuild` or
          `layout_problems` tell which).
        """
        used = bytearray(top)
        used[:self.first] = b"\2" * self.first
        if self.stride:
            used[1::self.stride] = b"\2" * len(range(1, top, self.stride))
        marks = used.count(2)
        if counts.count(1) == len(counts):
            deque(map(used.__setitem__, news, repeat(1)), maxlen=0)
        else:
            deque(map(used.__setitem__, map(slice, news, map(add, news, counts)),
                      map(mul, repeat(b"\1"), counts)), maxlen=0)
        # A chunk marked twice counts once: fewer 1s than chunks in runs.
        if used.count(2) != marks or used.count(1) != sum(counts):
            return False
        self.free = [(m.start(), m.end() - m.start()) for m in re.finditer(b"\0+", used)]
        self.next_free = top
        self._skip_metadata()
        return True

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


# Above this many chunks below next_free, `check_layout` sorts the runs by
# COW chunk instead of marking a byte per chunk (at most 64 MB for a moment).
DENSE_LIMIT = 64 << 20


@dataclass
class Layout:
    """What `check_layout` found.

    problems: one line per inconsistency; empty when the runs are fine.
    alloc: the rebuilt allocator, None when there are problems.
    by_old: the runs sorted by origin chunk and coalesced
      (`sort_by_origin`), None when there are problems.
    """
    problems: list[str] = field(default_factory=list)
    alloc: ChunkAllocator | None = None
    by_old: array | None = None


def check_layout(runs: array, chunk_size: int, cow_size: int) -> Layout:
    """Check the committed flat runs of a persistent store and rebuild its
    allocator: next_free = 1 + the highest COW chunk in use, every other
    data chunk below it is a hole on the free list.

    The checks are those of `layout_problems`, done in bulk; only when one
    fails does `layout_problems` run to say what is wrong.
    """
    alloc = persistent_allocator(chunk_size)
    news, counts = runs[1::3], runs[2::3]
    ok = True
    if news:
        if counts.count(counts[0]) == len(counts):   # one length: no sum per run
            top = max(news) + counts[0]
        else:
            top = max(map(add, news, counts))
        if top > cow_size // chunk_size:
            ok = False
        elif top <= DENSE_LIMIT:
            ok = alloc.rebuild_dense(news, counts, top)
        else:
            try:
                alloc.rebuild(list(zip(news, counts)))
            except ValueError:
                ok = False
    by_old = None
    if ok:
        try:
            by_old = sort_by_origin(runs)
        except ValueError:
            ok = False
    if not ok:
        # layout_problems checks the same things; its empty answer would be a bug
        return Layout(layout_problems(runs, chunk_size, cow_size) or
                      ["runs fail the bulk layout check"])
    return Layout([], alloc, by_old)


def layout_problems(runs: array, chunk_size: int, cow_size: int,
                    limit: int = 5) -> list[str]:
    """What is wrong with the committed flat runs of the persistent layout.

    Checks: no origin chunk mapped twice, no COW chunk used twice, no run
    on the header or a metadata chunk, no run past `cow_size`.  At most
    `limit` messages per kind (then one "... and N more").

    Returns:
      One line per problem; empty when the runs are consistent.
    """
    runs = [ExceptionRun(*runs[i:i + 3]) for i in range(0, len(runs), 3)]
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
