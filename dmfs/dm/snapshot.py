"""`Snapshot`: one snapshot of an origin (dm's `struct dm_snapshot`).

A snapshot owns its exception store, the table of completed exceptions
(`exceptions`), the pending exceptions being copied into it, and the
snapshot reads still going to the origin (`tracked`).  Its own device
maps reads and writes of the snapshot volume (`SnapshotTarget`); origin
writes reach it through `Origin.start_cow`.

Everything here runs on the trio thread: between two awaits nobody else
touches these tables, which is what the kernel's locks buy it.  The
kernel's "re-check after a sleeping allocation" rule holds because
allocation never awaits.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from dmio import discard_ranges
from dmio.space import NOSPACE
from store import ExceptionRun, ExceptionStore, StoreType

from ..errors import DmError, StoreFull
from .device import MappedDevice
from .events import SnapshotInvalidated
from .exception_table import ExceptionTable
from .pending import PendingException, PendingTable, TrackedChunks, pending_pieces
from .snapshot_target import SnapshotTarget
from .volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    from .origin import Origin

log = logging.getLogger(__name__)


# lvm.conf's snapshot_autoextend_threshold: 100 turns autoextend off.
AUTOEXTEND_OFF = 100


@dataclass
class SnapshotConfig:
    """What the pool persists about a snapshot besides its store.

    reserve: the whole COW store was allocated at creation (fallocate), so
      its copies never need new space: the snapshot is never given up for
      lack of space (origin.py, "Out of space").
    autoextend_threshold, autoextend_percent: lvm.conf's
      snapshot_autoextend_*: grow cow_size by this percentage once the
      store is this full (100: never).  The pool acts on them.
    """
    store: StoreType = StoreType.P
    readonly: bool = False
    discard_zeroes_cow: bool = False
    discard_passdown_origin: bool = False
    created: float = field(default_factory=time.time)
    reserve: bool = False
    autoextend_threshold: int = AUTOEXTEND_OFF
    autoextend_percent: int = 20


class Snapshot(Volume):
    """One snapshot of an origin (dm's `struct dm_snapshot`).

    Invariants:
      * a chunk is in at most one of `exceptions` and `pending` (never two
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
        self.exceptions = ExceptionTable()
        self.pending = PendingTable()
        self.tracked = TrackedChunks()
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
        # Once invalid_durable is set: whether anything on disk says so
        # (the store's header, the owner's metadata, or the store's log
        # deleted), so that its COW space may be given back.
        self.invalid_on_disk = not self.valid
        if store is not None:
            self.chunk_size = store.chunk_size
            self.exceptions = ExceptionTable.from_sorted(store.exceptions())
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

    def uncopied(self, c0: int, c1: int) -> Iterator[tuple[int, int, PendingException | None]]:
        """Pieces (lo, hi, pe) of chunks [c0, c1) without a completed
        exception: `pe` is the pending exception copying that piece, or
        None where nothing is being copied yet."""
        for gap, n in self.exceptions.missing(c0, c1 - c0):
            yield from pending_pieces(self.pending, gap, gap + n)

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
        # In the store's header, and through the event in the owner's
        # metadata: the store that just failed may not be able to write
        # its own header.
        try:
            await self.store.drop_snapshot()
        except Exception as e:  # the in-memory state is already invalid
            log.error("snapshot %s: could not persist the invalid flag in its store: %s", self.name, e)
        try:
            saved = await self.origin.raise_event(SnapshotInvalidated(self, self.invalid_reason))
            self.invalid_on_disk = saved or self.store.invalid_recorded or await self._forget_store()
        finally:
            self.invalid_durable.set()

    async def _forget_store(self) -> bool:
        """Neither the store's header nor the owner's metadata took the
        invalid flag (a failing disk; on a full filesystem a header is
        rewritten in place and needs no room): delete the store's log,
        which takes no room either.  A snapshot whose store is missing
        opens as Invalid, so a crash cannot bring it back as valid."""
        path = getattr(self.store, "log_path", None)
        if path is None:
            return False
        try:
            await trio.to_thread.run_sync(os.unlink, path)
            dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            log.error("snapshot %s: could not record its invalidation anywhere, and could not "
                      "delete %s: %s; after a crash it may come back valid", self.name, path, e)
            return False
        log.error("snapshot %s: its invalidation could be recorded neither in its store nor in "
                  "the pool: deleted %s instead (it stays listed as Invalid)", self.name, path)
        return True

    # -- pending exceptions ----------------------------------------------------

    def new_pending(self, old: int, count: int, full: bool = False,
                    writer: bool = False) -> list[PendingException]:
        """Allocate COW chunks for [old, old+count) as pending exceptions
        (`writer`: for a write to this snapshot, see PendingException).

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
            pe = PendingException(self, old, run.new, run.count, full, writer)
            self.pending.add(pe)
            out.append(pe)
            old += run.count
            count -= run.count
        return out

    async def complete_pending(self, pes: list[PendingException],
                               error: int | None) -> list[PendingException]:
        """Commit (or fail) pending exceptions whose COW data is in place.

        This is dm's complete_exception -> commit_exception ->
        pending_complete: the record is durable before the exception enters
        the completed table, and reads of the origin chunk still in flight
        drain before waiters (the held origin writes) are released.

        Out of space (ENOSPC, EDQUOT: from the copy, the snapshot write
        or the commit) the snapshot is not invalidated for a write to
        the snapshot itself: its chunks go back and the writer gets
        ENOSPC.  The origin's copies that could not be committed for
        lack of space are returned, still pending: the origin copies
        them again once there is room (origin.py, "Out of space").
        """
        retry: list[PendingException] = []
        if error is None and self.valid:
            try:
                await self.store.commit_exceptions([ExceptionRun(pe.old, pe.new, pe.count) for pe in pes])
            except DmError as e:
                error = e.errno
                if e.errno in NOSPACE and self.valid:
                    # Nothing was recorded and the store is still valid.
                    retry = [pe for pe in pes if not pe.writer]
                    pes = [pe for pe in pes if pe.writer]
                else:
                    self.invalidate(f"exception store commit failed: {e}")
        elif error is not None and not (error in NOSPACE and all(pe.writer for pe in pes)):
            self.invalidate(f"copy to the exception store failed: {os.strerror(error)}")
        if error is None and self.valid:
            insert = self.exceptions.insert
            for pe in pes:
                # New reads go to the COW copy from here on ("do not starve").
                insert(pe.old, pe.new, pe.count)
            if self.tracked:
                for pe in pes:
                    await self.tracked.wait_clear(pe.old, pe.count)
        elif error is None:
            error = errno.EIO
        if not self.valid:
            # dm's __invalidate_snapshot writes the header before the held
            # origin writes are retried: the chunk must not change while a
            # crash could still bring this snapshot back as valid.
            await self.invalid_durable.wait()
        elif error is not None:
            # A snapshot write that found no room: its chunks go back.
            for pe in pes:
                self.store.abort_exception(ExceptionRun(pe.old, pe.new, pe.count))
        discard = self.pending.discard
        for pe in pes:
            discard(pe)
            pe.finish(error)
        self.origin.cow_progressed(pes)
        return retry

    # -- discard (dm-snap.c's discard_zeroes_cow, discard_passdown_origin) --------

    def cow_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """(offset, length) in the COW file of every byte of [start, end)
        this snapshot has its own copy of (a completed exception)."""
        cs = self.chunk_size
        end = min(end, self.size)
        c0, c1 = self.chunk_range(start, end)
        out = []
        for old, new, n in self.exceptions.lookup_range(c0, c1 - c0):
            if new is None:
                continue
            lo, hi = max(start, old * cs), min(end, (old + n) * cs)
            out.append((new * cs + lo - old * cs, hi - lo))
        return out

    def copied(self, start: int, end: int) -> list[tuple[int, int]]:
        """The byte intervals [a, b) of [start, end) this snapshot no longer
        reads from the origin: completed exceptions, and all past its size."""
        cs = self.chunk_size
        out = []
        c0, c1 = self.chunk_range(start, end)
        for old, new, n in self.exceptions.lookup_range(c0, c1 - c0):
            if new is not None:
                out.append((max(start, old * cs), min(end, (old + n) * cs)))
        if end > self.size:
            out.append((max(start, self.size), end))
        return [(a, b) for a, b in out if a < b]

    async def discard(self, start: int, end: int, passdown: bool) -> tuple[int, int]:
        """Discard [start, end) of the snapshot, as dm-snap.c does with
        discard_zeroes_cow: every byte the snapshot has its own copy of is
        punched out of the COW file (it reads zeroes, and the space is
        freed; the exception stays, as dm's zero_exception keeps it); bytes
        still shared with the origin are left as they are, unless
        `passdown` (discard_passdown_origin): then the origin range is
        punched too, but only where no other snapshot still reads it
        (dm passes the discard down unconditionally, which would change
        the other snapshots' point-in-time data).

        The caller has this snapshot (and, with `passdown`, the origin)
        suspended, so no write is in flight and no copy is pending.

        Returns:
          (bytes punched from the COW file, bytes punched from the origin).
        """
        cow = self.cow_ranges(start, end)
        origin: list[tuple[int, int]] = []
        if passdown:
            origin = [(a, b - a) for a, b in self.origin.unneeded(start, end, exclude=self)]
        cow_fd, origin_fd = self.store.cow_fd, self.origin.fd

        if origin:
            self.origin.writeback.holes_punched()

        def work() -> None:
            discard_ranges(cow_fd, cow)
            discard_ranges(origin_fd, origin)

        try:
            await trio.to_thread.run_sync(work)
        except OSError as e:
            raise DmError(e.errno or errno.EIO, f"discard of {self.filename} failed: {e}") from None
        self.mtime_ns = time.time_ns()
        return sum(n for _, n in cow), sum(n for _, n in origin)

    def rename_snapshot(self, snap_name: str) -> None:
        """The owner renamed this snapshot (or its origin) and its store files."""
        self.snap_name = snap_name
        self.rename(f"{self.origin.name}@{snap_name}")

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
            "exceptions": len(self.exceptions), "pending": len(self.pending),
            "store_stats": self.store.stats() if self.store is not None else None,
            "open": self.open_count, "allocated": self.allocated(),
            "invalid_reason": None if self.valid else self.invalid_reason,
            "usage": list(self.store.usage()) if self.store is not None and self.valid else None,
            "features": [f for f in ("discard_zeroes_cow", "discard_passdown_origin")
                         if getattr(self.config, f)],
        }

    def allocated(self) -> int:
        """Bytes the snapshot's own store really occupies: its COW data
        file and its log (st_blocks), not the origin data it shares."""
        total = 0
        for fd in (getattr(self.store, "cow_fd", -1), getattr(self.store, "log_fd", -1)):
            if fd is not None and fd >= 0:
                try:
                    total += os.fstat(fd).st_blocks * 512
                except OSError:
                    pass
        return total

    def state(self) -> str:
        if not self.valid:
            return "Invalid"
        if self.overflow:
            return "Overflow"
        return "active"


