"""The origin's write-back cache: a disk's volatile cache for COW writes.

An origin write that must wait for copy-outs (pending exceptions) does
not have to keep its caller waiting: like a disk with a volatile write
cache, dmfs acknowledges it once its data is held here, and writes it to
the origin as soon as every snapshot's copy of the old data is durable
(copy and record committed).  The one rule of dm-snapshot still holds —
no origin chunk is overwritten before its old contents and the exception
are durable in every active snapshot's store — because the entry is only
applied after its pending exceptions complete.

What it changes for a crash (README, "What a crash can and cannot lose"):
writes acknowledged but not yet flushed may be lost, exactly as with a
disk cache; fsync/FUA waits until they are applied and synced, so nothing
fsynced is ever lost, and every snapshot stays intact.

Ordering: an entry applies only after every earlier entry that shares a
4 KiB page with it (its `deps`); a later read of an overlapping range
waits behind it.  So the origin always reads what was last acknowledged,
and after a crash a page holds a prefix of the writes acknowledged to it,
as a page of a 4Kn disk would: two writes to different sectors of one page
never land in the other order.

Space: nothing is acknowledged that cannot be stored.  Where an overwrite
never needs new space (a block device) the cache holds writes freely
(`SpacePolicy.FREE`); on a filesystem that allocates in place (ext4, XFS
without shared extents) the range is allocated in the origin file first
(fallocate: a sparse origin's holes need space), and a write whose range
cannot be allocated is not acknowledged early (`RESERVE`); where an
overwrite itself needs new space (btrfs, extents shared by reflink
copies) nothing is acknowledged early (`NEVER`).  If applying a held
write still finds no room, the origin gives up a snapshot and the write
is applied again (`make_room`); only when none is left is the error
kept for the next flush.
"""

from __future__ import annotations

import enum
import errno
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from dmio import pwrite_all, space

from .device import run_io

if TYPE_CHECKING:  # pragma: no cover
    from .pending import PendingException

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 32 << 20
# Also bounded in writes: a suspend (snapshot creation, handover) drains the
# cache, and must stay prompt however small the writes are.
DEFAULT_MAX_ENTRIES = 256
# Index granularity: an entry is listed in every region it touches.
REGION_SHIFT = 20
# Writes are ordered by the pages they touch, not only by their bytes.
PAGE_SHIFT = 12
# What the cache knows of the origin file's allocation, in regions of this
# size: a region without holes needs no fallocate before an early
# acknowledgement (one syscall saved per small write).
ALLOC_SHIFT = 20
PROBE_EVERY = 64


class SpacePolicy(enum.Enum):
    """When the cache may acknowledge a write before it is applied (see
    the module's docstring)."""
    FREE = "free"          # an overwrite never needs new space
    RESERVE = "reserve"    # allocate the range first (fallocate)
    NEVER = "never"        # overwrites need new space: never early


class _Entry:
    """A held write.  `nwait` counts its copy-outs not yet finished;
    `failed` says one of them failed (the origin looks again)."""

    __slots__ = ("seq", "start", "end", "data", "deps", "waits", "nwait", "failed", "applied")

    def __init__(self, seq: int, start: int, data, deps: list[_Entry], waits):
        self.seq = seq
        self.start = start
        self.end = start + len(data)
        self.data = data
        self.deps = deps
        self.waits = waits
        self.nwait = 0
        self.failed = False
        self.applied = False


def _apply_all(fd: int, entries: list[_Entry]) -> list[OSError | None]:
    """Write entries to the origin in order; one error (or None) per entry.

    Stops after the first that found no room: the list is then shorter,
    and the entries after it were not tried (room may be made for them,
    and a later overlapping entry must not be overwritten by an earlier
    one applied again).
    """
    out: list[OSError | None] = []
    for e in entries:
        try:
            pwrite_all(fd, e.data, e.start)
            out.append(None)
        except OSError as err:
            out.append(err)
            if err.errno in space.NOSPACE:
                break
    return out


