"""Origins, snapshots and their targets: dm-snap.c in trio.

`Origin` is the kernel's `struct origin` plus the snapshot-origin device:
the origin's backing file and the list of snapshots that must get a copy
of an origin chunk before it is overwritten.  `Snapshot` is
`struct dm_snapshot`: its exception store, the table of completed
exceptions, the pending exceptions, and the tracked chunks.

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

Everything here runs on the trio thread: between two awaits nobody else
touches these tables, which is what the kernel's locks buy it.  The
"re-check after a sleeping allocation" rule of C-two holds because
allocation never awaits.
"""

from __future__ import annotations

import bisect
import errno
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from kcopyd import CopyResult, KcopydClient, Region
from store.base import SECTOR, ExceptionRun, ExceptionStore

from .device import MappedDevice, run_io
from .errors import DmError, SnapshotInvalid, StoreFull
from .exception_table import ExceptionTable
from .request import Flags, Op, Request
from .target import Target
from .writeback import WritebackCache

if TYPE_CHECKING:  # pragma: no cover
    from .pool import Pool

log = logging.getLogger(__name__)

# dm-kcopyd: at most this many destinations per job.
KCOPYD_MAX_REGIONS = 8
# COW copies up to this size share one thread hop with every other such
# copy queued at the time (DESIGN §4: never a hop per 4 KiB).
BATCH_COPY_MAX = 64 * 1024


class PendingException:
    """A chunk run being copied out of the origin into one snapshot.

    Invariants:
      * while pending, every chunk of [old, old+count) maps to this object
        in `snapshot.pending`, and to nothing in `snapshot.complete`;
      * `done` is set exactly once, after the exception was committed and
        moved to the completed table (or failed: `error` set).
    """

    __slots__ = ("snapshot", "old", "new", "count", "full", "done", "error")

    def __init__(self, snapshot: Snapshot, old: int, new: int, count: int, full: bool = False):
        self.snapshot = snapshot
        self.old = old
        self.new = new
        self.count = count
        # A full-chunk snapshot write fills the COW chunks itself: no copy.
        self.full = full
        self.done = trio.Event()
        self.error: int | None = None

    def __repr__(self) -> str:
        return f"<pe {self.snapshot.name} {self.old}+{self.count}->{self.new}>"

    async def wait(self) -> None:
        await self.done.wait()


class _TrackedChunks:
    """Chunk ranges of snapshot reads that were routed to the origin.

    An origin write must not land on such a chunk until these reads are
    done ("dm snapshot: track snapshot reads", "fix race during exception
    creation").  Few reads are in flight at once, so a list is enough.
    """

    def __init__(self) -> None:
        self._ranges: dict[int, tuple[int, int]] = {}
        self._next = 0
        self._changed = trio.Event()

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


class _PendingTable:
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


def _pending_pieces(pending: _PendingTable, start: int, end: int):
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


class Volume:
    """What the pool and the FUSE layer see of an origin or a snapshot."""

    is_snapshot = False

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = size
        self.open_count = 0
        self.mtime_ns = time.time_ns()
        self.device: MappedDevice

    @property
    def filename(self) -> str:
        return self.name + ".img"

    @property
    def readonly(self) -> bool:
        return False

    async def read(self, offset: int, length: int, *, checkpoint: bool = True) -> memoryview:
        """Read up to `length` bytes (fewer at the end of the volume).

        `checkpoint=False`: the caller has just yielded (`MappedDevice.submit`).
        """
        if offset >= self.size or length <= 0:
            return memoryview(b"")
        length = min(length, self.size - offset)
        req = Request(Op.READ, offset, length)
        await self.device.submit(req, checkpoint=checkpoint)
        return req.buf

    async def write(self, offset: int, data, fua: bool = False, *, checkpoint: bool = True) -> int:
        """Write `data` at `offset`; FUA makes it durable before returning.

        `checkpoint=False`: the caller has just yielded (`MappedDevice.submit`).

        Raises:
          DmError(ENOSPC): the write goes past the end of the volume.
        """
        length = len(data)
        if length == 0:
            return 0
        if offset + length > self.size:
            raise DmError(errno.ENOSPC, f"write at {offset}+{length} past the end of {self.filename} ({self.size} bytes)")
        req = Request(Op.WRITE, offset, length, data, Flags.FUA if fua else Flags.NONE)
        await self.device.submit(req, checkpoint=checkpoint)
        self.mtime_ns = time.time_ns()
        return length

    async def flush(self) -> None:
        await self.device.submit(Request(Op.FLUSH))

    def status(self) -> str:
        return self.device.table.status()

    def table(self) -> str:
        t = self.device.table
        return f"0 {self.size // SECTOR} {t.name} {t.table()}"


