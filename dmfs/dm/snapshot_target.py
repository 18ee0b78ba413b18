"""`SnapshotTarget`: the `snapshot` target, reads and writes of a snapshot volume.

A read maps each chunk to the COW store where the snapshot has an
exception, else to the origin (tracked, so that an origin write to that
chunk waits for the read).  A write to a chunk without an exception
first copies the origin chunk (unless the write covers it whole), as
dm-snap.c's snapshot_map does.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from dmio.space import NOSPACE
from store.base import ExceptionRun

from ..errors import DmError, SnapshotInvalid, StoreFull
from .pending import PendingException
from .request import Op, Request
from .target import Target

if TYPE_CHECKING:  # pragma: no cover
    from .snapshot import Snapshot

log = logging.getLogger(__name__)


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
        for old, new, n in s.exceptions.lookup_range(c0, c1 - c0):
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
        # Chunks the write covers completely need no copy (dm-snap.c's
        # io_overlaps_chunk and start_full_bio).
        full_lo = -(-req.offset // cs)
        full_hi = req.end // cs if req.end < s.size else c1
        while True:
            waits: list[PendingException] = []
            for lo, hi, pe in s.uncopied(c0, c1):
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
            if any(pe.writer and pe.error in NOSPACE for pe in waits):
                # A write to a snapshot gives up nothing for room (origin.py).
                raise DmError(errno.ENOSPC, f"{s.filename}: no room on the pool's filesystem "
                              "to copy the chunk this write changes")
        # Everything not yet copied is now free and fully overwritten.
        full: list[PendingException] = []
        for gap, n in s.exceptions.missing(c0, c1 - c0):
            try:
                full.extend(s.new_pending(gap, n, full=True, writer=True))
            except StoreFull:
                for pe in full:
                    s.store.abort_exception(ExceptionRun(pe.old, pe.new, pe.count))
                    s.pending.discard(pe)
                await self._store_full()
        req.target_ctx = full
        clones = []
        fd = s.store.cow_fd
        for old, new, n in s.exceptions.lookup_range(c0, c1 - c0):
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
            pes = s.new_pending(chunk, 1, writer=True)
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
        if s.config.store.overflows:
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
            if req.error is None:
                # The data is in the COW file, but its record is not
                # (no room: ENOSPC, the chunks went back; or the store
                # failed and the snapshot is invalid): the write failed.
                req.error = next((pe.error for pe in full if pe.error is not None), None)