class WritebackCache:
    """Origin writes held until their copy-outs are committed.

    Invariants:
      * every entry not yet applied is in `_held` (by `seq`, oldest
        first), in `_regions` for each region it touches, and counted in
        `nbytes`;
      * an entry with `nwait` > 0 is listed under each of its unfinished
        copy-outs in `_waiting`; one with `nwait` == 0 is in `_ready` or
        `_blocked` (its deps not yet applied), or being applied;
      * an entry is applied after its deps and after no active snapshot
        needs a copy of any chunk it overwrites;
      * at most one applier task runs (`_applying`); it lives while
        entries are held and sleeps on `_kick` when nothing is ready;
      * `_allocated` holds regions (`ALLOC_SHIFT`) of the origin file
        known to have no hole: a write there needs no fallocate; a region
        found with holes is looked at again after `PROBE_EVERY` more
        fallocates there (`_probe_in`);
      * `error` is the first error of a background write since the last
        flush (reported by the next flush, like a disk's deferred error).

    Finding ready writes costs per finished copy-out, not per held write:
    the origin tells the cache which copy-outs finished (`kick`), and the
    applier wakes once per batch of them.
    """

    def __init__(self, name: str, fd: int, nursery: trio.Nursery, *,
                 recheck: Callable[[int, int], list[PendingException]],
                 before_apply: Callable[[], Awaitable[None]],
                 make_room: Callable[[str], Awaitable[bool]] | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_entries: int = DEFAULT_MAX_ENTRIES,
                 space_policy: SpacePolicy = SpacePolicy.RESERVE):
        """
        Args:
          name: the origin's file name, for log lines.
          fd: the origin's backing file.
          nursery: where the applier task runs.
          recheck: `Origin.start_cow`: the pending exceptions a write to
            [start, end) must still wait for, once one of its copies failed.
          before_apply: `Origin.wait_invalidations`: every invalidation is
            durable before a held write reaches the origin.
          make_room: `Origin.make_room`: give up a snapshot when a held
            write finds no room; False when none is left.
          space_policy: when a write may be acknowledged early (the owner
            sets it for the filesystem under the origin).
        """
        self.name = name
        self.fd = fd
        self.nursery = nursery
        self._recheck = recheck
        self._before_apply = before_apply
        self._make_room = make_room
        self.space_policy = space_policy
        # Writes not acknowledged early because their range could not be
        # allocated (RESERVE), since the cache was made.
        self.not_reserved = 0
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.nbytes = 0
        self.entries = 0
        self.error: int | None = None
        self._seq = 0
        self._held: dict[int, _Entry] = {}
        self._regions: dict[int, list[_Entry]] = {}
        self._waiting: dict[object, list[_Entry]] = {}
        self._ready: list[_Entry] = []
        self._blocked: list[_Entry] = []
        self._allocated: set[int] = set()
        self._probe_in: dict[int, int] = {}    # region -> fallocates before the next look
        self._changed = trio.Event()
        self._kick = trio.Event()
        self._applying = False

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.space_policy is not SpacePolicy.NEVER

    # -- space ---------------------------------------------------------------

    def reserve(self, start: int, length: int) -> bool:
        """Whether a write to [start, start+length) may be acknowledged
        before it is applied: under `RESERVE`, its range is allocated in
        the origin file first (fallocate), unless the regions it lies in
        are known to have no hole.  False: the caller applies the write
        before answering.
        """
        policy = self.space_policy
        if policy is SpacePolicy.FREE:
            return True
        if policy is SpacePolicy.NEVER:
            return False
        r0, r1 = start >> ALLOC_SHIFT, (start + length - 1) >> ALLOC_SHIFT
        allocated = self._allocated
        if r0 in allocated and (r0 == r1 or all(r in allocated for r in range(r0 + 1, r1 + 1))):
            return True
        try:
            space.fallocate(self.fd, space.FALLOC_FL_KEEP_SIZE, start, length)
        except OSError as e:
            if e.errno not in space.NOSPACE:
                # This filesystem cannot allocate ahead: nothing is early.
                log.warning("%s: cannot allocate ahead (%s): writes are acknowledged "
                            "only once applied", self.name, e.strerror)
                self.space_policy = SpacePolicy.NEVER
            self.not_reserved += 1
            return False
        # Learn which regions have no hole left, but do not pay two more
        # syscalls on every write into a sparse region: look again only
        # every PROBE_EVERY fallocates there.
        probe_in = self._probe_in
        for r in range(r0, r1 + 1):
            if r in allocated:
                continue
            left = probe_in.get(r, 0)
            if left:
                probe_in[r] = left - 1
            elif space.no_hole(self.fd, r << ALLOC_SHIFT, (r + 1) << ALLOC_SHIFT):
                allocated.add(r)
                probe_in.pop(r, None)
            else:
                probe_in[r] = PROBE_EVERY
        return True

    def holes_punched(self) -> None:
        """The origin file may have new holes (a discard): forget what
        was known allocated."""
        self._allocated.clear()
        self._probe_in.clear()

    # -- lookups -------------------------------------------------------------

    def overlapping(self, start: int, end: int) -> list[_Entry]:
        """Entries not yet applied that overlap [start, end), oldest first."""
        if not self.entries:
            return []
        r0, r1 = start >> REGION_SHIFT, (end - 1) >> REGION_SHIFT
        if r0 == r1:
            return [e for e in self._regions.get(r0, ()) if e.start < end and start < e.end]
        found: dict[int, _Entry] = {}
        for r in range(r0, r1 + 1):
            for e in self._regions.get(r, ()):
                if e.start < end and start < e.end:
                    found[e.seq] = e
        return [found[k] for k in sorted(found)]

    def ordered_before(self, start: int, end: int) -> list[_Entry]:
        """Entries not yet applied that a write to [start, end) must follow:
        those sharing a 4 KiB page with it, oldest first."""
        return self.overlapping(start >> PAGE_SHIFT << PAGE_SHIFT,
                                ((end - 1) >> PAGE_SHIFT) + 1 << PAGE_SHIFT)

    async def wait_applied(self, e: _Entry) -> None:
        """Until `e` reached the origin (or failed: then `error` says so)."""
        while not e.applied:
            await self._changed.wait()

    async def wait_clear(self, start: int, end: int) -> None:
        """Wait until nothing cached overlaps [start, end) (reads, FUA writes)."""
        for e in self.overlapping(start, end):
            await self.wait_applied(e)

    # -- holding -------------------------------------------------------------

    async def add(self, start: int, data, waits, deps: list[_Entry] | None = None) -> None:
        """Hold `data` for [start, start+len) and apply it in the background.

        `waits` are the pending exceptions the write needs; `data` must not
        change afterwards (bytes, or a copy); `deps` is what
        `ordered_before` returned for it, if the caller asked already.
        Returns once the data is held, which may mean waiting for room.
        """
        n = len(data)
        # No checkpoint of its own: every request path has one (pyfuse3's
        # wait_readable, or MappedDevice.submit's).
        while self.entries and (self.nbytes + n > self.max_bytes or self.entries >= self.max_entries):
            await self._changed.wait()
            deps = None     # entries were applied meanwhile: ask again
        if deps is None:
            deps = self.ordered_before(start, start + n)
        self._seq += 1
        e = _Entry(self._seq, start, data, deps, waits)
        r0, r1 = start >> REGION_SHIFT, (e.end - 1) >> REGION_SHIFT
        regions = self._regions
        for r in range(r0, r1 + 1):
            lst = regions.get(r)
            if lst is None:
                regions[r] = [e]
            else:
                lst.append(e)
        self._held[e.seq] = e
        self.nbytes += n
        self.entries += 1
        if not self._register(e):
            self._ready.append(e)
            self._kick.set()
        if not self._applying:
            self._applying = True
            self.nursery.start_soon(self._applier)

    def _register(self, e: _Entry) -> int:
        """List `e` under each of its unfinished copy-outs; their number."""
        waiting = self._waiting
        n = 0
        for pe in e.waits:
            if pe.finished:
                if pe.error is not None:
                    e.failed = True
                continue
            lst = waiting.get(pe)
            if lst is None:
                waiting[pe] = [e]
            else:
                lst.append(e)
            n += 1
        e.nwait = n
        return n

    def kick(self, finished=None) -> None:
        """Pending exceptions finished (`finished`; None: any, look at
        every held write): the writes waiting for them may be ready."""
        if finished is None:
            self._waiting.clear()
            for e in self._held.values():
                if e.nwait and not self._register(e):
                    self._ready.append(e)
            self._kick.set()
            return
        waiting, ready = self._waiting, self._ready
        for pe in finished:
            lst = waiting.pop(pe, None)
            if lst is None:
                continue
            failed = pe.error is not None
            for e in lst:
                if failed:
                    e.failed = True
                e.nwait -= 1
                if not e.nwait:
                    ready.append(e)
        if ready:
            self._kick.set()

    def _take_ready(self) -> list[_Entry]:
        """Entries that may be written now, oldest first.

        An entry is ready when its copy-outs are done and its deps are
        applied or ready before it (they are written first, in order).
        """
        cand = self._ready + self._blocked if self._blocked else self._ready
        self._ready, self._blocked = [], []
        if len(cand) > 1:
            cand.sort(key=_seq)
        out: list[_Entry] = []
        taken: set[int] = set()
        for e in cand:
            if e.failed:
                # As retry_origin_bios: look again (a failed snapshot is now
                # invalid and needs nothing).  After successful copies there
                # is nothing to look for: snapshots only come while the
                # cache is drained, and their exceptions only go in a merge,
                # which start_cow leaves alone.
                e.failed = False
                e.waits = self._recheck(e.start, e.end)
                if self._register(e):
                    continue
                if e.failed:        # a copy of the new look failed already
                    self._ready.append(e)
                    self._kick.set()
                    continue
            if e.deps and any(not d.applied and d.seq not in taken for d in e.deps):
                self._blocked.append(e)
                continue
            out.append(e)
            taken.add(e.seq)
        return out

    async def _applier(self) -> None:
        try:
            while self.entries:
                ready = self._take_ready()
                if not ready:
                    await self._kick.wait()
                    self._kick = trio.Event()
                    continue
                try:
                    await self._before_apply()
                    size = sum(e.end - e.start for e in ready)
                    errors = await run_io(_apply_all, self.fd, ready, size=size)
                except Exception:  # a bug must not hang the writers behind these
                    log.exception("%s: applying %d cached writes failed", self.name, len(ready))
                    errors = [OSError(errno.EIO, "internal error")] * len(ready)
                for i, e in enumerate(ready):
                    if i >= len(errors):
                        # Not tried: an earlier one found no room.  Next round.
                        self._ready.extend(ready[i:])
                        break
                    err = errors[i]
                    if err is not None and err.errno in space.NOSPACE and self._make_room is not None \
                            and await self._make_room(f"a held write to {self.name}"):
                        # A snapshot was given up: apply it (and those after it) again.
                        self._ready.extend(ready[i:])
                        break
                    if err is not None:
                        log.error("%s: cached write of %d bytes at %d failed: %s",
                                  self.name, e.end - e.start, e.start, err)
                        if self.error is None:
                            self.error = err.errno or errno.EIO
                    self._release(e)
                ev, self._changed = self._changed, trio.Event()
                ev.set()
        finally:
            self._applying = False

    def _release(self, e: _Entry) -> None:
        regions = self._regions
        for r in range(e.start >> REGION_SHIFT, ((e.end - 1) >> REGION_SHIFT) + 1):
            lst = regions[r]
            lst.remove(e)
            if not lst:
                del regions[r]
        del self._held[e.seq]
        self.nbytes -= e.end - e.start
        self.entries -= 1
        e.data = None
        e.deps = []
        e.waits = []
        e.applied = True

    async def drain(self) -> None:
        """Wait until every cached write is applied."""
        while self.entries:
            await self._changed.wait()

    def take_error(self) -> int | None:
        """The deferred error, once (the next flush reports it)."""
        err, self.error = self.error, None
        return err


def _seq(e: _Entry) -> int:
    return e.seq