# ---------------------------------------------------------------------------
# snapshot


@dataclass
class SnapshotConfig:
    """What the pool persists about a snapshot besides its store."""
    store: str = "P"
    readonly: bool = False
    discard_zeroes_cow: bool = False
    discard_passdown_origin: bool = False
    created: float = field(default_factory=time.time)


class Snapshot(Volume):
    """One snapshot of an origin (dm's `struct dm_snapshot`).

    Invariants:
      * a chunk is in at most one of `complete` and `pending` (never two
        exceptions for one chunk);
      * `active` is False until the origin was suspended and this
        snapshot registered; an inactive snapshot triggers no COW;
      * once `valid` is False it stays False and all I/O fails with EIO.
    """

    is_snapshot = True

    def __init__(self, origin: Origin, snap_name: str, store: ExceptionStore | None,
                 size: int, config: SnapshotConfig):
        super().__init__(f"{origin.name}@{snap_name}", size)
        self.origin = origin
        self.snap_name = snap_name
        self.store = store
        self.config = config
        self.complete = ExceptionTable()
        self.pending = _PendingTable()
        self.tracked = _TrackedChunks()
        self.valid = store is not None and store.valid
        self.active = False
        self.merging = False
        if store is None:
            self.invalid_reason = "store could not be opened"
        else:
            self.invalid_reason = "" if self.valid else "marked invalid in its header"
        # Clear while the invalid flag is being persisted: origin writes
        # that needed this snapshot wait for it before their chunk changes.
        self.invalid_durable = trio.Event()
        self.invalid_durable.set()
        if store is not None:
            self.chunk_size = store.chunk_size
            self.complete = ExceptionTable.from_sorted(store.exceptions())
        else:
            self.chunk_size = 0
        self.device = MappedDevice(self.name, SnapshotTarget(self, readonly=config.readonly))

    @property
    def readonly(self) -> bool:
        return self.device.table.readonly

    @property
    def overflow(self) -> bool:
        return self.store is not None and self.store.overflow

    def chunk_range(self, start: int, end: int) -> tuple[int, int]:
        """Chunks [c0, c1) covering bytes [start, end), clipped to the snapshot's size."""
        end = min(end, self.size)
        cs = self.chunk_size
        return start // cs, -(-end // cs)

    def chunk_bytes(self, old: int, count: int) -> int:
        """Bytes of `count` chunks from `old` that lie inside the snapshot."""
        start = old * self.chunk_size
        return max(0, min(count * self.chunk_size, self.size - start))

    # -- invalidation -------------------------------------------------------

    def invalidate(self, reason: str) -> None:
        """Mark invalid now (I/O fails from here on) and persist it in the background."""
        if not self.valid:
            return
        self.valid = False
        self.invalid_reason = reason
        log.error("snapshot %s invalidated: %s", self.name, reason)
        if self.store is not None:
            self.invalid_durable = trio.Event()
            self.origin.nursery.start_soon(self._persist_invalid)

    async def _persist_invalid(self) -> None:
        # In the store's header and in the pool metadata: the store that
        # just failed may not be able to write its own header.
        try:
            await self.store.drop_snapshot()
        except Exception as e:  # the in-memory state is already invalid
            log.error("snapshot %s: could not persist the invalid flag in its store: %s", self.name, e)
        try:
            await self.origin.pool.save_origin(self.origin)
        except Exception as e:
            log.error("snapshot %s: could not persist the invalid flag in the pool: %s", self.name, e)
        finally:
            self.invalid_durable.set()

    # -- pending exceptions ----------------------------------------------------

    def new_pending(self, old: int, count: int, full: bool = False) -> list[PendingException]:
        """Allocate COW chunks for [old, old+count) as pending exceptions.

        Raises:
          StoreFull: the store could not give even one chunk.
        """
        out = []
        while count > 0:
            try:
                run = self.store.prepare_exception(count)
            except StoreFull:
                for pe in out:  # roll back: nothing half-done
                    self.store.abort_exception(ExceptionRun(pe.old, pe.new, pe.count))
                    self.pending.discard(pe)
                raise
            pe = PendingException(self, old, run.new, run.count, full)
            self.pending.add(pe)
            out.append(pe)
            old += run.count
            count -= run.count
        return out

    async def complete_pending(self, pes: list[PendingException], error: int | None) -> None:
        """Commit (or fail) pending exceptions whose COW data is in place.

        This is dm's complete_exception -> commit_exception ->
        pending_complete: the record is durable before the exception enters
        the completed table, and reads of the origin chunk still in flight
        drain before waiters (the held origin writes) are released.
        """
        if error is None and self.valid:
            try:
                await self.store.commit_exceptions([ExceptionRun(pe.old, pe.new, pe.count) for pe in pes])
            except DmError as e:
                error = e.errno
                self.invalidate(f"exception store commit failed: {e}")
        elif error is not None:
            self.invalidate(f"copy to the exception store failed: {os.strerror(error)}")
        if error is None and self.valid:
            for pe in pes:
                # New reads go to the COW copy from here on ("do not starve").
                self.complete.insert(pe.old, pe.new, pe.count)
            for pe in pes:
                await self.tracked.wait_clear(pe.old, pe.count)
        elif error is None:
            error = errno.EIO
        if not self.valid:
            # dm's __invalidate_snapshot writes the header before the held
            # origin writes are retried: the chunk must not change while a
            # crash could still bring this snapshot back as valid.
            await self.invalid_durable.wait()
        for pe in pes:
            self.pending.discard(pe)
            pe.error = error
            pe.done.set()
        self.origin.cow_progressed()

    # -- reporting ----------------------------------------------------------

    def info(self) -> dict:
        data_percent = None
        if self.store is not None and self.valid:
            a, t, m = self.store.usage()
            data_percent = round(100.0 * a / t, 2) if t else 0.0
        return {
            "name": self.name, "file": self.filename, "origin": self.origin.name,
            "size": self.size, "chunk_size": self.chunk_size,
            "cow_size": self.store.cow_size if self.store else 0,
            "store": self.config.store, "data_percent": data_percent,
            "state": self.state(), "readonly": self.readonly,
            "exceptions": len(self.complete), "pending": len(self.pending),
            "store_stats": self.store.stats() if self.store is not None else None,
        }

    def state(self) -> str:
        if not self.valid:
            return "Invalid"
        if self.overflow:
            return "Overflow"
        return "active"


