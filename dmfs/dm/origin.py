"""`Origin`: an origin volume and the snapshots that depend on it.

This is the kernel's `struct origin` plus the snapshot-origin device: the
origin's backing file and the snapshots that must get a copy of an origin
chunk before it is overwritten.

The data path of an origin write (`OriginTarget.map`):

1. `Origin.start_cow()` looks, for every active snapshot, at the chunks
   the write touches (one range lookup per snapshot, not one per chunk).
   Chunks already copied need nothing; chunks with a pending exception
   are waited for; the rest get new pending exceptions, allocated in
   runs, and one kcopyd job per run copies the old origin data to every
   snapshot that needs that run (read once, write N).
   Small jobs share one thread hop with every other small job queued at
   the time (kcopyd's batch worker).
2. Finished copies queue for the origin's committer task, which commits
   everything copied meanwhile in one round: per snapshot one group
   commit of its store (data durable, then the record); the exceptions
   enter the completed table, snapshot reads of those chunks still going
   to the origin are drained, and only then are the pending exceptions
   released.
3. The write retries step 1 until nothing is pending, then goes to the
   origin in one piece.  With the write-back cache (writeback.py) the
   caller is acknowledged as soon as the write is held, and the cache's
   applier task does step 3.

Out of space, the origin gives up snapshots one at a time (nospace.py).

Everything here runs on the trio thread (see snapshot.py).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from dmio import PageCacheProbe, discard_ranges, pwrite_all
from dmio.space import NOSPACE
from kcopyd import CopyResult, KcopydClient, Region

from ..errors import DmError, StoreFull
from .device import MappedDevice, run_io
from .events import Event, EventHandler, TunablesChanged, no_handler
from .nospace import OutOfSpace
from .origin_target import OriginTarget
from .pending import PendingException
from .volume import Volume
from .writeback import WritebackCache

if TYPE_CHECKING:  # pragma: no cover
    from .merge import Merge
    from .snapshot import Snapshot

log = logging.getLogger(__name__)

# dm-kcopyd: at most this many destinations per job.
KCOPYD_MAX_REGIONS = 8
# COW copies up to this size share one thread hop with every other such
# copy queued at the time: a thread hop costs about as much as copying
# 64 KiB between page-cached files.
BATCH_COPY_MAX = 64 * 1024
# COW copies up to this size whose old data is in the page cache are made
# inline (`_copy_inline`).
INLINE_COPY_MAX = 64 * 1024

COPY_THROTTLE_RANGE = (1, 100)
COW_THRESHOLD_MIN = 1


@dataclass(frozen=True)
class OriginTunables:
    """How hard an origin's COW copies may push the disk.

    Attributes:
      copy_throttle: percent of the time kcopyd may spend on I/O, 1-100
        (dm-kcopyd's throttle, per origin here).
      cow_threshold: COW jobs in flight at most (dm-snapshot's
        cow_threshold module parameter).

    Raises:
      DmError(EINVAL): a value out of range.
    """

    copy_throttle: int = 100
    cow_threshold: int = 2048

    def __post_init__(self) -> None:
        lo, hi = COPY_THROTTLE_RANGE
        if not lo <= self.copy_throttle <= hi:
            raise DmError(errno.EINVAL, f"copy_throttle is a percentage from {lo} to {hi}")
        if self.cow_threshold < COW_THRESHOLD_MIN:
            raise DmError(errno.EINVAL, f"cow_threshold must be at least {COW_THRESHOLD_MIN}")


class Origin(Volume):
    """An origin volume and the snapshots that depend on it.

    Invariants:
      * `snapshots` is sorted by chunk size, largest first (dm's
        __insert_snapshot), and only changes while the origin device is
        suspended;
      * `fd` is the backing file, open O_RDWR, `size` bytes long;
      * what the owner must act on is reported through `raise_event`,
        never by calling the owner.
    """

    def __init__(self, name: str, path: str, fd: int, size: int, *,
                 backing: str | None, nursery: trio.Nursery,
                 events: EventHandler = no_handler):
        super().__init__(name, size)
        self.events = events
        self.path = path
        self.fd = fd
        self.backing = backing
        self.nursery = nursery
        self.snapshots: list[Snapshot] = []
        self.kcopyd = KcopydClient(batch_max=BATCH_COPY_MAX)
        # Held by whoever changes this origin's table or snapshots.
        self.config_lock = trio.Lock()
        self.merge: Merge | None = None  # while a snapshot merges into this origin
        self.writeback = WritebackCache(self.filename, fd, nursery,
                                        recheck=self.start_cow, before_apply=self.wait_invalidations,
                                        make_room=self.make_room)
        # Copied pending exceptions waiting for the committer task.
        self._copied: list[tuple[PendingException, int | None]] = []
        self._committing = False
        # Small cached copies are made inline until the backing file says
        # it cannot tell whether a read would block.
        self.inline_copies = True
        self.copies_inline = 0    # since the mount, for `info`
        self._page_cache = PageCacheProbe()
        # Set and replaced each time pending exceptions complete.
        self._progress = trio.Event()
        self.out_of_space = OutOfSpace(self)
        self.device = MappedDevice(name, OriginTarget(self))

    def register(self, snap: Snapshot) -> None:
        """Add a snapshot (origin suspended): from now on writes COW into it."""
        self.snapshots.append(snap)
        self.snapshots.sort(key=lambda s: -s.chunk_size)
        snap.active = True

    def unregister(self, snap: Snapshot) -> None:
        snap.active = False
        self.snapshots.remove(snap)

    async def raise_event(self, event: Event) -> bool:
        """Tell the owner (dm_table_event); its failure is logged, not raised,
        except for `TunablesChanged`, whose setter reports it.

        Returns:
          False if the owner failed to act on it.
        """
        if isinstance(event, TunablesChanged):
            await self.events(event)
            return True
        try:
            await self.events(event)
            return True
        except (DmError, OSError) as e:
            log.error("%s: the owner could not act on %s: %s", self.name, type(event).__name__, e)
        except Exception:  # a bug above must not stop the core
            log.exception("%s: handling %s failed", self.name, type(event).__name__)
        return False

    # -- copy on write ------------------------------------------------------

    def start_cow(self, start: int, end: int) -> list[PendingException]:
        """Make sure every active snapshot has (or gets) a copy of [start, end).

        Returns the pending exceptions the write must wait for; new ones
        have their copy job started.  Does not await (dm's __origin_write).
        """
        waits: list[PendingException] = []
        new: list[PendingException] = []
        for s in self.snapshots:
            if not (s.valid and s.active) or s.merging or start >= s.size:
                continue
            c0, c1 = s.chunk_range(start, end)
            if c1 - c0 == 1:
                # The common small write: one chunk, looked up without
                # building the pieces of a range.
                if s.exceptions.lookup(c0) is not None:
                    continue
                pe = s.pending.get(c0)
                if pe is not None:
                    waits.append(pe)
                    continue
                try:
                    new.extend(s.new_pending(c0, 1))
                except StoreFull:
                    s.invalidate("exception store is full (origin write)")
                continue
            for lo, hi, pe in s.uncopied(c0, c1):
                if pe is not None:
                    if not waits or waits[-1] is not pe:
                        waits.append(pe)
                    continue
                try:
                    new.extend(s.new_pending(lo, hi - lo))
                except StoreFull:
                    # The point-in-time image cannot be kept: dm invalidates.
                    s.invalidate("exception store is full (origin write)")
                    break
        if new:
            self.start_copy_job(new)
            waits.extend(new)
        return waits

    async def copy_out(self, ranges: list[tuple[int, int]],
                       waits: list[PendingException] | None = None) -> None:
        """Return once every active snapshot has its copy of each [start, end).

        Waits for `waits` (or what `start_cow` returns) and looks again, as
        dm's retry_origin_bios does: a copy that failed invalidated its
        snapshot, which then needs nothing.  Every invalidation is durable
        before this returns.  No checkpoint when nothing was pending.
        """
        if waits is None:
            waits = [pe for start, end in ranges for pe in self.start_cow(start, end)]
        while waits:
            for pe in waits:
                await pe.wait()
            waits = [pe for start, end in ranges for pe in self.start_cow(start, end)]
        await self.wait_invalidations()

    async def wait_invalidations(self) -> None:
        """Wait until every invalidation of a snapshot of this origin is durable."""
        for s in self.snapshots:
            if not s.invalid_durable.is_set():
                await s.invalid_durable.wait()

    def start_copy_job(self, pes: list[PendingException]) -> None:
        """Start kcopyd jobs for new pending exceptions: one per origin range,
        written to every snapshot that needs exactly that range.

        Copied exceptions go to `_copied`, and one committer task commits
        everything copied meanwhile: a task per job would cost more trio
        scheduling than a 4 KiB copy (small jobs share a thread hop in
        kcopyd for the same reason).
        """
        epoch = self.out_of_space.epoch
        if len(pes) == 1:
            pe = pes[0]
            pe.epoch = epoch
            s = pe.snapshot
            groups = {(pe.old * s.chunk_size, s.chunk_bytes(pe.old, pe.count)): pes}
        else:
            groups = {}
            for pe in pes:
                pe.epoch = epoch
                s = pe.snapshot
                key = (pe.old * s.chunk_size, s.chunk_bytes(pe.old, pe.count))
                groups.setdefault(key, []).append(pe)
        inline = self.inline_copies and self.kcopyd.throttle_percent == 100
        for (src, length), group in groups.items():
            if inline and length <= INLINE_COPY_MAX and self._copy_inline(src, length, group):
                continue
            for i in range(0, len(group), KCOPYD_MAX_REGIONS):
                job = group[i:i + KCOPYD_MAX_REGIONS]
                dests = [Region(pe.snapshot.store.cow_fd, pe.new * pe.snapshot.chunk_size, length)
                         for pe in job]
                self.kcopyd.copy_soon(self.nursery, Region(self.fd, src, length), dests,
                                      functools.partial(self._copy_done, job),
                                      chunks=max(pe.count for pe in job))

    def _copy_inline(self, src: int, length: int, pes: list[PendingException]) -> bool:
        """Copy a small origin range whose data is in the page cache right
        here, on the trio thread: a thread hop and a kcopyd job cost more
        than the copy (issue 17).  cachestat says whether the data is
        cached without starting a read (dmio.cache), and `os.preadv` with
        RWF_NOWAIT never blocks on what it missed; False (nothing done)
        when it is not cached, and the caller gives the copy to kcopyd.
        """
        if self._page_cache.cached(self.fd, src, length) is False:
            return False
        buf = bytearray(length)
        try:
            got = os.preadv(self.fd, (buf,), src, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                # This backing file cannot say: every copy goes to kcopyd.
                self.inline_copies = False
            return False
        if got != length:      # partly cached, or the file's end: kcopyd sorts it out
            return False
        copied = self._copied
        for pe in pes:
            err = None
            try:
                pwrite_all(pe.snapshot.store.cow_fd, buf, pe.new * pe.snapshot.chunk_size)
            except OSError as e:
                err = e.errno or errno.EIO
            copied.append((pe, err))
        self.copies_inline += 1
        if not self._committing:
            self._committing = True
            self.nursery.start_soon(self._committer)
        return True

    def _copy_done(self, pes: list[PendingException], res: CopyResult) -> None:
        """Queue copied (or failed) pending exceptions for the committer."""
        for i, pe in enumerate(pes):
            self._copied.append((pe, res.read_error or res.write_errors.get(i)))
        if not self._committing:
            self._committing = True
            self.nursery.start_soon(self._committer)

    async def _committer(self) -> None:
        """Commit what was copied, in rounds, until nothing is left.

        One round takes everything copied so far: per snapshot, one
        `complete_pending` (one group commit of its store), the snapshots
        in parallel.  Copies finishing during a round wait for the next,
        which is how commits batch under load.  An origin write's copy
        that found no room (its copy or its commit) waits for room
        instead (`_no_room`).
        """
        try:
            while self._copied:
                batch, self._copied = self._copied, []
                by_key: dict[tuple[Snapshot, int | None], list[PendingException]] = {}
                nospace: list[PendingException] = []
                for pe, err in batch:
                    if err in NOSPACE and not pe.writer and pe.snapshot.valid:
                        nospace.append(pe)
                    else:
                        by_key.setdefault((pe.snapshot, err), []).append(pe)

                async def complete(s: Snapshot, pes: list[PendingException], err: int | None) -> None:
                    nospace.extend(await s.complete_pending(pes, err))

                try:
                    if len(by_key) == 1:
                        (s, err), pes = next(iter(by_key.items()))
                        await complete(s, pes, err)
                    elif by_key:
                        async with trio.open_nursery() as n:
                            for (s, err), pes in by_key.items():
                                n.start_soon(complete, s, pes, err)
                    if nospace:
                        self.out_of_space.no_room(nospace)
                except Exception:  # a bug must not leave origin writes hanging, or kill the daemon
                    log.exception("committing %d exceptions of %s failed", len(batch), self.name)
                    unfinished = [pe for pe, _ in batch if not pe.finished]
                    for pe in unfinished:
                        pe.finish(errno.EIO)
                    self.cow_progressed(unfinished)
        finally:
            self._committing = False

    async def make_room(self, needed_by: str) -> bool:
        """`OutOfSpace.make_room`: give up one snapshot; False if none is left."""
        return await self.out_of_space.make_room(needed_by)

    @property
    def given_up(self) -> int:
        """Snapshots given up for space since the mount."""
        return self.out_of_space.given_up

    async def wait_progress(self) -> None:
        """Until some pending exceptions complete."""
        await self._progress.wait()

    def cow_progressed(self, finished: list[PendingException]) -> None:
        """Pending exceptions finished (`PendingException.finish`): wake
        the write-back cache's writes that waited for them, and every
        other waiter (`wait_progress`)."""
        self.writeback.kick(finished)
        self._progress.set()
        self._progress = trio.Event()

    # -- discard -----------------------------------------------------------------

    def unneeded(self, start: int, end: int, exclude: Snapshot | None = None) -> list[tuple[int, int]]:
        """The byte intervals [a, b) of [start, end) that no valid snapshot
        (but `exclude`) still reads from the origin."""
        free = [(start, min(end, self.size))]
        for s in self.snapshots:
            if s is exclude or not s.valid or not s.active:
                continue
            free = _intersect(free, s.copied(start, end))
            if not free:
                break
        return [(a, b) for a, b in free if a < b]

    async def discard(self, start: int, end: int) -> int:
        """Discard [start, end) of the origin: every snapshot first gets its
        copy of what is there (as for a write), then the range is punched
        out of the origin's file (it reads zeroes; the space is freed).
        dm's snapshot-origin target takes no discards; a linear target
        passes them down, which is what this is once the copies are made.

        The caller has the origin suspended (no write in flight, the
        write-back cache applied).  Returns the bytes punched.
        """
        end = min(end, self.size)
        if start >= end:
            return 0
        await self.copy_out([(start, end)])
        self.writeback.holes_punched()
        try:
            await trio.to_thread.run_sync(discard_ranges, self.fd, [(start, end - start)])
        except OSError as e:
            raise DmError(e.errno or errno.EIO, f"discard of {self.filename} failed: {e}") from None
        self.mtime_ns = time.time_ns()
        return end - start

    # -- name -----------------------------------------------------------------

    def rename(self, name: str, path: str | None = None) -> None:
        """The owner renamed this origin (and its files): the snapshots'
        names follow; `path` is the data file's new path (None: adopted
        backing, unchanged)."""
        super().rename(name)
        if path is not None:
            self.path = path
        self.writeback.name = self.filename
        for s in self.snapshots:
            s.rename_snapshot(s.snap_name)

    # -- size -----------------------------------------------------------------

    async def grow(self, size: int) -> None:
        """Grow the backing file (origin suspended by the caller)."""
        if self.backing is not None:
            raise DmError(errno.EINVAL, f"{self.filename} is backed by {self.backing}; grow that instead")
        await run_io(os.ftruncate, self.fd, size)
        self.size = size

    # -- reporting -------------------------------------------------------------

    def merge_state(self) -> str:
        """The value of user.dmfs.merge: none, merging D/T, paused D/T, failed: why."""
        return self.merge.describe() if self.merge is not None else "none"

    def info(self) -> dict:
        m = self.merge
        return {
            "name": self.name, "file": self.filename, "origin": "", "size": self.size,
            "chunk_size": None, "data_percent": None,
            "state": "active" if m is None else m.describe(),
            "merge": self.merge_state(),
            "snapshots": [s.snap_name for s in self.snapshots],
            "backing": self.backing, "readonly": False,
            "copy_throttle": self.kcopyd.throttle_percent,
            "cow_threshold": self.kcopyd.cow_threshold,
            # COW copies since the mount: made inline (small, cached) and
            # kcopyd jobs (merge steps too).
            "copies": {"inline": self.copies_inline, "kcopyd_jobs": self.kcopyd.jobs_done},
            "open": self.open_count, "allocated": self.allocated(),
            # The snapshot being merged has left the listing; what `dmfs
            # status` shows of it (and `dmfs merge --wait` follows) is here.
            "merging": None if m is None else {
                "snapshot": m.snap.snap_name, "state": m.state.value, "reason": m.reason,
                "done": m.done, "total": m.total, "chunk_size": m.snap.chunk_size,
                "snapshot_info": m.snap.info()},
        }

    def allocated(self) -> int:
        """Bytes the origin's data really occupies (st_blocks of its file;
        a block device counts whole)."""
        try:
            st = os.fstat(self.fd)
        except OSError:
            return 0
        return st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else self.size

    @property
    def tunables(self) -> OriginTunables:
        return OriginTunables(copy_throttle=self.kcopyd.throttle_percent,
                              cow_threshold=self.kcopyd.cow_threshold)

    def load_tunables(self, tunables: OriginTunables) -> None:
        """Apply saved tunables (at load, before any I/O)."""
        self.kcopyd.throttle_percent = tunables.copy_throttle
        self.kcopyd.cow_threshold = tunables.cow_threshold

    async def set_tunables(self, tunables: OriginTunables) -> None:
        """Apply new tunables and have the owner save them.

        Raises:
          whatever the owner's `TunablesChanged` handler raises (the new
          values stay in force for this mount).
        """
        self.load_tunables(tunables)
        await self.raise_event(TunablesChanged(self))


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The intersection of two sorted lists of disjoint intervals [x, y)."""
    out, i, j = [], 0, 0
    b = sorted(b)
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out