class SnapshotTarget(Target):
    """The `snapshot` target: reads and writes of the snapshot volume."""

    name = "snapshot"

    def __init__(self, snap: Snapshot, readonly: bool = False):
        self.snap = snap
        self.readonly = readonly

    def status(self) -> str:
        s = self.snap
        if not s.valid or s.store is None:
            return "Invalid"
        return s.store.status_params()

    def table(self) -> str:
        s = self.snap
        if s.store is None:
            return f"{s.origin.path} - {s.config.store} 0"
        feats = [f for f in ("discard_zeroes_cow", "discard_passdown_origin") if getattr(s.config, f)]
        extra = f" {len(feats)} {' '.join(feats)}" if feats else ""
        return f"{s.origin.path} {s.store.cow_path} {s.store.table_params()}{extra}"

    async def flush(self) -> None:
        # dm: a flush to a snapshot goes to the COW device only.
        s = self.snap
        if s.store is not None and s.valid:
            await s.store.flush()

    async def map(self, req: Request) -> list[Request]:
        s = self.snap
        if not s.valid:
            raise SnapshotInvalid(f"{s.filename} is invalid ({s.invalid_reason})")
        if s.merging:
            # Handed over to the origin's snapshot-merge table.
            raise DmError(errno.EIO, f"{s.filename} is being merged into {s.origin.filename}")
        if req.op is Op.READ:
            return self._map_read(req)
        if self.readonly:
            raise DmError(errno.EROFS, f"{s.filename} is read-only")
        if s.overflow:
            raise DmError(errno.EIO, f"{s.filename} overflowed its exception store")
        return await self._map_write(req)

    def _map_read(self, req: Request) -> list[Request]:
        s = self.snap
        cs = s.chunk_size
        c0, c1 = s.chunk_range(req.offset, req.end)
        tokens = []
        clones = []
        origin_fd, cow_fd = s.origin.fd, s.store.cow_fd
        prev = None  # (clone_start, clone_end, fd, dest_start) being extended
        for old, new, n in s.complete.lookup_range(c0, c1 - c0):
            lo = max(req.offset, old * cs)
            hi = min(req.end, (old + n) * cs)
            if new is None:
                tokens.append(s.tracked.add(old, n))
                fd, dest = origin_fd, lo
            else:
                fd, dest = cow_fd, new * cs + (lo - old * cs)
            if prev and prev[2] == fd and prev[1] == lo and prev[3] + (prev[1] - prev[0]) == dest:
                prev[1] = hi
            else:
                if prev:
                    clones.append(req.clone(prev[0], prev[1] - prev[0]).remap(prev[2], prev[3]))
                prev = [lo, hi, fd, dest]
        if prev:
            clones.append(req.clone(prev[0], prev[1] - prev[0]).remap(prev[2], prev[3]))
        req.seal()
        req.target_ctx = tokens
        return clones

    async def _map_write(self, req: Request) -> list[Request]:
        s = self.snap
        cs = s.chunk_size
        c0, c1 = s.chunk_range(req.offset, req.end)
        # Chunks the write covers completely need no copy (C-full).
        full_lo = -(-req.offset // cs)
        full_hi = req.end // cs if req.end < s.size else c1
        while True:
            waits: list[PendingException] = []
            for gap, n in s.complete.missing(c0, c1 - c0):
                for lo, hi, pe in _pending_pieces(s.pending, gap, gap + n):
                    if pe is not None:
                        if not waits or waits[-1] is not pe:
                            waits.append(pe)
                        continue
                    # Only a partly written first or last chunk needs a copy.
                    for c in ((lo, hi - 1) if hi - lo > 1 else (lo,)):
                        if not (full_lo <= c < full_hi):
                            waits.extend(self._start_copy(c))
            if not waits:
                break
            for pe in waits:
                await pe.wait()
            if not s.valid:
                raise SnapshotInvalid(f"{s.filename} became invalid")
        # Everything not yet copied is now free and fully overwritten.
        full: list[PendingException] = []
        for gap, n in s.complete.missing(c0, c1 - c0):
            try:
                full.extend(s.new_pending(gap, n, full=True))
            except StoreFull:
                for pe in full:
                    s.store.abort_exception(ExceptionRun(pe.old, pe.new, pe.count))
                    s.pending.discard(pe)
                await self._store_full()
        req.target_ctx = full
        clones = []
        fd = s.store.cow_fd
        for old, new, n in s.complete.lookup_range(c0, c1 - c0):
            if new is None:
                # One of our full pending exceptions (possibly several runs).
                pos = old
                while pos < old + n:
                    pe = s.pending.get(pos)
                    run_end = min(old + n, pe.old + pe.count)
                    lo, hi = max(req.offset, pos * cs), min(req.end, run_end * cs)
                    clones.append(req.clone(lo, hi - lo).remap(fd, (pe.new + pos - pe.old) * cs + lo - pos * cs))
                    pos = run_end
            else:
                lo, hi = max(req.offset, old * cs), min(req.end, (old + n) * cs)
                clones.append(req.clone(lo, hi - lo).remap(fd, new * cs + (lo - old * cs)))
        req.seal()
        return clones

    def _start_copy(self, chunk: int) -> list[PendingException]:
        """A partial write to an uncopied chunk: copy the origin chunk first."""
        s = self.snap
        try:
            pes = s.new_pending(chunk, 1)
        except StoreFull:
            # Waiting on nothing; _map_write retries and _store_full decides.
            s.origin.nursery.start_soon(self._store_full_bg)
            return []
        s.origin.start_copy_job(pes)
        return pes

    async def _store_full_bg(self) -> None:
        try:
            await self._store_full()
        except DmError:
            pass

    async def _store_full(self) -> None:
        """A snapshot write found the store full: PO overflows, P invalidates."""
        s = self.snap
        if s.config.store == "PO":
            if not s.store.overflow:
                log.error("snapshot %s overflowed: unable to allocate exception", s.name)
                await s.store.set_overflow()
            raise DmError(errno.EIO, f"{s.filename}: exception store is full (Overflow)")
        s.invalidate("exception store is full")
        raise SnapshotInvalid(f"{s.filename}: exception store is full")

    async def end_io(self, req: Request) -> None:
        s = self.snap
        if req.op is Op.READ:
            for token in req.target_ctx or ():
                s.tracked.remove(token)
            return
        full = req.target_ctx
        if full:
            await s.complete_pending(full, req.error)


# ---------------------------------------------------------------------------
# origin


class Origin(Volume):
    """An origin volume and the snapshots that depend on it.

    Invariants:
      * `snapshots` is sorted by chunk size, largest first (dm's
        __insert_snapshot), and only changes while the origin device is
        suspended;
      * `fd` is the backing file, open O_RDWR, `size` bytes long.
    """

    def __init__(self, pool: Pool, name: str, path: str, fd: int, size: int, *,
                 backing: str | None, nursery: trio.Nursery):
        super().__init__(name, size)
        self.pool = pool
        self.path = path
        self.fd = fd
        self.backing = backing
        self.nursery = nursery
        self.snapshots: list[Snapshot] = []
        self.kcopyd = KcopydClient(batch_max=BATCH_COPY_MAX)
        self.config_lock = trio.Lock()
        self.meta_lock = trio.Lock()
        self.merge = None  # dmfs.snapshot_merge.Merge while a snapshot merges into this origin
        self.writeback = WritebackCache(self)
        # Copied pending exceptions waiting for the committer task.
        self._copied: list[tuple[PendingException, int | None]] = []
        self._committing = False
        self.device = MappedDevice(name, OriginTarget(self))

    def register(self, snap: Snapshot) -> None:
        """Add a snapshot (origin suspended): from now on writes COW into it."""
        self.snapshots.append(snap)
        self.snapshots.sort(key=lambda s: -s.chunk_size)
        snap.active = True

    def unregister(self, snap: Snapshot) -> None:
        snap.active = False
        self.snapshots.remove(snap)

    def split_boundary(self) -> int:
        """Origin writes split at the smallest chunk size of its snapshots."""
        sizes = [s.chunk_size for s in self.snapshots if s.active]
        return min(sizes) if sizes else 0

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
            for gap, n in s.complete.missing(c0, c1 - c0):
                for lo, hi, pe in _pending_pieces(s.pending, gap, gap + n):
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
                if not s.valid:
                    break
        if new:
            self.start_copy_job(new)
            waits.extend(new)
        return waits

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
        groups: dict[tuple[int, int], list[PendingException]] = {}
        for pe in pes:
            s = pe.snapshot
            key = (pe.old * s.chunk_size, s.chunk_bytes(pe.old, pe.count))
            groups.setdefault(key, []).append(pe)
        for (src, length), group in groups.items():
            for i in range(0, len(group), KCOPYD_MAX_REGIONS):
                job = group[i:i + KCOPYD_MAX_REGIONS]
                dests = [Region(pe.snapshot.store.cow_fd, pe.new * pe.snapshot.chunk_size, length)
                         for pe in job]
                self.kcopyd.copy_soon(self.nursery, Region(self.fd, src, length), dests,
                                      functools.partial(self._copy_done, job),
                                      chunks=max(pe.count for pe in job))

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
        which is how commits batch under load.
        """
        try:
            while self._copied:
                batch, self._copied = self._copied, []
                by_key: dict[tuple[Snapshot, int | None], list[PendingException]] = {}
                for pe, err in batch:
                    by_key.setdefault((pe.snapshot, err), []).append(pe)
                try:
                    if len(by_key) == 1:
                        (s, err), pes = next(iter(by_key.items()))
                        await s.complete_pending(pes, err)
                    else:
                        async with trio.open_nursery() as n:
                            for (s, err), pes in by_key.items():
                                n.start_soon(s.complete_pending, pes, err)
                except Exception:  # a bug must not leave origin writes hanging
                    log.exception("committing %d exceptions of %s failed", len(batch), self.name)
                    for pe, _ in batch:
                        if not pe.done.is_set():
                            pe.error = errno.EIO
                            pe.done.set()
                    self.cow_progressed()
        finally:
            self._committing = False

    def cow_progressed(self) -> None:
        """Pending exceptions completed: wake the write-back cache."""
        self.writeback.kick()

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
        return {
            "name": self.name, "file": self.filename, "origin": "", "size": self.size,
            "chunk_size": None, "data_percent": None,
            "state": "active" if self.merge is None else self.merge.describe(),
            "merge": self.merge_state(),
            "snapshots": [s.snap_name for s in self.snapshots],
            "backing": self.backing, "readonly": False,
            "copy_throttle": self.kcopyd.throttle_percent,
            "cow_threshold": self.kcopyd.cow_threshold,
        }

    def get_attr(self, name: str) -> str:
        if name == "copy_throttle":
            return str(self.kcopyd.throttle_percent)
        if name == "cow_threshold":
            return str(self.kcopyd.cow_threshold)
        raise DmError(errno.ENODATA, f"no attribute {name}")

    async def set_attr(self, name: str, value: str) -> None:
        try:
            v = int(value)
        except ValueError:
            raise DmError(errno.EINVAL, f"{name} takes a whole number, not {value!r}") from None
        if name == "copy_throttle":
            if not 1 <= v <= 100:
                raise DmError(errno.EINVAL, "copy_throttle is a percentage from 1 to 100")
            self.kcopyd.throttle_percent = v
        elif name == "cow_threshold":
            if v < 1:
                raise DmError(errno.EINVAL, "cow_threshold must be at least 1")
            self.kcopyd.cow_threshold = v
        else:
            raise DmError(errno.ENODATA, f"no attribute {name}")
        await self.pool.save_origin(self)


class OriginTarget(Target):
    """The `snapshot-origin` target."""

    name = "snapshot-origin"

    def __init__(self, origin: Origin):
        self.origin = origin

    def table(self) -> str:
        return self.origin.path

    async def postsuspend(self) -> None:
        # Acknowledged writes belong to the point in time of a suspend.
        await self.origin.writeback.drain()

    async def flush(self) -> None:
        wb = self.origin.writeback
        await wb.drain()
        await trio.to_thread.run_sync(os.fdatasync, self.origin.fd)
        err = wb.take_error()
        if err is not None:
            raise DmError(err, f"an acknowledged write to {self.origin.filename} failed")

    async def map(self, req: Request) -> list[Request]:
        o = self.origin
        wb = o.writeback
        if req.op is Op.READ and wb.entries:
            await wb.wait_clear(req.offset, req.end)
        elif req.op is Op.WRITE and (o.snapshots or wb.entries):
            waits = o.start_cow(req.offset, req.end)
            await o.wait_invalidations()
            deps = wb.overlapping(req.offset, req.end)
            if (waits or deps) and wb.enabled and not req.flags & Flags.FUA:
                # Acknowledge now, apply once the copy-outs are committed.
                data = req.buf if req.buf.readonly else bytes(req.buf)
                await wb.add(req.offset, data, waits)
                req.complete()
                return []
            for d in deps:
                await d.applied.wait()
            # Loop like retry_origin_bios: a write goes to the origin only
            # once no snapshot needs a copy of what it overwrites.
            while waits:
                for pe in waits:
                    await pe.wait()
                waits = o.start_cow(req.offset, req.end)
                await o.wait_invalidations()
        # Reads are not split; a write whose chunks are all copied is one
        # piece (its per-chunk clones would all map to the same place).
        c = req.clone(req.offset, req.length).remap(o.fd, req.offset)
        req.seal()
        return [c]
